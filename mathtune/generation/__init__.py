"""Batched generation, in four modules (import from them; this package imports nothing, so that
reading settings never loads torch):

  settings  Generations (what came out, with select/merge); what to decode is config.GenerationArgs
  sharding  the work of one generation split across launched processes
  engine    Generator: order rows, batch, decode in chunks, text; plain ``model.generate`` path
  cpu       the CPU fast path: mathtune's own prefill/decode loop on transformers' public API
"""
