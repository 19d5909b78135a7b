"""``mathtune export``: a run (or any model spec) -> a standard Hugging Face model dir, and a GGUF.

    mathtune export runs/lora-uc --output runs/export                      # merged safetensors + card
    mathtune export runs/lora-uc --output runs/export --gguf --gguf-type q8_0

What lands in ``--output``:

  model.safetensors, config.json  LoRA folded into its base (``merge_and_unload``, in fp32, then cast
                                  to ``--dtype``); a full fine-tune or plain model as it is
  tokenizer files                 with the chat template the model was trained with
  generation_config.json          EOS = the end-of-turn token training supervised and eval stops on
                                  (not necessarily the tokenizer's EOS), greedy, as mathtune measures
  README.md                       a model card in the hub's format: YAML front matter, the training
                                  settings from mathtune_config.yaml, and the base-vs-trained table
                                  with its interval and McNemar p when the run has model_comparison.json
  <name>.<type>.gguf, Modelfile   with ``--gguf`` (see gguf_export.py)

``AutoModelForCausalLM.from_pretrained(DIR)`` loads the result with neither mathtune nor PEFT.
The directory is built under a temporary name and renamed into place when complete
(``models.gguf_cache.build_dir_atomically``, the GGUF cache's atomic dir build).

This module imports torch only inside functions: the CLI builds its parser from ``ExportConfig``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from mathtune.config import RECORD_KEYS, ConfigError, setting
from mathtune.errors import MathtuneError
from mathtune.gguf_export import GGUF_TYPES
from mathtune.run_dir import RunDir

DTYPES = ("fp32", "bf16", "fp16")
CARD_FILE = "README.md"
MODELFILE = "Modelfile"
RUN_CONFIG = RunDir.CONFIG
COMPARISON = RunDir.COMPARISON
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class ExportConfig:
    """Everything ``mathtune export`` needs; every field is a flag (``model`` is the positional)."""

    model: str = setting("", "run dir, LoRA adapter dir, model dir, alias, .gguf or hub id to export")
    output: str | None = setting(None, "directory to write the model into (must not exist, or be empty, unless --overwrite)")
    dtype: str = setting("fp32", "weight dtype of the saved safetensors (the LoRA merge is always done in fp32)", choices=DTYPES)
    gguf: bool = setting(False, "also write <output>/<name>.<gguf-type>.gguf and an Ollama Modelfile")
    gguf_type: str = setting("f16", "GGUF tensor type: f32, f16 or q8_0 (norms and biases stay f32)", choices=GGUF_TYPES)
    overwrite: bool = setting(False, "replace an existing non-empty --output directory")
    trust_remote_code: bool = setting(False, "allow model repos to run their own Python code (off by default)")
    allow_pickle: bool = setting(False, "allow loading pickle (.bin) checkpoints; safetensors is used otherwise")

    def validate(self) -> "ExportConfig":
        problems = []
        if not str(self.model).strip():
            problems.append("the model to export is missing: pass a run dir, model dir or alias")
        if not self.output:
            problems.append("--output DIR is required: where to write the exported model")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype {self.dtype}: use one of {', '.join(DTYPES)}")
        if self.gguf_type not in GGUF_TYPES:
            problems.append(f"--gguf-type {self.gguf_type}: use one of {', '.join(GGUF_TYPES)}")
        if self.output and Path(self.output).exists():
            out = Path(self.output)
            if not out.is_dir():
                problems.append(f"--output {out} is a file: pass a directory path")
            elif any(out.iterdir()) and not self.overwrite:
                problems.append(f"--output {out} exists and is not empty: pass --overwrite to replace it, or another path")
        if problems:
            raise ConfigError(problems)
        return self


@dataclass
class ExportResult:
    output: Path
    name: str  # model_tag of the spec: the GGUF's stem and the suggested Ollama model name
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    gguf: Path | None = None
    base_model: str | None = None
    merged_lora: bool = False


# --------------------------------------------------------------------------- run dir facts


def run_dir_of(kind: str, source: str) -> Path | None:
    """The training run a spec comes from (where mathtune_config.yaml lives), if any: the dir
    itself, or for ``checkpoint-N`` its parent."""
    if kind not in ("adapter", "local-dir"):
        return None
    run = RunDir.of_model(source)
    return run.root if run is not None else None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise MathtuneError(f"{path}: unreadable ({exc}): fix or remove it and export again") from exc
    if not isinstance(data, dict):
        raise MathtuneError(f"{path}: expected a mapping of setting: value")
    return data


def _read_comparison(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        for key in ("n", "base", "trained", "accuracy_difference", "ci95", "mcnemar_p"):
            data[key]  # noqa: B018 - a missing key is the error below
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MathtuneError(f"{path}: not a {RunDir.COMPARISON} written by mathtune ({exc}): "
                            f"rerun `mathtune compare` or remove it") from exc
    return data


def card_base_model(spec: str | None) -> str | None:
    """A hub id for the card's ``base_model`` (the hub validates it), or None for a local base and
    for a GGUF-derived one: the bundled smollm2-135m was trained from the de-quantized Q4_1 GGUF,
    whose weights are not those of the hub repo it was quantized from, so naming that repo as the
    base would claim weights the model was never trained from."""
    if not spec:
        return None
    text = str(spec).strip()
    from mathtune.models.spec import ALIASES

    alias = ALIASES.get(text.lower())
    if alias is not None and alias.hub_id:
        return alias.hub_id
    if _HUB_ID.fullmatch(text) and not Path(text).expanduser().exists():
        return text
    return None


# --------------------------------------------------------------------------- model card


def model_card(*, name: str, spec: str, base_spec: str | None, merged_lora: bool, run_config: dict | None,
               comparison: dict | None, gguf_file: str | None, eot_token: str) -> str:
    """README.md text: hub YAML front matter (via huggingface_hub's ModelCardData) + the body."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from mathtune.comparison import comparison_rows, stats_lines

    task = (run_config or {}).get("task") or (comparison or {}).get("task")
    method = (run_config or {}).get("method") or ("lora" if merged_lora else None)
    base_id = card_base_model(base_spec or (run_config or {}).get("model"))
    from mathtune.models.spec import ALIASES

    base_alias = ALIASES.get(str(base_spec or (run_config or {}).get("model") or "").strip().lower())
    gguf_base = base_alias if base_alias is not None and base_alias.gguf_type else None
    from mathtune.tasks import TASK_NAMES, task_class

    dataset = task_class(task).hub_dataset if task in TASK_NAMES else None  # generated/own-file tasks: none
    tags = ["mathtune", "math", "text-generation"]
    tags += [t for t in (task, {"lora": "lora", "full": "full-fine-tune"}.get(method)) if t]
    if gguf_file:
        tags.append("gguf")
    eval_results = None
    if comparison is not None:
        eval_results = [EvalResult(task_type="text-generation", dataset_type=dataset or str(task),
                                   dataset_name=str(task), metric_type="accuracy",
                                   metric_value=float(comparison["trained"]["accuracy"]),
                                   metric_name=f"accuracy ({comparison['n']} held-out items)")]
    # the hub's model tree: trained weights -> "finetune" of their base (a plain export has none)
    relation = "finetune" if base_id and (merged_lora or run_config is not None) else None
    data = ModelCardData(base_model=base_id, base_model_relation=relation, library_name="transformers", pipeline_tag="text-generation",
                         tags=tags, datasets=[dataset] if dataset else None, metrics=["accuracy"],
                         model_name=name if eval_results else None, eval_results=eval_results)

    lines = [f"# {name}", ""]
    origin = f"`{base_spec}`" if base_spec else f"`{spec}`"
    if gguf_base is not None:
        origin += f" ({gguf_base.describe()})"
    if merged_lora:
        lines.append(f"A LoRA fine-tune of {origin}{f' ({base_id})' if base_id and base_id != base_spec else ''} "
                     f"made with mathtune{f' on the `{task}` task' if task else ''}, with the adapter merged into the "
                     "base weights: a plain transformers checkpoint, no PEFT needed.")
    elif run_config is not None:
        lines.append(f"A {'full ' if method == 'full' else ''}fine-tune made with mathtune from "
                     f"{origin}{f' on the `{task}` task' if task else ''}.")
    else:
        lines.append(f"`{spec}` exported by mathtune (no mathtune training run found beside it).")
    if gguf_base is not None:
        source = gguf_base.quantized_from
        lines += ["", f"Its starting weights are the {gguf_base.gguf_type} values of `{gguf_base.gguf_name}` "
                      f"(pip package `{gguf_base.package}`) de-quantized to fp32, not the original weights of "
                      f"[{source}](https://huggingface.co/{source}); so the metadata names no `base_model`."]
    lines += ["", f"Prompts use the tokenizer's chat template; answers end with `{eot_token}` (the EOS in "
                  "generation_config.json) and close with a `#### N` line holding the final number.", ""]

    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("PATH")',
              'tokenizer = AutoTokenizer.from_pretrained("PATH")',
              'messages = [{"role": "user", "content": "How many grams are in 2.5 kilograms?"}]',
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
              "return_dict=True)",
              "output = model.generate(**inputs)  # greedy, stops at the end-of-turn token",
              'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
              "```", ""]
    if gguf_file:
        lines += [f"GGUF for llama.cpp / Ollama / LM Studio: `{gguf_file}`", "", "```bash",
                  f"llama-cli -m {gguf_file} --temp 0 -cnv", f"ollama create {name} -f {MODELFILE} && ollama run {name}",
                  "```", ""]

    if comparison is not None:
        rows = [("metric", "base", "trained", "Δ")] + comparison_rows(comparison["base"], comparison["trained"])
        lines += ["## Evaluation", "",
                  f"Base vs trained on the same {comparison['n']} held-out `{comparison.get('task', task)}` items "
                  "(mathtune compare, greedy decoding):", ""]
        trained = comparison["trained"]
        if (trained.get("generation") or {}).get("calculator"):
            # the figures below are not what plain generation gives: say so where people read them
            lines[-1:-1] = ["", f"Measured with mathtune's calculator-assisted decoding ({trained.get('calculator_calls', 0)} "
                            "`<<EXPR=` results computed by its evaluator). Plain transformers, llama.cpp or Ollama "
                            "generation has no calculator: there the model computes those results itself, and "
                            "its accuracy is lower (`mathtune eval --no-calculator` measures it)."]
        lines += [f"| {' | '.join(row)} |" for row in rows[:1]] + ["|---|---:|---:|---:|"]
        lines += [f"| {' | '.join(row)} |" for row in rows[1:]]
        lines += [""] + [f"- {line}" for line in stats_lines(comparison)] + [""]

    if run_config is not None:
        lines += ["## Training settings", "", f"From `{RUN_CONFIG}` of the run:", "", "| setting | value |", "|---|---|"]
        for key, value in run_config.items():
            if key in RECORD_KEYS:
                continue  # the run's record of its base (with this machine's cache path): described above
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            lines.append(f"| {key} | `{shown}` |")
        lines.append("")
    body = "\n".join(lines)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


# --------------------------------------------------------------------------- the export


def _generation_config(tokenizer, eot_id: int, max_new_tokens: int):
    from transformers import GenerationConfig

    # Greedy, stopping on the end-of-turn token only: what mathtune's eval measured. The base's own
    # generation_config (sampling defaults, extra EOS ids) would make the export behave otherwise.
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eot_id,
                            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot_id,
                            do_sample=False, max_new_tokens=max_new_tokens)


def _check_finite(model) -> None:
    import torch

    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise MathtuneError(f"the model has NaN/inf weights ({', '.join(bad[:3])}): not exported; "
                            f"export an earlier {RunDir.CHECKPOINT_PREFIX}N of the run")


def export_model(spec: str, output: str | os.PathLike, *, dtype: str = "fp32", gguf: bool = False,
                 gguf_type: str = "f16", overwrite: bool = False, trust_remote_code: bool = False,
                 allow_pickle: bool = False, log: Callable[[str], None] | None = None) -> ExportResult:
    """Export ``spec`` into ``output`` (see the module docstring); returns what was written."""
    from mathtune.data import end_of_turn_token, end_of_turn_token_id
    from mathtune.gguf_export import check_supported, modelfile_text, write_gguf
    from mathtune.hardware import dtype_of
    from mathtune.models.gguf_cache import build_dir_atomically
    from mathtune.models.load import load_for_inference
    from mathtune.models.spec import model_tag, resolve_model_source
    from mathtune.progress import phase  # start, "still running" every 30 s, end: merging/saving report nothing

    config = ExportConfig(model=str(spec), output=str(output), dtype=dtype, gguf=gguf, gguf_type=gguf_type,
                          overwrite=overwrite, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle).validate()
    log = log or (lambda message: None)
    kind, source = resolve_model_source(config.model)
    run_dir = run_dir_of(kind, source)
    run_config = _read_yaml(run_dir / RUN_CONFIG) if run_dir is not None else None
    comparison = _read_comparison(run_dir / COMPARISON) if run_dir is not None else None

    # fp32 here whatever --dtype: the GGUF is written from the fp32 merge, the safetensors cast below
    with phase(f"loading {config.model} ({kind}){' and merging its LoRA adapter in fp32' if kind == 'adapter' else ''}",
               write=log):
        loaded = load_for_inference(config.model, device="cpu", precision="fp32",
                                    trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)
    model, tokenizer = loaded.model, loaded.tokenizer
    if config.gguf:
        check_supported(model.config)  # before any file is written
    _check_finite(model)
    eot = end_of_turn_token(tokenizer)
    eot_id = end_of_turn_token_id(tokenizer)
    name = model_tag(config.model)
    gguf_name = f"{name}.{config.gguf_type}.gguf" if config.gguf else None
    max_new_tokens = int((run_config or {}).get("max_new_tokens") or 256)
    # the run's own record of its base first: adapter_config.json holds a dir path (for PEFT)
    recorded = (run_config or {}).get("base_model")
    base_spec = (recorded.get("spec") if isinstance(recorded, dict) else None) or (
        loaded.base if loaded.is_adapter else (run_config or {}).get("model"))
    target = Path(config.output)

    def build(tmp: Path) -> None:
        tokenizer.save_pretrained(tmp)
        if config.gguf:
            # from the fp32 merge, whatever --dtype the safetensors get
            with phase(f"writing {gguf_name}", write=log):
                write_gguf(model, tokenizer, tmp, tmp / gguf_name, config.gguf_type, eot_token_id=eot_id, name=name)
            (tmp / MODELFILE).write_text(modelfile_text(tokenizer, gguf_name, eot))
        torch_dtype = dtype_of(config.dtype)
        model.to(torch_dtype)
        model.config.dtype = torch_dtype
        model.generation_config = _generation_config(tokenizer, eot_id, max_new_tokens)
        with phase(f"writing safetensors ({config.dtype})", write=log):
            model.save_pretrained(tmp)
        card = model_card(name=name, spec=config.model, base_spec=base_spec, merged_lora=loaded.is_adapter,
                          run_config=run_config, comparison=comparison, gguf_file=gguf_name, eot_token=eot)
        (tmp / CARD_FILE).write_text(card)

    if not build_dir_atomically(target, build, replace=config.overwrite, what="the export",
                                hint="free space there or pass another --output, and export again"):
        raise MathtuneError(f"--output {target} appeared while exporting: pass --overwrite or another path")
    files = {p.name: p.stat().st_size for p in sorted(target.iterdir()) if p.is_file()}
    return ExportResult(output=target, name=name, files=files, gguf=target / gguf_name if gguf_name else None,
                        base_model=base_spec, merged_lora=loaded.is_adapter)
