"""`mathtune --help` answers at once: building the CLI parser imports no torch/transformers/PEFT.

Measured as the import set in a fresh interpreter (not wall time, which depends on the machine):
importing torch alone takes seconds, so a parser that avoids it answers in a fraction of one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "accelerate", "datasets", "gguf", "numpy", "matplotlib", "math_verify", "sympy")


def _fresh(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def _imported_after(code: str) -> list[str]:
    probe = code + f"\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    proc = _fresh(probe)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_building_the_full_parser_imports_no_heavy_library():
    # every command's flags added, i.e. every command module imported
    assert _imported_after("import mathtune.cli as c\nc.build_parser()") == []


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"], ["ask", "--help"], ["doctor", "--help"],
                                  ["train", "--no-such-flag"]])
def test_help_and_flag_errors_import_no_heavy_library(argv):
    code = ("import sys, mathtune.cli as c\n"
            f"try:\n    c.main({argv!r})\nexcept SystemExit as e:\n    print('exit', e.code)")
    assert _imported_after(code) == []


def test_every_command_is_listed_and_only_the_requested_one_is_imported():
    from mathtune import cli

    code = ("import sys, mathtune.cli as c\nc.build_parser(only='export')\n"
            "print(sorted(m for m in sys.modules if m.startswith('mathtune.commands.')))")
    proc = _fresh(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "['mathtune.commands.export']"
    help_text = cli.build_parser(only="export").format_help()
    for name in cli.COMMANDS:
        assert name in help_text
    assert cli.requested_command(["ask", "runs/x", "export"]) == "ask"
    assert cli.requested_command(["--help"]) is None
    assert cli.requested_command(["nonsense"]) is None


def test_the_real_cli_answers_help_and_flag_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    ok = subprocess.run([sys.executable, "-m", "mathtune.cli", "--help"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "export" in ok.stdout and "ask" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "mathtune.cli", "export", "x", "--gguf-type", "q4"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'q4'" in bad.stderr
