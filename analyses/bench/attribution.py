"""Benchmark: steering attribution in batched chunks against the paper's way, side by side in one run.

* **ours** (:func:`mechintro.attribution.passes.steering_attribution`): rows = (concept, strength) pairs in
  chunks of
  ``--batch-size``; each chunk is one forward in which the strength is a forward-mode dual number (the JVP
  rides along), then one backward; the un-injected prefix runs once per chunk and its KV cache is shared;
  the dictionaries are applied afterwards, one layer at a time.
* **the paper's way**: for every concept and every strength, one JVP (``torch.func.jvp`` of the strength ->
  transcoder inputs/outputs), one forward and one backward (for the output gradients), each over the whole
  prompt, then the same per-layer dictionary arithmetic. It is slow, so ``--paper-pairs`` pairs are timed
  and the total is extrapolated per pair; its SA values are compared with ours on those pairs.
* **memory of the largest step**: each step (our largest chunk: pass + dictionaries; one pair the paper's
  way) runs in a fresh child process that has loaded the model; the step's peak is the rise of the
  process's resident-memory high-water mark over the step (``VmHWM``, reset before the step), or
  ``torch.cuda.max_memory_allocated`` on a GPU. The dense tensors our chunk holds are also counted exactly.

Target: ours >= 5x the paper's way. Prints a table and writes a JSON to analyses/bench/results/.

    python analyses/bench/attribution.py                  # the organism, 8 held-out concepts x 21 strengths
    python analyses/bench/attribution.py --model tiny     # a random tiny Gemma 3 with random transcoders
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechintro.attribution.metric import resolve_metric  # noqa: E402
from mechintro.attribution.passes import (  # noqa: E402
    PassTensors,
    attribution_sites,
    site_terms,
    steering_attribution,
)
from mechintro.attribution.sites import Dictionaries  # noqa: E402
from mechintro.attribution.strengths import strength_grid  # noqa: E402
from mechintro.cli import setup as runs  # noqa: E402
from mechintro.core.concepts import concept_vectors, heldout_concepts  # noqa: E402
from mechintro.core.hooks import capture, hooks_context  # noqa: E402
from mechintro.core.models import spec_for  # noqa: E402
from mechintro.core.prompts import trial_prompt  # noqa: E402
from mechintro.core.readout import yes_no_gap  # noqa: E402
from mechintro.core.steering import inject  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Model, transcoders, concepts, vectors, strength grid."""
    torch.set_num_threads(args.threads)
    model, transcoders = runs.named_model_and_transcoders(args.model, device=args.device)
    spec = spec_for(model)
    try:
        concepts = heldout_concepts()[: args.concepts]
    except FileNotFoundError:
        from mechintro.core.concepts import original_concepts

        concepts = original_concepts()[: args.concepts]
    vectors = concept_vectors(model, concepts, layer=spec.injection_layer)
    grid = strength_grid(model, args.points)
    return {
        "model": model,
        "tcs": transcoders,
        "spec": spec,
        "concepts": concepts,
        "vectors": vectors,
        "grid": grid,
    }


# ----------------------------------------------------------------------------------------- the paper's way


def paper_pair(model: Any, transcoders: Any, vector: torch.Tensor, strength: float) -> tuple[dict, dict]:
    """One (concept, strength) the paper's way: a JVP, then a forward and a backward, over the whole prompt.

    Reads what its capture hooks intend (the transcoder's input ``ln2.hook_out`` and output ``hook_mlp_out``
    of every layer after the injection) and returns our per-site terms for positions >= the injection start.
    """
    spec = spec_for(model)
    prompt = trial_prompt(model, trial=1)
    start, layer = prompt.injection_start, spec.injection_layer
    dicts = Dictionaries(model, transcoders)
    metric = resolve_metric(model).at(len(prompt.tokens), start)
    sites = attribution_sites(dicts, layer=layer, metric=metric)
    names = [dicts.in_hook(s) for s in sites] + [dicts.out_hook(s) for s in sites]
    tokens = prompt.tokens[None].to(model.cfg.device)
    dtype = next(model.original_model.parameters()).dtype
    vector = vector.to(model.cfg.device, dtype)

    def reads(alpha: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with inject(model, vector, layer=layer, strength=alpha, start=start):
            with capture(model, names, detach=False) as acts:
                logits = model(tokens)
        return (yes_no_gap(logits[:, -1], spec), *(acts[n] for n in names))

    alpha = torch.tensor([strength], dtype=dtype, device=model.cfg.device)
    with torch.no_grad():
        primal, tangent = torch.func.jvp(reads, (alpha,), (torch.ones_like(alpha),))
    zeros: dict[str, torch.Tensor] = {}

    def add_zero(name: str):
        def hook(y: torch.Tensor, hook: Any = None) -> torch.Tensor:
            zeros[name] = torch.zeros_like(y, requires_grad=True)
            return y + zeros[name]

        return hook

    outs = [dicts.out_hook(s) for s in sites]
    with hooks_context(model, [(n, add_zero(n)) for n in outs]):
        with inject(model, vector, layer=layer, strength=alpha, start=start):
            gap = yes_no_gap(model(tokens)[:, -1], spec)
    grads = torch.autograd.grad(gap.sum(), [zeros[n] for n in outs])
    n = len(sites)
    got = PassTensors(positions=list(range(start, len(prompt.tokens))), value=primal[0].detach())
    for k, site in enumerate(sites):
        got.x[site] = primal[1 + k][:, start:].detach()
        got.x_dot[site] = tangent[1 + k][:, start:].detach()
        got.y_dot[site] = tangent[1 + n + k][:, start:].detach()
        got.grad[site] = grads[k][:, start:].detach()
    feats, rems = {}, {}
    for site in sites:
        feats[site], rems[site] = site_terms(site, dicts[site], got)
    return feats, rems


# ----------------------------------------------------------------------------------------------- memory


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> float:
    """Reset the process's resident-memory high-water mark (Linux ``clear_refs`` 5); return resident MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_mib("VmRSS")


def _step_memory(kind: str, argv: list[str], queue: Any) -> None:
    """In a fresh process: load everything, then run one step and report its peak memory in MiB."""
    s = setup(parse_args(argv))
    model, tcs, concepts, vectors, grid = s["model"], s["tcs"], s["concepts"], s["vectors"], s["grid"]
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _reset_peak_rss()
    if kind == "ours":
        rows = min(args.batch_size, len(concepts) * len(grid))
        per = -(-rows // len(grid))
        steering_attribution(
            model, tcs, concepts[:per], vectors=vectors[:per], strengths=grid, batch_size=rows
        )
    else:
        paper_pair(model, tcs, vectors[0], grid[-1])
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 - before
    else:
        peak = _proc_status_mib("VmHWM") - before
    queue.put(peak)


def step_memory(kind: str, argv: list[str]) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_step_memory, args=(kind, argv, queue))
    proc.start()
    value = queue.get(timeout=600)
    proc.join()
    return float(value)


def dense_bytes(model: Any, sites: int, rows: int, positions: int) -> int:
    """Bytes of the dense site tensors one chunk keeps: x, ẋ, ẏ and g at every site and position."""
    itemsize = torch.finfo(next(model.original_model.parameters()).dtype).bits // 8
    return 4 * sites * rows * positions * int(model.cfg.d_model) * itemsize


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism", help="organism, a folder, an HF id, or 'tiny'")
    p.add_argument("--concepts", type=int, default=8, help="held-out concepts (default 8)")
    p.add_argument("--points", type=int, default=21, help="strength grid points, 0..s* (default 21)")
    p.add_argument("--batch-size", type=int, default=64, help="(concept, strength) rows per pass")
    p.add_argument("--paper-pairs", type=int, default=21, help="pairs timed the paper's way")
    p.add_argument("--no-memory", action="store_true", help="skip the per-step memory measurements")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    s = setup(args)
    model, tcs, spec, concepts, vectors, grid = (
        s[k] for k in ("model", "tcs", "spec", "concepts", "vectors", "grid")
    )
    steering_attribution(model, tcs, concepts[:1], vectors=vectors[:1], strengths=grid[:2])  # warm-up
    paper_pair(model, tcs, vectors[0], grid[1])

    _sync()
    t0 = time.perf_counter()
    ours = steering_attribution(
        model, tcs, concepts, vectors=vectors, strengths=grid, batch_size=args.batch_size
    )
    _sync()
    t_ours = time.perf_counter() - t0

    pairs = [(c, k) for c in range(len(concepts)) for k in range(len(grid))][: args.paper_pairs]
    _sync()
    t0 = time.perf_counter()
    theirs = [paper_pair(model, tcs, vectors[c], grid[k]) for c, k in pairs]
    _sync()
    n_pairs = len(concepts) * len(grid)
    t_paper = (time.perf_counter() - t0) / len(pairs) * n_pairs

    diff, compared = 0.0, 0
    f = ours.features
    for (c, k), (feats, _) in zip(pairs, theirs, strict=True):
        mine = f[(f["concept"] == concepts[c]) & (f["strength"] == grid[k])]
        for site, arrays in feats.items():
            sub = mine[(mine["dictionary"] == site.kind) & (mine["layer"] == site.layer)]
            paper_sa = np.sort(arrays["ga"] * arrays["sg"])
            if len(sub) != len(paper_sa):
                raise AssertionError(
                    f"{site}, pair {(c, k)}: {len(sub)} active features ours, {len(paper_sa)}"
                )
            diff = max(diff, float(np.abs(np.sort(sub["sa"].to_numpy()) - paper_sa).max(initial=0.0)))
            compared += len(sub)
    prompt = trial_prompt(model, trial=1)
    positions = len(prompt.tokens) - prompt.injection_start
    chunk_rows = min(args.batch_size, n_pairs)
    n_sites = len(ours.settings.sites)
    result = {
        "model": spec.name,
        "device": str(model.cfg.device),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "concepts": len(concepts),
        "strengths": list(grid),
        "sites": [[site.kind, site.layer] for site in ours.settings.sites],
        "prompt_tokens": len(prompt.tokens),
        "positions_attributed": positions,
        "batch_size": args.batch_size,
        "passes_ours": -(-n_pairs // args.batch_size),
        "passes_paper": n_pairs,
        "seconds_ours": t_ours,
        "seconds_paper_extrapolated": t_paper,
        "paper_pairs_timed": len(pairs),
        "speedup": t_paper / t_ours,
        "max_abs_diff_sa": diff,
        "feature_rows_compared": compared,
        "feature_rows": len(ours.features),
        "dense_bytes_largest_chunk": dense_bytes(model, n_sites, chunk_rows, positions),
    }
    if not args.no_memory:
        result["peak_mib_ours_largest_chunk"] = step_memory("ours", argv)
        result["peak_mib_paper_one_pair"] = step_memory("paper", argv)
        result["memory_measure"] = (
            "cuda max_memory_allocated" if torch.cuda.is_available() else "peak resident memory (VmHWM) rise"
        )
    print(
        f"{spec.name} on {result['device']}: {len(concepts)} concepts x {len(grid)} strengths "
        f"({n_pairs} rows), {n_sites} dictionary sites, {positions} positions from the injection start"
    )
    print(f"  ours          : {t_ours:8.2f} s  ({result['passes_ours']} passes of <= {args.batch_size} rows)")
    print(f"  paper's way   : {t_paper:8.2f} s  (extrapolated from {len(pairs)} pairs, {n_pairs} passes)")
    print(
        f"  speedup       : {t_paper / t_ours:8.1f} x  (target >= 5x)   "
        f"max |SA ours - paper| = {diff:.2e} over {compared} SA values"
    )
    print(f"  dense tensors of the largest chunk: {result['dense_bytes_largest_chunk'] / 2**20:.1f} MiB")
    if not args.no_memory:
        print(
            f"  peak memory   : ours, largest chunk {result['peak_mib_ours_largest_chunk']:.0f} MiB; "
            f"paper, one pair {result['peak_mib_paper_one_pair']:.0f} MiB ({result['memory_measure']})"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if "cuda" in result["device"] else "cpu"
    name = "tiny" if args.model == runs.TINY else Path(spec.name).name
    path = args.out / f"attribution_{name}_{device}.json"
    path.write_text(json.dumps(result, indent=2))
    print(path)
    return result


if __name__ == "__main__":
    main()
