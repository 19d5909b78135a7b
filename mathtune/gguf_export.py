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

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from mathtune.errors import MathtuneError

GGUF_TYPES = ("f32", "f16", "q8_0")
# transformers model_type -> gguf architecture name (gguf.MODEL_ARCH_NAMES value)
SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}


@dataclass(frozen=True)
class PreTokenizer:
    """A tokenizer.json pre-tokenizer shape and the name llama.cpp knows it by."""

    name: str
    matches: object  # callable(pre_tokenizer_json) -> bool


def _byte_level_regex(pre: dict | None) -> bool:
    # GPT-2's split regex inside ByteLevel: what transformers' GGUF reader rebuilds for "gpt2"/"smollm"
    return bool(pre) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def _digits_then_byte_level(pre: dict | None) -> bool:
    # SmolLM's hub tokenizer: single digits, then GPT-2's regex (llama.cpp's "smollm")
    items = (pre or {}).get("pretokenizers") or []
    return ((pre or {}).get("type") == "Sequence" and len(items) == 2 and items[0].get("type") == "Digits"
            and items[0].get("individual_digits") and _byte_level_regex(items[1]))


def _qwen2_split(pre: dict | None) -> bool:
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    items = (pre or {}).get("pretokenizers") or []
    return ((pre or {}).get("type") == "Sequence" and len(items) == 2 and items[0].get("type") == "Split"
            and items[0].get("pattern", {}).get("Regex") == PRETOKENIZE_REGEX
            and items[1].get("type") == "ByteLevel" and not items[1].get("use_regex", True))


PRE_TOKENIZERS = (
    PreTokenizer("gpt2", _byte_level_regex),
    PreTokenizer("smollm", _digits_then_byte_level),
    PreTokenizer("qwen2", _qwen2_split),
)


def check_supported(config) -> str:
    """The gguf architecture name for a transformers config, or a one-line error.

    Besides the architecture, every setting the GGUF metadata cannot carry must be at the value
    llama.cpp and transformers' reader assume, else the file would load as a different model.
    """
    model_type = getattr(config, "model_type", None)
    arch = SUPPORTED_ARCHITECTURES.get(model_type)
    if arch is None:
        raise MathtuneError(
            f"--gguf: architecture '{model_type}' is not supported: mathtune writes GGUF for "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))} (SmolLM2, Qwen2.5); export without --gguf"
        )
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} (GGUF {arch} assumes silu)")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope scaling {rope.get('rope_type')!r} (only plain rotary embeddings are written)")
    if arch == "llama":
        for name in ("attention_bias", "mlp_bias"):
            if getattr(config, name, False):
                problems.append(f"{name}=True")
    if arch == "qwen2" and getattr(config, "use_sliding_window", False):
        problems.append("use_sliding_window=True")
    if problems:
        raise MathtuneError(f"--gguf: this {model_type} model cannot be written to GGUF exactly: "
                            f"{'; '.join(problems)}; export without --gguf")
    return arch


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


def pre_tokenizer_name(tokenizer) -> str:
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer")
    for candidate in PRE_TOKENIZERS:
        if candidate.matches(pre):
            return candidate.name
    kind = (pre or {}).get("type")
    raise MathtuneError(
        f"--gguf: the tokenizer's pre-tokenizer ({kind}) is not one mathtune can name for llama.cpp; "
        f"supported: {', '.join(p.name for p in PRE_TOKENIZERS)} (byte-level BPE as in SmolLM2 / Qwen2.5)"
    )


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
               *, eot_token_id: int, name: str) -> Path:
    """Write ``model`` (a plain fp32 transformers model, LoRA already merged) to ``path``.

    ``tokenizer_dir`` holds the saved tokenizer files (``SpecialVocab`` reads merges, special ids and
    the chat template from there).
    """
    import gguf
    import numpy as np
    import torch

    if gguf_type not in GGUF_TYPES:
        raise MathtuneError(f"--gguf-type {gguf_type}: use one of {', '.join(GGUF_TYPES)}")
    config = model.config
    arch_name = check_supported(config)
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
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(n_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(n_head_kv))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(n_vocab))
    if arch_name == "llama":
        writer.add_rope_dimension_count(int(head_dim))
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
        if arch_name == "llama" and hf_name.endswith("q_proj.weight"):
            data = permute_qk(data, n_head, n_head)
        elif arch_name == "llama" and hf_name.endswith("k_proj.weight"):
            data = permute_qk(data, n_head, n_head_kv)
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
