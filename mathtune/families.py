"""What differs between model families, as far as mathtune must know: one table, keyed by
``config.model_type``, plus what can only be read off a chat template.

LoRA targets. Adapting every projection of attention and MLP (not only q/v) is the usual recipe
(QLoRA, torchtune, litgpt); the module names are each family's own. Llama, Mistral, Qwen2/3 and
Gemma 1-3 share Llama's names; Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into
``gate_up_proj``, so Llama's names would miss most of it (and PEFT would refuse ``q_proj``).
A family missing from the table gets Llama's names when the model has all of them; otherwise the
error names the model type and its linear modules, so ``--target-modules`` can be set.

System role. mathtune formats a prompt as a single user turn (``data.format_prompt``); whatever
system turn a prompt starts with is the template's own default (SmolLM2, Qwen2.5). Some templates
have no system role at all (Gemma raises "System role not supported"; Mistral's takes only
user/assistant), so mathtune never adds one, and ``takes_system_role`` says which kind a tokenizer is.

GGUF. How a family is written for llama.cpp (``mathtune.gguf_export``): its llama.cpp architecture and
the few per-family facts llama.cpp's ``convert_hf_to_gguf.py`` also hand-codes. A family without a
``GGUFLayout`` is not written to GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass

from mathtune.errors import MathtuneError

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHI3_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class GGUFLayout:
    """How one family is written to GGUF: the llama.cpp architecture (a ``gguf.MODEL_ARCH_NAMES``
    value, whose ``gguf.TensorNameMap`` names the tensors) and what differs from a plain write."""

    arch: str
    hidden_act: str = "silu"
    # Llama-style q/k rows are permuted into llama.cpp's interleaved rotary layout; NeoX-style
    # families (Qwen, Phi-3, Gemma) rotate half-split rows, which llama.cpp reads as they are
    permute_qk: bool = False
    # Gemma's RMSNorm multiplies by (1 + weight); llama.cpp multiplies by the stored weight, so the
    # converter stores weight + 1 (as convert_hf_to_gguf.py's Gemma2Model does)
    norm_plus_one: bool = False
    no_bias: tuple = ()  # config flags that must be off (llama.cpp's graph for the arch has no such bias)
    # loaded by a real llama.cpp with greedy output equal to transformers' (`make check-gguf`); a
    # family whose file nothing has loaded yet is refused, not written on trust
    verified: bool = True


@dataclass(frozen=True)
class Family:
    """What mathtune knows of one ``config.model_type``."""

    lora_targets: tuple[str, ...]  # the linear modules LoRA adapts by default
    gguf: GGUFLayout | None = None  # None: not written to GGUF


# config.model_type -> its family
FAMILIES: dict[str, Family] = {
    "llama": Family(LLAMA_PROJECTIONS, GGUFLayout("llama", permute_qk=True, no_bias=("attention_bias", "mlp_bias"))),
    # llama.cpp runs Mistral as llama (so does its converter)
    "mistral": Family(LLAMA_PROJECTIONS, GGUFLayout("llama", permute_qk=True)),
    "qwen2": Family(LLAMA_PROJECTIONS, GGUFLayout("qwen2")),
    # qwen3, phi3 and gemma2 are written as llama.cpp's converter does, but the llama.cpp build that
    # `make check-gguf` can run (b4965) lacks qwen3, aborts on gemma2 and rejects phi3's vocabulary
    # without Phi-3's own special tokens: refused until a build that has them agrees with transformers
    # qwen3: + per-head q/k RMSNorm: attn_q_norm / attn_k_norm
    "qwen3": Family(LLAMA_PROJECTIONS, GGUFLayout("qwen3", no_bias=("attention_bias",), verified=False)),
    "gemma": Family(LLAMA_PROJECTIONS),
    "gemma2": Family(LLAMA_PROJECTIONS, GGUFLayout("gemma2", hidden_act="gelu_pytorch_tanh", norm_plus_one=True,
                                                   no_bias=("attention_bias",), verified=False)),
    "gemma3_text": Family(LLAMA_PROJECTIONS),
    # phi3: fused qkv_proj -> attn_qkv, gate_up_proj -> ffn_up (llama.cpp splits both)
    "phi3": Family(PHI3_PROJECTIONS, GGUFLayout("phi3", verified=False)),
}


def gguf_layout(kind: str | None) -> GGUFLayout | None:
    """How ``config.model_type`` ``kind`` is written to GGUF; None where it is not."""
    family = FAMILIES.get(kind)
    return family.gguf if family is not None else None


def gguf_model_types() -> list[str]:
    """The model types GGUF export writes, in the table's order."""
    return [kind for kind, family in FAMILIES.items() if family.gguf is not None]


def _linear_module_names(model) -> set[str]:
    import torch
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D))}


def model_type(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def lora_target_modules(model) -> list[str]:
    """The default LoRA target modules for ``model``'s family (see the module docstring)."""
    kind = model_type(model)
    if kind in FAMILIES:
        return list(FAMILIES[kind].lora_targets)
    available = _linear_module_names(model)
    if set(LLAMA_PROJECTIONS) <= available:
        return list(LLAMA_PROJECTIONS)
    raise MathtuneError(
        f"no default LoRA target modules for model type {kind!r} (mathtune knows "
        f"{', '.join(sorted(FAMILIES))}); its linear modules are: {', '.join(sorted(available))}: "
        f"set --target-modules to some of these (or all-linear)"
    )


def takes_system_role(tokenizer) -> bool:
    """Does the tokenizer's chat template render a system message? False for templates that raise
    on one (Gemma) or drop it silently, and for a tokenizer without a chat template (base models are
    prompted with plain text, which has no roles)."""
    from jinja2.exceptions import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        return False
    marker = "\u2063MATHTUNE_SYSTEM\u2063"
    messages = [{"role": "system", "content": marker}, {"role": "user", "content": "q"}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError:  # what the template's raise_exception() raises
        return False
    return marker in rendered
