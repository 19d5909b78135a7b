"""`mathtune ask`: the eval generation path from the command line, on the tiny model."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mathtune.commands import ask as ask_command
from mathtune.config import EvalConfig, build_config
from mathtune.errors import MathtuneError
from mathtune.generation.engine import Generator
from mathtune.config import GenerationArgs

REPO_ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is 2+3?", "Convert 3 km to m."]


def test_answers_are_the_eval_generators_outputs(tiny_model_dir, one_thread):
    """Same loader, settings and Generator as eval: the texts equal a direct Generator call."""
    from mathtune.models.load import load_model

    config = build_config(EvalConfig, None, {"model": str(tiny_model_dir), "max_new_tokens": 8,
                                             "device": "cpu", "precision": "fp32"})
    answers = ask_command.answer_questions(config, QUESTIONS)
    loaded = load_model(str(tiny_model_dir), device="cpu", merge_adapter=True)
    expected = Generator(loaded.model, loaded.tokenizer, config.generation.resolved(config.task), progress=False)(QUESTIONS)
    assert [a.text for a in answers] == [samples[0] for samples in expected]
    assert [a.question for a in answers] == QUESTIONS
    # sampling reaches the generator too: temperature > 0 with a fixed seed is reproducible
    hot = ask_command.ask(tiny_model_dir, QUESTIONS, max_new_tokens=8, temperature=1.5, seed=3, device="cpu",
                          precision="fp32")
    again = ask_command.ask(tiny_model_dir, QUESTIONS, max_new_tokens=8, temperature=1.5, seed=3, device="cpu",
                            precision="fp32")
    assert [a.text for a in hot] == [a.text for a in again]


def test_extracted_values_and_their_formatting(monkeypatch, tiny_model_dir, capsys, one_thread):
    canned = iter([["2 + 3 = 5\n#### 5"], ["3 km is 3000.5 m"], ["no idea"]])

    class FakeGenerator:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, questions, **kwargs):
            return [next(canned) for _ in questions]

    monkeypatch.setattr("mathtune.api.Generator", FakeGenerator)
    args = _parse(["ask", str(tiny_model_dir), "q1", "q2", "q3", "--device", "cpu", "--precision", "fp32"])
    assert ask_command.run(args) == 0
    out = capsys.readouterr().out
    assert "Q: q1\nA: 2 + 3 = 5\n#### 5\nanswer: 5 (from ####)" in out
    assert "answer: 3000.5 (from last_number)" in out
    assert "Q: q3\nA: no idea\nanswer: none (no number found)" in out


def _parse(argv):
    from mathtune.cli import build_parser

    return build_parser(only="ask").parse_args(argv)


def test_flags_map_to_generation_settings(tiny_model_dir):
    args = _parse(["ask", str(tiny_model_dir), "q", "--temperature", "0.7", "--max-new-tokens", "12",
                   "--top-p", "0.9", "--seed", "5"])
    from mathtune.config import config_from_args

    config = config_from_args(EvalConfig, args)
    settings = config.generation.resolved(config.task)
    assert (settings.temperature, settings.max_new_tokens, settings.top_p, config.seed) == (0.7, 12, 0.9, 5)
    with pytest.raises(SystemExit):
        _parse(["ask", str(tiny_model_dir), "q", "--eval-file", "x"])  # eval-item flags are not ask's


def test_questions_from_stdin_and_errors(tiny_model_dir):
    assert ask_command.read_questions(io.StringIO("What is 2+3?\n\n  Convert 3 km to m.  \n")) == QUESTIONS
    config = build_config(EvalConfig, None, {"model": str(tiny_model_dir)})
    with pytest.raises(MathtuneError, match="no questions: pass them as arguments, or one per line on stdin"):
        ask_command.answer_questions(config, [])
    with pytest.raises(MathtuneError, match="question 2 is empty"):
        ask_command.answer_questions(config, ["ok", "  "])
    with pytest.raises(MathtuneError, match="unknown setting"):
        ask_command.ask(tiny_model_dir, ["q"], temprature=1.0)
    with pytest.raises(MathtuneError, match="--temperature must be >= 0"):
        ask_command.ask(tiny_model_dir, ["q"], temperature=-1.0)
    assert ask_command.format_value(2500.0) == "2500" and ask_command.format_value(0.25) == "0.25"


def test_ask_cli_reads_stdin(tiny_model_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "mathtune.cli", "ask", str(tiny_model_dir), "--max-new-tokens", "4",
                           "--device", "cpu", "--precision", "fp32"], input="What is 2+3?\nConvert 3 km to m.\n",
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("Q: ") == 2 and proc.stdout.count("\nanswer: ") == 2
    assert "Q: Convert 3 km to m." in proc.stdout
    empty = subprocess.run([sys.executable, "-m", "mathtune.cli", "ask", str(tiny_model_dir)], input="\n",
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert empty.returncode == 1 and "error: no questions" in empty.stderr


def test_public_api_names():
    import mathtune
    from mathtune import export

    assert mathtune.ask is ask_command.ask
    assert mathtune.export_model is export.export_model
    assert callable(mathtune.export_model)  # the name is not shadowed by the mathtune.export module
