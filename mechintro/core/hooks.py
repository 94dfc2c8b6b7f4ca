"""The one place mechintro touches hook points: checked hook contexts, the layer check, where a forward
call sits in the sequence, and the one activation reader, :func:`capture`.

**Positions** are absolute indices into the token tensor a model is run on (for a left-padded batch,
:func:`mechintro.core.prompts.left_pad` has already shifted them). A forward call may cover only part of that
tensor: a KV-cached decoding step covers one position, a suffix run after a shared prefix cache covers the
rest of the prompt. :class:`PositionTracker` knows which part, because it reads the length of the KV cache
the call extends (a forward pre-hook on the underlying Hugging Face module), never the shape of the call.

A ``positions`` argument means the same everywhere in mechintro (:data:`Positions`):

* ``"last"`` -- the last position of the call (the last prompt token of a prompt forward);
* ``"all"`` -- every position of the call;
* ``"from_start"`` -- every position at or after the row's start (``starts=``, one per row);
* an ``int`` or a sequence of ``int`` -- those absolute positions (negative ints count from the end of the
  call).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechintro.core import validate
from mechintro.core.kvcache import cache_in_call, cache_length, hf_module, install_bridge_shim
from mechintro.core.models import Model

__all__ = [
    "CapturedActivations",
    "PositionTracker",
    "Positions",
    "capture",
    "check_layer",
    "check_positions",
    "hooks_context",
    "position_mask",
    "tracker",
]

Positions: TypeAlias = Literal["last", "all", "from_start"] | int | Sequence[int]
"""Which positions an operation reads or edits (see the module docstring)."""

POSITION_WORDS = ("last", "all", "from_start")


def as_int(value: Any, *, what: str) -> int:
    """``value`` as a Python int (numpy and torch integer scalars included); bools and floats are refused
    (:func:`mechintro.core.validate.integer`)."""
    return validate.integer(what, value)


def check_layer(model: Model, layer: Any) -> int:
    """Return ``layer`` as an int, or raise naming the valid range of the model's layers."""
    return validate.layer(layer, n_layers=int(model.cfg.n_layers))


RowMode: TypeAlias = Literal["fixed", "tracked", "shared"]
"""How a set of hooks depends on the rows of the batch (see :func:`hooks_context`)."""

ROW_MODES: tuple[RowMode, ...] = ("fixed", "tracked", "shared")


@dataclass(frozen=True)
class HookSet:
    """Hooks that mechintro installed on a model with :func:`hooks_context`, and how they treat the batch."""

    hooks: tuple[tuple[str, Any], ...]
    """``(hook name, function)`` pairs, in the order they were installed."""
    rows: RowMode
    """``"fixed"``, ``"tracked"`` or ``"shared"`` (see :func:`hooks_context`)."""


_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def active_hooks(model: Model) -> list[HookSet]:
    """The hook sets installed on ``model`` by :func:`hooks_context` and not yet removed, outermost first.

    The generation fast path (:mod:`mechintro.core.fastpath`) replays exactly these on the plain Hugging Face
    modules; any other hook on the model sends generation through the bridge.
    """
    return list(_ACTIVE.get(model, ()))


def hooks_context(
    model: Model, fwd_hooks: Sequence[tuple[str, Any]], *, rows: RowMode = "fixed"
) -> contextlib.AbstractContextManager:
    """``model.hooks(fwd_hooks)`` after checking every name exists (TransformerLens skips unknown names).

    The hooks are also recorded as mechintro's own (:func:`active_hooks`), so generation can replay them on
    the Hugging Face modules. ``rows`` says what the sampler may do to the batch while they are active:

    * ``"fixed"`` (default): nothing; every forward call sees every row of the batch they were made for.
    * ``"tracked"``: per-row settings are looked up through the position tracker's ``rows``
      (:meth:`PositionTracker.select`), so finished rows may be dropped from the batch.
    * ``"shared"``: the same edit for every row at every position (a bias, an MLP replacement), so rows may
      be dropped and a prompt prefix common to every row may be run once, as a one-row call.
    """
    if rows not in ROW_MODES:
        raise ValueError(f"unknown rows mode {rows!r}; valid: {list(ROW_MODES)}")
    known = model.hook_dict
    for name, _ in fwd_hooks:
        if name not in known:
            close = sorted(k for k in known if k.split(".")[-1] == name.split(".")[-1])[:6]
            raise ValueError(f"no hook point {name!r} in this model; similar names: {close}")
    entry = HookSet(hooks=tuple(fwd_hooks), rows=rows)
    return _recorded(model, entry)


@contextlib.contextmanager
def _recorded(model: Model, entry: HookSet) -> Iterator[None]:
    with model.hooks(fwd_hooks=list(entry.hooks)):
        stack = _ACTIVE.setdefault(model, [])
        stack.append(entry)
        try:
            yield
        finally:
            stack.remove(entry)


# ----------------------------------------------------------------------------------------------- positions


@dataclass
class PositionTracker:
    """Where the current forward call sits in the sequence: positions ``offset .. offset + seq - 1``.

    ``offset`` is the length of the KV cache the call extends (0 without a cache), read by a forward pre-hook
    on the model's Hugging Face module before any layer runs; ``calls`` counts forward calls. One tracker is
    installed per model, on first use (:func:`tracker`), and stays: it only records two integers per call.
    """

    offset: int = 0
    """Absolute position of the first position of the current (or latest) call."""
    seq: int = 0
    """Number of positions in the current (or latest) call."""
    calls: int = 0
    """Forward calls seen so far."""
    rows: Tensor | None = None
    """While a sampler runs a batch whose finished rows it dropped: which rows of the full batch the current
    call holds (indices into it); None: the call holds the full batch."""
    full: int = 0
    """The number of rows of the full batch while ``rows`` is set."""

    def select(self, values: Tensor, batch: int, *, what: str) -> Tensor:
        """The current call's rows of a per-row setting ``values`` (``[rows | 1, ...]``; one row is shared).

        ``batch`` is the number of rows of the call. Raises naming both sizes when ``values`` fits neither the
        call nor the full batch the call's rows were taken from.
        """
        n = values.shape[0]
        if n == 1:
            return values
        if self.rows is not None and n == self.full and len(self.rows) == batch:
            return values[self.rows.to(values.device)]
        if n != batch:
            raise ValueError(f"{what} has per-row settings for [{n}] rows but the batch has {batch} rows")
        return values

    @contextlib.contextmanager
    def selecting(self, rows: Tensor | None, *, full: int) -> Iterator[None]:
        """Within the block, forward calls hold only ``rows`` of a batch of ``full`` rows (set by the sampler
        between calls as rows finish: update ``rows`` in place with :meth:`keep`)."""
        previous = (self.rows, self.full)
        self.rows, self.full = rows, full
        try:
            yield
        finally:
            self.rows, self.full = previous

    def keep(self, rows: Tensor) -> None:
        """Set the rows of the full batch that the next calls hold (inside :meth:`selecting`)."""
        self.rows = rows

    @property
    def stop(self) -> int:
        """One past the last absolute position of the current call."""
        return self.offset + self.seq

    def arange(self, device: torch.device | str | None = None) -> Int[Tensor, " seq"]:
        """The absolute positions of the current call."""
        return torch.arange(self.offset, self.stop, device=device)

    def _pre_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        tokens = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        self.offset = cache_length(cache_in_call(module, kwargs))
        self.seq = int(tokens.shape[1]) if tokens is not None and tokens.ndim >= 2 else 0
        self.calls += 1


_TRACKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tracker(model: Model) -> PositionTracker:
    """The model's :class:`PositionTracker` (installed on its Hugging Face module on first use)."""
    install_bridge_shim()
    hf = hf_module(model)
    found = _TRACKERS.get(hf)
    if found is None:
        found = PositionTracker()
        hf.register_forward_pre_hook(found._pre_hook, with_kwargs=True)
        _TRACKERS[hf] = found
    return found


def check_positions(positions: Any, *, starts: Any = None) -> Positions:
    """Validate a ``positions`` argument (see :data:`Positions`); return it normalized."""
    if isinstance(positions, str):
        if positions not in POSITION_WORDS:
            raise ValueError(
                f"unknown positions {positions!r}; valid: {list(POSITION_WORDS)} or absolute indices"
            )
        if positions == "from_start" and starts is None:
            raise ValueError("positions='from_start' needs start= (the injection start of each row)")
        return positions
    if isinstance(positions, (Sequence, Tensor)) and not isinstance(positions, (str, bytes)):
        values = [
            as_int(p, what="a position")
            for p in (positions.tolist() if torch.is_tensor(positions) else positions)
        ]
        if not values:
            raise ValueError("positions is empty")
        return values
    return as_int(positions, what="positions")


def position_mask(
    positions: Positions,
    *,
    offset: int,
    seq: int,
    starts: Int[Tensor, " rows"] | None = None,
    device: torch.device | str | None = None,
) -> Bool[Tensor, "rows seq"]:
    """Which positions of a call covering ``offset .. offset + seq - 1`` are selected: ``[rows | 1, seq]``.

    ``"last"`` is the call's last position; negative ints count from the end of the call.
    """
    absolute = torch.arange(offset, offset + seq, device=device)
    if positions == "all":
        return torch.ones(1, seq, dtype=torch.bool, device=device)
    if positions == "last":
        return (absolute == offset + seq - 1)[None]
    if positions == "from_start":
        return absolute[None, :] >= torch.as_tensor(starts, device=device).reshape(-1, 1)
    wanted = [positions] if isinstance(positions, int) else list(positions)
    wanted = [p + offset + seq if p < 0 else p for p in wanted]
    return torch.isin(absolute, torch.as_tensor(wanted, device=device))[None]


def call_indices(positions: Positions, *, offset: int, seq: int) -> list[int]:
    """Indices into a call (``0 .. seq - 1``) of ``positions`` (not ``"from_start"``), in the order given.

    Raises naming the call's span when an absolute position lies outside it.
    """
    if positions == "all":
        return list(range(seq))
    if positions == "last":
        return [seq - 1]
    if positions == "from_start":
        raise ValueError("positions='from_start' selects per row; use position_mask")
    wanted = [positions] if isinstance(positions, int) else list(positions)
    out = []
    for p in wanted:
        absolute = p + offset + seq if p < 0 else p
        if not offset <= absolute < offset + seq:
            raise ValueError(
                f"position {p} is outside this forward call, which covers positions "
                f"{offset}..{offset + seq - 1}"
            )
        out.append(absolute - offset)
    return out


# ----------------------------------------------------------------------------------------------- capture


@dataclass
class CapturedActivations(Mapping[str, Tensor]):
    """Activations read by :func:`capture`: ``captured[name]`` is ``[batch, n_positions, ...]``.

    With ``append=True`` every call's activations are kept in ``captured.calls[name]`` (a list, one entry per
    forward call) and ``captured[name]`` is the latest.
    """

    latest: dict[str, Tensor] = field(default_factory=dict)
    calls: dict[str, list[Tensor]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.latest:
            raise KeyError(f"nothing captured at {name!r} (yet); captured: {sorted(self.latest)}")
        return self.latest[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.latest)

    def __len__(self) -> int:
        return len(self.latest)


@contextlib.contextmanager
def capture(
    model: Model,
    names: Sequence[str] | str,
    *,
    positions: Positions = "all",
    detach: bool = True,
    append: bool = False,
    dtype: torch.dtype | None = None,
) -> Iterator[CapturedActivations]:
    """Read the activations at hook points ``names`` during the forward calls made inside the block.

    Args:
        names: hook-point names (build them with :class:`mechintro.core.models.HookNames`).
        positions: which positions of each call to keep (:data:`Positions`; ``"from_start"`` is not a reader's
            choice: read ``"all"`` and mask).
        detach: ``True`` (default) stores detached copies; ``False`` keeps the autograd graph and forward-mode
            tangents (dual tensors, ``torch.func.jvp``), for attribution.
        append: keep every call's activations (``captured.calls``), e.g. through cached generation.
        dtype: cast what is stored (e.g. ``torch.float32``).

    ``with capture(model, [HookNames.resid_post(3)], positions="last") as acts: model(tokens)`` then
    ``acts[HookNames.resid_post(3)]`` is ``[batch, 1, d_model]``.
    """
    names = [names] if isinstance(names, str) else list(names)
    if positions == "from_start":
        raise ValueError(
            "capture reads 'all', 'last' or absolute positions; 'from_start' is an edit's choice"
        )
    positions = check_positions(positions)
    track = tracker(model)
    out = CapturedActivations()

    def make(name: str):
        def hook(x: Tensor, hook: Any = None) -> None:
            seq = x.shape[1]
            offset = track.offset if track.seq == seq else 0
            idx = call_indices(positions, offset=offset, seq=seq)
            kept = x[:, idx] if idx != list(range(seq)) else x
            if detach:
                kept = kept.detach().clone() if kept is x else kept.detach()
            if dtype is not None:
                kept = kept.to(dtype)
            out.latest[name] = kept
            if append:
                out.calls.setdefault(name, []).append(kept)

        return hook

    with hooks_context(model, [(name, make(name)) for name in names]):
        yield out
