"""Shared fixtures: one tiny random Gemma 3 (saved with save_pretrained, loaded through load_model) per
session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Hermetic: an organism a developer trained into their per-user folder never stands in for the shipped one.
if "XDG_DATA_HOME" not in os.environ:
    os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="mechintro-test-xdg-")
    atexit.register(shutil.rmtree, os.environ["XDG_DATA_HOME"], ignore_errors=True)
torch.set_num_threads(1)  # tiny models: more threads only add contention


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from mechintro.testing import save_tiny_gemma3

    return save_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from mechintro.core.models import load_model

    return load_model(tiny_dir, device="cpu")


@pytest.fixture(scope="session")
def hf_tiny(tiny_dir):
    """The same weights as plain HF, eager attention (what the bridge uses)."""
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()


def hf_capture(hf_model, tokens, module_names):
    """Outputs of HF submodules (by dotted name) from one plain-HF forward, via register_forward_hook."""
    got, handles = {}, []
    modules = dict(hf_model.named_modules())
    for name in module_names:

        def hook(_m, _inp, out, name=name):
            got[name] = (out[0] if isinstance(out, tuple) else out).detach()

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = hf_model(tokens).logits
    finally:
        for h in handles:
            h.remove()
    return logits, got


@pytest.fixture(scope="module")
def tcs(tiny, tmp_path_factory):
    """Random JumpReLU skip transcoders (seed 3) for every layer of the tiny model."""
    from mechintro.core.transcoders import load_transcoders
    from mechintro.testing import save_random_transcoders

    return load_transcoders(tiny, source=save_random_transcoders(tmp_path_factory.mktemp("tcs"), seed=3))


@pytest.fixture(scope="session")
def subword_dir(tmp_path_factory):
    """A tiny random Gemma 3 with a small BPE tokenizer: words split into pieces, prompts differ in length."""
    from mechintro.testing import save_tiny_gemma3

    return save_tiny_gemma3(tmp_path_factory.mktemp("tiny_subword"), tokenizer="subword", seed=1)


@pytest.fixture(scope="session")
def subword(subword_dir):
    from mechintro.core.models import load_model

    return load_model(subword_dir, device="cpu")


def hf_injected_logits(hf_model, tokens, *, layer, vector, strength, start):
    """Last-position logits of a plain-HF forward of ``tokens`` ([seq]) with ``strength * vector`` added to
    the output of decoder layer ``layer`` at every position >= ``start``: an injection written independently
    of mechintro's hooks."""

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, start:] += strength * vector.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = hf_model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return hf_model(tokens[None]).logits[0, -1].float()
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def true_float64():
    """For one test module: Gemma 3's RMSNorm and the bridge's attention softmax keep float64 inputs in
    float64 (they round to float32 otherwise: ``x.float()``, ``softmax(..., dtype=torch.float32)``), so a
    model loaded with ``dtype=torch.float64`` is float64 end to end. float32 inputs are computed as before."""
    from transformers.models.gemma3 import modeling_gemma3

    plain_softmax, plain_norm = torch.nn.functional.softmax, modeling_gemma3.Gemma3RMSNorm.forward

    def softmax(x, *args, dtype=None, **kw):
        return plain_softmax(x, *args, dtype=None if x.dtype == torch.float64 else dtype, **kw)

    def norm(self, x):
        if x.dtype != torch.float64:
            return plain_norm(self, x)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "softmax", softmax)
        mp.setattr(modeling_gemma3.Gemma3RMSNorm, "forward", norm)
        yield


_STALLING_SWEEP = """\
import sys, time, torch
torch.set_num_threads(1)
from mechintro.behaviour.judges import RuleJudge
from mechintro.core.models import load_model
from mechintro.behaviour.trials import sweep

class StallingJudge:
    name = "rule"
    calls = 0
    def judge(self, **rows):
        self.calls += 1
        if self.calls == {stall_at}:  # earlier batches are stored; this one is in flight when we are killed
            print("STALLED", flush=True)
            time.sleep(300)
        return RuleJudge().judge(**rows)

{prelude}
model = load_model(sys.argv[1], device="cpu")
sweep(model, {concepts!r}, judge=StallingJudge(), store=sys.argv[2], progress=False, {settings})
print("FINISHED", flush=True)
"""


@pytest.fixture
def kill_a_stalled_sweep(tmp_path):
    """``kill(model_dir, store, *, concepts, settings, stall_at, prelude="", args=())``: see
    :func:`_kill_a_stalled_sweep`."""
    return lambda *a, **k: _kill_a_stalled_sweep(tmp_path, *a, **k)


def _kill_a_stalled_sweep(
    tmp_path, model_dir, store, *, concepts, settings: str, stall_at: int, prelude: str = "", args=()
) -> int:
    """Run ``sweep(model, concepts, <settings>)`` in a subprocess whose judge stalls on call ``stall_at``,
    SIGKILL it there (as a crash would), and return its pid. ``prelude`` runs before the model loads (e.g.
    ``ray.init``); ``args`` come after the model folder and the store on its command line."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "stalling_sweep.py"
    script.write_text(
        _STALLING_SWEEP.format(stall_at=stall_at, prelude=prelude, concepts=list(concepts), settings=settings)
    )
    repo = Path(__file__).resolve().parent.parent  # this checkout's mechintro, not another install's
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(model_dir), str(store), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=repo,
    )
    try:
        line = ""
        for line in proc.stdout:
            if line.strip() in ("STALLED", "FINISHED"):
                break
        assert line.strip() == "STALLED", "the sweep finished before its judge stalled"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    return proc.pid


@pytest.fixture
def one_layer_at_a_time():
    """``make(transcoders) -> (lazy, seen)``: a LazyTranscoders keeping one layer whose loader hands out
    copies
    and records, per load, how many earlier copies are still alive (referenced by anyone). ``max(seen) <= 1``
    means peak memory held one dictionary."""
    import copy
    import gc
    import weakref

    from mechintro.core.transcoders import LazyTranscoders

    def make(transcoders):
        alive: weakref.WeakSet = weakref.WeakSet()
        seen: list[int] = []

        def load(layer):
            if len(alive) > 1:  # collect only to confirm (a full collection takes ~0.5 s)
                gc.collect()
            seen.append(len(alive))
            tc = copy.deepcopy(transcoders[layer])
            alive.add(tc)
            return tc

        return LazyTranscoders(list(transcoders), load, keep=1), seen

    return make
