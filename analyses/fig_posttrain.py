"""Figures 5, 14 and Table 3 on the organism: does a preference stage whose data never contain an injection
give organism-base detection? Trains the SFT checkpoint and one LoRA adapter per condition into --artifacts
(each resumes), measures every checkpoint on held-out concepts at the calibrated and the saturated strength,
and draws the stages (posttrain_stages), the conditions beside the paper's Table 3 (posttrain_conditions) and
the instruct organism's top gate on Base, DPO and Instruct (posttrain_gates).

    python analyses/fig_posttrain.py --model organism
    python analyses/fig_posttrain.py --model organism --n-pairs 32 --n-concepts 4 --n-trials 1 \
        --rows dpo,reversed,random-lora,positive-control --artifacts /tmp/posttrain
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from mechintro.cli import setup as runs
from mechintro.cli.options import add_config_arguments, config_from_args
from mechintro.organism.posttraining import PosttrainStudyConfig, run_study
from mechintro.plots.checkpoints import conditions_figure, gates_figure, stages_figure

OWN = ("n_pairs", "lr", "pairs_per_step", "lora_r", "lora_alpha", "injected_strengths", "n_concepts", "rows")
"""The study's flags; trials, generation budget, batch and seed come from the run options."""


def main(argv: Sequence[str] | None = None) -> None:
    p = runs.mechanism_parser(__doc__)
    p.add_argument(
        "--artifacts", default="runs/posttrain", help="folder of the adapters and trials (resumes)"
    )
    p.add_argument("--gate", default=None, help="e.g. 'L3 F310' (default: the instruct organism's top gate)")
    add_config_arguments(p.add_argument_group("post-training study"), PosttrainStudyConfig, only=OWN)
    args = p.parse_args(argv)
    cfg = config_from_args(
        PosttrainStudyConfig,
        args,
        only=OWN,
        n_trials=args.n_trials,
        max_new_tokens=args.max_new_tokens,
        trial_batch=args.batch_size,
    )
    gate = args.gate
    if gate is None:
        s = runs.load_setup(args)
        _, gates = runs.grid_and_gates(s, runs.behaviour(s))
        gate = gates["feature"].iloc[0]
    frames = run_study(args.artifacts, cfg=cfg, model=args.model, gate=gate, progress=not args.quiet)
    stages, conditions, gate_rows = frames["stages"], frames["conditions"], frames["gates"]
    show = ["checkpoint", "strength", "tpr", "fpr", "discrimination", "introspection", "forced_id"]
    for name, df in (("stages", stages), ("conditions", conditions)):
        print(f"== {name}\n" + df[df["scope"] == "cell"][show].round(3).to_string(index=False))
    # the paper's text gives one number for Figure 5: DPO is the first stage with about 0% FPR
    paper = pd.DataFrame({"checkpoint": ["DPO"], "fpr": [0.0]})
    fig = stages_figure(stages, scope="cell", paper=paper, title="Detection by stage on the organism")
    runs.save(fig, "posttrain_stages", args.out, [("posttrain_stages", stages)])
    runs.save(
        conditions_figure(conditions),
        "posttrain_conditions",
        args.out,
        [("posttrain_conditions", conditions)],
    )
    runs.save(gates_figure(gate_rows), "posttrain_gates", args.out, [("posttrain_gates", gate_rows)])


if __name__ == "__main__":
    main()
