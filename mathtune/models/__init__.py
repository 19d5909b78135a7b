"""Models by concern: ``spec`` (what a model name means), ``gguf_cache`` (GGUF -> safetensors,
converted once), ``hub`` (offline rules), ``load`` (load_model, load_for_inference, LoRA).

No re-exports here on purpose: one name per function keeps ``monkeypatch`` and readers pointed at
the module that owns it, and importing ``mathtune.models.spec`` stays free of torch (the CLI parser
imports spec-level names without paying for torch).
"""
