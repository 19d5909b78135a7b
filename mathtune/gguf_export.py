"""A merged Hugging Face model dir -> one GGUF file for llama.cpp / Ollama / LM Studio.

The ``gguf`` package does the format: ``GGUFWriter`` (header, metadata, tensor data),
``get_tensor_name_map`` (``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q``), ``SpecialVocab``
(merges, special-token ids, chat template read from the saved tokenizer files) and
``quants.quantize`` (f16, q8_0). mathtune's own part is what llama.cpp's ``convert_hf_to_gguf.py``
decides per architecture, written so that transformers' ``from_pretrained(..., gguf_file=...)`` reads
back exactly this model (checked by tests/test_export.py):

  names    the gguf name map, plus ``lm_head`` -> ``output`` only when the head is not tied to the
           embedding (the reader infers ``tie_word_embeddings`` from ``output.weight``'s absence)
  Llama    q/k rows permuted into llama.cpp's rotary layout (transformers' ``LlamaTensorProcessor``
           undoes exactly this permutation on load); Qwen2 is written as is
  config   the keys transformers' GGUF reader maps back: context length, sizes, head counts,
           rope base, RMS eps, ``rope.dimension_count`` (= head_dim for Llama)
  tokens   byte-level BPE: the vocabulary by id (padded to the embedding's rows), token types
           (control = special added token, user-defined = other added token), the merges, the
           pre-tokenizer name llama.cpp splits text with, whether BOS/EOS are added, and EOS/EOT =
           the end-of-turn token the model was trained to stop on
  types    1-D tensors (norms, biases) stay f32, as llama.cpp keeps them; q8_0 needs rows that are a
           multiple of its 32-value block, other tensors fall back to f16 (also llama.cpp's rule)

The file is written under a temporary name and renamed when complete: no half-written GGUF.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
from pathlib import Path

from mathtune.errors import MathtuneError
from mathtune.families import gguf_layout, gguf_model_types

GGUF_TYPES = ("f32", "f16", "q8_0")
# which model types are written, and how: mathtune/families.py (GGUFLayout)

# --- the pre-tokenizer name (tokenizer.ggml.pre): which split regex llama.cpp applies before BPE.
# llama.cpp refuses to load an unknown name ("unknown pre-tokenizer type"), and a known but wrong
# name splits text differently from the tokenizer the model was trained with. mathtune decides it
# as llama.cpp's convert_hf_to_gguf.py does (get_vocab_base_pre): encode CHECK_TEXT, hash the ids,
# look the hash up. The hashes are those of that script's table for the tokenizers of the families
# mathtune/families.py writes; a tokenizer not in it (a custom or retrained vocabulary) is named by
# the shape of its tokenizer.json pre-tokenizer, and anything else is an error, never a guess.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis "
    "concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
KNOWN_TOKENIZERS = {  # sha256 of str(tokenizer.encode(CHECK_TEXT)) -> llama.cpp pre-tokenizer name
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / 2 / 2.5 / 3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3 embedding vocab
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}
# the names above as llama.cpp's src/llama-vocab.cpp accepts them (it throws on any other)
LLAMA_CPP_PRE_TOKENIZERS = frozenset({"gpt-2", "smollm", "qwen2", "llama-bpe", "tekken"})


def _byte_level_regex(pre: dict | None) -> bool:
    # GPT-2's split regex inside ByteLevel (llama.cpp "gpt-2")
    return bool(pre) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def _digits_then_byte_level(pre: dict | None) -> bool:
    # SmolLM's hub tokenizer: single digits, then GPT-2's regex (llama.cpp "smollm")
    items = (pre or {}).get("pretokenizers") or []
    return ((pre or {}).get("type") == "Sequence" and len(items) == 2 and items[0].get("type") == "Digits"
            and items[0].get("individual_digits") and _byte_level_regex(items[1]))


@functools.lru_cache(maxsize=1)
def _qwen2_split_regex() -> str:
    """Qwen2's split regex, read off the pre-tokenizer transformers' public ``Qwen2Tokenizer`` builds
    (an empty vocabulary is enough: the pre-tokenizer does not depend on it)."""
    from transformers import Qwen2Tokenizer

    pre = json.loads(Qwen2Tokenizer().backend_tokenizer.to_str())["pre_tokenizer"]
    return pre["pretokenizers"][0]["pattern"]["Regex"]


def _qwen2_split(pre: dict | None) -> bool:
    # Qwen2's hub tokenizer: its own split regex, then byte-level without GPT-2's (llama.cpp "qwen2")
    items = (pre or {}).get("pretokenizers") or []
    return ((pre or {}).get("type") == "Sequence" and len(items) == 2 and items[0].get("type") == "Split"
            and items[0].get("pattern", {}).get("Regex") == _qwen2_split_regex()
            and items[1].get("type") == "ByteLevel" and not items[1].get("use_regex", True))


# every name these give must be in LLAMA_CPP_PRE_TOKENIZERS (tests/test_export.py checks it)
PRE_TOKENIZER_SHAPES = (("gpt-2", _byte_level_regex), ("smollm", _digits_then_byte_level), ("qwen2", _qwen2_split))


def check_supported(config, *, allow_unverified: bool = False) -> str:
    """The gguf architecture name for a transformers config, or a one-line error.

    Besides the architecture, every setting the GGUF metadata cannot carry must be at the value
    llama.cpp and transformers' reader assume, else the file would load as a different model.
    """
    model_type = getattr(config, "model_type", None)
    family = gguf_layout(model_type)
    if family is None:
        raise MathtuneError(f"GGUF export does not support {model_type} yet; export safetensors instead "
                            f"(without --gguf); supported: {', '.join(gguf_model_types())}")
    if not family.verified and not allow_unverified:
        raise MathtuneError(f"GGUF export of {model_type} is not verified against llama.cpp yet (the build mathtune "
                            "checks with lacks it); export safetensors instead (without --gguf) and convert with "
                            "llama.cpp's own convert_hf_to_gguf.py")
    arch = family.arch
    problems = []
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act != family.hidden_act:
        problems.append(f"activation {act!r} (GGUF {arch} assumes {family.hidden_act})")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope scaling {rope.get('rope_type')!r} (only plain rotary embeddings are written)")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append(f"partial_rotary_factor {rope['partial_rotary_factor']}")
    problems += [f"{name}=True" for name in family.no_bias if getattr(config, name, False)]
    if model_type in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
        problems.append("use_sliding_window=True")
    if model_type == "gemma2":
        head_dim = config.head_dim
        # llama.cpp scales Gemma 2 attention by 1/sqrt(head_dim) (except its 27B size): the config must agree
        if float(config.query_pre_attn_scalar) != float(head_dim):
            problems.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} != head_dim {head_dim}")
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)]
        if list(getattr(config, "layer_types", expected)) != expected:
            problems.append("layer_types other than Gemma 2's alternating sliding/full attention")
    if problems:
        raise MathtuneError(f"--gguf: this {model_type} model cannot be written to GGUF exactly: "
                            f"{'; '.join(problems)}; export safetensors instead (without --gguf)")
    return arch


def _context_length(config) -> int:
    """max_position_embeddings, capped at a sliding window the arch's llama.cpp graph does not
    apply (Mistral, Phi-3): below the window, sliding-window attention equals full attention."""
    length = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if window and config.model_type in ("mistral", "phi3"):
        length = min(length, int(window))
    return length


def _rope_theta(config) -> float:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise MathtuneError("--gguf: the model config has no rope_theta: cannot write llama.cpp's rope.freq_base")
    return float(theta)


def permute_qk(weight, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's rotary layout for Llama q/k rows (its ``LlamaModel.permute``): within each head,
    the two halves [x0..x(d/2-1) | y0..] become interleaved pairs. transformers' reader applies the
    inverse (``_reverse_permute_weights``), so the round trip is exact."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    # rows = n_head × 2 × (head_dim / 2): swap the last two factors
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def tokenizer_hash(tokenizer) -> str:
    """llama.cpp's fingerprint of a tokenizer: sha256 of the ids it encodes CHECK_TEXT to."""
    return hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def pre_tokenizer_name(tokenizer) -> str:
    """The ``tokenizer.ggml.pre`` name llama.cpp loads this tokenizer with (see KNOWN_TOKENIZERS)."""
    name = KNOWN_TOKENIZERS.get(tokenizer_hash(tokenizer))
    if name is None:
        pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer")
        name = next((shape for shape, matches in PRE_TOKENIZER_SHAPES if matches(pre)), None)
        if name is None:
            raise MathtuneError(
                f"--gguf: the tokenizer (pre-tokenizer {(pre or {}).get('type')}, hash {tokenizer_hash(tokenizer)[:12]}) "
                f"is not one mathtune can name for llama.cpp (known: {', '.join(sorted(LLAMA_CPP_PRE_TOKENIZERS))}); "
                f"export safetensors instead (without --gguf)"
            )
    return name


def _token_table(tokenizer, n_vocab: int):
    """(tokens, types) by id, ``n_vocab`` long (the embedding may have more rows than the tokenizer)."""
    from gguf import TokenType

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise MathtuneError(f"--gguf: tokenizer model {model.get('type')} is not byte-level BPE: export without --gguf")
    if len(tokenizer) > n_vocab:
        raise MathtuneError(f"--gguf: the tokenizer has {len(tokenizer)} tokens but the embedding only {n_vocab} rows")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for index in range(n_vocab):
        if index not in by_id:  # unused embedding rows (Qwen2.5 pads 151665 tokens to 151936 rows)
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        if index in added:
            types.append(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    return tokens, types


def _adds_token(tokenizer, token_id: int | None, where: str) -> bool:
    """Whether encoding text adds ``token_id`` (BOS at the start / EOS at the end) by itself."""
    if token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(ids) == len(plain):
        return False
    return (ids[0] if where == "start" else ids[-1]) == token_id


def write_gguf(model, tokenizer, tokenizer_dir: str | os.PathLike, path: str | os.PathLike, gguf_type: str,
               *, eot_token_id: int, name: str, allow_unverified: bool = False) -> Path:
    """Write ``model`` (a plain fp32 transformers model, LoRA already merged) to ``path``.

    ``tokenizer_dir`` holds the saved tokenizer files (``SpecialVocab`` reads merges, special ids and
    the chat template from there). ``allow_unverified`` writes a family not yet verified against
    llama.cpp (``make check-gguf`` does, to try each one); exports never pass it.
    """
    import gguf
    import numpy as np
    import torch

    if gguf_type not in GGUF_TYPES:
        raise MathtuneError(f"--gguf-type {gguf_type}: use one of {', '.join(GGUF_TYPES)}")
    config = model.config
    arch_name = check_supported(config, allow_unverified=allow_unverified)
    family = gguf_layout(config.model_type)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_layers = config.num_hidden_layers
    n_head, n_head_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    embed = model.get_input_embeddings().weight
    n_vocab = embed.shape[0]
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed

    path = Path(path)
    writer = gguf.GGUFWriter(path=None, arch=arch_name)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(_context_length(config))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(n_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(n_head_kv))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(n_vocab))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim != config.hidden_size // n_head:  # Qwen3, Gemma 2, Mistral Nemo: heads not hidden/n_head wide
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    if config.model_type == "phi3":  # llama.cpp's phi3 loader requires the key; a window >= the context is full attention
        writer.add_sliding_window(int(getattr(config, "sliding_window", None) or _context_length(config)))
    if config.model_type == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
        writer.add_sliding_window(int(config.sliding_window))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # tokenizer
    tokens, types = _token_table(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(Path(tokenizer_dir), load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise MathtuneError(f"--gguf: no BPE merges found in {tokenizer_dir}/tokenizer.json")
    # stop where training stopped: EOS (and EOT, which llama.cpp also ends a turn on) = end-of-turn
    special.special_token_ids["eos"] = eot_token_id
    if tokenizer.pad_token_id is not None:
        special.special_token_ids["pad"] = tokenizer.pad_token_id
    special.add_special_token["bos"] = _adds_token(tokenizer, tokenizer.bos_token_id, "start")
    special.add_special_token["eos"] = _adds_token(tokenizer, tokenizer.eos_token_id, "end")
    if getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    writer.add_eot_token_id(eot_token_id)
    writer.add_add_space_prefix(False)

    # tensors
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    target = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]  # 32 values per q8_0 block
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # tied: the reader re-ties the head to token_embd when output.weight is absent
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise MathtuneError(f"--gguf: tensor {hf_name} has no GGUF name for {arch_name}: cannot write it")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if family.permute_qk and hf_name.endswith("q_proj.weight"):
            data = permute_qk(data, n_head, n_head)
        elif family.permute_qk and hf_name.endswith("k_proj.weight"):
            data = permute_qk(data, n_head, n_head_kv)
        elif family.norm_plus_one and hf_name.endswith("norm.weight"):
            data = data + 1.0
        qtype = target
        if data.ndim <= 1:
            qtype = gguf.GGMLQuantizationType.F32
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % block:
            qtype = gguf.GGMLQuantizationType.F16
        packed = gguf.quants.quantize(np.ascontiguousarray(data), qtype)
        writer.add_tensor(gguf_name, packed, raw_dtype=qtype)

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    return path


def modelfile_text(tokenizer, gguf_name: str, eot_token: str) -> str:
    """An Ollama Modelfile for the GGUF beside it: mathtune's own prompt, its stop token, greedy.

    Ollama templates are Go templates, not the Jinja of ``tokenizer.chat_template``; a general
    translation does not exist. mathtune asks single questions, so the template is the rendered
    prompt of one question with ``{{ .Prompt }}`` in its place: exactly what training and eval saw.
    """
    from mathtune.data import format_prompt

    marker = "\u2063MATHTUNE_QUESTION\u2063"
    rendered = format_prompt(tokenizer, marker)
    if rendered.count(marker) != 1:
        raise MathtuneError("--gguf: the chat template does not place the question exactly once: cannot write a Modelfile")
    before, after = rendered.split(marker)

    def literal(text: str) -> str:
        # Go template text cannot hold "{{" literally, and """ would end the Modelfile string
        if '"""' in text:
            raise MathtuneError('--gguf: the prompt template contains """, which an Ollama Modelfile cannot quote')
        return text.replace("{{", '{{ "{{" }}')

    template = f"{literal(before)}{{{{ .Prompt }}}}{literal(after)}{{{{ .Response }}}}{literal(eot_token)}"
    stop = eot_token.replace("\\", "\\\\").replace('"', '\\"')
    return (
        "# Ollama Modelfile written by `mathtune export`: ollama create NAME -f Modelfile\n"
        f"FROM ./{gguf_name}\n"
        f'TEMPLATE """{template}"""\n'
        f'PARAMETER stop "{stop}"\n'
        "# greedy decoding, as mathtune evaluates\n"
        "PARAMETER temperature 0\n"
    )
