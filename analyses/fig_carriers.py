"""Figure: the top evidence carriers of a gate (features between the injection layer and the gate that grow
with the injection, track detection and suppress the gate), with the suppressors beside them.

    python analyses/fig_carriers.py --model organism
    python analyses/fig_carriers.py --model tiny --concepts Bread,Oceans,Dust --judge logit --n-trials 1
"""

from __future__ import annotations

from collections.abc import Sequence

from mechintro.cli import setup as runs
from mechintro.plots.mechanism import carriers_figure


def main(argv: Sequence[str] | None = None) -> None:
    p = runs.mechanism_parser(__doc__)
    runs.add_carrier_options(p)
    p.add_argument("--top", type=int, default=20, help="carriers and suppressors shown")
    args = p.parse_args(argv)
    s = runs.load_setup(args)
    rates = runs.behaviour(s)
    grid, gates = runs.grid_and_gates(s, rates)
    gate, carriers = runs.find_carriers(s, grid, gates, rates)
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
