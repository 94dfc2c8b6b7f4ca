"""The KV cache across transformers versions: which argument names it, a fresh one, a prefill, and the bridge.

transformers 5.24 renamed the cache argument of every decoder family from ``past_key_values`` to ``cache``
(the old name stays a deprecated alias until 5.40), and the model outputs' field with it. On 5.23 a
``cache=`` argument is swallowed by ``**kwargs`` without a sound, so the name is never guessed: it is read
off the signature of the module that is called (:func:`cache_argument`).

TransformerBridge (transformer-lens 3.9) fills the cache in its own attention modules and reads only
``past_key_values`` / ``layer_past`` there, so on 5.24 the cache stays empty through the bridge (also for
calls on ``original_model``, whose attention modules are the bridge's). :func:`install_bridge_shim` teaches
the bridge's attention the new name; it is installed only when a probe shows the bridge ignores it, so it
falls away by itself once transformer-lens reads ``cache``. Nothing here passes the deprecated alias.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

NEW_NAME = "cache"
"""The cache argument's name from transformers 5.24 on."""
OLD_NAME = "past_key_values"
"""The name before 5.24 (a deprecated alias from 5.24 to 5.40)."""


def hf_module(model: Any) -> torch.nn.Module:
    """The Hugging Face module behind ``model`` (a bridge's ``original_model``; a plain HF model itself)."""
    return getattr(model, "original_model", model)


@functools.cache
def _argument_of(forward: Any) -> str:
    params = inspect.signature(forward).parameters  # follows functools.wraps to the real forward
    for name in (NEW_NAME, OLD_NAME):
        if name in params:
            return name
    raise TypeError(
        f"{getattr(forward, '__qualname__', forward)} takes neither {NEW_NAME!r} nor {OLD_NAME!r}; "
        "mechintro cannot pass it a KV cache"
    )


def cache_argument(model: Any) -> str:
    """The name under which ``model``'s Hugging Face forward takes its KV cache: ``"cache"`` (transformers
    >= 5.24) or ``"past_key_values"`` (earlier), read from the forward's signature."""
    return _argument_of(type(hf_module(model)).forward)


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """Keyword arguments that make a forward call of ``model`` (bridge or HF) read and extend ``cache``."""
    install_bridge_shim()
    return {cache_argument(model): cache, "use_cache": True}


def cache_in_call(module: torch.nn.Module, kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward call of the HF ``module`` was given (None without one, or when its forward
    takes no cache).

    Reads the name the forward's signature takes. Where that is ``"cache"``, a ``past_key_values`` argument
    (the deprecated alias, which transformers still maps) is read too. Where the forward takes only
    ``past_key_values``, a ``cache=`` argument would be silently ignored by transformers, so it raises.
    """
    try:
        name = _argument_of(type(module).forward)
    except TypeError:  # a forward that takes no cache at all
        return None
    if name == NEW_NAME:
        found = kwargs.get(NEW_NAME)
        return kwargs.get(OLD_NAME) if found is None else found
    if kwargs.get(NEW_NAME) is not None:
        raise TypeError(
            f"{type(module).__name__}.forward takes its KV cache as {OLD_NAME!r} in this transformers "
            f"version; a {NEW_NAME!r} argument would be ignored (use mechintro.core.kvcache.cache_kwargs)"
        )
    return kwargs.get(OLD_NAME)


def new_cache(model: Any = None) -> Any:
    """An empty ``DynamicCache``. Without ``model`` every layer keeps every column (no sliding-window
    cropping: mechintro's own masks apply the window by position); with ``model`` its layers are laid out as
    the model's own forward would make them (sliding-window layers included)."""
    from transformers import DynamicCache

    if model is None:
        return DynamicCache()
    return DynamicCache(config=hf_module(model).config)


def cache_length(cache: Any) -> int:
    """Positions held by ``cache`` (0 for None)."""
    return 0 if cache is None else int(cache.get_seq_length())


def prefill(model: Any, tokens: Int[Tensor, "batch seq"], **kwargs: Any) -> Any:
    """Run ``tokens`` through ``model`` (bridge or HF) and return the KV cache it filled.

    The cache is made here and handed over under the name the forward takes, instead of being read back
    from the output (whose field transformers 5.24 renamed, and which the bridge reads under the old name).
    Raises when the call left the cache short of ``tokens``: a cache that silently stays empty is the bug
    this module exists to prevent.
    """
    cache = new_cache(model)
    model(tokens, **cache_kwargs(model, cache), **kwargs)
    held = cache_length(cache)
    if held != tokens.shape[1]:
        raise RuntimeError(
            f"the KV cache holds {held} positions after a prefill of {tokens.shape[1]}: this combination of "
            "transformers and transformer-lens does not fill it (see mechintro.core.kvcache)"
        )
    return cache


# ------------------------------------------------------------------------------------------ bridge shim


class _Probe:
    """A stand-in cache that records whether ``update`` was called."""

    def __init__(self) -> None:
        self.updated = False

    def update(self, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        self.updated = True
        return k, v


def bridge_reads_cache(attention_class: type) -> bool:
    """Whether ``attention_class._update_kv_cache`` fills a cache passed as ``cache=`` (a behavioural probe
    on a bare instance, not a version check)."""
    probe = _Probe()
    bare = object.__new__(attention_class)
    object.__setattr__(bare, "_layer_idx", 0)
    empty = torch.zeros(1)
    try:
        attention_class._update_kv_cache(bare, empty, empty, cache=probe)
    except Exception:  # an attention that cannot run bare: treat as not reading it
        return False
    return probe.updated


@functools.lru_cache(maxsize=1)
def install_bridge_shim() -> bool:
    """Make TransformerBridge's attention fill a KV cache passed as ``cache=`` (transformers >= 5.24).

    Wraps ``AttentionBridge._update_kv_cache`` so that a ``cache`` argument is read when neither
    ``past_key_values`` nor ``layer_past`` is given; an explicit old name still wins, so on transformers 5.23
    (which never passes ``cache``) nothing changes. Installed once, and only when the probe
    :func:`bridge_reads_cache` shows the bridge ignores ``cache``. Returns whether it installed the shim.
    """
    try:
        from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    except ImportError:  # no bridge installed: nothing to shim
        return False
    if bridge_reads_cache(AttentionBridge):  # transformer-lens reads it, or the shim is already in
        return False
    original = AttentionBridge._update_kv_cache

    @functools.wraps(original)
    def _update_kv_cache(self: Any, k: Tensor, v: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if kwargs.get(OLD_NAME) is None and kwargs.get("layer_past") is None and NEW_NAME in kwargs:
            kwargs[OLD_NAME] = kwargs[NEW_NAME]
        return original(self, k, v, **kwargs)

    AttentionBridge._update_kv_cache = _update_kv_cache
    return True
