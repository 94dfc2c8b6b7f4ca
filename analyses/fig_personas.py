"""Figure: TPR and FPR per persona variant (all six), at one layer and strength, original prompt.
Store-backed: re-running resumes where it stopped.

    python analyses/fig_personas.py --model organism --n-trials 10
    python analyses/fig_personas.py --model tiny --n-trials 2 --concepts Bread,Oceans --max-new-tokens 8
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mechintro import cli, plots
from mechintro.metrics import detection_metrics
from mechintro.prompts import PERSONAS
from mechintro.trials import sweep


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_run_options(parser)
    parser.add_argument("--layer", type=int, default=None, help="default: the model's injection layer")
    parser.add_argument("--strength", type=float, default=None, help="default: the model's strength")
    parser.add_argument("--personas", type=cli.name_list, default=list(PERSONAS))
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
        personas=args.personas,
        judge=judge,
        **cli.run_settings(args),
    )
    fig = plots.personas_figure(
        detection_metrics(df, by=("persona",)),
        title=f"Persona variants: detection ({args.model}, layer {layer}, strength {strength:g})",
    )
    for path in plots.save_figure(fig, "personas", args.out):
        print(path)


if __name__ == "__main__":
    main()
