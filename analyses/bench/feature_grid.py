"""Benchmark: feature_grid (one batched pass per chunk of rows) against a per-(concept, strength) loop.

* **feature_grid**: ``--concepts`` concepts x 9 strengths x every transcoder layer; rows = (concept, strength)
  pairs in chunks of ``--batch-size``, one forward per chunk with per-row injection strengths, every layer's
  transcoder input captured in that pass, activations kept sparse.
* **loop**: one forward per (concept, strength) with a single-row injection and ``encode_at`` on every layer
  (dense). It is slow, so ``--loop-pairs`` pairs are timed and the total is extrapolated per pair. The loop's
  activations are compared with the grid's on those pairs.

Prints a table and writes a JSON to analyses/bench/results/.

    python analyses/bench/feature_grid.py                  # the organism and its transcoders
    python analyses/bench/feature_grid.py --model tiny     # a random tiny Gemma 3 with random transcoders
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mechintro.cli import setup as runs  # noqa: E402
from mechintro.core.concepts import all_concepts, concept_vectors  # noqa: E402
from mechintro.core.models import spec_for  # noqa: E402
from mechintro.core.prompts import trial_prompt  # noqa: E402
from mechintro.core.steering import inject  # noqa: E402
from mechintro.core.transcoders import encode_at  # noqa: E402
from mechintro.mechanism.features import default_strengths, feature_grid  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def loop_grid(model, transcoders, vectors, strengths, pairs, *, layer: int) -> dict[tuple[int, int], dict]:
    """The naive way: one forward per (concept, strength) pair, dense activations of every layer."""
    prompt = trial_prompt(model, trial=1)
    out = {}
    for c, s in pairs:
        with inject(model, vectors[c], layer=layer, strength=strengths[s], start=prompt.injection_start):
            acts = encode_at(model, transcoders, prompt.tokens)
        out[c, s] = {la: a[0, 0].float().cpu() for la, a in acts.items()}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism")
    p.add_argument("--concepts", type=int, default=100, help="number of concepts (default 100)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--loop-pairs", type=int, default=90, help="(concept, strength) pairs timed in the loop")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, transcoders = runs.named_model_and_transcoders(args.model, device=args.device)
    spec = spec_for(model)
    concepts = all_concepts()[: args.concepts]
    vectors = concept_vectors(model, concepts, layer=spec.injection_layer)
    strengths = default_strengths(model)
    feature_grid(model, transcoders, concepts[:2], vectors=vectors[:2], strengths=strengths[:2])  # warm-up

    _sync()
    t0 = time.perf_counter()
    grid = feature_grid(
        model, transcoders, concepts, vectors=vectors, strengths=strengths, batch_size=args.batch_size
    )
    _sync()
    t_grid = time.perf_counter() - t0

    n_pairs = len(concepts) * len(strengths)
    step = max(1, n_pairs // args.loop_pairs)
    pairs = [(i // len(strengths), i % len(strengths)) for i in range(0, n_pairs, step)][: args.loop_pairs]
    _sync()
    t0 = time.perf_counter()
    naive = loop_grid(model, transcoders, vectors, strengths, pairs, layer=spec.injection_layer)
    _sync()
    t_loop = (time.perf_counter() - t0) / len(pairs) * n_pairs

    diff = max(
        float((grid.dense(la)[c, s] - acts).abs().max())
        for (c, s), by_layer in naive.items()
        for la, acts in by_layer.items()
    )
    nnz = sum(int(a._nnz()) for a in grid.acts.values())
    dense_values = n_pairs * sum(grid.d_sae(la) for la in grid.layers)
    chunks = -(-n_pairs // args.batch_size)
    result = {
        "model": spec.name,
        "device": str(model.cfg.device),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "concepts": len(concepts),
        "strengths": list(strengths),
        "layers": grid.layers,
        "d_sae": {la: grid.d_sae(la) for la in grid.layers},
        "batch_size": args.batch_size,
        "forwards_grid": chunks,
        "seconds_grid": t_grid,
        "seconds_loop_extrapolated": t_loop,
        "loop_pairs_timed": len(pairs),
        "speedup": t_loop / t_grid,
        "max_abs_diff": diff,
        "nonzero_activations": nnz,
        "dense_values": dense_values,
        "sparse_fraction": nnz / dense_values,
    }
    print(
        f"{spec.name} on {result['device']}: {len(concepts)} concepts x {len(strengths)} strengths x "
        f"{len(grid.layers)} layers ({n_pairs} pairs)"
    )
    print(f"  feature_grid : {t_grid:8.2f} s  ({chunks} batched forwards of <= {args.batch_size} rows)")
    print(f"  per-pair loop: {t_loop:8.2f} s  (extrapolated from {len(pairs)} pairs)")
    print(f"  speedup      : {t_loop / t_grid:8.1f} x   max |grid - loop| = {diff:.2e}")
    print(f"  stored       : {nnz} nonzero of {dense_values} ({100 * nnz / dense_values:.1f}%)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    device = "cuda" if "cuda" in result["device"] else "cpu"
    name = "tiny" if args.model == runs.TINY else Path(spec.name).name
    path = RESULTS / f"feature_grid_{name}_{device}.json"
    path.write_text(json.dumps(result, indent=2))
    print(path)


if __name__ == "__main__":
    main()
