"""Figure: the organism's detection-vs-injection-layer profile, as measured by `mechintro organism train`
(every layer x 4 strengths, held-out concepts; table organism_layer_profile.csv,
beside the organism), beside the paper's
Gemma3-27B-IT series.

    python analyses/fig_organism_profile.py
    python analyses/fig_organism_profile.py --model organism-olmo
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pandas as pd

from mechintro.cli import setup as runs
from mechintro.core import resources
from mechintro.plots.behaviour import layer_sweep_figure


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="organism",
        choices=[n for n in resources.ORGANISMS if not n.endswith("-base")],
        help="the organism whose table is shown (default organism)",
    )
    p.add_argument("--table", default=None, help="the profile table (default: the one beside the organism)")
    p.add_argument("--out", default="figures", help="output folder")
    args, _ = p.parse_known_args(argv)  # tolerates the shared run options `reproduce` passes to every script
    table = args.table or resources.organism_file("organism_layer_profile.csv", name=args.model)
    metrics = pd.read_csv(table)
    fig = layer_sweep_figure(
        metrics,
        model_name=f"{args.model} (held-out concepts)",
        title="The organism: detection and identification vs injection layer",
    )
    runs.save(fig, "organism_layer_profile", args.out)


if __name__ == "__main__":
    main()
