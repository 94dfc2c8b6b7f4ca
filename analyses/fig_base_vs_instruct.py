"""Figure: the top gate's activation against injection strength in organism-base and organism, for success
(high-detection) and failure (low-detection) concepts. Each model uses its own concept vectors; both use the
organism's transcoders.

    python analyses/fig_base_vs_instruct.py --model organism --base organism-base
    python analyses/fig_base_vs_instruct.py --model tiny --base tiny --concepts Bread,Oceans,Dust,Peace
    --judge logit --n-trials 1
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from mechintro.cli import setup as runs
from mechintro.core.concepts import concept_vectors
from mechintro.core.models import ORGANISM_NAMES, spec_for, with_spec
from mechintro.mechanism.curves import gate_response, success_failure
from mechintro.plots.mechanism import base_vs_instruct_figure


def main(argv: Sequence[str] | None = None) -> None:
    p = runs.mechanism_parser(__doc__)
    p.add_argument(
        "--base",
        default=None,
        help="the base variant (default: the organism's own, organism-base or organism-olmo-base)",
    )
    p.add_argument("--gate", default=None, help="e.g. 'L45 F1234' (default: the instruct model's top gate)")
    p.add_argument("--n-concepts", type=int, default=3, help="success and failure concepts (each)")
    p.add_argument(
        "--base-prompt",
        choices=["chat", "raw"],
        default="chat",
        help="the base model's trial prompt: its chat template (default) or raw 'User: ... Assistant:' text "
        "(what the paper's released code uses for a tokenizer without a chat template)",
    )
    args = p.parse_args(argv)
    if args.base is None:
        args.base = f"{args.model}-base" if f"{args.model}-base" in ORGANISM_NAMES else "organism-base"
    s = runs.load_setup(args)
    rates = runs.behaviour(s)
    grid, gates = runs.grid_and_gates(s, rates)
    gate = args.gate or gates["feature"].iloc[0]
    groups = success_failure(rates, n=args.n_concepts)
    base = runs.load_named_model(args.base, device=args.device)
    with_spec(base, injection_layer=s.spec.injection_layer, strength=s.spec.strength)
    frames = []
    base_name = args.base if args.base != args.model else f"{args.base} (base)"
    for name, model in ((base_name, base), (args.model, s.model)):
        for group, concepts in groups.items():
            vectors = concept_vectors(model, concepts, layer=spec_for(model).injection_layer)
            raw = model is base and args.base_prompt == "raw"
            persona = "standard_assistant_raw" if raw else "standard_assistant"
            df = gate_response(
                model,
                s.transcoders,
                gate,
                concepts,
                vectors=vectors,
                strengths=grid.strengths,
                persona=persona,
            )
            frames.append(df.assign(model=name, group=group))
    df = pd.concat(frames, ignore_index=True)
    print(df.groupby(["model", "group", "strength"])["gate_activation"].mean().unstack().round(3).to_string())
    runs.save(base_vs_instruct_figure(df), "base_vs_instruct", args.out, [("base_vs_instruct", df)])


if __name__ == "__main__":
    main()
