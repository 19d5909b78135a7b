"""Tiny random-weight models of the families people fine-tune with mathtune, saved as model dirs.

Each family gets the settings that make it differ from Llama (the thing a test must exercise):

  llama    the reference: GQA, tied embeddings, ChatML-style template (SmolLM2's own)
  qwen2    q/k/v biases (always on in Qwen2), tied embeddings, ChatML with a default system turn
  qwen3    RMSNorm on queries and keys (q_norm/k_norm), explicit head_dim, ChatML without a system turn
  gemma2   logit soft-capping (attention and final), sliding-window layers (window 16, shorter than
           the prompts, so the window really masks), embeddings scaled by sqrt(hidden), GeGLU MLP,
           and a template with no system role (``<start_of_turn>user`` / ``model``)
  phi3     fused projections (``qkv_proj``, ``gate_up_proj``), untied head, ``<|user|>...<|end|>``
  mistral  untied head, ``[INST] ... [/INST]`` with the answer closed by EOS

All share the SmolLM2 tokenizer's vocabulary (tests/conftest.py); the special tokens a family's
template needs and SmolLM2 lacks are added to the tokenizer, and the model is built with the grown
vocabulary (so no embedding resize is needed). Weights are random: what a test can check is that
every stage runs and that stages agree with plain transformers, not that the model learns.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

# Qwen2.5's shape: a default system turn unless the conversation brings its own.
CHATML_QWEN2 = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3's shape (without the thinking switch): no default system turn.
CHATML_QWEN3 = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma 2's template: no system role at all (it raises), the assistant is called "model".
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Phi-3's shape.
PHI3 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# Mistral's v3 shape: [INST] and [/INST] are special tokens; the answer is closed by EOS.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    name: str  # config.model_type
    build_config: Callable[[object], object]  # tokenizer -> transformers config
    chat_template: str | None  # None: keep SmolLM2's own
    special_tokens: list[str] = field(default_factory=list)
    takes_system_role: bool = True
    gguf: bool = False  # mathtune writes GGUF for this architecture today


def _ids(tok) -> dict:
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, max_position_embeddings=512)


def _llama(tok):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=True, **_ids(tok))


def _qwen2(tok):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=True, **_ids(tok))


def _qwen3(tok):
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, **_ids(tok))


def _gemma2(tok):
    from transformers import Gemma2Config

    return Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0, tie_word_embeddings=True, **_ids(tok))


def _phi3(tok):
    from transformers import Phi3Config

    return Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, original_max_position_embeddings=512, tie_word_embeddings=False,
                      **_ids(tok))


def _mistral(tok):
    from transformers import MistralConfig

    return MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, sliding_window=16, tie_word_embeddings=False,
                         **_ids(tok))


FAMILIES = {
    f.name: f
    for f in (
        Family("llama", _llama, None, gguf=True),  # SmolLM2's own template
        Family("qwen2", _qwen2, CHATML_QWEN2, gguf=True),
        Family("qwen3", _qwen3, CHATML_QWEN3),
        Family("gemma2", _gemma2, GEMMA, ["<start_of_turn>", "<end_of_turn>"], takes_system_role=False),
        Family("phi3", _phi3, PHI3, ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]),
        Family("mistral", _mistral, MISTRAL, ["[INST]", "[/INST]"], takes_system_role=False),
    )
}


def family_tokenizer(base_tokenizer, family: Family):
    tok = copy.deepcopy(base_tokenizer)
    if family.special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(family.special_tokens)})
    if family.chat_template is not None:
        tok.chat_template = family.chat_template
    return tok


def build_family_model(base_tokenizer, family: Family, seed: int = 0):
    """(model, tokenizer): random weights, biases made non-zero (transformers initialises them to 0,
    which would hide a bias that export or the fast path dropped)."""
    tok = family_tokenizer(base_tokenizer, family)
    config = family.build_config(tok)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model, tok


def save_family_model(base_tokenizer, family: Family, path: Path) -> Path:
    model, tok = build_family_model(base_tokenizer, family)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
