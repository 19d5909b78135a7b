"""``mathtune rft``: selection rules, and end to end on the tiny model with a fake judge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from conftest import REPO_ROOT
from mathtune.cli import _raise_terminated
from mathtune.errors import ConfigError, MathtuneError, Terminated
from mathtune.generation.settings import Generations
from mathtune.rft import RFTConfig, as_target, group_seed, run_rft, select_solutions, task_judge
from mathtune.tasks import Example, get_task

GOLD = Example("q1", "Tom has 3 apples and buys 4. How many?", "3+4=<<3+4=7>>7\n#### 7", 7.0)


def test_selection_keeps_distinct_correct_solutions_in_the_task_format():
    samples = [[
        "He has 3+4=<<3+4=7>>7 apples.\n#### 7",  # correct, new
        "He has  3+4=<<3+4=7>>7   apples.\n#### 7",  # the same up to whitespace: duplicate
        "3+4=<<3+4=7>>7\n#### 7",  # the gold solution itself: nothing new
        "3*4=12\n#### 12",  # wrong
        "So the answer is 7.",  # right by flexible extraction: gets '#### 7' appended
        "4+3=7\n#### 7\nQuestion: and then?",  # text after the answer line is cut
        "7\n#### 7\n#### 7",  # correct but two '####' lines: not a valid target... cut to the first line
        "7 7 7 7",  # a loop (flagged below): never kept
    ]]
    loops = [[False] * 7 + [True]]
    selection = select_solutions([GOLD], samples, loops, task_judge("exact"), get_task("gsm8k"))
    assert selection.kept == [[
        "He has 3+4=<<3+4=7>>7 apples.\n#### 7",
        "So the answer is 7.\n#### 7",
        "4+3=7\n#### 7",
        "7\n#### 7",
    ]]
    assert selection.rejected == {"duplicate": 2, "wrong": 1, "loop": 1}


def test_as_target_rejects_what_the_task_would_reject():
    assert as_target("#### 7 #### 7", 7.0) is None  # two '####' on one line
    assert as_target("", 7.0) == "#### 7"


def test_config_problems_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        RFTConfig.from_flat(task="gsm8k", output=str(tmp_path / "x.csv"), temperature=0.0, num_samples=0).validate()
    text = str(err.value)
    assert "--output" in text and "--temperature" in text and "--num-samples" in text
    with pytest.raises(ConfigError, match="--output is required"):
        RFTConfig.from_flat().validate()


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"question": f"Sam has {a} pens and gets {b} more. How many pens?",
             "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"} for a, b in ((2, 3), (10, 5), (7, 8))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def training_rows(path):
    """What training reads: the {question, answer} of every row, in file order."""
    return [{"question": r["question"], "answer": r["answer"]} for r in rows_of(path)]


@pytest.mark.parametrize("task", ["gsm8k", "file"])
def test_end_to_end_on_the_tiny_model_with_a_fake_judge(tiny_model_dir, train_file, tmp_path, task, one_thread, capsys):
    """Real sampling from the tiny model (k=4, temperature 0.7); a fake judge calls every sample
    of the first and third questions correct. The file holds each question's gold row followed by
    its distinct samples turned into '#### gold' targets, and the task reads it back as training data."""
    out = tmp_path / "rft.jsonl"
    config = RFTConfig.from_flat(model=str(tiny_model_dir), task=task, train_file=str(train_file), output=str(out),
                       max_new_tokens=12, batch_size=8, device="cpu", precision="fp32")
    lucky = {0, 2}
    questions = get_task(task, train_file=str(train_file)).examples("train")
    judged = []

    def fake_judge(text, example):
        judged.append(example.id)
        return questions.index(example) in lucky

    result = run_rft(config, is_correct=fake_judge)
    assert len(judged) == 3 * 4  # every sample judged once
    rows = training_rows(out)
    golds = [{"question": q.question, "answer": q.answer_text} for q in questions]
    assert [r for r in rows if r in golds] == golds  # each gold row once, in train order
    new = [r for r in rows if r not in golds]
    current = None
    for r in rows:  # gold 0, its samples, gold 1, its samples, ...: every sample right after its question's gold
        current = r["question"] if r in golds else current
        assert r["question"] == current
    assert len(new) == result["new_rows"] and 1 <= len(new) <= 8
    assert {r["question"] for r in new} <= {questions[i].question for i in lucky}
    for r in new:
        gold = next(q for q in questions if q.question == r["question"]).gold
        assert r["answer"].endswith(f"#### {gold:g}")
    assert len({(r["question"], " ".join(r["answer"].split())) for r in new}) == len(new)  # distinct
    gained = result["questions_gained"]
    assert gained.get(0, 0) >= 1 and sum(gained.values()) == 3
    captured = capsys.readouterr()
    assert f"{result['gold_rows']} gold rows + {result['new_rows']} sampled solutions" in captured.out
    assert "rft: 3/3 questions (100%)" in captured.err and "done in" in captured.err  # the progress line
    # the written file is training data for the same task: every row passes its checks
    reread = get_task(task, train_file=str(out)).examples("train")
    assert len(reread) == len(rows)


def test_sampled_correct_solutions_from_a_scripted_generator(train_file, tmp_path):
    """The task's own judge (exact, flexible extraction) with a generator stub: which samples are
    kept is decided by their text alone."""
    texts = [["2+3=5\n#### 5", "2+3=6\n#### 6", "5", "2+3=5\n#### 5"],
             ["#### 14", "#### 16", "#### 16", "15 pens"],
             ["no idea"] * 4]
    calls = []

    def generator(questions, seed):
        calls.append((len(questions), seed))
        return Generations(texts, [[1] * 4] * 3, 0.1)

    out = tmp_path / "rft.jsonl"
    config = RFTConfig.from_flat(task="gsm8k", train_file=str(train_file), output=str(out))
    result = run_rft(config, generator=generator, verbose=False)
    assert calls == [(3, group_seed(config.seed, 0))]  # batch 32 / k=4: the 3 questions are one group
    assert result["questions_gained"] == {0: 1, 1: 1, 2: 1}
    assert result["rejected"] == {"wrong": 8, "duplicate": 1}
    new = [r["answer"] for r in rows_of(out) if "new_solutions" not in r["rft"]]
    assert new == ["2+3=5\n#### 5", "5\n#### 5", "15 pens\n#### 15"]


def test_other_tasks_make_sampled_targets_as_they_make_their_gold_rows(train_file, tmp_path):
    """Through the task's training_target: task 'file' strips the annotations (--strip-calculator) from
    the samples as from its gold rows and knows no equation chains; unit-conversion keeps the text."""
    sample = "So 2+3=<<2+3=5>>5 pens.\n#### 5"
    stripping = get_task("file", train_file=str(train_file), strip_calculator=True)
    gold = stripping.examples("train")[0]
    assert gold.answer_text == "2+3=5\n#### 5"  # the gold row, stripped by the task's reader
    kept = select_solutions([gold], [[sample]], None, task_judge("exact"), stripping).kept
    assert kept == [["So 2+3=5 pens.\n#### 5"]]  # not a chain, and stripped like the gold row
    generated = get_task("unit-conversion")
    kept = select_solutions([gold], [[sample]], None, task_judge(generated.judge_rule), generated).kept
    assert kept == [[sample]]
    stripping.target_format = "equations"  # a format the task cannot make: an error, not full targets
    with pytest.raises(MathtuneError, match="--target-format equations applies to --task gsm8k"):
        select_solutions([gold], [[sample]], None, task_judge("exact"), stripping)
    with pytest.raises(MathtuneError, match="task 'file' takes --target-format full"):
        get_task("file", train_file=str(train_file), target_format="equations-drop")


# ------------------------------------------------------------------ appending as it goes, --resume

@pytest.fixture
def five_questions(tmp_path):
    path = tmp_path / "train5.jsonl"
    rows = [{"question": f"Ana has {a} cups and buys {a + 1} more. How many cups?",
             "answer": f"{a}+{a + 1}=<<{a}+{a + 1}={2 * a + 1}>>{2 * a + 1}\n#### {2 * a + 1}"} for a in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_sampler(tiny_model_dir, one_thread):
    """The real batched Generator on the tiny model, as run_rft calls it (questions, seed)."""
    from mathtune.generation.engine import Generator
    from mathtune.config import GenerationArgs
    from mathtune.models.load import load_model

    loaded = load_model(str(tiny_model_dir), device="cpu")
    settings = GenerationArgs(max_new_tokens=10, temperature=0.7, num_samples=4, batch_size=8)
    generator = Generator(loaded.model, loaded.tokenizer, settings, progress=False)
    return lambda questions, seed: generator(questions, seed=seed)


def everything_right(text, example):
    return True  # the tiny model's text is noise: keep every valid, distinct sample


def rft_config(model_dir, train, out, **changes):
    # batch 8 / k=4: groups of 2 questions -> [0, 1] [2, 3] [4]
    return RFTConfig.from_flat(model=str(model_dir), task="gsm8k", train_file=str(train), output=str(out), max_new_tokens=10,
                     batch_size=8, device="cpu", precision="fp32", **changes)


def interrupted_after(generator, calls: int):
    """The generator, with Ctrl-C arriving while it samples group number ``calls``."""
    made = []

    def sample(questions, seed):
        if len(made) == calls:
            raise KeyboardInterrupt
        made.append(seed)
        return generator(questions, seed)

    return sample


def test_interrupted_run_keeps_what_it_sampled_and_resume_equals_an_uninterrupted_run(
        tiny_model_dir, tiny_sampler, five_questions, tmp_path, capsys):
    whole = tmp_path / "whole.jsonl"
    expected = run_rft(rft_config(tiny_model_dir, five_questions, whole), is_correct=everything_right,
                       generator=tiny_sampler, verbose=False)
    assert expected["new_rows"] >= 5  # the comparison below has sampled rows to compare

    part = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_rft(rft_config(tiny_model_dir, five_questions, part), is_correct=everything_right,
                generator=interrupted_after(tiny_sampler, 2))
    assert "stopped with 4 of 5 questions" in capsys.readouterr().err
    assert [r["rft"]["question"] for r in rows_of(part) if "new_solutions" in r["rft"]] == [0, 1, 2, 3]

    sampled = []

    def counting(questions, seed):
        sampled.extend(questions)
        return tiny_sampler(questions, seed)

    resumed = run_rft(rft_config(tiny_model_dir, five_questions, part, resume=True), is_correct=everything_right,
                      generator=counting)
    assert sampled == [json.loads(five_questions.read_text().splitlines()[4])["question"]]  # only question 4
    assert part.read_text() == whole.read_text()
    assert resumed == {**expected, "output": str(part)}
    assert "rft: 1/1 questions (100%)" in capsys.readouterr().err


def send_sigterm_to(thread_kind: str) -> None:
    """SIGTERM to this (main) thread, or to another thread of the process, where the kernel may deliver a
    signal sent to the process (`kill`, `timeout`): torch's and the test runner's threads do not block it."""
    if thread_kind == "main thread":
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        return
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    signal.pthread_kill(other.ident, signal.SIGTERM)
    release.set()
    other.join()  # it ran the C-level handler before leaving the kernel: the main thread is flagged now


def signal_mid_write(monkeypatch, path, thread_kind):
    """The output file, with SIGTERM arriving halfway through the first write of its lines (append_whole
    writes them with os.write, so that a full disk can cut a partial write back): Python runs the handler
    in the main thread at its next bytecode, inside the write, unless the handler is held."""
    real_write, sent = os.write, []

    def write(fd, data):
        if sent or not (os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path))):
            return real_write(fd, data)
        sent.append(True)
        written = real_write(fd, bytes(data[: len(data) // 2]))
        send_sigterm_to(thread_kind)
        return written  # a short write, as a signal makes one: the caller writes the rest

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("thread_kind", ["main thread", "another thread"])
def test_sigterm_during_a_write_leaves_whole_lines_and_says_how_to_resume(
        tiny_model_dir, tiny_sampler, five_questions, tmp_path, capsys, monkeypatch, thread_kind):
    """A stop signal is held while a group's rows are written: the file stays one a training run reads
    (no torn last line), and SIGTERM reports what was kept like Ctrl-C does."""
    out = tmp_path / "rft.jsonl"
    signal_mid_write(monkeypatch, out, thread_kind)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)  # as mathtune.cli.main installs it
    try:
        with pytest.raises(Terminated):
            run_rft(rft_config(tiny_model_dir, five_questions, out), is_correct=everything_right,
                    generator=tiny_sampler)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "stopped with 2 of 5 questions" in capsys.readouterr().err  # the first group, written whole
    assert [r["rft"]["question"] for r in rows_of(out) if "new_solutions" in r["rft"]] == [0, 1]
    assert len(get_task("gsm8k", train_file=out).examples("train")) == len(rows_of(out))


@pytest.mark.parametrize("cut", ["torn last line", "a question's last sample line", "a whole question"])
def test_resume_after_a_crash_mid_write_samples_the_cut_question_again(
        tiny_model_dir, tiny_sampler, five_questions, tmp_path, cut):
    whole = tmp_path / "whole.jsonl"
    run_rft(rft_config(tiny_model_dir, five_questions, whole), is_correct=everything_right, generator=tiny_sampler,
            verbose=False)
    text = whole.read_text()
    lines = text.splitlines(keepends=True)
    last_gold = max(i for i, line in enumerate(lines) if "new_solutions" in line)
    assert last_gold < len(lines) - 1  # question 4 kept samples, so its rows can be cut short
    crashed = tmp_path / "crashed.jsonl"
    crashed.write_text({"torn last line": text[:-7],
                        "a question's last sample line": "".join(lines[:-1]),
                        "a whole question": "".join(lines[:last_gold])}[cut])
    run_rft(rft_config(tiny_model_dir, five_questions, crashed, resume=True), is_correct=everything_right,
            generator=tiny_sampler, verbose=False)
    assert crashed.read_text() == text


def test_resume_continues_a_shorter_run_to_more_questions(tiny_model_dir, tiny_sampler, five_questions, tmp_path):
    """--max-samples 2 then --resume with all 5: the same file as one run over 5 (2 is a whole group)."""
    whole, grown = tmp_path / "whole.jsonl", tmp_path / "grown.jsonl"
    run_rft(rft_config(tiny_model_dir, five_questions, whole), is_correct=everything_right, generator=tiny_sampler,
            verbose=False)
    run_rft(rft_config(tiny_model_dir, five_questions, grown, max_samples=2), is_correct=everything_right,
            generator=tiny_sampler, verbose=False)
    run_rft(rft_config(tiny_model_dir, five_questions, grown, resume=True), is_correct=everything_right,
            generator=tiny_sampler, verbose=False)
    assert grown.read_text() == whole.read_text()


def never_called(questions, seed):
    raise AssertionError("nothing should be sampled")


def test_existing_output_without_resume_is_an_error_naming_the_flag(five_questions, tmp_path):
    out = tmp_path / "rft.jsonl"
    out.write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(MathtuneError, match=r"--output .*rft.jsonl exists: add --resume"):
        run_rft(RFTConfig.from_flat(task="gsm8k", train_file=str(five_questions), output=str(out)), generator=never_called,
                verbose=False)
    assert out.read_text() == '{"question": "q", "answer": "#### 1"}\n'  # untouched


def test_resume_refuses_other_settings_another_train_split_or_a_foreign_file(five_questions, train_file, tmp_path):
    texts = lambda n: Generations([["#### 0"] * 4] * n, [[1] * 4] * n, 0.1)  # noqa: E731
    out = tmp_path / "rft.jsonl"
    config = RFTConfig.from_flat(task="gsm8k", train_file=str(five_questions), output=str(out), max_samples=2)
    run_rft(config, generator=lambda questions, seed: texts(len(questions)), verbose=False)
    before = out.read_text()
    with pytest.raises(MathtuneError, match=r"--temperature 0.9 \(the file: 0.7\)"):
        run_rft(RFTConfig.from_flat(task="gsm8k", train_file=str(five_questions), output=str(out), resume=True,
                          temperature=0.9), generator=never_called, verbose=False)
    with pytest.raises(MathtuneError, match=r"question 0 is not question 0 of this train split"):
        run_rft(RFTConfig.from_flat(task="gsm8k", train_file=str(train_file), output=str(out), resume=True),
                generator=never_called, verbose=False)
    assert out.read_text() == before
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(MathtuneError, match=r"foreign.jsonl:1 is not a question's first row"):
        run_rft(RFTConfig.from_flat(task="gsm8k", train_file=str(five_questions), output=str(foreign), resume=True),
                generator=never_called, verbose=False)


def test_cli_rft_bad_flags_exit_2():
    proc = subprocess.run([sys.executable, "-m", "mathtune.cli", "rft", "--task", "unit-conversion",
                           "--output", "x.txt", "--temperature", "0"],
                          capture_output=True, text=True, cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT), "PATH": ""})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "--output x.txt" in proc.stderr and "--temperature" in proc.stderr


# ------------------------------------------------------------------ --target-format equations

CHAIN_GOLD = Example("b1", "A baker makes 30 rolls in the morning and half as many in the afternoon. How many rolls?",
                     "<<30/2=15>> <<30+15=45>> #### 45", 45.0)  # the gsm8k task's equations target of a worded gold
EQUATION_SAMPLES = [
    "<<30/2=15>> <<30+15=45>> #### 45",  # the gold chain itself: nothing new
    "<<30*0.5=15>> <<15+30=45>> #### 45",  # a new chain
    "<<30*0.5=15>>  <<15+30=45>>\n####  45",  # the same chain up to whitespace: duplicate
    "<<30/2=15>> <<30+15=45>> #### 44",  # '#### 44' is the answer, not the chain's last result 45: wrong
    "<<30-15=15>> <<15*3=45>>",  # right by its last number: gets '#### 45', on the chain's line
    "Half of 30 is 30/2=<<30/2=15>>15.\nSo 15*3=<<15*3=45>>45 rolls.\n#### 45",  # worded: converted to its chain
    "Half: 30*0.5=<<30*0.5=15>>15, and 15+30=<<15+30=45>>45.\n#### 45",  # worded, but the chain of the 2nd: duplicate
    "The answer is 45.",  # no annotations: keeps its text, as a gold row without annotations does
]


def test_equation_chain_samples_are_judged_and_kept_as_chains():
    """With the task's own judge (flexible extraction) the '#### N' after a chain is the answer; the
    kept targets are chains in the equations format, distinct after that format."""
    selection = select_solutions([CHAIN_GOLD], [EQUATION_SAMPLES], None, task_judge("exact"),
                                 get_task("gsm8k", target_format="equations"))
    assert selection.kept == [[
        "<<30*0.5=15>> <<15+30=45>> #### 45",
        "<<30-15=15>> <<15*3=45>> #### 45",
        "<<30/2=15>> <<15*3=45>> #### 45",
        "The answer is 45.\n#### 45",
    ]]
    assert selection.rejected == {"duplicate": 3, "wrong": 1}
    dropping = select_solutions([CHAIN_GOLD], [EQUATION_SAMPLES], None, task_judge("exact"),
                                get_task("gsm8k", target_format="equations-drop"))
    assert dropping.kept == [selection.kept[0][:3]]
    assert dropping.rejected == {"duplicate": 3, "wrong": 1, "no <<calculation>> (equations-drop)": 1}
    # in the full format the worded samples stay worded, so the 2nd worded one is a solution of its own
    full = select_solutions([CHAIN_GOLD], [EQUATION_SAMPLES], None, task_judge("exact"), get_task("gsm8k"))
    assert EQUATION_SAMPLES[6] in full.kept[0] and full.rejected == {"duplicate": 2, "wrong": 1}


def test_the_equations_format_is_idempotent_on_its_own_targets():
    from mathtune.tasks.gsm8k import check_row, format_target

    selection = select_solutions([CHAIN_GOLD], [EQUATION_SAMPLES], None, task_judge("exact"),
                                 get_task("gsm8k", target_format="equations"))
    for target in [CHAIN_GOLD.answer_text, *selection.kept[0]]:
        _question, checked, _gold = check_row({"question": "q", "answer": target})
        for fmt in ("equations", "equations-drop"):
            if "<<" in target or fmt == "equations":
                assert format_target(checked, strip_calc=False, target_format=fmt) == target


@pytest.fixture
def worded_train_file(tmp_path):
    path = tmp_path / "worded.jsonl"
    rows = [{"question": CHAIN_GOLD.question,
             "answer": "In the afternoon: 30/2 = <<30/2=15>>15 rolls.\nIn all: 30+15 = <<30+15=45>>45 rolls.\n#### 45"},
            {"question": "Sam has 2 pens and gets 3 more. How many pens?", "answer": "2+3=<<2+3=5>>5\n#### 5"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rft_with_equation_targets_writes_a_file_equations_training_reads_unchanged(worded_train_file, tmp_path,
                                                                                   capsys):
    """Scripted samples, the task's judge: gold rows and kept samples are chains, the file's first row says
    so, --resume checks it, and training with --target-format equations reads every answer unchanged."""
    texts = [EQUATION_SAMPLES[:4], ["<<2+3=5>>", "2 and 3 make 2+3=<<2+3=5>>5.\n#### 5", "#### 6", "<<3+2=5>> #### 5"]]
    asked = []

    def generator(questions, seed):
        asked.extend(questions)
        return Generations(texts, [[1] * 4] * 2, 0.1)

    out = tmp_path / "rft.jsonl"
    config = RFTConfig.from_flat(task="gsm8k", train_file=str(worded_train_file), output=str(out), target_format="equations")
    result = run_rft(config, generator=generator)
    assert asked == [CHAIN_GOLD.question, "Sam has 2 pens and gets 3 more. How many pens?"]  # the plain questions
    assert result["questions_gained"] == {1: 2}
    assert result["rejected"] == {"duplicate": 4, "wrong": 2}
    answers = [r["answer"] for r in rows_of(out)]
    assert answers == ["<<30/2=15>> <<30+15=45>> #### 45", "<<30*0.5=15>> <<15+30=45>> #### 45",
                       "<<2+3=5>> #### 5", "<<3+2=5>> #### 5"]
    assert rows_of(out)[0]["rft"]["settings"]["target_format"] == "equations"
    assert "--train-file " + str(out) + " --target-format equations" in capsys.readouterr().out
    reread = get_task("gsm8k", train_file=str(out), target_format="equations").examples("train")
    assert [e.answer_text for e in reread] == answers
    with pytest.raises(MathtuneError, match=r"--target-format full \(the file: equations\)"):
        run_rft(RFTConfig.from_flat(task="gsm8k", train_file=str(worded_train_file), output=str(out), resume=True),
                generator=never_called, verbose=False)


@pytest.fixture(scope="module")
def equations_run(tiny_model_dir, tmp_path_factory):
    """A real one-step LoRA run of the tiny model on gsm8k with --target-format equations."""
    from conftest import tiny_train_config
    from mathtune import training

    root = tmp_path_factory.mktemp("equations-run")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"Ana has {a} cups and buys {a} more. How many cups?",
                                        "answer": f"She has {a}+{a}=<<{a}+{a}={2 * a}>>{2 * a} cups.\n#### {2 * a}"})
                            + "\n" for a in range(1, 5)))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture (function-scoped, so not usable here)
    try:
        training.run(training.setup(tiny_train_config(tiny_model_dir, root / "run", task="gsm8k",
                                                      train_file=str(data), target_format="equations",
                                                      max_samples=4, max_steps=1, sample_every=0)))
    finally:
        torch.set_num_threads(threads)
    return root / "run", data


def test_rft_on_a_run_trained_with_equations_needs_the_same_format(equations_run, tmp_path, capsys):
    run, data = equations_run
    scripted = lambda questions, seed: Generations([["<<1+1=2>> #### 2"] * 4] * len(questions),  # noqa: E731
                                                   [[1] * 4] * len(questions), 0.1)
    with pytest.raises(MathtuneError, match=r"trained with --target-format equations .*mathtune_config.yaml\): its "
                                            r"samples are equation chains; pass --target-format equations"):
        run_rft(RFTConfig.from_flat(model=str(run), task="gsm8k", train_file=str(data), output=str(tmp_path / "full.jsonl")),
                generator=never_called, verbose=False)
    assert not (tmp_path / "full.jsonl").exists()
    out = tmp_path / "eq.jsonl"
    run_rft(RFTConfig.from_flat(model=str(run), task="gsm8k", train_file=str(data), output=str(out), target_format="equations",
                      max_samples=1), generator=scripted)
    assert [r["answer"] for r in rows_of(out)] == ["<<1+1=2>> #### 2"]  # the gold chain; the sample equals it
    assert "trained with --target-format" not in capsys.readouterr().err  # same format: no note
    run_rft(RFTConfig.from_flat(model=str(run), task="gsm8k", train_file=str(data), output=str(tmp_path / "drop.jsonl"),
                      target_format="equations-drop", max_samples=1), generator=scripted)
    assert "turned into --target-format equations-drop targets like the gold rows" in capsys.readouterr().err
