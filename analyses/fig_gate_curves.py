"""Figure: detection rate against the number of top-ranked gates ablated in steered runs, patched into
unsteered runs, and forced identification under gate ablation (sampled, judged trials; 95% Wilson CIs).

    python analyses/fig_gate_curves.py --model organism --n-trials 10
    python analyses/fig_gate_curves.py --model tiny --concepts Bread,Oceans --n-trials 2 --max-new-tokens 6
"""

from __future__ import annotations

from collections.abc import Sequence

from mechintro.cli import setup as runs
from mechintro.mechanism.curves import gate_curves_sampled, summarize_gate_curves
from mechintro.plots.mechanism import gate_curves_figure


def main(argv: Sequence[str] | None = None) -> None:
    p = runs.mechanism_parser(__doc__)
    p.add_argument("--ks", type=runs.int_list, default=None, help="numbers of gates (default 0,1,2,5,...,k)")
    p.add_argument("--positions", default="last", choices=["last", "from_start"])
    args = p.parse_args(argv)
    s = runs.load_setup(args)
    _, gates = runs.grid_and_gates(s, runs.behaviour(s))
    ks = None if args.ks is None else [k for k in args.ks if k <= len(gates)]
    df = gate_curves_sampled(
        s.model,
        s.transcoders,
        gates,
        s.concepts,
        judge=runs.parse_judge(args.judge),
        vectors=s.vectors,
        ks=ks,
        n_samples=args.n_trials,
        positions=args.positions,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    print(summarize_gate_curves(df).to_string(index=False))
    runs.save(gate_curves_figure(df), "gate_curves", args.out, [("gate_curves", df)])


if __name__ == "__main__":
    main()
