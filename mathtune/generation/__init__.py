"""Batched generation, in three modules (import from them; this package imports nothing, so that
reading settings never loads torch):

  settings  GenerationSettings (what to decode), Generations (what came out, with select/merge)
  engine    Generator: order rows, batch, decode in chunks, text; plain ``model.generate`` path
  cpu       the CPU fast path: mathtune's own prefill/decode loop on transformers' public API
"""
