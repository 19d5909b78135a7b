"""``mathtune report RUN_DIR``: report.md and plots/*.png from what a training run left behind."""

from __future__ import annotations

import argparse

from mathtune.run_dir import RunDir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help=f"a run directory written by mathtune train (holds {RunDir.METRICS})")


def run(args: argparse.Namespace) -> int:
    from mathtune.report import PLOTS_DIR, write_report

    report = write_report(args.run_dir)
    plots = sorted(p.name for p in (report.parent / PLOTS_DIR).glob("*.png"))
    print(f"wrote {report}" + (f" and {PLOTS_DIR}/{{{','.join(plots)}}}" if plots else ""))
    return 0
