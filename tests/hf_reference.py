"""Plain Hugging Face references for the per-family tests: hand-written torch hooks on the modules a family's
description names, transcoders applied from their raw Gemma Scope 2 tensors, and greedy ``generate``.

Nothing here goes through mechintro's hook names, the bridge or the fast path: a site is a Hugging Face module
name (``model.layers.L.mlp``), an edit is a plain torch hook, and a transcoder is the four formulas of its raw
format. So a test that compares mechintro with these proves that mechintro reads and writes the same tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _with_first(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


@contextlib.contextmanager
def hooked(hf, hooks: Sequence[tuple[str, str, Callable]]) -> Iterator[None]:
    """Install ``(module name, "input" | "output", fn)`` on ``hf``: ``fn(tensor) -> tensor | None`` sees the
    module's first argument (a pre-hook) or its output (the first element of a tuple)."""
    handles = []
    try:
        for name, side, fn in hooks:
            module = hf.get_submodule(name)
            if side == "output":

                def after(_m, _i, out, fn=fn):
                    new = fn(_first(out))
                    return None if new is None else _with_first(out, new)

                handles.append(module.register_forward_hook(after))
            else:

                def before(_m, args, kwargs, fn=fn):
                    if args:
                        new = fn(args[0])
                        return None if new is None else ((new, *args[1:]), kwargs)
                    new = fn(kwargs["hidden_states"])
                    return None if new is None else (args, kwargs | {"hidden_states": new})

                handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class FromStart:
    """Add ``strength * vector`` to a one-row tensor at absolute positions ``>= start``, counting positions
    over the calls of one (KV-cached) generation."""

    vector: Tensor
    strength: float | Tensor
    start: int
    seen: int = 0

    def __call__(self, h: Tensor) -> Tensor:
        seq = h.shape[1]
        pos = torch.arange(self.seen, self.seen + seq)
        self.seen += seq
        on = (pos >= self.start).to(h.dtype)[None, :, None]
        return h + on * (self.strength * self.vector).to(h.dtype)


def injection(layer: int, vector: Tensor, strength: float | Tensor, start: int) -> tuple[str, str, FromStart]:
    """The paper's injection as a plain hook: the output of ``model.layers[layer]``, from ``start`` on."""
    return (f"model.layers.{layer}", "output", FromStart(vector, strength, start))


# ----------------------------------------------------------------------------------------------- transcoders


@dataclass
class RawTranscoder:
    """A JumpReLU (skip) transcoder from Google's raw tensors (``w_enc [d_in, d_sae]``,
    ``w_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, ``threshold``, ``affine_skip_connection
    [d_in, d_out]``)."""

    p: dict[str, Tensor]

    @classmethod
    def load(cls, folder: str | Path, layer: int, dtype: torch.dtype = torch.float32) -> RawTranscoder:
        params = load_file(str(Path(folder) / f"layer_{layer}" / "params.safetensors"))
        return cls({k: v.to(dtype) for k, v in params.items()})

    def pre(self, x: Tensor) -> Tensor:
        return x.to(self.p["w_enc"].dtype) @ self.p["w_enc"] + self.p["b_enc"]

    def acts(self, x: Tensor) -> Tensor:
        pre = self.pre(x)
        return torch.relu(pre) * (pre > self.p["threshold"]).to(pre.dtype)

    def __call__(self, x: Tensor) -> Tensor:
        out = self.acts(x) @ self.p["w_dec"] + self.p["b_dec"]
        if "affine_skip_connection" in self.p:
            out = out + x.to(out.dtype) @ self.p["affine_skip_connection"]
        return out


@dataclass
class Seen:
    """What a pre-hook saw last (the MLP's input), for the output hook of the same layer and call."""

    x: dict[int, Tensor] = field(default_factory=dict)

    def read(self, layer: int) -> Callable:
        def fn(x: Tensor) -> None:
            self.x[layer] = x

        return fn


def replacement(
    layer: int, tc: RawTranscoder, out_module: str, seen: Seen | None = None
) -> list[tuple[str, str, Callable]]:
    """MLP replacement by hand: read ``layers[L].mlp``'s input, overwrite ``out_module``'s output with the
    transcoder's prediction from it."""
    seen = seen or Seen()

    def write(y: Tensor) -> Tensor:
        return tc(seen.x.pop(layer)).to(y.dtype)

    return [(f"model.layers.{layer}.mlp", "input", seen.read(layer)), (out_module, "output", write)]


def feature_edit(
    layer: int,
    tc: RawTranscoder,
    out_module: str,
    *,
    index: int,
    target: float,
    from_pos: int = 0,
    unit: bool = True,
) -> list[tuple[str, str, Callable]]:
    """Set feature ``index`` to ``target`` by hand: its activation read at ``layers[L].mlp``'s input, and
    ``(target - a) * d`` added at ``out_module``'s output at positions ``>= from_pos`` (one row; positions
    counted over cached calls)."""
    seen = Seen()
    w = tc.p["w_dec"][index]
    direction = w / w.norm() if unit else w
    state = {"seen": 0}

    def write(y: Tensor) -> Tensor:
        a = tc.acts(seen.x.pop(layer))[..., index]
        seq = y.shape[1]
        pos = torch.arange(state["seen"], state["seen"] + seq)
        state["seen"] += seq
        on = (pos >= from_pos).to(a.dtype)[None, :]
        return y + ((target - a) * on)[..., None].to(y.dtype) * direction.to(y.dtype)

    return [(f"model.layers.{layer}.mlp", "input", seen.read(layer)), (out_module, "output", write)]


# ----------------------------------------------------------------------------------------------- generating


@torch.no_grad()
def greedy(
    hf,
    tokens: Tensor,
    *,
    hooks: Sequence[tuple[str, str, Callable]] = (),
    max_new_tokens: int,
    stop: list[int],
) -> tuple[Tensor, Tensor]:
    """Plain HF greedy ``generate`` of one unpadded prompt under ``hooks``: (new tokens, raw logits per
    step)."""
    with hooked(hf, hooks):
        out = hf.generate(
            input_ids=tokens[None],
            attention_mask=torch.ones_like(tokens)[None],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=stop[0],
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, tokens.shape[0] :]
    return new, torch.stack([step[0] for step in out.logits])
