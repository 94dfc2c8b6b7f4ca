"""The ``mechintro`` command: builds the argument parser and dispatches to :mod:`mechintro.cli.commands`.

Errors in the arguments or the environment (an unknown judge, a layer out of range, a missing API key, an
uncached model, a corrupt store, CUDA asked for on a machine without it) print one line naming the valid
choices and exit with status 2; ``MECHINTRO_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Sequence

from mechintro.behaviour.plan import SweepConfig, TrialConfig
from mechintro.cli import commands
from mechintro.cli.options import add_config_arguments, name_list, positive_float, positive_int
from mechintro.cli.setup import DEFAULT_STORE, add_run_options
from mechintro.core.settings import STORE

__all__ = ["build_parser", "main"]


def _reproduce_parser(sub: argparse._SubParsersAction) -> None:
    rp = sub.add_parser("reproduce", help="the main job on the embedded default model (the organism)")
    rp.add_argument(
        "--model",
        choices=list(commands.REPRODUCE_MODELS),
        default="organism",
        help="the organism to run on (default organism, the Gemma 3 one)",
    )
    rp.add_argument("--store", default="runs/reproduce.sqlite", help="trial store (resumable)")
    rp.add_argument("--cache", default="runs/cache", help="cached feature grid and gates")
    rp.add_argument(
        "--n-trials", type=positive_int, default=10, help="trials per held-out concept and condition"
    )
    rp.add_argument(
        "--out", default=None, help="figure folder (default figures/; a temporary folder with --quick)"
    )
    rp.add_argument(
        "--quick", action="store_true", help="the whole pipeline with tiny settings (CI), never in figures/"
    )
    scripts = sorted({s.script for s in commands.REPRODUCE_STEPS})
    rp.add_argument(
        "--only",
        type=name_list,
        default=None,
        help=f"a comma list of scripts to run (default: all of {scripts})",
    )
    rp.set_defaults(func=commands.reproduce)


def _trial_parsers(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("evaluate", help="introspection trials at one layer and strength; prints metrics")
    add_run_options(ev)
    add_config_arguments(ev, TrialConfig, only=commands.EVALUATE_FIELDS)
    ev.set_defaults(func=commands.evaluate)

    sw = sub.add_parser(
        "sweep", help="trials over layers x strengths (x variants x personas); prints metrics"
    )
    add_run_options(sw)
    add_config_arguments(sw, SweepConfig, only=commands.SWEEP_FIELDS)
    sw.set_defaults(func=commands.sweep)

    fg = sub.add_parser("figures", help="figures from a trial store (plus the paper's series)")
    fg.add_argument("--store", default=DEFAULT_STORE, help=f"trial store (default {DEFAULT_STORE})")
    fg.add_argument("--out", default="figures", help="output folder (default figures)")
    fg.add_argument("--model", default=None, help="model name as stored, when the store holds several")
    fg.add_argument("--judge", default=None, help="judge name as stored, when the store holds several")
    fg.add_argument(
        "--formats", type=name_list, default=["html", "png"], help="comma-separated (default html,png)"
    )
    fg.set_defaults(func=commands.figures)


def _rejudge_parser(sub: argparse._SubParsersAction) -> None:
    rj = sub.add_parser("rejudge", help="judge again the stored responses whose judge failed (no generation)")
    rj.add_argument("--store", required=True, help="the trial store")
    rj.add_argument(
        "--judge", required=True, help="the judge the rows were stored with (e.g. llm:gpt-4.1-mini)"
    )
    rj.add_argument("--model", default=None, help="only this model's rows (as stored)")
    rj.add_argument("--batch-size", type=positive_int, default=32, help="responses per judge batch")
    rj.add_argument("--lease-s", type=positive_float, default=STORE.lease_s, help="lease of a claimed batch")
    rj.set_defaults(func=commands.rejudge)


def _family_argument(p: argparse.ArgumentParser) -> None:
    flags = list(commands.ORGANISM_FAMILY_FLAGS)
    p.add_argument(
        "--family",
        choices=flags,
        default="gemma",
        help="the organism's architecture: "
        + ", ".join(f"{k} ({v})" for k, v in commands.ORGANISM_FAMILY_FLAGS.items())
        + "; the OLMo one lives in the data folder's olmo/ (default gemma)",
    )


def _organism_parser(sub: argparse._SubParsersAction) -> None:
    org = sub.add_parser("organism", help="the model organism").add_subparsers(
        dest="organism_command", required=True
    )
    tr = org.add_parser("train", help="regenerate the organism, its transcoders and its report from a seed")
    tr.add_argument(
        "--out",
        default=None,
        help="output folder (default: MECHINTRO_DATA, else ~/.local/share/mechintro; never the package)",
    )
    tr.add_argument("--seed", type=int, default=0)
    _family_argument(tr)
    tr.add_argument("--quick", action="store_true", help="the few-minute version the tests run")
    tr.add_argument("--no-eval", action="store_true", help="skip the measurements")
    tr.set_defaults(func=commands.organism_train)
    ca = org.add_parser("calibrate", help="calibrate the default strength (held-out TPR ~ the paper's 0.411)")
    ca.add_argument(
        "--folder",
        default=None,
        help="the folder holding organism/ (default: the user data folder; copies the shipped one if empty)",
    )
    _family_argument(ca)
    ca.add_argument("--quick", action="store_true", help="a tiny grid (tests)")
    ca.add_argument("--dry-run", action="store_true", help="measure and report, record nothing")
    ca.add_argument("--quiet", action="store_true", help="no progress bars")
    ca.set_defaults(func=commands.organism_calibrate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechintro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="concept injection on a tiny random Gemma 3").set_defaults(func=commands.demo)
    _reproduce_parser(sub)
    _trial_parsers(sub)
    _rejudge_parser(sub)
    for command, (text, scripts) in commands.SCRIPT_COMMANDS.items():
        sc = sub.add_parser(
            command, help=f"{text} (runs analyses/{', '.join(scripts)}; see its --help)", add_help=False
        )
        sc.add_argument("script_args", nargs=argparse.REMAINDER)
        sc.set_defaults(func=commands.script_command)
    _organism_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, dispatch, and turn expected errors into one line and exit status 2."""
    from mechintro.behaviour.judges import MissingAPIKeyError
    from mechintro.core.models import ModelNotAvailableError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if (
        argv and argv[0] in commands.SCRIPT_COMMANDS
    ):  # everything after it goes to the script, --help included
        args = argparse.Namespace(command=argv[0], script_args=argv[1:], func=commands.script_command)
    else:
        args = parser.parse_args(argv)
    expected = (
        ValueError,
        TypeError,
        ImportError,  # an optional extra that is not installed (Ray); the message says what to install
        MissingAPIKeyError,
        FileNotFoundError,
        ModelNotAvailableError,
        sqlite3.Error,
    )
    try:
        return int(args.func(args) or 0)
    except expected as err:
        if os.environ.get("MECHINTRO_DEBUG"):
            raise
        parser.exit(2, f"mechintro {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
