"""The sites steering attribution reads, and the dictionaries at them.

A :class:`DictionarySite` is where one dictionary sits: a per-layer transcoder (the MLP's input ->
``hook_mlp_out``: Gemma 3's ``ln2.hook_out``, OLMo's ``mlp.hook_in``; the sae-lens JumpReLU skip
transcoders that :func:`mechintro.core.transcoders.load_transcoders` wires), or any sae-lens SAE with encode
and decode at one hook: ``resid_post`` or ``attn_z`` (the concatenated heads entering the attention output
projection, :meth:`mechintro.core.models.HookNames.attn_z`). :class:`Dictionaries` holds the dictionaries by
site and reads them one site at a time, so a lazy mapping never holds more than one 262k-wide layer.

Feature names (:func:`dictionary_feature_name`) are ``"L5 F12"`` for a transcoder feature and
``"resid L5 F12"`` / ``"attn L5 F12"`` for SAE features; :data:`SITE_PREFIX` is the one map from a dictionary
kind to its prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
from torch import Tensor

from mechintro.core.hooks import check_layer
from mechintro.core.models import HookNames, Model, hook_names
from mechintro.core.transcoders import transcoder_site

__all__ = [
    "DICTIONARY_KINDS",
    "SITE_PREFIX",
    "Dictionaries",
    "DictionarySite",
    "dict_input",
    "dictionary_feature_name",
    "parse_dictionary_feature",
    "pre_activation",
    "reconstruct",
    "site_label",
]

DictionaryKind: TypeAlias = Literal["transcoder", "resid_post", "attn_z"]

DICTIONARY_KINDS: tuple[DictionaryKind, ...] = ("transcoder", "resid_post", "attn_z")
"""Where a dictionary can sit: a per-layer transcoder, or an SAE at resid_post or at the attention's z."""
SUPPORTED_ARCHITECTURES = (
    "standard",
    "jumprelu",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
)
"""sae-lens architectures whose activation moves as its pre-activation while active (ReLU, JumpReLU)."""
RUNTIME_NORMS = ("none", "expected_average_only_in")
"""``normalize_activations`` settings that are the identity at inference (sae-lens folds the second)."""
STAGE = {"attn_z": 0, "transcoder": 1, "resid_post": 2}
"""Order of the sites within one block: attention, then the MLP, then the block's output."""
SITE_PREFIX: dict[str, str] = {"transcoder": "", "resid_post": "resid ", "attn_z": "attn "}
"""What a site's name starts with, per dictionary kind (transcoder sites have none): ``"resid L5"``."""


@dataclass(frozen=True)
class DictionarySite:
    """Where one dictionary sits: its kind and layer. The hook names depend on the model's family, so they
    are asked of the model's :class:`HookNames` (:func:`mechintro.core.models.hook_names`):
    ``site.in_hook(names)`` / ``site.out_hook(names)``."""

    kind: DictionaryKind
    """``"transcoder"`` (reads the MLP's input: Gemma 3's ``ln2.hook_out``, OLMo's ``mlp.hook_in``; writes
    ``hook_mlp_out``), ``"resid_post"`` or ``"attn_z"`` (an SAE that encodes and decodes at one hook)."""
    layer: int
    """The block."""

    def __post_init__(self) -> None:
        if self.kind not in DICTIONARY_KINDS:
            raise ValueError(f"unknown dictionary kind {self.kind!r}; valid: {list(DICTIONARY_KINDS)}")

    @property
    def order(self) -> tuple[int, int]:
        """Sort key in computation order (attn_z < transcoder < resid_post within a block)."""
        return (self.layer, STAGE[self.kind])

    def in_hook(self, names: HookNames) -> str:
        """The hook the dictionary encodes from, among ``names`` (the model's family's)."""
        if self.kind == "transcoder":
            return names.transcoder_in(self.layer)
        return self.out_hook(names)

    def out_hook(self, names: HookNames) -> str:
        """The hook the dictionary's output (its decoder rows) is written to, among ``names``."""
        if self.kind == "transcoder":
            return names.transcoder_out(self.layer)
        if self.kind == "resid_post":
            return names.resid_post(self.layer)
        return names.attn_z(self.layer)

    def before(self, other: DictionarySite) -> bool:
        """Whether this site's output can reach ``other``'s input (strictly earlier in the forward pass)."""
        return self.order < other.order

    def after_injection(self, layer: int) -> bool:
        """Whether the injection at resid_post of ``layer`` reaches this site's input."""
        return self.order > (layer, STAGE["transcoder"])


def site_label(kind: str, layer: int) -> str:
    """``"L5"`` for a transcoder site, ``"resid L5"`` / ``"attn L5"`` for SAE sites."""
    if kind not in SITE_PREFIX:
        raise ValueError(f"unknown dictionary kind {kind!r}; valid: {list(DICTIONARY_KINDS)}")
    return f"{SITE_PREFIX[kind]}L{int(layer)}"


def dictionary_feature_name(kind: str, layer: int, index: int) -> str:
    """``"L5 F12"`` for a transcoder feature, ``"resid L5 F12"`` / ``"attn L5 F12"`` for SAE features."""
    return f"{site_label(kind, layer)} F{int(index)}"


def parse_dictionary_feature(name: str) -> tuple[DictionaryKind, int, int]:
    """``(kind, layer, index)`` from :func:`dictionary_feature_name`'s format."""
    text = name.strip()
    kind: DictionaryKind = "transcoder"
    for k, prefix in SITE_PREFIX.items():
        if prefix and text.startswith(prefix):
            kind, text = k, text[len(prefix) :]  # type: ignore[assignment]
    parts = text.split()
    if len(parts) != 2 or not parts[0][:1] == "L" or not parts[1][:1] == "F":
        raise ValueError(f"a feature name looks like 'L3 F12', 'resid L3 F12' or 'attn L3 F12', got {name!r}")
    try:
        return kind, int(parts[0][1:]), int(parts[1][1:])
    except ValueError:
        raise ValueError(f"a feature name looks like 'L3 F12', got {name!r}") from None


# ----------------------------------------------------------------------------------------------- dictionaries


def _site_shape(model: Model, site: DictionarySite) -> tuple[int, ...]:
    if site.kind == "attn_z":
        return (int(model.cfg.n_heads), int(model.cfg.d_head))
    return (int(model.cfg.d_model),)


def _site_width(model: Model, site: DictionarySite) -> int:
    return int(np.prod(_site_shape(model, site)))


def _check_dictionary(model: Model, site: DictionarySite, d: Any) -> Any:
    """Raise unless ``d`` (a sae-lens SAE or transcoder) fits ``site`` of ``model``."""
    cfg = getattr(d, "cfg", None)
    if cfg is None or not hasattr(d, "W_enc") or not hasattr(d, "W_dec"):
        raise TypeError(f"the dictionary at {site} is not a sae-lens SAE/transcoder (got {type(d).__name__})")
    arch = str(cfg.architecture())
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"the dictionary at {site} has architecture {arch!r}; steering attribution supports "
            f"{list(SUPPORTED_ARCHITECTURES)}"
        )
    is_transcoder = "transcoder" in arch
    if is_transcoder != (site.kind == "transcoder"):
        raise ValueError(
            f"a {arch} cannot sit at a {site.kind} site: transcoders go in `transcoders`, SAEs in `saes`"
        )
    norm = str(getattr(cfg, "normalize_activations", "none"))
    if norm not in RUNTIME_NORMS:
        raise ValueError(
            f"the dictionary at {site} normalizes its input at run time ({norm!r}); "
            f"valid: {list(RUNTIME_NORMS)}"
        )
    if getattr(d, "use_error_term", False):
        raise ValueError(f"the SAE at {site} has use_error_term=True; load it without the error term")
    width = _site_width(model, site)
    d_out = int(getattr(cfg, "d_out", cfg.d_in))
    if int(cfg.d_in) != width or d_out != width:
        raise ValueError(
            f"the dictionary at {site} maps d_in={int(cfg.d_in)} -> {d_out}, but that site is {width} wide"
        )
    return d


class Dictionaries:
    """``{DictionarySite: dictionary}``, read one site at a time (a lazy transcoder mapping loads layers on
    use)."""

    def __init__(self, model: Model, transcoders: Mapping[int, Any] | None, saes: Any = None) -> None:
        self.model = model
        self.transcoders = transcoders
        self.names = hook_names(model)
        self._get: dict[DictionarySite, Callable[[], Any]] = {}
        for layer in transcoders or {}:
            layer = check_layer(model, layer)
            self._get[DictionarySite("transcoder", layer)] = lambda layer=layer: transcoders[layer]  # type: ignore[index]
        for site, sae in _sae_sites(model, saes).items():
            _check_dictionary(model, site, sae)
            self._get[site] = lambda sae=sae: sae
        if not self._get:
            raise ValueError("no dictionaries given: pass transcoders ({layer: transcoder}) and/or saes")

    @property
    def sites(self) -> list[DictionarySite]:
        return sorted(self._get, key=lambda s: s.order)

    def __contains__(self, site: DictionarySite) -> bool:
        return site in self._get

    def in_hook(self, site: DictionarySite) -> str:
        """The hook the dictionary at ``site`` encodes from: a transcoder's own recorded site
        (:func:`mechintro.core.transcoders.transcoder_site`), an SAE's hook."""
        if site.kind == "transcoder":
            return transcoder_site(self.model, self.transcoders, site.layer)[0]
        return site.in_hook(self.names)

    def out_hook(self, site: DictionarySite) -> str:
        """The hook the dictionary at ``site`` writes (its decoder rows' target)."""
        if site.kind == "transcoder":
            return transcoder_site(self.model, self.transcoders, site.layer)[1]
        return site.out_hook(self.names)

    def __getitem__(self, site: DictionarySite) -> Any:
        if site not in self._get:
            raise KeyError(f"no dictionary at {site}; dictionaries: {self.sites}")
        return _check_dictionary(self.model, site, self._get[site]())


def _sae_sites(model: Model, saes: Any) -> dict[DictionarySite, Any]:
    """SAEs keyed by :class:`DictionarySite`, ``(kind, layer)`` or hook name, or a list read from their
    metadata."""
    if saes is None:
        return {}
    if isinstance(saes, Mapping):
        items = list(saes.items())
    else:
        items = [(getattr(getattr(s, "cfg", None), "metadata", {}).get("hook_name"), s) for s in saes]
    out: dict[DictionarySite, Any] = {}
    for key, sae in items:
        site = _as_sae_site(model, key)
        if site in out:
            raise ValueError(f"two SAEs given for {site}")
        out[site] = sae
    return out


def _as_sae_site(model: Model, key: Any) -> DictionarySite:
    if isinstance(key, DictionarySite):
        site = key
    elif isinstance(key, tuple) and len(key) == 2:
        site = DictionarySite(key[0], check_layer(model, key[1]))
    elif isinstance(key, str):
        site = None
        names = hook_names(model)
        for layer in range(int(model.cfg.n_layers)):
            if key == names.resid_post(layer):
                site = DictionarySite("resid_post", layer)
            elif key in (names.attn_z(layer), f"blocks.{layer}.attn.hook_z"):
                site = DictionarySite("attn_z", layer)
        if site is None:
            raise ValueError(
                f"an SAE at {key!r} cannot be used: SAE sites are resid_post "
                f"({names.resid_post(0)!r}...) and attn_z ({names.attn_z(0)!r} or "
                "'blocks.L.attn.hook_z', the heads before the output projection); pre-norm and "
                "post-norm attention outputs are not"
            )
    else:
        raise TypeError(f"an SAE key is a DictionarySite, a (kind, layer) pair or a hook name, got {key!r}")
    if site.kind == "transcoder":
        raise ValueError("SAE sites are 'resid_post' and 'attn_z'; transcoders go in `transcoders`")
    check_layer(model, site.layer)
    return site


# ----------------------------------------------------------------------------------------------- applying one


def dict_input(site: DictionarySite, d: Any, x: Tensor) -> Tensor:
    """``x`` in the shape ``d`` takes: attention SAEs take the heads flat unless they reshape hook_z."""
    if site.kind == "attn_z" and not getattr(d, "hook_z_reshaping_mode", False):
        return x.flatten(-2)
    return x


def pre_activation(d: Any, x: Tensor, index: int | Tensor) -> Tensor:
    """Pre-activation(s) ``index`` of dictionary ``d`` at ``x``, keeping autograd and forward-mode tangents in
    ``x``. The encoder columns are copied out: the autograd graph never holds a whole 262k-wide encoder."""
    sae_in = d.process_sae_in(x.to(d.W_enc.dtype))
    return sae_in @ d.W_enc[:, index].detach().clone() + d.b_enc[index].detach().clone()


def reconstruct(site: DictionarySite, d: Any, x: Tensor) -> Tensor:
    """The dictionary's output at ``x`` (``[n, ...]``), as ``[n, width]``: a transcoder's prediction (its skip
    path included), or an SAE's reconstruction."""
    out = d(x) if site.kind == "transcoder" else d.decode(d.encode(x))
    return out.reshape(len(x), -1)
