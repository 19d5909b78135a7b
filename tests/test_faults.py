"""Faults survived (issue 33): every write path under a full disk, and damage found before use.

Each write path gets ``OSError(ENOSPC)`` from its lowest write call (the Python ``open`` of
mathtune.atomic, ``os.write`` of an append, ``torch.save``, safetensors' ``save_file``, matplotlib's
``savefig``, the GGUF writer) and must end in one ``error:`` line (exit 1 at the CLI) naming the path,
the bytes and the free space, with the partial output removed and the earlier complete output untouched
and loadable. One test fills a real tmpfs (where the machine lets a mount namespace mount one), and the
three cases of the issue are replayed through the CLI in subprocesses. The failure zoo
(tests/test_failure_zoo.py) has the same faults through the training API, and the cache rebuild.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT
from mathtune import atomic
from mathtune.atomic import append_whole, write_failure_kind, write_files_atomically, write_text_atomically
from mathtune.errors import DiskFull, MathtuneError
from mathtune.integrity import files_problem, record_files, safetensors_problem
from mathtune.run_dir import RunDir

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def enospc(path="") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def cut(path: Path, keep: float = 0.5) -> None:
    """A file cut short, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def assert_one_line(message: str, *parts: str) -> None:
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def no_temps(root: Path) -> bool:
    return not [p for p in root.rglob("*") if ".tmp-" in p.name]


# --------------------------------------------------------------------------- the helpers


class _FillingFile:
    """A text file whose writes stop, with ENOSPC, after ``room`` characters (a disk filling up)."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, text):
        if len(text) > self.room:
            self.handle.write(text[: self.room])
            self.handle.flush()
            raise enospc(self.handle.name)
        self.room -= len(text)
        return self.handle.write(text)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def fill_disk_on_open(monkeypatch, matching: str, room: int = 10):
    """mathtune.atomic's ``open`` of a temp file whose name contains ``matching`` gets a disk with ``room``
    characters left."""
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode and matching in Path(path).name:
            return _FillingFile(handle, room)
        return handle

    monkeypatch.setattr(atomic, "open", fake_open, raising=False)


def test_atomic_text_write_out_of_space_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")
    fill_disk_on_open(monkeypatch, "summary.json")
    with pytest.raises(DiskFull) as err:
        write_text_atomically(target, "x" * 5000, hint="pass another --output")
    assert_one_line(str(err.value), str(target), "out of disk space", "needs ~5.0 kB", "10 bytes written",
                    "free there", "pass another --output")
    assert err.value.needed == 5000 and err.value.written == 10 and err.value.free > 0
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_pair_of_files_is_replaced_together_or_not_at_all(tmp_path, monkeypatch):
    """The eval log and its summary: the summary's write fails, so neither is replaced."""
    items, summary = tmp_path / "m-task.jsonl", tmp_path / "m-task.summary.json"
    write_files_atomically({items: "old items\n", summary: "old summary\n"})
    fill_disk_on_open(monkeypatch, "summary")
    with pytest.raises(DiskFull) as err:
        write_files_atomically({items: "new items\n" * 100, summary: "new summary\n" * 100}, hint="free space")
    assert_one_line(str(err.value), str(summary), "out of disk space", "free space")
    assert items.read_text() == "old items\n" and summary.read_text() == "old summary\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [items.name, summary.name]


def fill_disk_for_fd(monkeypatch, fd: int, room: int):
    """``os.write`` to ``fd`` takes ``room`` more bytes, then fails with ENOSPC (other fds unchanged)."""
    real_write = os.write
    left = {"room": room}

    def fake_write(target, data):
        if target != fd:
            return real_write(target, data)
        if left["room"] <= 0:
            raise enospc()
        written = real_write(target, bytes(data[: left["room"]]))
        left["room"] -= written
        return written

    monkeypatch.setattr(os, "write", fake_write)


def test_append_out_of_space_cuts_the_torn_lines_back(tmp_path, monkeypatch):
    path = tmp_path / "rft.jsonl"
    with open(path, "a", encoding="utf-8") as sink:
        append_whole(sink, '{"a": 1}\n')
        fill_disk_for_fd(monkeypatch, sink.fileno(), room=7)
        with pytest.raises(DiskFull) as err:
            append_whole(sink, '{"b": 2}\n{"c": 3}\n', hint="run with --resume")
    assert_one_line(str(err.value), str(path), "7 bytes written before it failed, removed", "run with --resume")
    assert path.read_text() == '{"a": 1}\n'  # the earlier line whole, no torn half line after it


def test_a_writer_that_drops_the_errno_is_a_full_disk_only_when_the_disk_is_nearly_full():
    """torch.save's zip writer: "basic_ios::clear: iostream error", then "unexpected pos" from its close."""
    try:
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 192 vs 106")
    except RuntimeError as exc:
        torch_error = exc
    assert write_failure_kind(torch_error, free_at_failure=4096) == "full"
    assert write_failure_kind(torch_error, free_at_failure=10**11) == "failed"
    assert write_failure_kind(enospc(), free_at_failure=10**11) == "full"
    assert write_failure_kind(ValueError("a bug"), free_at_failure=0) is None
    try:  # a one-line error raised from an OSError (a GGUF that will not read) is no failed write
        try:
            raise OSError("unreadable GGUF")
        except OSError as cause:
            raise MathtuneError("could not convert GGUF file m.gguf: unreadable GGUF") from cause
    except MathtuneError as exc:
        assert write_failure_kind(exc, free_at_failure=0) is None


def test_records_find_a_file_cut_short_and_a_changed_byte(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "b.txt").write_text("hello")
    record = record_files(tmp_path)
    assert files_problem(tmp_path, record) is None and safetensors_problem(tmp_path / "a.safetensors") is None
    (tmp_path / "b.txt").write_text("hellO")
    assert "b.txt does not match its recorded SHA-256" in files_problem(tmp_path, record)
    cut(tmp_path / "a.safetensors")
    assert "a.safetensors is 2" in files_problem(tmp_path, record) and "cut short" in files_problem(tmp_path, record)
    assert "cut short" in safetensors_problem(tmp_path / "a.safetensors")


# --------------------------------------------------------------------------- training (the CLI, in process)


def train_args(model_dir, out, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--task", "unit-conversion", "--max-samples", "16",
            "--batch-size", "4", "--precision", "fp32", "--device", "cpu", "--no-guards", "--eval-samples", "0",
            "--output-dir", str(out), *map(str, extra)]


def run_cli(args) -> int:
    from mathtune.cli import main

    return main(args)


def test_checkpoint_out_of_space_removes_it_keeps_the_earlier_one_and_resume_finishes(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):  # the second checkpoint's optimizer state: the disk fills midway
            Path(f).write_bytes(b"\0" * 1000)
            raise enospc(f)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert run_cli(train_args(tiny_model_dir, out, "--max-steps", 6, "--save-steps", 2)) == 1
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1
    assert_one_line(errors[0], str(out / "checkpoint-4"), "out of disk space writing a checkpoint", "needs ~",
                    "written before it failed, removed", "free there", "--save-total-limit",
                    "--resume auto continues from checkpoint-2")
    run = RunDir(out)
    assert [p.name for p in run.checkpoints()] == ["checkpoint-2"]
    assert run.checkpoint_problem(out / "checkpoint-2") is None
    load_file(str(out / "checkpoint-2" / "adapter_model.safetensors"))  # loadable
    assert not (out / "adapter_model.safetensors").exists()  # no final model from a failed run

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    assert run_cli(train_args(tiny_model_dir, out, "--max-steps", 6, "--save-steps", 2, "--resume", "auto")) == 0
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    assert [p.name for p in run.complete_checkpoints()] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_final_model_out_of_space_removes_it_and_keeps_the_checkpoints(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import peft.peft_model

    out = tmp_path / "run"
    real_save_file = peft.peft_model.safe_save_file

    def save_file(tensors, filename, *args, **kwargs):
        if Path(filename).parent == out:  # the final adapter, not a checkpoint's
            Path(filename).write_bytes(b"\0" * 500)
            raise enospc(filename)
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)
    assert run_cli(train_args(tiny_model_dir, out, "--max-steps", 2, "--save-steps", 2)) == 1
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1
    assert_one_line(errors[0], str(out), "out of disk space writing the final model", "free there",
                    "--resume auto continues from checkpoint-2 and saves the final model")
    assert not (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert (out / "metrics.jsonl").is_file() and (out / "mathtune_config.yaml").is_file()
    assert RunDir(out).checkpoint_problem(out / "checkpoint-2") is None


# --------------------------------------------------------------------------- export, cache, eval, rft, report


@pytest.mark.parametrize("part", ["model", "tokenizer", "gguf"])
def test_export_out_of_space_leaves_the_earlier_export(tiny_model_dir, tmp_path, monkeypatch, part):
    import mathtune.gguf_export
    import transformers.modeling_utils
    from mathtune.export import export_model

    target = tmp_path / "export"
    export_model(str(tiny_model_dir), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def partial_then_full(path):
        Path(path).write_bytes(b"\0" * 4096)
        raise enospc(path)

    if part == "model":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file",
                            lambda tensors, filename, *a, **k: partial_then_full(filename))
    elif part == "tokenizer":
        from transformers import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        for cls in (PreTrainedTokenizerBase, TokenizersBackend):  # the base's, and the fast tokenizers' override
            monkeypatch.setattr(cls, "save_pretrained",
                                lambda self, directory, *a, **k: partial_then_full(Path(directory) / "tokenizer.json"))
    else:
        monkeypatch.setattr(mathtune.gguf_export, "write_gguf", lambda model, tok, tok_dir, path, *a, **k:
                            partial_then_full(path))
    with pytest.raises(DiskFull) as err:
        export_model(str(tiny_model_dir), target, overwrite=True, gguf=part == "gguf", gguf_type="f32")
    assert_one_line(str(err.value), str(target), "out of disk space writing the export", "written before it failed",
                    "free there", "another --output")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # untouched
    assert no_temps(tmp_path)


def test_cache_build_out_of_space_leaves_no_cache(tiny_gguf, tmp_path, monkeypatch):
    import transformers.modeling_utils
    from mathtune.models.load import load_model

    monkeypatch.setenv("MATHTUNE_CACHE", str(tmp_path / "cache"))

    def save_file(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 2048)
        raise enospc(filename)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    with pytest.raises(DiskFull) as err:
        load_model(str(tiny_gguf))
    assert_one_line(str(err.value), str(tmp_path / "cache"), "out of disk space writing the fp32 conversion",
                    "free there", "MATHTUNE_CACHE")
    assert list((tmp_path / "cache").iterdir()) == []


def test_eval_cache_out_of_space_names_the_cache_fix(tmp_path, monkeypatch):
    from mathtune import evaluation
    from mathtune.generation.settings import Generations

    monkeypatch.setenv("MATHTUNE_CACHE", str(tmp_path / "cache"))
    fill_disk_on_open(monkeypatch, "key123")
    with pytest.raises(DiskFull) as err:
        evaluation._store_cached("key123", Generations([["#### 4"]], [[3]], 0.1), {"model": "m"})
    assert_one_line(str(err.value), "key123", "out of disk space", "MATHTUNE_CACHE", "--no-cache")
    assert no_temps(tmp_path)


def test_eval_log_out_of_space_keeps_the_earlier_log_and_summary(tmp_path, monkeypatch):
    from mathtune.evaluation import write_eval_log

    items, summary = write_eval_log(tmp_path, "m", "gsm8k", [{"id": 1, "correct": True}], {"accuracy": 1.0})
    before = (items.read_text(), summary.read_text())
    fill_disk_on_open(monkeypatch, ".jsonl")
    with pytest.raises(DiskFull) as err:
        write_eval_log(tmp_path, "m", "gsm8k", [{"id": i, "correct": False} for i in range(50)], {"accuracy": 0.0})
    assert_one_line(str(err.value), str(items), "out of disk space", "another --output")
    assert (items.read_text(), summary.read_text()) == before and no_temps(tmp_path)


def test_rft_output_out_of_space_keeps_whole_questions_and_resume_finishes(tmp_path, monkeypatch):
    from mathtune.generation.settings import Generations
    from mathtune.rft import RFTConfig, run_rft

    train = tmp_path / "train.jsonl"
    rows = [{"question": f"Sam has {a} pens and gets {b} more. How many pens?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
            for a, b in ((2, 3), (10, 5), (7, 8))]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rft.jsonl"

    def generator(questions, seed):  # wrong answers: each question's append is its gold row alone
        return Generations([["#### 0"] * 4 for _ in questions], [[3] * 4] * len(questions), 0.1)

    config = dict(task="gsm8k", train_file=str(train), output=str(out), num_samples=4, batch_size=4)
    real_write, calls = os.write, {"n": 0}

    def write(fd, data):  # the second question's append finds the disk full after 20 bytes
        if fd > 2 and b"pens" in bytes(data):
            calls["n"] += 1
            if calls["n"] == 2:
                real_write(fd, bytes(data[:20]))
                raise enospc(out)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(DiskFull) as err:
        run_rft(RFTConfig.from_flat(**config), generator=generator, verbose=False)
    assert_one_line(str(err.value), str(out), "out of disk space", "20 bytes written before it failed, removed",
                    "--resume")
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["rft"]["question"] for r in kept} == {0}  # question 0 whole, nothing of question 1
    monkeypatch.setattr(os, "write", real_write)
    result = run_rft(RFTConfig.from_flat(**config, resume=True), generator=generator, verbose=False)
    assert result["gold_rows"] == 3


def test_report_and_plots_out_of_space_keep_the_earlier_ones(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from mathtune.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s, "grad_norm": 1.0,
                                                           "learning_rate": 1e-4, "seconds": s}) + "\n"
                                               for s in range(1, 5)))
    report = write_report(run)
    plots = sorted((run / "plots").glob("*.png"))
    assert plots
    before = {p: p.read_bytes() for p in [report, *plots]}

    def savefig(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise enospc(fname)

    monkeypatch.setattr(Figure, "savefig", savefig)
    with pytest.raises(DiskFull) as err:
        write_report(run)
    assert_one_line(str(err.value), str(run / "plots"), "out of disk space", "mathtune report again")
    assert {p: p.read_bytes() for p in before} == before and no_temps(run)
    monkeypatch.undo()
    fill_disk_on_open(monkeypatch, "report.md")
    with pytest.raises(DiskFull) as err:
        write_report(run)
    assert_one_line(str(err.value), str(report), "out of disk space")
    assert report.read_bytes() == before[report] and no_temps(run)


# --------------------------------------------------------------------------- damaged checkpoints and weights


def test_damaged_run_dir_adapter_is_a_one_line_error(tiny_model_dir, tmp_path):
    from mathtune import training
    from conftest import tiny_train_config
    from mathtune.models.load import load_model

    result = training.train(tiny_train_config(tiny_model_dir, tmp_path / "run", max_steps=1, eval_samples=0))
    cut(result.run_dir / "adapter_model.safetensors")
    with pytest.raises(MathtuneError) as err:
        load_model(str(result.run_dir))
    assert_one_line(str(err.value), str(result.run_dir / "adapter_model.safetensors"), "damaged weights file",
                    "cut short", "copy it again")


def test_resume_with_every_checkpoint_damaged_says_how_to_start_over(tmp_path):
    run = RunDir(tmp_path)
    for step in (2, 4):
        checkpoint = run.checkpoint(step)
        checkpoint.mkdir()
        (checkpoint / "trainer_state.json").write_text("{}")
        (checkpoint / "adapter_model.safetensors").write_bytes(b"x" * 100)
        run.marker(checkpoint).write_text(json.dumps({"step": step, "complete": True,
                                                      "files": record_files(checkpoint)}))
        cut(checkpoint / "adapter_model.safetensors")

    with pytest.raises(MathtuneError) as err:
        run.resolve_resume("auto")
    assert_one_line(str(err.value), "no whole checkpoint", "checkpoint-4: adapter_model.safetensors is 50 bytes",
                    "checkpoint-2:", "start over with a new --output-dir")
    with pytest.raises(MathtuneError, match="--resume .*checkpoint-2: damaged checkpoint"):
        run.resolve_resume(str(run.checkpoint(2)))


# --------------------------------------------------------------------------- the three cases, replayed


def mathtune(*args, timeout=600, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    return subprocess.run([sys.executable, "-m", "mathtune.cli", *map(str, args)], cwd=REPO_ROOT, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def test_case_1_a_real_full_filesystem(tiny_model_dir, tmp_path):
    """A 6 MB tmpfs (a mount namespace, where the machine allows one): the first checkpoint (~3.8 MB)
    fits, the second does not. The run ends in one error line, the partial checkpoint is gone, the first
    is whole; with room made (the tmpfs grown), --resume auto finishes."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) here: cannot mount a small filesystem for this test")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m none {tmp_path}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs in a user namespace: {probe.stderr.strip()}")
    mount = tmp_path / "small"
    mount.mkdir()
    out = mount / "run"
    cli = [sys.executable, "-m", "mathtune.cli", *train_args(tiny_model_dir, out, "--max-steps", 6, "--save-steps", 3)]
    check = textwrap.dedent(f"""
        import json, sys
        from safetensors.torch import load_file
        from mathtune.run_dir import RunDir
        run = RunDir({str(out)!r})
        load_file(str(run.checkpoint(3) / "adapter_model.safetensors"))
        print("STATE", json.dumps({{"checkpoints": [p.name for p in run.checkpoints()],
              "problem": run.checkpoint_problem(run.checkpoint(3))}}))
    """)
    script = " && ".join([
        f"mount -t tmpfs -o size=6m none {mount}",
        "{ " + " ".join(map(_quote, cli)) + "; echo RC=$?; }",
        f"{_quote(sys.executable)} -c {_quote(check)}",
        f"mount -o remount,size=40m {mount}",
        " ".join(map(_quote, cli + ["--resume", "auto"])) + "; echo RESUMED=$?",
    ])
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    stdout, stderr = proc.stdout, proc.stderr
    assert "RC=1" in stdout, stderr[-3000:]
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr[-3000:]
    assert_one_line(errors[0], str(out / "checkpoint-6"), "out of disk space writing a checkpoint", "free there",
                    "--resume auto continues from checkpoint-3")
    assert "Traceback" not in stderr.split("RESUMED")[0]
    state = json.loads(next(line for line in stdout.splitlines() if line.startswith("STATE "))[6:])
    assert state == {"checkpoints": ["checkpoint-3"], "problem": None}
    assert "RESUMED=0" in stdout, stderr[-3000:]


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(str(text))


def test_case_2_a_damaged_newest_checkpoint_is_skipped_and_the_run_finishes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    first = mathtune(*train_args(tiny_model_dir, out, "--max-steps", 4, "--save-steps", 2, "--save-total-limit", 5))
    assert first.returncode == 0, first.stderr[-3000:]
    (out / "adapter_model.safetensors").unlink()  # as if the run had been stopped after checkpoint-4
    cut(out / "checkpoint-4" / "adapter_model.safetensors")
    resumed = mathtune(*train_args(tiny_model_dir, out, "--max-steps", 4, "--save-steps", 2, "--save-total-limit", 5,
                                   "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    skipped = [line for line in resumed.stderr.splitlines() if "skipping the damaged checkpoint-4" in line]
    assert len(skipped) == 1
    assert_one_line(skipped[0], "adapter_model.safetensors is", "its record says", "resuming from checkpoint-2")
    assert "Traceback" not in resumed.stderr and "resuming from" in resumed.stdout
    run = RunDir(out)
    assert run.checkpoint_problem(out / "checkpoint-4") is None  # saved again, whole
    assert (out / "damaged-checkpoint-4").is_dir()  # moved aside, not deleted
    load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.integration
def test_case_3_a_damaged_model_cache_is_rebuilt_and_the_command_runs(tmp_path):
    """The bundled SmolLM2-135M converted into a fresh cache, its model.safetensors cut short: the next
    command says so in one line, converts again from the GGUF and answers."""
    cache = tmp_path / "cache"
    ask = ("ask", "smollm2-135m", "What is 2 + 2?", "--max-new-tokens", 8, "--precision", "fp32")
    first = mathtune(*ask, MATHTUNE_CACHE=str(cache))
    assert first.returncode == 0, first.stderr[-3000:]
    entry = cache / "smollm2-135m"
    cut(entry / "model.safetensors")
    again = mathtune(*ask, MATHTUNE_CACHE=str(cache))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr and again.stdout == first.stdout
    rebuilt = [line for line in again.stderr.splitlines() if "rebuilding it from" in line]
    assert len(rebuilt) == 1 and "model.safetensors is" in rebuilt[0] and "its record says" in rebuilt[0]
    assert safetensors_problem(entry / "model.safetensors") is None
