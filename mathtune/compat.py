"""The only home of access to library internals that have no public API (see each shim)."""

from __future__ import annotations


def attention_implementation(model) -> str | None:
    """The attention kernel a transformers model runs ("sdpa", "eager", a registered name)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)
