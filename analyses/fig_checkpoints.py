"""Figure 5 (and 14): the same trials on every checkpoint of a series, one command. On a GPU, the paper's
OLMo 3 stages (Base -> SFT -> DPO -> Instruct, ids in mechintro/core/paper_models.py):

    python analyses/fig_checkpoints.py --series olmo --concepts original --n-trials 100 \
        --judge anthropic:claude-sonnet-4-5 --store runs/olmo_stages.sqlite --device cuda

On a CPU, the organism's two checkpoints at its own depth and strengths:

    python analyses/fig_checkpoints.py --series organism --concepts held-out:20 --n-trials 4 \
        --fractions 0.375 --strengths 2.11,4

Add --gate 'L7 F510' for the gate comparison (Figure 14) on the same series (the last checkpoint's
dictionary on each, its reconstruction error beside it).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mechintro.cli import setup as runs
from mechintro.cli.options import float_list
from mechintro.core.paper_models import OLMO_SWEEP_FRACTIONS, OLMO_SWEEP_STRENGTHS
from mechintro.plots.checkpoints import gates_figure, stages_figure
from mechintro.studies.checkpoints import SERIES, compare_checkpoints, compare_gates


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--series", required=True, choices=sorted(SERIES), help="the checkpoint series")
    p.add_argument("--concepts", default="held-out:20", help="a concept set (name[:N]) or a comma list")
    p.add_argument("--n-trials", type=int, default=10, help="trials per concept, condition and cell")
    p.add_argument("--judge", default="rule", help=f"one of {', '.join(runs.JUDGE_CHOICES)}")
    p.add_argument("--fractions", type=float_list, default=OLMO_SWEEP_FRACTIONS, help="layer fractions")
    p.add_argument("--strengths", type=float_list, default=OLMO_SWEEP_STRENGTHS, help="injection strengths")
    p.add_argument("--store", default=None, help="SQLite trial store (resumes); default: in memory")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    p.add_argument("--gate", default=None, help="also compare this gate, e.g. 'L7 F510' (Figure 14)")
    p.add_argument("--out", default="figures", help="output folder")
    args = p.parse_args(argv)
    concepts = runs.parse_concepts(args.concepts)
    df = compare_checkpoints(
        args.series,
        concepts,
        n_trials=args.n_trials,
        judge=runs.parse_judge(args.judge),
        layer_fractions=tuple(args.fractions),
        strengths=tuple(args.strengths),
        store=args.store,
        device=args.device,
        forced=True,
    )
    pooled = df[df["scope"] == "pooled"]
    print(
        pooled[["checkpoint", "stage", "tpr", "fpr", "discrimination", "introspection"]].round(3).to_string()
    )
    name = f"checkpoints_{args.series}"
    runs.save(stages_figure(df), name, args.out, [(name, df)])
    if args.gate:
        gates = compare_gates(args.series, args.gate, concepts[:20], device=args.device)
        runs.save(gates_figure(gates), f"{name}_gates", args.out, [(f"{name}_gates", gates)])


if __name__ == "__main__":
    main()
