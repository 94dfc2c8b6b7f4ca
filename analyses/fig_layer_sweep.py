"""Figure: TPR, FPR, introspection and forced identification vs injection layer, one line per strength,
beside the paper's Gemma3-27B-IT series. Store-backed: re-running resumes where it stopped.

    python analyses/fig_layer_sweep.py --model organism --n-trials 10
    python analyses/fig_layer_sweep.py --model tiny --n-trials 2 --concepts Bread,Oceans --max-new-tokens 8
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mechintro.behaviour.metrics import detection_metrics
from mechintro.behaviour.trials import sweep
from mechintro.cli import setup as runs
from mechintro.plots import behaviour as plots


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    runs.add_run_options(parser)
    parser.add_argument(
        "--layers", type=runs.int_list, default=None, help="e.g. 0,2,4 (default: every layer)"
    )
    parser.add_argument("--strengths", type=runs.float_list, default=None, help="default: the model's sweep")
    parser.add_argument("--out", default="figures", help="output folder")
    parser.set_defaults(store=runs.DEFAULT_STORE, n_trials=10, forced=True, threads=1)
    args = parser.parse_args(argv)
    judge, concepts, model, spec = runs.prepare_run(args)
    df = sweep(
        model,
        concepts,
        layers=args.layers or list(spec.valid_layers()),
        strengths=args.strengths or list(spec.strength_sweep),
        judge=judge,
        **runs.run_settings(args),
    )
    metrics = detection_metrics(df, by=("layer", "strength"))
    fig = plots.layer_sweep_figure(metrics, model_name=args.model)
    runs.save(fig, "layer_sweep", args.out)


if __name__ == "__main__":
    main()
