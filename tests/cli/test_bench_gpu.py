"""analyses/bench/gpu.py: the real Gemma 3 sizes are built from the public numbers, and the tiny CPU smoke
configuration runs the whole benchmark (run_trials, the paper's way, the ceiling) through the same code."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "analyses" / "bench"


@pytest.fixture(scope="module")
def gpu():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_sizes_have_the_public_parameter_counts(gpu):
    """The configs give Gemma 3's published sizes (built on the meta device: no memory, no download)."""
    from transformers import Gemma3ForCausalLM

    from mechintro.core.models import data_dir

    tok = __import__("transformers").AutoTokenizer.from_pretrained(data_dir() / "organism")
    counts = {}
    for size in ("gemma-3-1b", "gemma-3-4b", "gemma-3-12b", "gemma-3-27b"):
        with torch.device("meta"):
            model = Gemma3ForCausalLM(gpu.gemma3_config(size, tok))
        counts[size] = sum(p.numel() for p in model.parameters()) / 1e9
        layers = model.config.layer_types
        assert layers.count("full_attention") == len(layers) // 6  # five sliding layers, then a global one
    # text parameters (tied embeddings): 1.0B, 3.9B, 11.8B, 27.0B as the model cards round them
    assert counts["gemma-3-1b"] == pytest.approx(1.00, abs=0.01)
    assert counts["gemma-3-4b"] == pytest.approx(3.88, abs=0.01)
    assert counts["gemma-3-12b"] == pytest.approx(11.77, abs=0.01)
    assert counts["gemma-3-27b"] == pytest.approx(27.0, abs=0.1)


def test_cpu_smoke_configuration_runs_end_to_end(gpu, tmp_path):
    result = gpu.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_smoke_cpu.json").read_text())
    assert saved["sizes"][0]["size"] == "smoke" and saved["dtype"] == "torch.bfloat16"
    assert "full-length decoding" in saved["note"]
    cells = result["sizes"][0]["batches"]
    assert [c["batch_size"] for c in cells] == [2, 4]
    for cell in cells:
        assert not cell.get("oom")
        for method in ("run_trials", "paper", "ceiling"):
            r = cell[method]
            assert r["trials_per_s"] > 0 and r["peak_gb"] is None  # no GPU here
            assert 0 < r["new_tokens"][0] <= cell["trials"] * saved["max_new_tokens"]
        assert cell["speedup_vs_paper"] > 0


def test_out_of_memory_is_a_recorded_result(gpu):
    def too_big():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    assert gpu.guarded(too_big) == {"oom": True, "error": "CUDA out of memory. Tried to allocate 80.00 GiB"}
    assert gpu.guarded(lambda: {"fine": 1}) == {"fine": 1}


def test_real_sizes_refuse_a_cpu(gpu):
    with pytest.raises(SystemExit, match="need a GPU"):
        gpu.parse_args(["--sizes", "gemma-3-1b", "--device", "cpu"])
    with pytest.raises(SystemExit, match="batch sizes must be >= 1"):
        gpu.parse_args(["--sizes", "gemma-3-1b", "--device", "cuda", "--batch-sizes", "64", "0"])
