"""Where a dictionary reads and writes: its recorded hook, translated to one of its family's candidate sites.

Public dictionaries record their hook in one of several naming schemes, and the same name does not mean the
same tensor in every scheme or family:

* TransformerLens / bridge names (sae-lens ``metadata.hook_name`` / ``hook_name_out``, with ``blocks.L.``)
  and circuit-tracer's ``feature_input_hook`` / ``feature_output_hook`` (the same names without
  ``blocks.L.``): ``hook_resid_mid``, ``hook_mlp_in``, ``ln2.hook_in`` / ``ln2.hook_out`` /
  ``ln2.hook_normalized``, ``mlp.hook_in`` / ``mlp.hook_out``, ``hook_mlp_out``, ``ln2_post.*``;
* Hugging Face module names (``model.layers.L.mlp``, ``pre_feedforward_layernorm.output``,
  ``post_attention_layernorm``), optionally ending in ``.input`` / ``.output`` (a bare module name means its
  output, except the MLP module on the input side, which means what the MLP reads);
* formats whose recorded name is known to differ from what they read: sae-lens's Gemma Scope 2 configs name
  ``hook_mlp_in`` (in TransformerLens, the residual *before* ``pre_feedforward_layernorm``), while those
  dictionaries read that norm's output (Google's released code names ``pre_feedforward_layernorm.output``).

:func:`site_from_recorded` maps a recorded name to a site of :attr:`Family.transcoder_in_candidates` /
:attr:`Family.transcoder_out_candidates` (the tables :data:`TL_INPUT`, :data:`TL_OUTPUT`, :data:`HF_INPUT`,
:data:`HF_OUTPUT`, per norm layout). :func:`reconstruction_errors` and :func:`check_reconstruction` then check
the choice: the dictionary's fraction of variance unexplained at the chosen sites must not be far above the
one it records, nor far above that at another candidate pair.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechintro.core import validate
from mechintro.core.families import FAMILIES, Family, Side

__all__ = [
    "HF_INPUT",
    "HF_OUTPUT",
    "TL_INPUT",
    "TL_OUTPUT",
    "SiteCheck",
    "WrongSiteError",
    "check_reconstruction",
    "family_of_model_name",
    "fvu",
    "site_from_recorded",
]

Layout = Literal["sandwich", "pre", "post"]

_TL_PRE_INPUT = {
    "hook_resid_mid": "mlp_in_prenorm",
    "hook_mlp_in": "mlp_in_prenorm",
    "ln2.hook_in": "mlp_in_prenorm",
    "ln2.hook_out": "mlp_in",
    "ln2.hook_normalized": "mlp_in",
    "mlp.hook_in": "mlp_in",
}
TL_INPUT: Mapping[Layout, Mapping[str, str]] = {
    "sandwich": _TL_PRE_INPUT,
    "pre": _TL_PRE_INPUT,
    "post": {"hook_resid_mid": "mlp_in", "hook_mlp_in": "mlp_in", "mlp.hook_in": "mlp_in"},
}
"""TransformerLens / bridge / circuit-tracer input names (without ``blocks.L.``) -> input site, per layout.
``ln2.hook_normalized`` is TransformerLens's normalized residual; with ``fold_ln`` it lacks the norm's weight,
so it is the nearest candidate, not the same tensor, and the reconstruction check decides."""
TL_OUTPUT: Mapping[Layout, Mapping[str, str]] = {
    "sandwich": {
        "hook_mlp_out": "mlp_out",
        "ln2_post.hook_out": "mlp_out",
        "mlp.hook_out": "mlp_module_out",
        "ln2_post.hook_in": "mlp_module_out",
    },
    "pre": {"hook_mlp_out": "mlp_out", "mlp.hook_out": "mlp_out"},
    "post": {
        "hook_mlp_out": "mlp_out",
        "ln2.hook_out": "mlp_out",
        "mlp.hook_out": "mlp_module_out",
        "ln2.hook_in": "mlp_module_out",
    },
}
"""TransformerLens / bridge / circuit-tracer output names -> output site, per layout (in the OLMo bridge,
``ln2`` is the post-feedforward norm)."""
HF_INPUT: Mapping[Layout, Mapping[tuple[str, Side], str]] = {
    "sandwich": {
        ("pre_feedforward_layernorm", "input"): "mlp_in_prenorm",
        ("pre_feedforward_layernorm", "output"): "mlp_in",
        ("mlp", "input"): "mlp_in",
    },
    "pre": {
        ("post_attention_layernorm", "input"): "mlp_in_prenorm",
        ("post_attention_layernorm", "output"): "mlp_in",
        ("mlp", "input"): "mlp_in",
    },
    "post": {("mlp", "input"): "mlp_in"},
}
"""Hugging Face (module inside ``model.layers.L``, input/output) -> input site, per layout."""
_HF_POST_NORM_OUTPUT = {
    ("mlp", "output"): "mlp_module_out",
    ("post_feedforward_layernorm", "input"): "mlp_module_out",
    ("post_feedforward_layernorm", "output"): "mlp_out",
}
HF_OUTPUT: Mapping[Layout, Mapping[tuple[str, Side], str]] = {
    "sandwich": _HF_POST_NORM_OUTPUT,
    "pre": {("mlp", "output"): "mlp_out"},
    "post": _HF_POST_NORM_OUTPUT,
}
"""Hugging Face (module, input/output) -> output site, per layout."""

FORMAT_INPUT: Mapping[str, Mapping[str, str]] = {"gemma_scope_2": {"hook_mlp_in": "mlp_in"}}
"""Per-format readings that override the literal one: Gemma Scope 2's recorded ``hook_mlp_in`` is what the
MLP reads (Gemma's pre-feedforward-norm output), in every family its raw files are used with (the tests
use them on every family's tiny model)."""

_TL = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF = re.compile(r"^(?:model\.(?:language_model\.)?)?layers\.(\d+)\.(.+)$")


class WrongSiteError(ValueError):
    """A dictionary's recorded hook names no candidate site, or its reconstruction says it sits elsewhere."""


def _parse(name: str) -> tuple[int | None, str, str]:
    """``(layer or None, rest, scheme)`` of a recorded hook name; scheme ``"tl"`` or ``"hf"``."""
    name = name.strip()
    if m := _TL.match(name):
        return int(m.group(1)), m.group(2), "tl"
    if m := _HF.match(name):
        return int(m.group(1)), m.group(2), "hf"
    hf = name == "mlp" or name.endswith((".input", ".output")) or "layernorm" in name
    return None, name, "hf" if hf else "tl"


def _hf_key(rest: str, side: Side) -> tuple[str, Side]:
    """A Hugging Face module name (relative to the layer) -> (module, input/output)."""
    module, _, end = rest.rpartition(".")
    if end in ("input", "output"):
        return module, end  # type: ignore[return-value]
    return rest, ("input" if rest == "mlp" and side == "input" else "output")


def accepted_names(family: Family, *, side: Side) -> list[str]:
    """Every recorded name :func:`site_from_recorded` understands for ``family`` on ``side``."""
    layout = family.norm_layout
    tl = TL_INPUT[layout] if side == "input" else TL_OUTPUT[layout]
    hf = HF_INPUT[layout] if side == "input" else HF_OUTPUT[layout]
    return sorted(tl) + [f"{m}.{s}" for m, s in sorted(hf)]


def site_from_recorded(
    family: Family, name: str, *, side: Side, layer: int | None = None, fmt: str | None = None
) -> str:
    """The candidate site of ``family`` that a dictionary's recorded hook ``name`` means.

    Args:
        side: ``"input"`` (what the dictionary reads) or ``"output"`` (what it predicts).
        layer: the layer the dictionary is for; a name of another layer is refused.
        fmt: the dictionary's format; some formats' names are read by :data:`FORMAT_INPUT`, not literally.

    Raises :class:`WrongSiteError` naming the candidates and the names understood.
    """
    family.require_mechanism("a dictionary site")
    candidates = family.transcoder_in_candidates if side == "input" else family.transcoder_out_candidates
    recorded_layer, rest, scheme = _parse(str(name))
    if layer is not None and recorded_layer is not None and recorded_layer != layer:
        raise WrongSiteError(f"the recorded hook {name!r} is of layer {recorded_layer}, not layer {layer}")
    layout = family.norm_layout
    site: str | None
    if scheme == "tl":
        table = dict(TL_INPUT[layout] if side == "input" else TL_OUTPUT[layout])
        if side == "input" and fmt in FORMAT_INPUT:
            table |= FORMAT_INPUT[fmt]
        site = table.get(rest)
    else:
        table_hf = HF_INPUT[layout] if side == "input" else HF_OUTPUT[layout]
        site = table_hf.get(_hf_key(rest, side))
    if site is None or site not in candidates:
        raise WrongSiteError(
            f"the dictionary's recorded {side} hook {name!r} is none of {family.title}'s {side} sites "
            f"{list(candidates)}; names understood for {family.title}: {accepted_names(family, side=side)}"
        )
    return site


_MODEL_NAME_FAMILY = (
    (re.compile(r"gemma[-_]?4", re.I), "gemma4_text"),
    (re.compile(r"gemma[-_]?3", re.I), "gemma3"),
    (re.compile(r"qwen3.*(moe|-a\d+b)", re.I), "qwen3_moe"),
    (re.compile(r"qwen[-_]?3", re.I), "qwen3"),
    (re.compile(r"llama[-_]?3", re.I), "llama"),
    (re.compile(r"olmo[-_]?2", re.I), "olmo2"),
    (re.compile(r"olmo[-_]?3", re.I), "olmo3"),
)


def family_of_model_name(name: str | None) -> Family | None:
    """The family a dictionary's recorded model name (``google/gemma-3-27b-it``, ``qwen3-4b``,
    ``meta-llama/Llama-3.2-1B``) belongs to, or None when the name says nothing known."""
    if not name:
        return None
    for pattern, fam in _MODEL_NAME_FAMILY:
        if pattern.search(str(name)):
            return next(f for f in FAMILIES if f.name == fam)
    return None


# --------------------------------------------------------------------------------------- reconstruction


@dataclass(frozen=True)
class SiteCheck:
    """How the reconstruction check of a dictionary's site decides."""

    n_prompts: int = 3
    """Trial prompts (of different variants) whose tokens, all but the first, the errors are measured on."""
    ratio: float = 2.0
    """"Far above": the error at the chosen sites may be at most ``ratio`` times the dictionary's recorded
    error, and at most ``ratio`` times that at another candidate pair."""
    usable: float = 0.5
    """Another candidate pair counts only when its own error is below this (a dictionary that fits
    nowhere, such as a random one, is not refused for being as bad at its site as elsewhere)."""
    slack: float = 0.05
    """Absolute excess over the recorded error that is never refused (tiny recorded errors)."""

    def __post_init__(self) -> None:
        validate.count("SiteCheck.n_prompts", self.n_prompts)
        for name in ("ratio", "usable", "slack"):
            value = validate.finite_number(f"SiteCheck.{name}", getattr(self, name))
            least = 1.0 if name == "ratio" else 0.0
            if value < least:
                raise validate.InvalidArgument(f"SiteCheck.{name} must be >= {least:g}, got {value}")


def fvu(pred: Float[Tensor, "n d"], target: Float[Tensor, "n d"]) -> float:
    """Fraction of variance unexplained: ``Σ|pred - target|² / Σ|target - mean(target)|²``."""
    pred, target = pred.double(), target.double()
    denom = (target - target.mean(0, keepdim=True)).pow(2).sum()
    return float((pred - target).pow(2).sum() / denom.clamp_min(1e-30))


def check_reconstruction(
    errors: Mapping[tuple[str, str], float],
    chosen: tuple[str, str],
    *,
    layer: int,
    recorded: float | None = None,
    settings: SiteCheck = SiteCheck(),
) -> None:
    """Raise :class:`WrongSiteError` if the error at ``chosen`` (input site, output site) is far above the
    ``recorded`` one or far above that of another usable candidate pair in ``errors``."""
    err = errors[chosen]
    shown = ", ".join(f"{i} -> {o}: {e:.3g}" for (i, o), e in sorted(errors.items()))
    if recorded is not None and err > settings.ratio * recorded and err - recorded > settings.slack:
        raise WrongSiteError(
            f"the layer-{layer} dictionary reconstructs {chosen[0]} -> {chosen[1]} with FVU {err:.3g}, far "
            f"above the {recorded:.3g} it records (errors at each candidate pair: {shown})"
        )
    best = min(errors, key=errors.__getitem__)
    if best != chosen and errors[best] < settings.usable and err > settings.ratio * errors[best]:
        raise WrongSiteError(
            f"the layer-{layer} dictionary is wired to the wrong side of a norm: its recorded sites "
            f"{chosen[0]} -> {chosen[1]} give FVU {err:.3g}, but {best[0]} -> {best[1]} give "
            f"{errors[best]:.3g} (errors at each candidate pair: {shown}); pass check='hook' to keep the "
            "recorded sites anyway"
        )


def recorded_fvu(meta: Mapping | object) -> float | None:
    """The reconstruction error a dictionary records (``metadata.fvu``), if any."""
    get = meta.get if hasattr(meta, "get") else lambda k, d=None: getattr(meta, k, d)
    value = get("fvu", None)
    return None if value is None else float(value)


def stack_positions(acts: list[Tensor]) -> Tensor:
    """Per-prompt ``[1, pos, d]`` captures -> ``[n, d]`` on the CPU (every layer's candidates of a large
    model are kept at once), dropping each prompt's first position (the attention sink's outliers)."""
    return torch.cat([a[0, 1:].cpu() for a in acts])
