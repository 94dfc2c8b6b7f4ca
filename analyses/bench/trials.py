"""Benchmark: trials per second of run_trials against the naive way, and the hooked-forward overhead.

* **run_trials**: batches of ``--batch-size`` (>= 64) trials, one concept vector, strength and start per row
  through ``inject``, KV-cached sampling.
* **naive**: one TransformerLens ``generate`` per trial (KV cache on) with a resid_post hook that adds the
  vector from the injection start on; the same prompts, strength, temperature and ``--max-new-tokens``.
  It is slow, so ``--naive-trials`` of the trials are timed and the rate is per trial.
* **forward overhead**: one batch of ``--batch-size`` padded trial prompts through the plain HF model
  (``from_pretrained``, the same eager attention the bridge uses), through the TransformerBridge, and
  through the bridge with the injection hook; ratio = hooked bridge / plain HF (target <= 1.3).

Targets: run_trials >= 10x the naive trials/s. Prints a table and writes a JSON to analyses/bench/results/.

    python analyses/bench/trials.py                 # the organism
    python analyses/bench/trials.py --model tiny    # a random tiny Gemma 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mechintro import runs
from mechintro.concepts import concept_vectors, original_concepts
from mechintro.judges import RuleJudge
from mechintro.models import ORGANISM_NAMES, HookNames, data_dir, spec_for
from mechintro.prompts import left_pad, trial_prompt
from mechintro.sampling import stop_ids
from mechintro.steering import inject
from mechintro.trials import run_trials

RESULTS = Path(__file__).resolve().parent / "results"


def model_folder(name: str) -> Path:
    """The local folder holding the weights of ``--model``."""
    if name == runs.TINY:
        return runs.tiny_model_folder()
    if name in ORGANISM_NAMES:
        return data_dir() / name
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


# ----------------------------------------------------------------------------------------------- run_trials


def bench_ours(
    model: Any,
    concepts: list[str],
    vectors: torch.Tensor,
    args: argparse.Namespace,
    layer: int,
    strength: float,
) -> dict[str, float]:
    """Time run_trials on every concept x ``args.n_trials`` injection trials (after a warm-up)."""

    def run(n_trials: int) -> Any:
        return run_trials(
            model,
            concepts,
            layer=layer,
            strength=strength,
            n_trials=n_trials,
            judge=RuleJudge(),
            controls=False,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            vectors=vectors,
            progress=False,
        )

    run(1)
    seconds, df = timed(lambda: run(args.n_trials))
    new_tokens = int(df["n_new_tokens"].sum())
    return {
        "trials": len(df),
        "seconds": seconds,
        "trials_per_s": len(df) / seconds,
        "new_tokens": new_tokens,
        "new_tokens_per_s": new_tokens / seconds,
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
    ours, naive, fwd = result["run_trials"], result["naive"], result["forward"]
    lines = [
        f"model {result['model']} on {result['device']} ({result['threads']} threads), "
        f"max_new_tokens {result['max_new_tokens']}, batch {result['batch_size']}",
        f"{'method':<34}{'trials':>8}{'seconds':>10}{'trials/s':>10}{'new tok/s':>11}",
    ]
    for label, r in (
        (f"run_trials (batch {result['batch_size']}, KV cache)", ours),
        ("naive: TL generate per trial", naive),
    ):
        lines.append(
            f"{label:<34}{r['trials']:>8}{r['seconds']:>10.2f}{r['trials_per_s']:>10.2f}"
            f"{r['new_tokens_per_s']:>11.1f}"
        )
    lines.append(f"speedup (trials/s): {result['speedup']:.1f}x (target >= 10x)")
    lines.append(
        f"forward, batch {fwd['batch']} x {fwd['seq']} tokens: plain HF {fwd['hf_ms']:.1f} ms, bridge "
        f"{fwd['bridge_ms']:.1f} ms, bridge + inject {fwd['bridge_inject_ms']:.1f} ms -> overhead "
        f"{fwd['overhead_inject']:.2f}x (target <= 1.3x; bridge alone {fwd['overhead_bridge']:.2f}x)"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism", help="organism, a folder, an HF id, or 'tiny'")
    p.add_argument("--n-concepts", type=int, default=8, help="concepts (the first of the original 50)")
    p.add_argument("--n-trials", type=int, default=8, help="run_trials trials per concept")
    p.add_argument("--naive-trials", type=int, default=8, help="trials timed the naive way")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5, help="forward-pass timings (median)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = runs.load_named_model(args.model, device=args.device)
    spec = spec_for(model)
    layer, strength = spec.injection_layer, spec.strength
    concepts = original_concepts()[: args.n_concepts]
    vectors = concept_vectors(model, concepts, layer=layer)
    prompts = [trial_prompt(model, trial=t) for t in range(1, 11)]
    ours = bench_ours(model, concepts, vectors, args, layer, strength)
    naive = bench_naive(model, prompts, vectors, args, layer, strength)
    result = {
        "model": args.model,
        "model_name": spec.name,
        "device": str(model.cfg.device),
        "device_name": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else (platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "layer": layer,
        "strength": strength,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "run_trials": ours,
        "naive": naive,
        "speedup": ours["trials_per_s"] / naive["trials_per_s"],
        "forward": bench_forward(model, prompts, vectors, args, layer, strength),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(report(result))
    args.out.mkdir(parents=True, exist_ok=True)
    slug = Path(args.model).name if Path(args.model).exists() else args.model.replace("/", "_")
    path = args.out / f"trials_{slug}_{'cuda' if 'cuda' in result['device'] else 'cpu'}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
