"""``--dataset ORG/NAME[:CONFIG]``: any Hugging Face dataset, read by ``datasets.load_dataset``.

Offline (HF_HUB_OFFLINE=1, or the hub unreachable) it reads datasets' local cache, as the built-in
GSM8K does; a local directory laid out like a dataset repo is read by the same call. Rows go
through the file task's column mapping and gold-answer reading (``mathtune.tasks.rows``).
"""

from __future__ import annotations

from mathtune.errors import MathtuneError
from mathtune.tasks import Example


def parse_dataset_spec(spec: str) -> tuple[str, str | None]:
    """``"ORG/NAME:CONFIG"`` -> ``("ORG/NAME", "CONFIG")``; the config is optional."""
    name, _, config = spec.partition(":")
    if not name.strip() or (_ and not config.strip()):
        raise MathtuneError(f"--dataset {spec!r}: write ORG/NAME or ORG/NAME:CONFIG, e.g. openai/gsm8k:main")
    return name.strip(), config.strip() or None


def load_hub_split(spec: str, split: str) -> list[dict]:
    from mathtune.compat import hub_offline
    from mathtune.models.hub import hub_local_only

    name, config = parse_dataset_spec(spec)
    local_only = hub_local_only()  # an unreachable hub: the cache at once, not ~25 s of retries
    try:
        from datasets import DownloadConfig, get_dataset_split_names, load_dataset

        with hub_offline(local_only):
            try:
                return list(load_dataset(name, config, split=split,
                                         download_config=DownloadConfig(local_files_only=local_only)))
            except ValueError as err:
                if "split" not in str(err).lower():
                    raise
                splits = get_dataset_split_names(name, config)
                raise MathtuneError(f"--dataset {spec} has no split {split!r}; it has {', '.join(splits)}: "
                                    "pick one with --train-split/--eval-split") from None
    except MathtuneError:
        raise
    except Exception as err:  # network, auth, missing config: one line with the cause and the way out
        where = "the hub is unreachable and no cached copy exists" if local_only else type(err).__name__
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise MathtuneError(f"could not load --dataset {spec} split {split} ({where}: {detail}); check the name "
                            "and config, or pass --train-file/--eval-file") from err


def hub_examples(spec: str, split: str, fields, *, strip_calc: bool) -> list[Example]:
    from mathtune.tasks.gsm8k import make_example
    from mathtune.tasks.rows import BadRow, numbered_rows

    rows = load_hub_split(spec, split)
    if not rows:
        raise MathtuneError(f"--dataset {spec} split {split} is empty")
    examples = []
    for index, row in numbered_rows(enumerate(rows), fields):
        try:
            if isinstance(row, BadRow):
                raise ValueError(row.reason)
            examples.append(make_example(f"{spec}:{split}:{index}", row, strip_calc=strip_calc, bare_number_ok=True,
                                         symbolic_ok=True))
        except ValueError as err:
            raise MathtuneError(f"--dataset {spec} {split} row {index}: {err}") from None
    return examples
