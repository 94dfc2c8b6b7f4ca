"""Figure: TPR and FPR per prompt variant (the paper's seven) or per persona variant (the paper's six), at one
layer and strength. Store-backed: re-running resumes where it stopped.

    python analyses/fig_variants.py --axis variant --model organism --n-trials 10
    python analyses/fig_variants.py --axis persona --model organism --n-trials 10
    python analyses/fig_variants.py --axis variant --model tiny --n-trials 2 --concepts Bread,Oceans
    --max-new-tokens 8
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mechintro.behaviour.metrics import detection_metrics
from mechintro.behaviour.trials import sweep
from mechintro.cli import setup as runs
from mechintro.core.prompts import PAPER_VARIANTS, PERSONAS
from mechintro.plots import behaviour as plots

DEFAULT_VALUES = {"variant": list(PAPER_VARIANTS), "persona": list(PERSONAS)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    runs.add_run_options(parser)
    parser.add_argument(
        "--axis", choices=sorted(DEFAULT_VALUES), default="variant", help="what the bars compare"
    )
    parser.add_argument("--values", type=runs.name_list, default=None, help="default: the paper's variants")
    parser.add_argument("--layer", type=int, default=None, help="default: the model's injection layer")
    parser.add_argument(
        "--strength",
        type=runs.strength_arg,
        default=None,
        help="strength or operating point (default: the model's)",
    )
    parser.add_argument("--out", default="figures", help="output folder")
    parser.set_defaults(store=runs.DEFAULT_STORE, threads=1)
    args = parser.parse_args(argv)
    values = args.values or DEFAULT_VALUES[args.axis]
    setattr(args, args.axis + "s", values)
    judge, concepts, model, spec = runs.prepare_run(args)
    layer = spec.injection_layer if args.layer is None else args.layer
    strength = spec.resolve_strength(args.strength)
    axis = {"variants": values} if args.axis == "variant" else {"personas": values}
    df = sweep(
        model, concepts, layers=[layer], strengths=[strength], judge=judge, **axis, **runs.run_settings(args)
    )
    title = (
        f"{args.axis.capitalize()} variants: detection ({args.model}, layer {layer}, strength {strength:g})"
    )
    fig = plots.rate_bars_figure(detection_metrics(df, by=(args.axis,)), axis=args.axis, title=title)
    runs.save(fig, f"{args.axis}s", args.out)


if __name__ == "__main__":
    main()
