"""Benchmark: run_trials against the paper's way, plain HF generate, and the naive way, side by side.

* **run_trials**: ``--n-concepts`` x ``--n-trials`` injection trials (128 by default) in batches of
  ``--batch-size`` (64): one concept vector, strength and start per row through ``inject``, KV-cached
  sampling, the fast path (plain HF modules with mechintro's hooks), the trial prompt's shared prefix
  computed once per batch, finished rows dropped; judged (RuleJudge) and stored (in memory) as always.
* **run_trials through the bridge**: the same call with a no-op TransformerLens hook around it, which sends
  generation through the TransformerBridge (no fast path, no shared prefix, no dropping): mechintro before
  issue #12.
* **the paper's way**: plain Hugging Face ``generate`` on the same trials in the same batches (left
  padded), with a forward hook on the injection layer adding each row's vector from its own start, the same
  stop tokens, the same temperature and ``--max-new-tokens``; once with eager attention and once with SDPA.
* **ceiling**: the same ``generate`` with no hook at all.

Every method is warmed up, then all are timed once per round for ``--rounds`` rounds in rotating order, and
the ratios are taken per round (side by side) and summarized by their median. Target: run_trials >= 1.5x the
paper's way (the faster of its two kernels).

* **naive** (``--naive-trials``, 0 skips it): one TransformerLens ``generate`` per trial with a resid_post
  hook; target run_trials >= 10x its trials/s.
* **forward overhead** (``--forward``): one batch of padded prompts through the plain HF model, through the
  bridge, and through the bridge with the injection hook.

Prints a table and writes a JSON to analyses/bench/results/.

    python analyses/bench/trials.py                 # the organism
    python analyses/bench/trials.py --model tiny    # a random tiny Gemma 3
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import hf_generate, paired_ratio, side_by_side, stop_tokens, trial_batches  # noqa: E402

from mechintro.behaviour.judges import RuleJudge
from mechintro.behaviour.trials import run_trials
from mechintro.cli import setup as runs
from mechintro.core import resources
from mechintro.core.concepts import concept_vectors, original_concepts
from mechintro.core.models import ORGANISM_NAMES, HookNames, spec_for
from mechintro.core.prompts import left_pad, trial_prompt
from mechintro.core.sampling import stop_ids
from mechintro.core.steering import inject

RESULTS = Path(__file__).resolve().parent / "results"


def model_folder(name: str) -> Path:
    """The local folder holding the weights of ``--model``."""
    if name == runs.TINY:
        return runs.tiny_model_folder()
    if name in ORGANISM_NAMES:
        return resources.organism_checkpoint(name)
    if Path(name).exists():
        return Path(name)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, local_files_only=True))


def timed(fn: Callable[[], Any], *, repeats: int = 1) -> tuple[float, Any]:
    """(median seconds over ``repeats`` calls, the last result)."""
    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


# ----------------------------------------------------------------------------------------------- the naive
# way


def naive_trial(
    model: Any,
    tokens: torch.Tensor,
    vector: torch.Tensor,
    *,
    layer: int,
    strength: float,
    start: int,
    max_new_tokens: int,
    temperature: float,
) -> torch.Tensor:
    """One trial the naive way: TransformerLens generate with a resid_post hook; returns the new tokens."""
    delta = (strength * vector).to(model.cfg.device)

    def hook(resid: torch.Tensor, hook: Any = None) -> torch.Tensor:
        resid = resid.clone()
        if resid.shape[1] > 1:  # the prompt: inject from the start position on
            resid[:, start:] += delta
        else:  # a cached generation step: one new position, always after the start
            resid += delta
        return resid

    with model.hooks(fwd_hooks=[(HookNames.resid_post(layer), hook)]):
        out = model.generate(
            tokens[None].to(model.cfg.device),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            use_past_kv_cache=True,
            stop_at_eos=True,
            eos_token_id=stop_ids(model),
            verbose=False,
            return_type="tokens",
        )
    return out[0, tokens.shape[0] :]


def bench_naive(
    model: Any, prompts: list, vectors: torch.Tensor, args: argparse.Namespace, layer: int, strength: float
) -> dict[str, float]:
    """Time ``args.naive_trials`` naive trials (after one warm-up)."""

    def run(n: int) -> int:
        new = 0
        for i in range(n):
            p = prompts[i % len(prompts)]
            out = naive_trial(
                model,
                p.tokens,
                vectors[i % len(vectors)],
                layer=layer,
                strength=strength,
                start=p.injection_start,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
            )
            new += int(out.shape[0])
        return new

    run(1)
    seconds, new_tokens = timed(lambda: run(args.naive_trials))
    return {
        "trials": args.naive_trials,
        "seconds": seconds,
        "trials_per_s": args.naive_trials / seconds,
        "new_tokens": new_tokens,
        "new_tokens_per_s": new_tokens / seconds,
    }


# ----------------------------------------------------------------------------------------------- side by side


def run_trials_fn(
    model: Any,
    concepts: list[str],
    vectors: torch.Tensor,
    args: argparse.Namespace,
    layer: int,
    strength: float,
) -> Callable[[], int]:
    """run_trials on every concept x ``args.n_trials`` injection trials; returns the generated tokens."""

    def run() -> int:
        df = run_trials(
            model,
            concepts,
            layer=layer,
            strength=strength,
            n_trials=args.n_trials,
            judge=RuleJudge(),
            controls=False,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            vectors=vectors,
            progress=False,
        )
        assert len(df) == len(concepts) * args.n_trials
        return int(df["n_new_tokens"].sum())

    return run


def through_bridge(model: Any, fn: Callable[[], int]) -> Callable[[], int]:
    """``fn`` with a no-op TransformerLens hook on the model, which sends generation through the bridge."""

    def noop(x: torch.Tensor, hook: Any = None) -> None:
        return None

    def run() -> int:
        with model.hooks(fwd_hooks=[(HookNames.resid_pre(0), noop)]):
            return fn()

    return run


def plain_hf(args: argparse.Namespace, model: Any, attention: str) -> Any:
    """The model loaded again as plain Hugging Face (``from_pretrained``) with ``attention``."""
    from transformers import AutoModelForCausalLM

    return (
        AutoModelForCausalLM.from_pretrained(
            model_folder(args.model),
            attn_implementation=attention,
            output_attentions=False,
            dtype=next(model.original_model.parameters()).dtype,
        )
        .to(model.cfg.device)
        .eval()
    )


def bench_side_by_side(
    model: Any,
    concepts: list[str],
    vectors: torch.Tensor,
    args: argparse.Namespace,
    layer: int,
    strength: float,
) -> dict[str, Any]:
    """run_trials (fast path, bridge), the paper's way (eager, SDPA) and the ceiling, timed per round."""
    batches = trial_batches(
        model,
        concepts,
        vectors,
        layer=layer,
        strength=strength,
        n_trials=args.n_trials,
        batch_size=args.batch_size,
    )
    kw = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "stops": stop_tokens(model),
        "pad_id": model.tokenizer.pad_token_id,
    }
    ours = run_trials_fn(model, concepts, vectors, args, layer, strength)
    runs: dict[str, Callable[[], int]] = {
        "run_trials": ours,
        "run_trials_bridge": through_bridge(model, ours),
    }
    for attention in ("eager", "sdpa"):
        hf = plain_hf(args, model, attention)
        runs[f"paper_{attention}"] = functools.partial(hf_generate, hf, batches, layer=layer, **kw)
        runs[f"ceiling_{attention}"] = functools.partial(hf_generate, hf, batches, layer=None, **kw)
    result = side_by_side(runs, rounds=args.rounds)
    trials = len(concepts) * args.n_trials
    for r in result.values():
        r["ms_per_trial"] = 1000 * r["median_s"] / trials
        r["trials_per_s"] = trials / r["median_s"]
        r["new_tokens_per_s"] = statistics.median(r["new_tokens"]) / r["median_s"]
    paper = min(("paper_eager", "paper_sdpa"), key=lambda n: result[n]["median_s"])
    ceiling = min(("ceiling_eager", "ceiling_sdpa"), key=lambda n: result[n]["median_s"])
    return {
        "trials": trials,
        "batches": len(batches),
        "runs": result,
        "paper_way": paper,
        "ceiling": ceiling,
        "speedup_vs_paper": paired_ratio(result, paper, "run_trials"),
        "speedup_vs_paper_eager": paired_ratio(result, "paper_eager", "run_trials"),
        "speedup_vs_paper_sdpa": paired_ratio(result, "paper_sdpa", "run_trials"),
        "bridge_vs_paper": paired_ratio(result, paper, "run_trials_bridge"),
        "ceiling_vs_run_trials": paired_ratio(result, "run_trials", ceiling),
    }


# ----------------------------------------------------------------------------------------------- forward


@torch.no_grad()
def bench_forward(
    model: Any, prompts: list, vectors: torch.Tensor, args: argparse.Namespace, layer: int, strength: float
) -> dict[str, float]:
    """Median ms of one forward pass over a padded batch: plain HF, bridge, bridge + injection hook."""
    from transformers import AutoModelForCausalLM

    hf = (
        AutoModelForCausalLM.from_pretrained(
            model_folder(args.model),
            attn_implementation=model.original_model.config._attn_implementation,
            dtype=next(model.original_model.parameters()).dtype,
        )
        .to(model.cfg.device)
        .eval()
    )
    rows = [prompts[i % len(prompts)] for i in range(args.batch_size)]
    batch = left_pad(rows, pad_id=model.tokenizer.pad_token_id)
    tokens, mask = batch.tokens.to(model.cfg.device), batch.attention_mask.to(model.cfg.device)
    vecs = torch.stack([vectors[i % len(vectors)] for i in range(args.batch_size)])

    def hooked() -> torch.Tensor:
        with inject(model, vecs, layer=layer, strength=strength, start=batch.starts):
            return model(tokens, attention_mask=mask)

    runs = {
        "hf_ms": lambda: hf(input_ids=tokens, attention_mask=mask).logits,
        "bridge_ms": lambda: model(tokens, attention_mask=mask),
        "bridge_inject_ms": hooked,
    }
    out: dict[str, float] = {"batch": args.batch_size, "seq": int(tokens.shape[1])}
    for name, fn in runs.items():
        fn()  # warm-up
        out[name] = 1000 * timed(fn, repeats=args.repeats)[0]
    out["overhead_bridge"] = out["bridge_ms"] / out["hf_ms"]
    out["overhead_inject"] = out["bridge_inject_ms"] / out["hf_ms"]
    return out


# ----------------------------------------------------------------------------------------------- main


def report(result: dict[str, Any]) -> str:
    """The printed table."""
    side = result["side_by_side"]
    lines = [
        f"model {result['model']} on {result['device']} ({result['threads']} threads, load average "
        f"{result['load_average'][0]:.1f} at start), {side['trials']} trials in {side['batches']} batches of "
        f"{result['batch_size']}, max_new_tokens {result['max_new_tokens']}, "
        f"temperature {result['temperature']}, {result['rounds']} rounds",
        f"{'method':<34}{'ms/trial':>10}{'trials/s':>10}{'new tok/s':>11}{'seconds per round':>30}",
    ]
    labels = {
        "run_trials": "run_trials (fast path)",
        "run_trials_bridge": "run_trials through the bridge",
        "paper_eager": "paper's way (HF generate, eager)",
        "paper_sdpa": "paper's way (HF generate, SDPA)",
        "ceiling_eager": "ceiling (HF generate, eager)",
        "ceiling_sdpa": "ceiling (HF generate, SDPA)",
    }
    for name, r in side["runs"].items():
        rounds = " ".join(f"{s:.2f}" for s in r["seconds"])
        lines.append(
            f"{labels.get(name, name):<34}{r['ms_per_trial']:>10.1f}{r['trials_per_s']:>10.1f}"
            f"{r['new_tokens_per_s']:>11.0f}   {rounds}"
        )
    sp = side["speedup_vs_paper"]
    lines.append(
        f"run_trials vs the paper's way ({side['paper_way']}): {sp['median']:.2f}x (rounds {sp['min']:.2f}.."
        f"{sp['max']:.2f}; target >= 1.5x); through the bridge: {side['bridge_vs_paper']['median']:.2f}x; "
        f"the ceiling ({side['ceiling']}) is {side['ceiling_vs_run_trials']['median']:.2f}x run_trials"
    )
    naive = result.get("naive")
    if naive:
        lines.append(
            f"naive (TL generate per trial): {naive['trials_per_s']:.2f} trials/s -> run_trials is "
            f"{result['speedup_vs_naive']:.1f}x (target >= 10x)"
        )
    fwd = result.get("forward")
    if fwd:
        lines.append(
            f"forward, batch {fwd['batch']} x {fwd['seq']} tokens: plain HF {fwd['hf_ms']:.1f} ms, bridge "
            f"{fwd['bridge_ms']:.1f} ms, bridge + inject {fwd['bridge_inject_ms']:.1f} ms -> overhead "
            f"{fwd['overhead_inject']:.2f}x (bridge alone {fwd['overhead_bridge']:.2f}x)"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism", help="organism, a folder, an HF id, or 'tiny'")
    p.add_argument("--n-concepts", type=int, default=16, help="concepts (the first of the original 50)")
    p.add_argument("--n-trials", type=int, default=8, help="run_trials trials per concept")
    p.add_argument("--naive-trials", type=int, default=8, help="trials timed the naive way (0: skip)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=5, help="side-by-side rounds (ratios per round, median)")
    p.add_argument("--repeats", type=int, default=5, help="forward-pass timings (median)")
    p.add_argument("--forward", action=argparse.BooleanOptionalAction, default=True, help="forward overhead")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    model = runs.load_named_model(args.model, device=args.device)
    spec = spec_for(model)
    layer, strength = spec.injection_layer, spec.strength
    concepts = original_concepts()[: args.n_concepts]
    vectors = concept_vectors(model, concepts, layer=layer)
    prompts = [trial_prompt(model, trial=t) for t in range(1, 11)]
    side = bench_side_by_side(model, concepts, vectors, args, layer, strength)
    result: dict[str, Any] = {
        "model": args.model,
        "model_name": spec.name,
        "device": str(model.cfg.device),
        "device_name": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else (platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),
        "load_average": list(load),
        "load_average_end": None,
        "torch": torch.__version__,
        "layer": layer,
        "strength": strength,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "rounds": args.rounds,
        "side_by_side": side,
        "run_trials": {
            "trials": side["trials"],
            "seconds": side["runs"]["run_trials"]["median_s"],
            "trials_per_s": side["runs"]["run_trials"]["trials_per_s"],
            "new_tokens_per_s": side["runs"]["run_trials"]["new_tokens_per_s"],
        },
    }
    if args.naive_trials:
        naive = bench_naive(model, prompts, vectors, args, layer, strength)
        result["naive"] = naive
        result["speedup_vs_naive"] = result["run_trials"]["trials_per_s"] / naive["trials_per_s"]
    if args.forward:
        result["forward"] = bench_forward(model, prompts, vectors, args, layer, strength)
    result["load_average_end"] = list(os.getloadavg())
    result["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(report(result))
    args.out.mkdir(parents=True, exist_ok=True)
    slug = Path(args.model).name if Path(args.model).exists() else args.model.replace("/", "_")
    path = args.out / f"trials_{slug}_{'cuda' if 'cuda' in result['device'] else 'cpu'}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
