"""Figure: TPR and FPR per prompt variant (the paper's seven, or --variants), at one layer and strength.
Store-backed: re-running resumes where it stopped.

    python analyses/fig_variants.py --model organism --n-trials 10
    python analyses/fig_variants.py --model tiny --n-trials 2 --concepts Bread,Oceans --max-new-tokens 8
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mechintro import cli, plots
from mechintro.metrics import detection_metrics
from mechintro.prompts import PAPER_VARIANTS
from mechintro.trials import sweep


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_run_options(parser)
    parser.add_argument("--layer", type=int, default=None, help="default: the model's injection layer")
    parser.add_argument("--strength", type=float, default=None, help="default: the model's strength")
    parser.add_argument("--variants", type=cli.name_list, default=list(PAPER_VARIANTS))
    parser.add_argument("--out", default="figures", help="output folder")
    parser.set_defaults(store=cli.DEFAULT_STORE, n_trials=10, threads=1)
    args = parser.parse_args(argv)
    judge, concepts, model, spec = cli.prepare_run(args)
    layer = spec.injection_layer if args.layer is None else args.layer
    strength = spec.strength if args.strength is None else args.strength
    df = sweep(
        model,
        concepts,
        layers=[layer],
        strengths=[strength],
        variants=args.variants,
        judge=judge,
        **cli.run_settings(args),
    )
    fig = plots.variants_figure(
        detection_metrics(df, by=("variant",)),
        title=f"Prompt variants: detection ({args.model}, layer {layer}, strength {strength:g})",
    )
    for path in plots.save_figure(fig, "variants", args.out):
        print(path)


if __name__ == "__main__":
    main()
