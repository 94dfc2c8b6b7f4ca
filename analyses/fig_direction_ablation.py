"""Directional ablation on the organism: its gates' "say No" direction vs norm-matched random directions.

The paper ablates Gemma's refusal direction (harmful minus harmless prompts, :func:`difference_of_means`)
and detection rises. The organism was never trained to refuse, so there is no refusal result to reproduce
on it. Its analogue is the direction its gates write: the unit mean of the top-``k`` gate candidates'
decoder directions (features that promote "No" when nothing is injected, :func:`find_gates`). This script
ablates it from every layer's output (``w = 1``, the paper's site) while trials run, next to random unit
directions as controls, and reports TPR, FPR and introspection against strength, whichever way they go.

    python analyses/fig_direction_ablation.py
    python analyses/fig_direction_ablation.py --model tiny --concepts Bread,Oceans --n-trials 1 \\
        --grid-concepts Bread,Oceans --max-new-tokens 6 --k 3
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from mechintro.behaviour.metrics import detection_metrics, newcombe_interval
from mechintro.behaviour.trials import sweep
from mechintro.cli import setup as runs
from mechintro.core.concepts import concept_vectors
from mechintro.core.fingerprint import weights_fingerprint
from mechintro.core.models import with_spec
from mechintro.core.readout import yes_no_direction
from mechintro.mechanism.directions import ABLATION_SITES, ablate_directions, gate_direction, random_direction
from mechintro.mechanism.features import feature_grid, find_gates
from mechintro.plots.elicitation import direction_ablation_figure


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runs.add_run_options(p)
    p.add_argument(
        "--strength",
        type=runs.strength_arg,
        default=None,
        help="strength or operating point (default: the spec's)",
    )
    p.add_argument(
        "--multiples",
        type=runs.float_list,
        default=[0.75, 1.0, 1.25],
        help="injection strengths as multiples of the default strength",
    )
    p.add_argument("--k", type=int, default=10, help="gates averaged into the direction (default 10)")
    p.add_argument("--grid-concepts", default="held-out:20", help="concepts of the feature grid")
    p.add_argument("--n-random", type=int, default=3, help="random control directions (default 3)")
    p.add_argument("--weight", type=float, default=1.0, help="ablation weight (default 1)")
    p.add_argument("--ablate-layers", type=runs.int_list, default=None, help="layers (default: every layer)")
    p.add_argument("--site", default="resid_post", help=f"one of {list(ABLATION_SITES)}")
    p.add_argument("--artifacts", default="runs/elicitation", help="per-condition trial stores")
    p.add_argument("--out", default="figures", help="output folder")
    p.add_argument("--formats", type=runs.name_list, default=["html", "png"], help="figure formats")
    p.set_defaults(n_trials=2, max_new_tokens=24, batch_size=128, threads=1, concepts="held-out:50")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    t0 = time.time()
    judge, concepts, model, spec = runs.prepare_run(args)
    if args.strength is not None:
        spec = with_spec(model, strength=spec.resolve_strength(args.strength))
    layer, strength = spec.injection_layer, spec.strength
    tcs = runs.named_transcoders(model, args.model)
    grid_concepts = runs.parse_concepts(args.grid_concepts)
    grid = feature_grid(model, tcs, grid_concepts, strengths=(0.0, strength), batch_size=args.batch_size)
    gates = find_gates(model, tcs, grid, k=max(args.k, 10))
    if len(gates) < args.k:
        raise SystemExit(f"only {len(gates)} gate candidates; lower --k")
    direction = gate_direction(tcs, gates, k=args.k)
    yes_no = yes_no_direction(model, spec).float().cpu()
    cos = float(direction @ yes_no / yes_no.norm())
    directions = {"gates' say-No direction": direction}
    for i in range(args.n_random):
        directions[f"random {i + 1}"] = random_direction(spec.d_model, seed=i, norm=float(direction.norm()))
    strengths = sorted({round(strength * m, 6) for m in args.multiples} | {strength})
    vectors = {layer: concept_vectors(model, concepts, layer=layer)}  # computed without any ablation
    digest = weights_fingerprint(model)[:12]
    folder = Path(args.artifacts)
    folder.mkdir(parents=True, exist_ok=True)
    kw = dict(
        n_trials=args.n_trials,
        judge=judge,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    frames = [
        sweep(
            model,
            concepts,
            layers=[layer],
            strengths=strengths,
            vectors=vectors,
            store=folder / f"trials_none-{digest}.sqlite",
            **kw,
        ).assign(ablation="none")
    ]
    for name, r in directions.items():
        ident = f"{name}|{args.weight!r}|{args.site}|{args.ablate_layers}".encode()
        ident += r.double().numpy().tobytes()
        tag = f"{digest}-{hashlib.sha256(ident).hexdigest()[:12]}"
        with ablate_directions(model, r, layers=args.ablate_layers, weight=args.weight, site=args.site):
            df = sweep(
                model,
                concepts,
                layers=[layer],
                strengths=strengths,
                vectors=vectors,
                store=folder / f"trials_ablation-{tag}.sqlite",
                **kw,
            )
        frames.append(df.assign(ablation=name))
    df = pd.concat(frames, ignore_index=True)
    metrics = detection_metrics(df, by=("ablation", "strength"))
    lines = [
        f"== directional ablation on {spec.name}: injection layer {layer}, default strength {strength:g},",
        f"   {len(concepts)} concepts x {args.n_trials} trials, judge {judge.name}; direction = unit mean",
        f"   of the top-{args.k} gates' unit decoder directions ({', '.join(gates['feature'][: args.k])});",
        f"   ablated at layers {args.ablate_layers or 'all'} ({args.site}, weight {args.weight:g});",
        f"   cosine with the Yes-minus-No unembedding direction {cos:+.3f}; controls: {args.n_random} random",
        "   directions of the same norm",
    ]
    at = metrics[metrics["strength"].isin(strengths)]
    none = at[at["ablation"] == "none"].set_index("strength")
    for _, row in at.iterrows():
        if row["n_injection"] == 0:
            continue
        ref = none.loc[row["strength"]] if row["strength"] in none.index else None
        delta = ""
        if ref is not None and row["ablation"] != "none":
            k1, n1 = round(row["tpr"] * row["n_injection"]), int(row["n_injection"])
            k0, n0 = round(ref["tpr"] * ref["n_injection"]), int(ref["n_injection"])
            lo, hi = newcombe_interval(k1, n1, k0, n0)
            delta = f" (TPR change {row['tpr'] - ref['tpr']:+.3f} [{lo:+.3f}, {hi:+.3f}])"
        lines.append(
            f"   {row['ablation']:24s} strength {row['strength']:<5g} TPR {row['tpr']:.3f} "
            f"[{row['tpr_lo']:.3f}, {row['tpr_hi']:.3f}], FPR {row['fpr']:.3f} [{row['fpr_lo']:.3f}, "
            f"{row['fpr_hi']:.3f}], introspection {row['introspection']:.3f}{delta}"
        )
    print(f"\n==== README numbers ({time.time() - t0:.0f} s)\n" + "\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "direction_ablation_numbers.txt").write_text("\n".join(lines) + "\n")
    fig = direction_ablation_figure(metrics)
    runs.save(fig, "direction_ablation", out, [("direction_ablation", metrics)], formats=args.formats)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
