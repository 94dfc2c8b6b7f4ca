"""Figure: the top evidence carriers of a gate (features between the injection layer and the gate that grow
with the injection, track detection and suppress the gate), with the suppressors beside them.

    python analyses/fig_carriers.py --model organism
    python analyses/fig_carriers.py --model tiny --concepts Bread,Oceans,Dust --judge logit --n-trials 1
"""

from __future__ import annotations

from collections.abc import Sequence

from mechintro import runs
from mechintro.features import find_evidence_carriers
from mechintro.plots_mechanism import carriers_figure


def main(argv: Sequence[str] | None = None) -> None:
    p = runs.mechanism_parser(__doc__)
    p.add_argument("--gate", default=None, help="e.g. 'L45 F1234' (default: the top gate)")
    p.add_argument("--top", type=int, default=20, help="carriers and suppressors shown")
    p.add_argument(
        "--carrier-concept",
        default=None,
        help="find carriers for this one concept (the paper's per-(gate, concept) carriers); default: pooled",
    )
    p.add_argument(
        "--criteria",
        choices=["dose_behaviour", "sign"],
        default="dose_behaviour",
        help="carrier criteria: dose and behaviour filters (default) or the attribution sign alone (paper)",
    )
    p.add_argument("--correlation", choices=["spearman", "pearson"], default="spearman")
    args = p.parse_args(argv)
    s = runs.load_setup(args)
    rates = runs.behaviour(s)
    grid, gates = runs.grid_and_gates(s, rates)
    gate = args.gate or gates["feature"].iloc[0]
    carriers = find_evidence_carriers(
        s.model,
        s.transcoders,
        grid,
        gate,
        behaviour=runs.carrier_behaviour(rates),
        concept=args.carrier_concept,
        criteria=args.criteria,
        correlation=args.correlation,
    )
    print(
        f"gate {gate}: {int((carriers['role'] == 'carrier').sum())} carriers, "
        f"{int((carriers['role'] == 'suppressor').sum())} suppressors"
    )
    print(carriers.head(args.top).to_string(index=False))
    runs.save(
        carriers_figure(carriers, top=args.top, gate=gate), "carriers", args.out, [("carriers", carriers)]
    )


if __name__ == "__main__":
    main()
