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
"""

from __future__ import annotations

from mathtune.errors import MathtuneError

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHI3_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

# config.model_type -> the linear modules LoRA adapts by default
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": LLAMA_PROJECTIONS,
    "mistral": LLAMA_PROJECTIONS,
    "qwen2": LLAMA_PROJECTIONS,
    "qwen3": LLAMA_PROJECTIONS,
    "gemma": LLAMA_PROJECTIONS,
    "gemma2": LLAMA_PROJECTIONS,
    "gemma3_text": LLAMA_PROJECTIONS,
    "phi3": PHI3_PROJECTIONS,
}


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
    if kind in LORA_TARGETS:
        return list(LORA_TARGETS[kind])
    available = _linear_module_names(model)
    if set(LLAMA_PROJECTIONS) <= available:
        return list(LLAMA_PROJECTIONS)
    raise MathtuneError(
        f"no default LoRA target modules for model type {kind!r} (mathtune knows "
        f"{', '.join(sorted(LORA_TARGETS))}); its linear modules are: {', '.join(sorted(available))}: "
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
