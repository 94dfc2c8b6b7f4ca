"""The generation fast path: forward calls through the plain Hugging Face modules under the bridge.

The TransformerBridge wraps every Hugging Face module of the model in a component of its own, with hook
points and its own attention and norm arithmetic; at decoding time (a few positions per call) those wrappers
cost more than the model's matrix products. When nothing but mechintro's own hooks is installed on the
bridge, the same forward call can run through a plain Hugging Face model that shares every parameter and
buffer with the bridge (:func:`twin`; nothing is copied), with mechintro's hooks replayed as torch hooks on
the Hugging Face modules that compute the same tensors. The bridge stays the analysis surface; this is only a
faster way to run it.

**Sites.** A hook point ``<component>.hook_in`` / ``<component>.hook_out`` of the bridge is the input / output
of the Hugging Face module that the component wraps. :data:`SITE_KINDS` lists the components replayed on the
fast path (the residual stream and the norms and MLP of each block, the embedding and the final norm). Which
Hugging Face module each :class:`~mechintro.core.models.HookNames` site is, per family, is written in
:mod:`mechintro.core.families` (:attr:`~mechintro.core.families.Family.sites`); for Gemma 3:

* ``resid_pre(L)`` / ``resid_post(L)``: input / output of ``layers[L]``;
* ``attn_out(L)``: output of ``layers[L].post_attention_layernorm``;
* ``resid_mid(L)`` (= ``ln2.hook_in``): input of ``layers[L].pre_feedforward_layernorm``;
* ``transcoder_in(L)`` (= ``ln2.hook_out``): output of ``layers[L].pre_feedforward_layernorm``;
* ``mlp_out(L)`` / ``transcoder_out(L)``: output of ``layers[L].post_feedforward_layernorm``;
* ``final_norm_out()`` and ``ln_final.hook_in``: output / input of the final norm.

The site is found from the bridge's own component tree, so it is right for every family's adapter.

Every mechintro intervention (``inject``, feature interventions, MLP replacement, captures, bias vectors,
directional ablation) installs its hooks with :func:`mechintro.core.hooks.hooks_context`, which records them
(:func:`mechintro.core.hooks.active_hooks`); their Hugging Face equivalent is the same function on the mapped
module, called with the bridge's own hook point as ``hook``. An intervention with a hook anywhere else
(attention patterns, per-head results, ...) sends generation through the bridge.

**Choosing** (:func:`choose_path`): the fast path (``"hf"``) is taken when the model is a causal LM of a
supported family run without TransformerLens's compatibility processing, every hook on the bridge's modules
was installed by mechintro, and every one of them sits on a mapped site. Anything else, in particular an outer
``model.hooks(...)`` from the user, runs the bridge (``"bridge"``); the reason is returned.

Both paths take the same explicit inputs from :class:`Runner`: token ids, RoPE position ids, and one 4D
additive attention mask per attention kind (:func:`attention_masks`; one mask when the config has no
``layer_types``), built from each token's position in its
own prompt. So a sliding-window layer sees the window of the unpadded prompt even when pads sit in the middle
of a row (after a shared prefix), and a KV cache that never crops (:func:`new_cache`) holds every column.
"""

from __future__ import annotations

import contextlib
import copy
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechintro.core import kvcache
from mechintro.core.families import FAMILIES
from mechintro.core.hooks import active_hooks, tracker
from mechintro.core.kvcache import (
    new_cache,
)  # called without a model: no cropping, the masks apply the window
from mechintro.core.models import Model

__all__ = [
    "PATHS",
    "SITE_KINDS",
    "HFHookSite",
    "Runner",
    "attention_masks",
    "choose_path",
    "foreign_hooks",
    "hf_site",
    "new_cache",
    "runner",
    "twin",
]

Path: TypeAlias = Literal["auto", "hf", "bridge"]
PATHS: tuple[Path, ...] = ("auto", "hf", "bridge")
"""``"auto"`` (the fast path when it applies), ``"hf"`` (the fast path, or an error saying why not),
``"bridge"``."""

SUPPORTED = tuple(arch for fam in FAMILIES for arch in fam.architectures)
"""Hugging Face classes the fast path runs (others use the bridge): every supported family's."""

SITE_KINDS = (
    r"blocks\.\d+\.hook_(in|out)",
    r"blocks\.\d+\.(ln1|ln1_post|ln2|ln2_post|mlp)\.hook_(in|out)",
    r"ln_final\.hook_(in|out)",
    r"embed\.hook_out",
)
"""Canonical hook-point names the fast path replays (regular expressions): a component's ``hook_in`` /
``hook_out`` is the input / output of the Hugging Face module it wraps."""

_SITE = re.compile(rf"^(?:{'|'.join(SITE_KINDS)})$")


# ----------------------------------------------------------------------------------------------- the twin


def _hf_name(name: str) -> str:
    """A module name in the bridged Hugging Face tree without the bridge's wrapper levels."""
    return name.replace("._original_component", "").replace("_original_component.", "")


@dataclass
class _Twin:
    module: torch.nn.Module
    pairs: list[tuple[torch.nn.Module, str, Tensor]]
    """(twin module, attribute, the bridge's tensor): what the twin shares, to check it still does."""

    def current(self) -> bool:
        return all(
            (mod._parameters.get(attr) if attr in mod._parameters else mod._buffers.get(attr)) is ref
            for mod, attr, ref in self.pairs
        )


_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def default_attention(model: Model) -> str:
    """The twin's attention kernel: PyTorch's SDPA on CUDA, eager (the bridge's arithmetic) elsewhere."""
    device = next(model.original_model.parameters()).device
    return "sdpa" if device.type == "cuda" else "eager"


def twin(model: Model, *, attention: str | None = None) -> torch.nn.Module:
    """A plain Hugging Face model that shares every parameter and buffer of ``model``'s (no copy).

    Built once per (model, attention kernel) on the meta device, then given the bridge's own tensors, so a
    change of the weights in place shows in both. Rebuilt if the bridge's tensors were replaced. The model's
    :class:`~mechintro.core.hooks.PositionTracker` is installed on it too, so positions read the same on both
    paths.
    """
    hf = model.original_model
    attention = attention or default_attention(model)
    cached = _TWINS.setdefault(model, {})
    found = cached.get(attention)
    if found is not None and found.current():
        return found.module
    if type(hf).__name__ not in SUPPORTED:
        raise ValueError(f"the fast path runs {list(SUPPORTED)}, not {type(hf).__name__}")
    config = copy.deepcopy(hf.config)
    config.output_attentions = False  # the bridge turns it on for its pattern hooks; generation needs none
    config._attn_implementation = attention
    with torch.device("meta"):
        module = type(hf)(config)
    params = {_hf_name(k): v for k, v in hf.named_parameters(remove_duplicate=False)}
    buffers = {_hf_name(k): v for k, v in hf.named_buffers(remove_duplicate=False)}
    pairs = []
    for name, mod in module.named_modules():
        prefix = f"{name}." if name else ""
        for attr, value in list(mod._parameters.items()):
            if value is not None:
                mod._parameters[attr] = params[prefix + attr]
                pairs.append((mod, attr, params[prefix + attr]))
        for attr in list(mod._buffers):
            if mod._buffers[attr] is not None:
                mod._buffers[attr] = buffers[prefix + attr]
                pairs.append((mod, attr, buffers[prefix + attr]))
    module.eval()
    module.register_forward_pre_hook(tracker(model)._pre_hook, with_kwargs=True)
    cached[attention] = _Twin(module, pairs)
    return module


# ----------------------------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class HFHookSite:
    """Where a bridge hook point's tensor is on the Hugging Face modules."""

    module: str
    """Dotted name of the Hugging Face module (the same in the bridged tree and in the twin)."""
    side: Literal["input", "output"]
    """``"input"``: its first argument (a forward pre-hook); ``"output"``: what it returns."""

    def register(self, root: torch.nn.Module, fn: Callable, hook_point: Any) -> Any:
        """Install the TransformerLens-style ``fn(tensor, hook=...)`` on ``root``'s module; return the
        handle."""
        module = root.get_submodule(self.module)
        if self.side == "output":

            def after(_module: Any, _inputs: Any, output: Any) -> Any:
                if isinstance(output, tuple):
                    new = fn(output[0], hook=hook_point)
                    return None if new is None else (new, *output[1:])
                return fn(output, hook=hook_point)

            return module.register_forward_hook(after)

        def before(_module: Any, args: tuple, kwargs: dict) -> Any:
            if args:
                new = fn(args[0], hook=hook_point)
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"], hook=hook_point)
            return None if new is None else (args, kwargs | {"hidden_states": new})

        return module.register_forward_pre_hook(before, with_kwargs=True)


def _bridged_names(model: Model) -> dict[int, str]:
    """id(Hugging Face module in the bridged tree) -> its name in a plain Hugging Face model (the twin's)."""
    names = getattr(model, "_mechintro_hf_names", None)
    if names is None:
        plain = {n for n, _ in twin(model).named_modules()}
        names = {}
        for name, module in model.original_model.named_modules(remove_duplicate=False):
            clean = _hf_name(name)
            if clean in plain:  # not a bridge alias (blocks.L.ln1 for input_layernorm, ...)
                names[id(module)] = clean
        model._mechintro_hf_names = names
    return names


def hf_site(model: Model, name: str) -> HFHookSite | None:
    """The Hugging Face site of hook point ``name`` (any alias); None if the fast path does not replay it."""
    point = model.hook_dict.get(name)
    if point is None or getattr(point, "hook_conversion", None) is not None:
        return None
    canonical = point.name or ""
    if _SITE.match(canonical) is None:
        return None
    owner, _, side = canonical.rpartition(".")
    component = model.get_submodule(owner)
    inner = getattr(component, "_original_component", component)
    module = _bridged_names(model).get(id(inner))
    if module is None:
        return None
    return HFHookSite(module=module, side="input" if side == "hook_in" else "output")


# ----------------------------------------------------------------------------------------------- choosing


def _hook_counts(module: torch.nn.Module) -> int:
    return sum(
        len(getattr(module, attr, None) or ())
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def foreign_hooks(model: Model) -> int:
    """How many hooks on the bridge's hook points mechintro did not install (0: only mechintro's).

    TransformerLens installs every hook (``model.hooks``, ``add_hook``, ``run_with_hooks``) as a torch hook on
    a hook point; torch hooks that the bridge and Hugging Face keep on their own modules for their own
    bookkeeping are not counted, nor are raw torch hooks a user puts on those modules.
    """
    from transformer_lens.hook_points import HookPoint

    ours = sum(len(s.hooks) for s in active_hooks(model))
    return sum(_hook_counts(m) for m in model.modules() if isinstance(m, HookPoint)) - ours


def choose_path(model: Model, path: Path = "auto") -> tuple[Literal["hf", "bridge"], str]:
    """``("hf" | "bridge", reason)``: which path a forward call takes now (see the module docstring).

    ``path="bridge"`` always gives the bridge; ``"hf"`` raises with the reason when the fast path does not
    apply; ``"auto"`` takes it when it applies.
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; valid: {list(PATHS)}")
    if path == "bridge":
        return "bridge", "asked for"
    reason = _why_not(model)
    if reason is None:
        return "hf", "only mechintro hooks on mapped sites"
    if path == "hf":
        raise ValueError(f"the fast path does not apply: {reason}")
    return "bridge", reason


def _why_not(model: Model) -> str | None:
    hf = getattr(model, "original_model", None)
    if hf is None or type(hf).__name__ not in SUPPORTED:
        return f"the model is not one of {list(SUPPORTED)}"
    if getattr(model, "compatibility_mode", False):
        return "the bridge runs in compatibility mode (processed weights)"
    extra = foreign_hooks(model)
    if extra:
        return f"{extra} hook(s) on the bridge were not installed by mechintro (e.g. an outer model.hooks())"
    for hook_set in active_hooks(model):
        for name, _ in hook_set.hooks:
            if hf_site(model, name) is None:
                return f"hook point {name!r} has no Hugging Face equivalent on the fast path"
    return None


# ----------------------------------------------------------------------------------------------- running


def attention_masks(
    model: Model,
    *,
    real: Bool[Tensor, "batch key"],
    positions: Int[Tensor, "batch key"],
    queries: int,
    dtype: torch.dtype,
) -> dict[str, Float[Tensor, "batch 1 query key"]] | Float[Tensor, "batch 1 query key"]:
    """Additive 4D masks (0 or the dtype's minimum) for the last ``queries`` columns, one per attention kind.

    A dict ``{kind: mask}`` when the config names ``layer_types`` (Gemma 3 / 4, Qwen3, OLMo 3); one mask
    otherwise (Llama, OLMo 2), since only models with ``layer_types`` accept a dict.

    Key ``k`` is visible to query ``q`` when ``k`` is a real token at or before ``q``'s column and, on
    sliding-window layers, ``positions[q] - positions[k] < sliding_window`` (positions in each row's own
    unpadded prompt). A pad query sees itself, so no row of the softmax is empty.
    """
    config = model.original_model.config
    keys = real.shape[1]
    cols = torch.arange(keys, device=real.device)
    qcols = cols[keys - queries :]
    causal = cols[None, :] <= qcols[:, None]  # [q, k]
    own = cols[None, :] == qcols[:, None]
    visible = (real[:, None, :] & causal[None]) | own[None]  # [b, q, k]
    low = torch.finfo(dtype).min
    zero = torch.zeros((), dtype=dtype, device=real.device)
    floor = torch.full((), low, dtype=dtype, device=real.device)
    out = {}
    layer_types = getattr(config, "layer_types", None)
    kinds = set(layer_types or ["full_attention"])
    for kind in kinds:
        allowed = visible
        if kind == "sliding_attention":
            window = int(config.sliding_window)
            gap = positions[:, keys - queries :, None] - positions[:, None, :]
            allowed = visible & ((gap < window) | own[None])
        out[kind] = torch.where(allowed, zero, floor)[:, None]
    return out if layer_types else out["full_attention"]


@dataclass
class Runner:
    """One path's forward call: ``runner(ids, positions=, masks=, cache=)`` -> last-position logits."""

    model: Model
    path: Literal["hf", "bridge"]
    reason: str
    module: torch.nn.Module | None = None
    """The twin on the fast path."""

    def __call__(
        self,
        ids: Int[Tensor, "batch seq"],
        *,
        positions: Int[Tensor, "batch seq"],
        masks: dict[str, Tensor] | Tensor,
        cache: Any,
        last: bool = True,
    ) -> Float[Tensor, "batch vocab"] | Float[Tensor, "batch seq vocab"]:
        """Logits of the call's last position (``last=True``) or of every position."""
        keep = 1 if last else 0
        kw = {"attention_mask": masks, "position_ids": positions, "logits_to_keep": keep}
        if cache is not None:
            kw |= kvcache.cache_kwargs(self.model, cache)
        else:
            kw |= {"use_cache": False}
        if self.path == "hf":
            logits = self.module(input_ids=ids, **kw).logits
        else:
            logits = self.model(ids, return_type="logits", **kw)
        return logits[:, -1] if last else logits


@contextlib.contextmanager
def runner(model: Model, *, path: Path = "auto", attention: str | None = None) -> Iterator[Runner]:
    """A :class:`Runner` on the chosen path (:func:`choose_path`); on the fast path, every active mechintro
    hook is replayed on the twin's modules for the duration of the block (and removed after)."""
    chosen, reason = choose_path(model, path)
    if chosen == "bridge":
        yield Runner(model, "bridge", reason)
        return
    module = twin(model, attention=attention)
    handles = []
    try:
        for hook_set in active_hooks(model):
            for name, fn in hook_set.hooks:
                site = hf_site(model, name)
                handles.append(site.register(module, fn, model.hook_dict[name]))
        yield Runner(model, "hf", reason, module)
    finally:
        for handle in handles:
            handle.remove()
