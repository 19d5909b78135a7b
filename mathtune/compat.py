"""The only place mathtune touches a library's private API: each shim names the library versions it
was checked on, and tests/test_compat.py runs each one against the installed library (on both CI
legs: the pinned versions and the newest releases inside pyproject's bounds).

A shim lives here only where the library offers no public way to do the same; everything else
mathtune does through public API. When a library adds one, the shim goes and its callers switch.
"""

from __future__ import annotations

import contextlib


def attention_implementation(model) -> str | None:
    """The attention kernel a transformers model (or a PEFT model around one) runs now: "eager",
    "sdpa", a registered name such as mathtune's CPU kernel, or None for a model without a config.

    transformers has a public setter (``PreTrainedModel.set_attn_implementation``) but no public
    getter: the current value lives in the config's private ``_attn_implementation`` property,
    which ``set_attn_implementation`` writes and every attention layer reads.
    Checked on transformers 5.24.0 and 5.25.0 (``PretrainedConfig._attn_implementation``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def can_switch_attention(model) -> bool:
    """The model has transformers' public setter (``PreTrainedModel.set_attn_implementation``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(base, "set_" + "attn_implementation")


def switch_attention(model, implementation: str) -> None:
    """Set the attention kernel through the public setter. It lives here beside its getter above so
    that the two stay one pair: the day transformers adds a public getter, both change together."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(implementation)


@contextlib.contextmanager
def hub_offline(offline: bool = True):
    """datasets and huggingface_hub in offline mode for the duration (``offline=False``: as they are).

    Both read HF_HUB_OFFLINE once, at import, into module constants, and neither has a public way to
    switch it later; ``DownloadConfig(local_files_only=True)`` alone still sends (and retries) HEAD
    requests. mathtune decides offline only when a dataset is loaded (the hub may be unreachable
    without the variable set), so the constants are set here and restored after.
    Checked on datasets 5.2.0 (``datasets.config.HF_HUB_OFFLINE``) and huggingface_hub 2.4.0
    (``huggingface_hub.constants.HF_HUB_OFFLINE``, which ``is_offline_mode()`` returns)."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = [(module, module.HF_HUB_OFFLINE) for module in (datasets.config, huggingface_hub.constants)]
    try:
        for module, _ in saved:
            module.HF_HUB_OFFLINE = True
        yield
    finally:
        for module, value in saved:
            module.HF_HUB_OFFLINE = value


# TRL's GRPOTrainer computes the completions' log-probabilities and entropies in one private method, the
# only place a GRPO step runs the model with gradients; TRL has no public hook for it (``rollout_func``
# covers sampling only). mathtune's shared-prompt pass (shared_prefix.score_completions_by_group) stands
# in for it. Checked on TRL 1.16.0: called from ``_compute_loss`` (with gradients, the whole micro-batch)
# and ``_generate_and_score_completions`` (without: old/reference log-probabilities), with this signature.
_GRPO_SCORING = "_get_per_token_logps_and_entropies"
_GRPO_SCORING_PARAMETERS = ("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size",
                            "compute_entropy", "compute_aux_loss")


def grpo_scoring_problem(trainer_class) -> str | None:
    """Why ``install_grpo_scoring`` cannot stand in for TRL's scoring on ``trainer_class``, or None."""
    import inspect

    method = getattr(trainer_class, _GRPO_SCORING, None)
    if method is None:
        return f"this TRL's GRPOTrainer has no {_GRPO_SCORING} (checked on TRL 1.16)"
    parameters = inspect.signature(method).parameters
    missing = [name for name in _GRPO_SCORING_PARAMETERS if name not in parameters]
    if missing:
        return f"this TRL's GRPOTrainer.{_GRPO_SCORING} lacks {', '.join(missing)} (checked on TRL 1.16)"
    return None


def install_grpo_scoring(trainer_class, scoring) -> str | None:
    """Make ``scoring(self, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
    compute_aux_loss, **multimodal) -> (log_probs, entropies, aux_loss)`` the scoring method of
    ``trainer_class`` (a GRPOTrainer subclass); ``call_trl_scoring`` reaches TRL's own. Returns why not, or None."""
    problem = grpo_scoring_problem(trainer_class)
    if problem is None:
        setattr(trainer_class, _GRPO_SCORING, scoring)
    return problem


def call_trl_scoring(trainer, trl_class, *args, **kwargs):
    """TRL's own scoring method (the per-row forward) on ``trainer``."""
    return getattr(trl_class, _GRPO_SCORING)(trainer, *args, **kwargs)
