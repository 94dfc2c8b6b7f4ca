"""Benchmark: run_trials on random-weight Gemma 3 at the real sizes (1B, 4B, 12B, 27B), on one GPU.

For each size the architecture numbers of the public Gemma 3 configs (:data:`SIZES`, written in here:
nothing is downloaded) build a ``Gemma3ForCausalLM`` with random weights, in bfloat16, directly on the GPU,
and ``load_model(..., hf_model=)`` wraps it in the TransformerBridge as for a real checkpoint (the organism's
tokenizer and chat template give the trial prompts, ~140 tokens). For each batch size (64..512) it measures,
side by side in one run (every method warmed up, then ``--rounds`` rounds in rotating order):

* **run_trials**: ``--batches`` batches of injection trials (per-row concept vectors, here random with the
  norm of the model's residual stream), the fast path, the shared prompt prefix, bf16;
* **the paper's way**: Hugging Face ``generate`` on the same batches with a forward hook adding each row's
  vector from its own start (SDPA attention, the same weights: :func:`mechintro.core.fastpath.twin`);
* **the ceiling**: the same ``generate`` with no hook at all;

reporting trials/s, generated tokens/s and the peak GPU memory of each. An out-of-memory error is recorded
as the result of that cell (27B in bf16 is ~54 GB of weights before any KV cache), not a failure.

**Random weights (almost) never emit a stop token** (2 stop ids among 262k), so every row decodes
``--max-new-tokens`` tokens: this measures full-length decoding, the slowest case; the generated token counts
are in the results.

On a CPU, ``--smoke`` runs a tiny configuration (2 layers, d_model 64, batches of 2 and 4, 4 new tokens, bf16)
through the same code: the test suite runs it. Never run a real size on a CPU.

    python analyses/bench/gpu.py                          # every size, batch 64..512 (one GPU)
    python analyses/bench/gpu.py --sizes gemma-3-1b --batch-sizes 64 128
    python analyses/bench/gpu.py --smoke                  # CPU smoke test
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import hf_generate, side_by_side, stop_tokens, trial_batches  # noqa: E402

from mechintro.behaviour.judges import RuleJudge  # noqa: E402
from mechintro.behaviour.trials import run_trials  # noqa: E402
from mechintro.core import fastpath  # noqa: E402
from mechintro.core.concepts import all_concepts  # noqa: E402
from mechintro.core.models import data_dir, load_model, spec_for  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _layer_types(n_layers: int, every: int = 6) -> list[str]:
    """Gemma 3's pattern: five sliding-window layers, then one global layer."""
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layers)]


def _rope(scaled: bool) -> dict[str, dict[str, Any]]:
    full = {"rope_type": "linear", "factor": 8.0} if scaled else {"rope_type": "default"}
    return {
        "full_attention": {**full, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }


SIZES: dict[str, dict[str, Any]] = {
    # the text models' numbers from the public configs (google/gemma-3-*-it; for 4b/12b/27b the text_config)
    "gemma-3-1b": {
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 512,
        "vocab_size": 262_144,
        "rope_scaled": False,
    },
    "gemma-3-4b": {
        "hidden_size": 2560,
        "intermediate_size": 10_240,
        "num_hidden_layers": 34,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 1024,
        "vocab_size": 262_208,
        "rope_scaled": True,
    },
    "gemma-3-12b": {
        "hidden_size": 3840,
        "intermediate_size": 15_360,
        "num_hidden_layers": 48,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 1024,
        "vocab_size": 262_208,
        "rope_scaled": True,
    },
    "gemma-3-27b": {
        "hidden_size": 5376,
        "intermediate_size": 21_504,
        "num_hidden_layers": 62,
        "num_attention_heads": 32,
        "num_key_value_heads": 16,
        "head_dim": 128,
        "query_pre_attn_scalar": 168,
        "sliding_window": 1024,
        "vocab_size": 262_208,
        "rope_scaled": True,
    },
    "smoke": {  # CPU smoke test only
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 16,
        "vocab_size": 4096,
        "rope_scaled": False,
    },
}


def gemma3_config(size: str, tokenizer: Any) -> Any:
    """A ``Gemma3TextConfig`` with the architecture numbers of ``size``."""
    from transformers import Gemma3TextConfig

    numbers = dict(SIZES[size])
    scaled = numbers.pop("rope_scaled")
    n = numbers["num_hidden_layers"]
    return Gemma3TextConfig(
        **numbers,
        layer_types=_layer_types(n),
        rope_parameters=_rope(scaled),
        max_position_embeddings=32_768,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_tokens_of(tokenizer),
        tie_word_embeddings=True,
        architectures=["Gemma3ForCausalLM"],
    )


def stop_tokens_of(tokenizer: Any) -> list[int]:
    return sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")})


def random_model(size: str, *, device: str, dtype: torch.dtype, folder: Path) -> Any:
    """A random-weight Gemma 3 of ``size`` built on ``device``, wrapped as mechintro's model."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(data_dir() / "organism")
    config = gemma3_config(size, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    with torch.device(device):
        hf = Gemma3ForCausalLM._from_config(config, dtype=dtype).eval()
    return load_model(folder, device=device, dtype=dtype, hf_model=hf)


def n_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.original_model.parameters())


# ----------------------------------------------------------------------------------------------- measuring


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_gb(fn: Callable[[], Any]) -> tuple[Any, float | None]:
    """(fn's result, the peak GPU memory allocated while it ran, in GB; None on a CPU)."""
    if not torch.cuda.is_available():
        return fn(), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() / 1e9


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``, or ``{"oom": True, "error": ...}`` when the accelerator runs out of memory (a result to
    record, not a failure)."""
    try:
        return fn()
    except torch.OutOfMemoryError as err:
        _free()
        return {"oom": True, "error": str(err).splitlines()[0][:200]}


def trial_vectors(model: Any, n: int, *, layer: int) -> torch.Tensor:
    """``n`` random concept vectors with the typical norm of resid_post at ``layer`` (float32 on the CPU)."""
    from mechintro.core.concepts import last_token_resid
    from mechintro.core.prompts import trial_prompt

    resid = last_token_resid(model, [trial_prompt(model, trial=1).tokens], layer=layer)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(n, resid.shape[-1], generator=g)
    return v / v.norm(dim=-1, keepdim=True) * resid.norm()


def bench_batch(model: Any, args: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    """run_trials, the paper's way and the ceiling on ``args.batches`` batches of ``batch_size`` trials."""
    spec = spec_for(model)
    layer, strength = spec.injection_layer, 1.0
    total = args.batches * batch_size
    n_trials = min(8, total)
    concepts = all_concepts()[: total // n_trials]
    vectors = trial_vectors(model, len(concepts), layer=layer)
    batches = trial_batches(
        model, concepts, vectors, layer=layer, strength=strength, n_trials=n_trials, batch_size=batch_size
    )
    kw = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": 1.0,
        "stops": stop_tokens(model),
        "pad_id": model.tokenizer.pad_token_id,
    }
    twin = fastpath.twin(model, attention=fastpath.default_attention(model))

    def ours() -> int:
        df = run_trials(
            model,
            concepts,
            layer=layer,
            strength=strength,
            n_trials=n_trials,
            judge=RuleJudge(),
            controls=False,
            max_new_tokens=args.max_new_tokens,
            batch_size=batch_size,
            vectors=vectors,
            progress=False,
        )
        return int(df["n_new_tokens"].sum())

    runs: dict[str, Callable[[], int]] = {
        "run_trials": ours,
        "paper": functools.partial(hf_generate, twin, batches, layer=layer, **kw),
        "ceiling": functools.partial(hf_generate, twin, batches, layer=None, **kw),
    }
    peaks = {}
    for name, fn in runs.items():  # one pass each for the peak memory (also a warm-up)
        _, peaks[name] = peak_gb(fn)
    timing = side_by_side(runs, rounds=args.rounds)
    trials = len(concepts) * n_trials
    out: dict[str, Any] = {"batch_size": batch_size, "trials": trials}
    for name, r in timing.items():
        median = r["median_s"]
        out[name] = {
            "seconds": r["seconds"],
            "trials_per_s": trials / median,
            "new_tokens": r["new_tokens"],
            "new_tokens_per_s": statistics.median(r["new_tokens"]) / median,
            "peak_gb": peaks[name],
        }
    ratios = [p / o for p, o in zip(timing["paper"]["seconds"], timing["run_trials"]["seconds"], strict=True)]
    ceiling = [
        o / c for o, c in zip(timing["run_trials"]["seconds"], timing["ceiling"]["seconds"], strict=True)
    ]
    out["speedup_vs_paper"] = statistics.median(ratios)
    out["ceiling_vs_run_trials"] = statistics.median(ceiling)
    return out


def bench_size(size: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Every batch size of one model size (the model is built once)."""
    try:
        model = random_model(size, device=args.device, dtype=args.dtype, folder=folder / size)
    except torch.OutOfMemoryError as err:
        _free()
        return {"size": size, "oom_loading": str(err).splitlines()[0][:200]}
    result: dict[str, Any] = {
        "size": size,
        "parameters": n_parameters(model),
        "config": SIZES[size],
        "injection_layer": spec_for(model).injection_layer,
        "batches": [],
    }
    for batch_size in args.batch_sizes:
        cell = guarded(functools.partial(bench_batch, model, args, batch_size))
        cell.setdefault("batch_size", batch_size)
        result["batches"].append(cell)
        print(row(size, cell), flush=True)
    del model
    _free()
    return result


def row(size: str, cell: dict[str, Any]) -> str:
    """One printed line per (size, batch size)."""
    head = f"{size:<12}{cell['batch_size']:>6}"
    if cell.get("oom"):
        return f"{head}  out of memory"

    def fmt(r: dict[str, Any]) -> str:
        peak = "" if r["peak_gb"] is None else f" {r['peak_gb']:.1f} GB"
        return f"{r['trials_per_s']:>8.1f} tr/s {r['new_tokens_per_s']:>9.0f} tok/s{peak}"

    return (
        f"{head}  run_trials {fmt(cell['run_trials'])} | paper {fmt(cell['paper'])} | ceiling "
        f"{fmt(cell['ceiling'])} | run_trials/paper {cell['speedup_vs_paper']:.2f}x, ceiling/run_trials "
        f"{cell['ceiling_vs_run_trials']:.2f}x"
    )


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=[s for s in SIZES if s != "smoke"], choices=list(SIZES))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128, 256, 512])
    p.add_argument("--batches", type=int, default=2, help="batches per measurement")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="the tiny CPU configuration (for CI)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.batch_sizes, args.max_new_tokens, args.rounds = ["smoke"], [2, 4], 4, 1
        args.device = args.device or "cpu"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cpu" and any(s != "smoke" for s in args.sizes):
        raise SystemExit("real Gemma 3 sizes need a GPU; on a CPU run --smoke")
    if "smoke" in args.sizes and len(args.sizes) > 1:
        raise SystemExit("--sizes smoke is the CPU test configuration; run it alone (--smoke)")
    bad = [b for b in args.batch_sizes if b < 1]
    if bad:
        raise SystemExit(f"batch sizes must be >= 1, got {bad}")
    args.dtype = torch.bfloat16
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mechintro-gpu-bench-") as tmp:
        sizes = [bench_size(size, args, Path(tmp)) for size in args.sizes]
    result = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "dtype": str(args.dtype),
        "max_new_tokens": args.max_new_tokens,
        "batches_per_measurement": args.batches,
        "rounds": args.rounds,
        "note": "random weights (almost) never emit a stop token: full-length decoding",
        "sizes": sizes,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu_smoke_cpu.json" if args.sizes == ["smoke"] else f"gpu_{args.device.split(':')[0]}.json"
    path = args.out / name
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
