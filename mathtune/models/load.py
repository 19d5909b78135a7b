"""Model spec -> (model, tokenizer) ready to train or generate, and the LoRA wrapper.

Resolution is ``mathtune.models.spec``, GGUF conversion ``mathtune.models.gguf_cache``, hub rules
``mathtune.models.hub``; this module only loads.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mathtune.errors import MathtuneError, first_line
from mathtune.families import LLAMA_PROJECTIONS, lora_target_modules
from mathtune.models.gguf_cache import ensure_converted
from mathtune.models.hub import hub_error, hub_local_only
from mathtune.models.spec import canonical_name, resolve_model_source
from mathtune.run_dir import RunDir

# Llama's attention + MLP projections; the default for each family is in mathtune/families.py
DEFAULT_LORA_TARGETS = list(LLAMA_PROJECTIONS)

@dataclass
class LoadedModel:
    model: Any  # PreTrainedModel or PeftModel; eval mode, on the requested device
    tokenizer: Any  # PreTrainedTokenizerBase; pad_token set, padding_side "left" (generation)
    spec: str  # what the user passed
    source: str  # resolved local dir / hub id actually loaded
    kind: str  # "alias-gguf" | "hub" | "local-dir" | "gguf-file" | "adapter"
    is_adapter: bool  # the spec is a LoRA adapter (with merge_adapter, .model is already merged)
    base: str | None = None  # adapters only: the base model spec from adapter_config.json


def _has_tokenizer_files(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def _check_weights(path: Path, allow_pickle: bool, adapter: bool = False) -> None:
    """Refuse a pickle-only checkpoint unless opted in: unpickling can run arbitrary code."""
    stem = "adapter_model" if adapter else "model"
    pickle_stem = "adapter_model" if adapter else "pytorch_model"
    if any(path.glob(f"{stem}*.safetensors")) or (path / f"{stem}.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in path.glob(f"{pickle_stem}*.bin"))
    if pickles:
        if allow_pickle:
            return
        raise MathtuneError(
            f"{path} has only pickle weights ({pickles[0]}), which can run arbitrary code when loaded: "
            f"pass --allow-pickle if you trust it, or re-save it as safetensors"
        )
    raise MathtuneError(
        f"{path} has no weights ({stem}.safetensors): point --model at a directory save_pretrained wrote"
    )


def _check_whole(path: Path, stem: str = "model") -> None:
    """A safetensors file cut short (a copy interrupted, a disk error) is one line naming it, not a
    SafetensorError traceback from deep in the loader. Reads the headers only."""
    from mathtune.integrity import safetensors_problem

    for path in sorted(path.glob(f"{stem}*.safetensors")):
        problem = safetensors_problem(path)
        if problem is not None:
            raise MathtuneError(f"{path}: damaged weights file ({problem}): copy it again, or point --model at a "
                                f"whole copy (a training run's checkpoint-N dirs hold one each)")


# `mathtune grpo` from a LoRA run dir: the merged weights its new LoRA trains on (training/grpo.py)
START_MODEL_DIR = "start-model"


def read_adapter_base(adapter_dir: Path) -> str:
    config_path = adapter_dir / "adapter_config.json"
    try:
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as exc:
        raise MathtuneError(f"{config_path}: unreadable adapter config: {first_line(exc)}") from exc
    if not base:
        raise MathtuneError(
            f"{config_path}: base_model_name_or_path is empty: set it to the base model's alias, dir or hub id"
        )
    base_path = Path(base).expanduser()
    # A relative base path is taken from the working dir, else from the adapter dir itself.
    if not base_path.is_absolute() and not base_path.exists() and (adapter_dir / base_path).exists():
        return str((adapter_dir / base_path).resolve())
    if base_path.is_absolute() and not base_path.exists():
        # A GRPO run's own start-model, moved or copied with the run dir (checkpoint-N: in its parent)
        if base_path.name == START_MODEL_DIR:
            for run_dir in (adapter_dir, adapter_dir.parent):
                if (run_dir / START_MODEL_DIR / "config.json").is_file():
                    return str((run_dir / START_MODEL_DIR).resolve())
        # A run copied to another machine, or a cleared model cache: the absolute dir PEFT reads is
        # gone, but the run's own record names the spec it came from (an alias converts again).
        recorded = _recorded_base_spec(adapter_dir)
        if recorded is not None:
            return recorded
    return base


def _recorded_base_spec(adapter_dir: Path) -> str | None:
    """The ``base_model.spec`` a mathtune run recorded, from the adapter dir or, for a checkpoint-N,
    its run dir; None when there is no such record."""
    import yaml

    for run_dir in (adapter_dir, adapter_dir.parent):
        path = RunDir(run_dir).config  # the run's settings + base_model record (written by training)
        if path.is_file():
            try:
                record = (yaml.safe_load(path.read_text()) or {}).get("base_model")
            except (OSError, yaml.YAMLError, AttributeError) as exc:
                raise MathtuneError(f"{path}: unreadable run config: {first_line(exc)}") from exc
            if isinstance(record, dict) and record.get("spec"):
                return str(record["spec"])
    return None


def _tokenizer_policy(tokenizer, model=None):
    """pad = eos when missing (decoder-only models rarely ship a pad token); left padding, so
    batched generation continues right after each prompt."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise MathtuneError(
                f"tokenizer of '{tokenizer.name_or_path}' has neither a pad nor an eos token: add one "
                f"to its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model is not None and getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def _auto_tokenizer(source: str, *, trust_remote_code: bool, local_files_only: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        source, trust_remote_code=trust_remote_code, local_files_only=local_files_only
    )


def _load_tokenizer_raw(kind: str, spec: str, source: str, trust_remote_code: bool):
    if kind in ("alias-gguf", "gguf-file"):
        source = str(ensure_converted(kind, spec, Path(source), weights=False))  # the tokenizer alone is read
        return _auto_tokenizer(source, trust_remote_code=False)
    if kind == "hub":
        local_only = hub_local_only()
        try:
            return _auto_tokenizer(source, trust_remote_code=trust_remote_code, local_files_only=local_only)
        except OSError as exc:
            raise hub_error(source, exc, offline=local_only, allow_pickle=True) from exc
    if kind == "adapter":
        adapter_dir = Path(source)
        if not _has_tokenizer_files(adapter_dir):
            base = read_adapter_base(adapter_dir)
            base_kind, base_source = resolve_model_source(base)
            if base_kind == "adapter":
                raise _nested_adapter_error(adapter_dir, base)
            return _load_tokenizer_raw(base_kind, base, base_source, trust_remote_code)
    # local dir, or an adapter dir that carries its tokenizer
    if not _has_tokenizer_files(Path(source)):
        raise MathtuneError(
            f"{source} has no tokenizer (tokenizer_config.json): save it there with tokenizer.save_pretrained"
        )
    try:
        return _auto_tokenizer(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise MathtuneError(f"could not load the tokenizer in {source}: {first_line(exc)}") from exc


def _nested_adapter_error(adapter_dir: Path, base: str) -> MathtuneError:
    return MathtuneError(
        f"{adapter_dir}/adapter_config.json names another adapter ({base}) as its base: merge that one "
        f"first, or point base_model_name_or_path at a full model"
    )


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The tokenizer for a model spec: pad token set, padding_side "left"."""
    kind, source = resolve_model_source(spec)
    return _tokenizer_policy(_load_tokenizer_raw(kind, spec, source, trust_remote_code))


def _from_pretrained(source: str, *, kind: str, dtype, trust_remote_code: bool, allow_pickle: bool):
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        # None = safetensors when present, else the pickle file; only reachable with --allow-pickle
        use_safetensors=None if allow_pickle else True,
    )
    if kind == "hub":
        local_only = hub_local_only()
        try:
            return AutoModelForCausalLM.from_pretrained(
                source,
                local_files_only=local_only,
                # the auto class probes for adapter_config.json without local_files_only (5.x):
                # without this it goes online, with ~25 s of retries, even in offline mode
                adapter_kwargs={"local_files_only": local_only},
                **kwargs,
            )
        except OSError as exc:
            raise hub_error(source, exc, offline=local_only, allow_pickle=allow_pickle) from exc
    if kind == "local-dir":
        _check_weights(Path(source), allow_pickle)
        _check_whole(Path(source))
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        hint = ": pass --trust-remote-code if you trust its code" if "trust_remote_code" in str(exc) else ""
        raise MathtuneError(f"could not load the model in {source}: {first_line(exc)}{hint}") from exc


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    merge_adapter: bool = False,
) -> LoadedModel:
    """Load a model spec (see the module docstring) in eval mode on ``device``.

    ``merge_adapter``: fold a LoRA adapter into the base weights (``merge_and_unload``) and return a
    plain model. For inference only: every linear layer then runs one matmul instead of three (the
    demo's 200-item eval: 14.5 s merged vs 20.4 s unmerged, bf16 on CPU). The merge is done in fp32 and only then cast to ``dtype``, so a
    bf16 model rounds W + BA once instead of adding a bf16-rounded delta to bf16-rounded weights.
    """
    kind, source = resolve_model_source(spec)
    base_spec = None
    if kind == "adapter":
        from peft import PeftModel

        adapter_dir = Path(source)
        _check_weights(adapter_dir, allow_pickle, adapter=True)
        base_spec = read_adapter_base(adapter_dir)
        _check_whole(adapter_dir, "adapter_model")  # before the base loads: a cut file fails in a second
        base_kind, _ = resolve_model_source(base_spec)
        if base_kind == "adapter":
            raise _nested_adapter_error(adapter_dir, base_spec)
        base = load_model(
            base_spec, device="cpu", dtype=torch.float32 if merge_adapter else dtype,
            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        )
        try:
            with quiet_checkpointing_deprecation():
                model = PeftModel.from_pretrained(base.model, str(adapter_dir), is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise MathtuneError(
                f"could not apply adapter {adapter_dir} to its base '{base_spec}': {first_line(exc)}"
            ) from exc
        if merge_adapter:
            model = model.merge_and_unload().to(dtype)
            model.config.dtype = dtype  # .to() leaves it at the fp32 of the merge
        tokenizer = (
            _load_tokenizer_raw("local-dir", spec, source, trust_remote_code)
            if _has_tokenizer_files(adapter_dir)
            else base.tokenizer
        )
    else:
        load_from = source
        if kind in ("alias-gguf", "gguf-file"):
            load_from = str(ensure_converted(kind, spec, Path(source)))
        model = _from_pretrained(
            load_from,
            kind=kind,
            dtype=dtype,
            # converted GGUFs are plain architectures saved by us: never run remote code for them
            trust_remote_code=trust_remote_code and kind in ("hub", "local-dir"),
            allow_pickle=allow_pickle,
        )
        name = canonical_name(kind, spec, source)
        model.name_or_path = name
        model.config.name_or_path = name
        tokenizer = _load_tokenizer_raw(kind, spec, source, trust_remote_code)
    _tokenizer_policy(tokenizer, model)
    model.to(device)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        source=source,
        kind=kind,
        is_adapter=kind == "adapter",
        base=base_spec,
    )


def load_for_inference(spec: str, *, device: str, precision: str, trust_remote_code: bool = False,
                       allow_pickle: bool = False) -> LoadedModel:
    """Any model spec -> a model ready to generate: the one loading policy of eval, compare, ask,
    rft, export and ``mathtune.load``, so they all run the same weights.

    ``device`` and ``precision`` are concrete (``hardware.choose_device`` / ``choose_precision``
    decide "auto"). A LoRA adapter is merged (in fp32, then cast to ``precision``'s dtype: see
    ``load_model``), because one matmul per layer is faster than base + LoRA and an unmerged bf16
    adapter rounds differently, which would make one entry point's answers differ from another's.
    Attention is the library's default implementation for the model (sdpa for Llama/Qwen2).
    """
    from mathtune.hardware import dtype_of

    return load_model(spec, device=device, dtype=dtype_of(precision), merge_adapter=True,
                      trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)


def _linear_module_names(model) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    )


@contextlib.contextmanager
def quiet_checkpointing_deprecation():
    """PEFT 0.21 (on every LoRA load) and TRL 1.16 (``GRPOTrainer``'s scoring pass) call transformers 5's
    deprecated ``is_gradient_checkpointing``: a FutureWarning about library internals, nothing a user can
    act on. Only that one is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def lora_merge_blocker(model) -> str | None:
    """Why ``lora_merged`` would leave ``model``'s LoRA unmerged, or None when it merges.

    Only float32 base weights merge: adding the delta and subtracting it again gives a float32 weight
    back to within two roundings (each at most 2^-24 ~ 6e-8 relative), a random walk over a run: after
    1,000 rollouts ~sqrt(1000) x 6e-8 ~ 2e-6 relative typically, 1.2e-4 if every rounding went one way.
    A bfloat16 weight rounds at 2^-9 ~ 2e-3 relative, so 1,000 rollouts would walk it ~6e-2: the LoRA
    would train on top of a different model."""
    layers = _lora_layers(model)
    if not layers:
        return "no LoRA adapter"
    if any(layer.merged for layer in layers):
        return "the LoRA is merged already"
    dtypes = {layer.get_base_layer().weight.dtype for layer in layers}
    if dtypes != {torch.float32}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        return f"base weights in {names} (unmerging would not restore them exactly; float32 only)"
    return None


@contextlib.contextmanager
def lora_merged(model):
    """Inside, ``model``'s LoRA deltas are folded into their base weights (PEFT's public ``merge_adapter``;
    TRL wraps the same pair around each vLLM weight sync), and unmerged on the way out, errors included.

    Why: an unmerged LoRA projection runs the base matmul, then A, B, the scale and an add, five ops
    where a merged one runs one, and a decode step of SmolLM2-135M has 210 such projections (30 layers
    x 7): on a 2-core fp32 CPU the GRPO sampler ran 1.20x faster merged, for a merge + unmerge of 0.4-0.6 s
    a rollout call (bench/rollout_lora_merge.py). Yields None when merged, else why not
    (``lora_merge_blocker``); the model is then left as it is."""
    why_not = lora_merge_blocker(model)
    if why_not is not None:
        yield why_not
        return
    model.merge_adapter()
    try:
        yield None
    finally:
        model.unmerge_adapter()


def apply_lora(
    model,
    *,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    target_modules: list[str] | str | None = None,
):
    """Wrap ``model`` in a LoRA PeftModel (task CAUSAL_LM). ``target_modules``: module names (the last
    part of the dotted name), a comma-separated string, "all-linear", or None for the attention and
    MLP projections under the names of the model's family (``families.lora_target_modules``)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise MathtuneError("the model already carries a LoRA adapter: load the base model to add a new one")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise MathtuneError(f"LoRA r must be a positive integer, got {r!r}: set --lora-r")
    if not alpha > 0:
        raise MathtuneError(f"LoRA alpha must be > 0, got {alpha!r}: set --lora-alpha")
    if not 0 <= dropout < 1:
        raise MathtuneError(f"LoRA dropout must be in [0, 1), got {dropout!r}: set --lora-dropout")

    if target_modules is None:
        targets: list[str] | str = lora_target_modules(model)
    elif isinstance(target_modules, str):
        targets = (
            "all-linear"
            if target_modules.strip() == "all-linear"
            else [t.strip() for t in target_modules.split(",") if t.strip()]
        )
    else:
        targets = [str(t) for t in target_modules]
        if targets == ["all-linear"]:  # `--target-modules all-linear` arrives as a one-item list
            targets = "all-linear"
    if not targets:
        raise MathtuneError("LoRA target modules are empty: set --target-modules (e.g. q_proj v_proj, or all-linear)")
    if targets != "all-linear":
        available = _linear_module_names(model)
        absent = [t for t in targets if t not in available]
        if absent:
            raise MathtuneError(
                f"LoRA target module(s) {', '.join(absent)} not in this model; its linear modules are: "
                f"{', '.join(available)}: set --target-modules to some of these (or all-linear)"
            )
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
    )
    with quiet_checkpointing_deprecation():
        return get_peft_model(model, config)

