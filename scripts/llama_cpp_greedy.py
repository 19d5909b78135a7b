"""Greedy decoding with a real llama.cpp: the prebuilt CPU library in the PyPI wheel llama-cpp-cffi
0.4.42 (llama.cpp build 4965), called through its C API.

Runs in its own venv (``make check-gguf`` builds .venv-gguf), imports nothing from mathtune, torch or
transformers. For each GGUF in the job file it renders every question through the chat template
stored in the GGUF's own ``tokenizer.chat_template`` metadata with jinja2, as llama-server
``--jinja`` does (messages, add_generation_prompt, bos/eos tokens; trim_blocks and lstrip_blocks as
in transformers and llama.cpp's minja), tokenizes the rendered string the way llama-server does
(``add_special`` honouring the file's add_bos flag, special tokens parsed), then decodes greedily
with llama.cpp's C API until an end-of-generation token or ``max_new_tokens``.

    python scripts/llama_cpp_greedy.py JOB.json RESULT.json

JOB: {"max_new_tokens": N, "questions": [...], "models": [{"name": ..., "gguf": path}, ...]}
RESULT: {"llama_cpp": build tag, "models": {name: [{"prompt", "prompt_ids", "ids"}, ...]}}
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import sys
from pathlib import Path

import gguf
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

LLAMA_CPP_BUILD = "b4965 (llama-cpp-cffi 0.4.42)"


def load_llama_cpp():
    """The wheel's cffi extension ``llama/_llama_cpp_cpu`` on its own: the package's __init__ pulls in
    transformers < 5, huggingface_hub and more for its high-level API, none of which this needs.
    GCC14_SHIM (built by ``make check-gguf``) supplies the one libstdc++ symbol Debian 12 lacks."""
    shim = os.environ.get("GCC14_SHIM")
    if shim:
        ctypes.CDLL(shim, mode=ctypes.RTLD_GLOBAL)
    spec = importlib.util.find_spec("llama")
    path = next(Path(spec.submodule_search_locations[0]).glob("_llama_cpp_cpu*.so"))
    module_spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ffi, module.lib


def metadata_string(reader: gguf.GGUFReader, key: str) -> str | None:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def render_prompts(path: str, questions: list[str]) -> list[str]:
    reader = gguf.GGUFReader(path)
    template = metadata_string(reader, "tokenizer.chat_template")
    if not template:
        raise SystemExit(f"{path}: no tokenizer.chat_template in the GGUF metadata")
    tokens = reader.fields["tokenizer.ggml.tokens"]

    def token(key: str) -> str:
        field = reader.fields.get(key)
        return "" if field is None else tokens.contents(int(field.contents()))

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    return [compiled.render(messages=[{"role": "user", "content": q}], add_generation_prompt=True,
                            bos_token=token("tokenizer.ggml.bos_token_id"),
                            eos_token=token("tokenizer.ggml.eos_token_id")) for q in questions]


class LlamaCpp:
    def __init__(self, path: str, n_ctx: int = 1024):
        self.ffi, self.lib = load_llama_cpp()
        self.lib.llama_backend_init()
        params = self.lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = self.lib.llama_model_load_from_file(path.encode(), params)
        if self.model == self.ffi.NULL:
            raise SystemExit(f"llama.cpp could not load {path} (its log above says why)")
        self.vocab = self.lib.llama_model_get_vocab(self.model)
        self.n_vocab = self.lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = n_ctx

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        out = self.ffi.new(f"llama_token[{len(data) + 16}]")
        n = self.lib.llama_tokenize(self.vocab, data, len(data), out, len(data) + 16, True, True)
        if n < 0:
            raise SystemExit(f"llama_tokenize failed ({n})")
        return [out[i] for i in range(n)]

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        params = self.lib.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = self.n_ctx
        params.n_ubatch = self.n_ctx
        params.n_threads = params.n_threads_batch = 1
        ctx = self.lib.llama_init_from_model(self.model, params)
        try:
            out, pending = [], list(prompt_ids)
            for _ in range(max_new_tokens):
                array = self.ffi.new(f"llama_token[{len(pending)}]", pending)
                if self.lib.llama_decode(ctx, self.lib.llama_batch_get_one(array, len(pending))) != 0:
                    raise SystemExit("llama_decode failed")
                logits = np.frombuffer(self.ffi.buffer(self.lib.llama_get_logits_ith(ctx, -1), 4 * self.n_vocab),
                                       dtype=np.float32)
                token = int(np.argmax(logits))
                if self.lib.llama_vocab_is_eog(self.vocab, token):
                    break
                out.append(token)
                pending = [token]
            return out
        finally:
            self.lib.llama_free(ctx)

    def close(self):
        self.lib.llama_model_free(self.model)


def main(job_path: str, result_path: str) -> None:
    job = json.loads(open(job_path).read())
    results = {}
    for entry in job["models"]:
        prompts = render_prompts(entry["gguf"], job["questions"])
        llama = LlamaCpp(entry["gguf"])
        rows = []
        for prompt in prompts:
            ids = llama.tokenize(prompt)
            rows.append({"prompt": prompt, "prompt_ids": ids, "ids": llama.greedy(ids, job["max_new_tokens"])})
        llama.close()
        results[entry["name"]] = rows
        print(f"llama.cpp ran {entry['name']}", file=sys.stderr)
    with open(result_path, "w") as handle:
        json.dump({"llama_cpp": LLAMA_CPP_BUILD,
                   "models": results}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:3])
