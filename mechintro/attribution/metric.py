"""The scalar ``L`` steering attribution explains, read at one prompt position.

By default the Yes-No logsumexp gap at the last prompt token (:func:`mechintro.core.readout.yes_no_gap`, the
same token sets as the DLA target and the ``LogitJudge``); a token pair (:func:`token_metric`) or a dictionary
feature's pre-activation (:func:`feature_metric`) also works. :func:`resolve_metric` turns what a caller
passes into a :class:`Metric`, and :func:`check_metric` checks it against the loaded dictionaries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from mechintro.attribution.sites import (
    Dictionaries,
    DictionarySite,
    dictionary_feature_name,
    parse_dictionary_feature,
)
from mechintro.core import validate
from mechintro.core.models import Model, spec_for

__all__ = ["Metric", "check_metric", "feature_metric", "resolve_metric", "token_metric"]


@dataclass(frozen=True)
class Metric:
    """The scalar steering attribution explains, read at one prompt position."""

    kind: Literal["yes_no", "tokens", "feature"]
    """``"yes_no"``: logsumexp over the Yes ids minus over the No ids
    (:func:`mechintro.core.readout.yes_no_gap`);
    ``"tokens"``: the same gap for chosen token ids; ``"feature"``: a dictionary feature's pre-activation."""
    position: int = -1
    """Prompt position it is read at: absolute, or negative from the end (-1 = the last prompt token)."""
    positive: tuple[int, ...] = ()
    """Token ids on the plus side (yes_no, tokens)."""
    negative: tuple[int, ...] = ()
    """Token ids on the minus side (yes_no, tokens)."""
    site: DictionarySite | None = None
    """The feature's dictionary site (feature)."""
    index: int | None = None
    """The feature's index in its dictionary (feature)."""
    label: str = ""
    """A name for figures and exports."""

    def at(self, seq: int, start: int) -> Metric:
        """This metric with an absolute position inside a prompt of ``seq`` tokens injected from ``start``."""
        pos = self.position + seq if self.position < 0 else self.position
        if not 0 <= pos < seq:
            raise ValueError(f"metric position {self.position} is outside the prompt (0..{seq - 1})")
        if pos < start:
            raise ValueError(
                f"metric position {pos} is before the injection start {start}: the metric would not "
                "depend on the injection"
            )
        return Metric(self.kind, pos, self.positive, self.negative, self.site, self.index, self.label)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["site"] = None if self.site is None else [self.site.kind, self.site.layer]
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Metric:
        site = data.get("site")
        return Metric(
            kind=data["kind"],
            position=int(data["position"]),
            positive=tuple(int(i) for i in data.get("positive", ())),
            negative=tuple(int(i) for i in data.get("negative", ())),
            site=None if site is None else DictionarySite(site[0], int(site[1])),
            index=None if data.get("index") is None else int(data["index"]),
            label=str(data.get("label", "")),
        )


def _token_id(model: Model, token: str | int) -> int:
    if validate.is_integer(token):
        vocab = int(model.cfg.d_vocab)
        if not 0 <= int(token) < vocab:
            raise ValueError(f"token id {token} is outside the vocabulary 0..{vocab - 1}")
        return int(token)
    if not isinstance(token, str):
        raise TypeError(f"a metric token is a string or an id, got {token!r}")
    ids = model.tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids)} tokens, not one; pass a single token or its id")
    return int(ids[0])


def token_metric(model: Model, plus: str | int, minus: str | int, *, position: int = -1) -> Metric:
    """``logit(plus) - logit(minus)`` at ``position`` (each a single token: a string or an id)."""
    a, b = _token_id(model, plus), _token_id(model, minus)
    tok = model.tokenizer
    return Metric(
        "tokens",
        position,
        (a,),
        (b,),
        label=f"{tok.convert_ids_to_tokens(a)} − {tok.convert_ids_to_tokens(b)}",
    )


def feature_metric(feature: str | tuple[str, int, int] | tuple[int, int], *, position: int = -1) -> Metric:
    """The pre-activation of a dictionary feature (``"L5 F12"``, ``"resid L5 F3"``, ``(kind, layer, index)``
    or a transcoder ``(layer, index)``) at ``position``."""
    if isinstance(feature, str):
        kind, layer, index = parse_dictionary_feature(feature)
    elif len(feature) == 3:
        kind, layer, index = feature  # type: ignore[misc]
    else:
        kind, (layer, index) = "transcoder", feature  # type: ignore[misc]
    site = DictionarySite(kind, int(layer))
    return Metric(
        "feature",
        position,
        site=site,
        index=int(index),
        label=f"pre({dictionary_feature_name(kind, layer, index)})",
    )


def resolve_metric(model: Model, metric: Any = None) -> Metric:
    """A :class:`Metric` from ``None`` (the Yes-No gap), a ``(plus, minus)`` token pair, a feature name, or a
    :class:`Metric`."""
    if metric is None:
        spec = spec_for(model)
        return Metric("yes_no", -1, tuple(spec.yes_ids), tuple(spec.no_ids), label="Yes − No")
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        return feature_metric(metric)
    if isinstance(metric, (tuple, list)) and len(metric) == 2:
        return token_metric(model, metric[0], metric[1])
    raise ValueError(
        f"unknown metric {metric!r}; valid: None (the Yes-No gap), a (plus, minus) token pair, a feature "
        "name like 'L5 F12', or a Metric"
    )


def check_metric(model: Model, metric: Metric, dicts: Dictionaries, *, layer: int) -> Metric:
    """Raise unless a feature metric names a loaded dictionary feature after the injection."""
    if metric.kind != "feature":
        for token in (*metric.positive, *metric.negative):
            _token_id(model, token)
        if not metric.positive or not metric.negative:
            raise ValueError("a token metric needs token ids on both sides")
        return metric
    if metric.site not in dicts:
        raise ValueError(
            f"the metric's feature is at {metric.site}, which has no dictionary; loaded: {dicts.sites}"
        )
    d_sae = int(dicts[metric.site].cfg.d_sae)
    if not 0 <= int(metric.index) < d_sae:
        raise ValueError(f"feature index {metric.index} is outside 0..{d_sae - 1} of {metric.site}")
    if not metric.site.after_injection(layer):
        raise ValueError(f"the metric's feature at {metric.site} is not after the injection (layer {layer})")
    return metric
