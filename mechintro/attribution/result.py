"""What steering attribution returns: :class:`SteeringAttribution`, sparse tidy frames over (concept,
strength) rows with the settings they were computed with, and :func:`merge_attributions`, which joins parts
over disjoint concepts (e.g. shards run on several workers).

Per active feature ``f`` at position ``t``: ``GA`` (what a unit of f's activation would do to ``L``), ``SG``
(how fast the injection moves f's pre-activation) and ``SA = GA × SG``; per (site, position) the four terms
``total = features + skip + error``. ``ISA`` integrates ``SA`` over the strength grid
(:func:`mechintro.attribution.strengths.quadrature_weights`). ``g`` is a *total* gradient, so none of these
terms is ever summed across layers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechintro.attribution.metric import Metric
from mechintro.attribution.sites import DictionarySite, dictionary_feature_name
from mechintro.attribution.strengths import Integration, quadrature_weights
from mechintro.core.html import card

__all__ = [
    "FEATURE_COLUMNS",
    "METRIC_COLUMNS",
    "REMAINDER_COLUMNS",
    "AttributionSettings",
    "SteeringAttribution",
    "merge_attributions",
]


@dataclass(frozen=True)
class AttributionSettings:
    """What a :class:`SteeringAttribution` was computed with."""

    model: str
    """The model's name (its spec)."""
    concepts: tuple[str, ...]
    """The concepts, in row order."""
    strengths: tuple[float, ...]
    """The strength grid, exactly as used."""
    integration: Integration
    """The quadrature rule over the grid."""
    layer: int
    """The injection layer (resid_post)."""
    start: int
    """The injection start (absolute prompt position)."""
    trial: int
    """The trial number of the prompt."""
    variant: str
    """The prompt variant."""
    metric: Metric
    """What is attributed (with its absolute position)."""
    sites: tuple[DictionarySite, ...]
    """The dictionary sites, in computation order."""
    prompt_tokens: tuple[int, ...]
    """The prompt's token ids."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["metric"] = self.metric.to_dict()
        out["sites"] = [[s.kind, s.layer] for s in self.sites]
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> AttributionSettings:
        return AttributionSettings(
            model=str(data["model"]),
            concepts=tuple(data["concepts"]),
            strengths=tuple(float(s) for s in data["strengths"]),
            integration=data["integration"],
            layer=int(data["layer"]),
            start=int(data["start"]),
            trial=int(data["trial"]),
            variant=str(data["variant"]),
            metric=Metric.from_dict(data["metric"]),
            sites=tuple(DictionarySite(k, int(la)) for k, la in data["sites"]),
            prompt_tokens=tuple(int(t) for t in data["prompt_tokens"]),
        )


FEATURE_COLUMNS = [
    "concept",
    "strength",
    "dictionary",
    "layer",
    "position",
    "feature",
    "activation",
    "ga",
    "sg",
    "sa",
]
REMAINDER_COLUMNS = [
    "concept",
    "strength",
    "dictionary",
    "layer",
    "position",
    "total",
    "features",
    "skip",
    "error",
    "sa_remainder",
]
METRIC_COLUMNS = ["concept", "strength", "value", "slope", "slope_reverse"]
_KEY = ["concept", "dictionary", "layer", "position", "feature"]


@dataclass
class SteeringAttribution:
    """Steering attribution of one metric over (concept, strength) rows: sparse tidy frames.

    * ``features``: one row per (concept, strength, dictionary, layer, position, feature) **active** there:
      activation, ``ga``, ``sg``, ``sa = ga × sg``.
    * ``remainders``: one row per (concept, strength, dictionary, layer, position): ``total = g·ẏ``,
      ``features = Σ sa``, ``skip``, ``error`` (``total = features + skip + error``) and
      ``sa_remainder = total - features``. Never sum these across layers (``g`` is a total gradient).
    * ``metric``: per (concept, strength): the metric ``value``, its ``slope`` dL/dα from the forward-mode
      tangent and ``slope_reverse`` from the backward pass.
    """

    features: pd.DataFrame
    remainders: pd.DataFrame
    metric: pd.DataFrame
    settings: AttributionSettings
    vectors: Float[Tensor, "concept d_model"] = field(repr=False)
    """The injected concept vectors (float32, CPU), one per concept."""

    @property
    def weights(self) -> dict[float, float]:
        """Quadrature weight of every grid strength (keyed by the exact strength)."""
        w = quadrature_weights(self.settings.strengths, self.settings.integration)
        return dict(zip(self.settings.strengths, w.tolist(), strict=True))

    def integrate(self, frame: pd.DataFrame, columns: Sequence[str], by: Sequence[str]) -> pd.DataFrame:
        """``Σ_k w_k frame[column]`` over the strength grid, grouped by ``by`` (absent rows count as 0)."""
        w = frame["strength"].map(self.weights)
        if w.isna().any():
            bad = sorted(set(frame.loc[w.isna(), "strength"]))[:5]
            raise ValueError(f"strengths {bad} are not on the grid {list(self.settings.strengths)}")
        weighted = frame[list(by)].copy()
        for column in columns:
            weighted[column] = frame[column].to_numpy(dtype=np.float64) * w.to_numpy()
        return weighted.groupby(list(by), sort=False, as_index=False)[list(columns)].sum()

    def isa(self) -> pd.DataFrame:
        """Integrated steering attribution per feature and position: concept, dictionary, layer, position,
        feature, name, isa, n_active (grid points where the feature is active); ranked by isa per concept."""
        df = self.features
        if df.empty:
            return pd.DataFrame(columns=[*_KEY, "name", "isa", "n_active"])
        out = self.integrate(df, ["sa"], _KEY).rename(columns={"sa": "isa"})
        out["n_active"] = df.groupby(_KEY, sort=False).size().to_numpy()
        out.insert(
            5,
            "name",
            [
                dictionary_feature_name(k, la, i)
                for k, la, i in out[["dictionary", "layer", "feature"]].itertuples(index=False)
            ],
        )
        order = {c: i for i, c in enumerate(self.settings.concepts)}
        out = out.assign(_c=out["concept"].map(order)).sort_values(["_c", "isa"], ascending=[True, False])
        return out.drop(columns="_c").reset_index(drop=True)

    def top(self, n: int = 10) -> pd.DataFrame:
        """The ``n`` features with the largest |ISA| per concept (from :meth:`isa`), largest first."""
        isa = self.isa()
        order = isa["isa"].abs().groupby(isa["concept"], sort=False).rank(ascending=False, method="first")
        concepts = {c: i for i, c in enumerate(isa["concept"].unique())}
        out = isa.assign(_r=order, _c=isa["concept"].map(concepts))[order <= n]
        return out.sort_values(["_c", "_r"]).drop(columns=["_r", "_c"]).reset_index(drop=True)

    def _repr_html_(self) -> str:
        s = self.settings
        facts = {
            "model": s.model,
            "concepts": list(s.concepts),
            "strengths": list(s.strengths),
            "integration": s.integration,
            "injection": f"layer {s.layer} from position {s.start}",
            "metric": s.metric.label or s.metric.kind,
            "dictionaries": [f"{site.kind} L{site.layer}" for site in s.sites],
        }
        return card(
            "SteeringAttribution",
            facts,
            [("metric per (concept, strength)", self.metric), ("top features by |ISA|", self.top(5))],
        )

    def integrated_remainders(self) -> pd.DataFrame:
        """``∫ total``, ``∫ features``, ``∫ skip``, ``∫ error`` per (concept, dictionary, layer, position)."""
        cols = ["total", "features", "skip", "error"]
        return self.integrate(self.remainders, cols, ["concept", "dictionary", "layer", "position"])

    def layer_shares(self, kept: pd.DataFrame | None = None) -> pd.DataFrame:
        """Per (concept, dictionary, layer): the integrated terms summed over positions, and how much of the
        layer's total the ``kept`` features explain: ``explained = Σ_kept ISA / ∫ total``.

        ``kept``: rows with concept, dictionary, layer, position, feature (e.g. a graph's feature nodes);
        default every active feature (then ``kept_isa`` is ``∫ features``). Never add these across layers.
        """
        by = ["concept", "dictionary", "layer"]
        terms = self.integrate(self.remainders, ["total", "features", "skip", "error"], by)
        isa = self.isa()
        if kept is not None:
            isa = isa.merge(kept[_KEY].drop_duplicates(), on=_KEY, how="inner")
        kept_isa = isa.groupby(by, as_index=False)["isa"].sum().rename(columns={"isa": "kept_isa"})
        out = terms.merge(kept_isa, on=by, how="left").fillna({"kept_isa": 0.0})
        with np.errstate(divide="ignore", invalid="ignore"):
            out["explained"] = np.where(out["total"] != 0, out["kept_isa"] / out["total"], np.nan)
        return out

    # ------------------------------------------------------------------------------------------ files

    def to_parquet(self, folder: str | Path) -> list[Path]:
        """Write the three frames as parquet, the settings as JSON and the vectors as ``.npy``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name in ("features", "remainders", "metric"):
            path = folder / f"attribution_{name}.parquet"
            getattr(self, name).to_parquet(path, index=False)
            paths.append(path)
        path = folder / "attribution_settings.json"
        path.write_text(json.dumps(self.settings.to_dict(), indent=1))
        np.save(folder / "attribution_vectors.npy", self.vectors.numpy())
        return [*paths, path, folder / "attribution_vectors.npy"]

    @classmethod
    def from_parquet(cls, folder: str | Path) -> SteeringAttribution:
        """Read what :meth:`to_parquet` wrote."""
        folder = Path(folder)
        frames = {
            n: pd.read_parquet(folder / f"attribution_{n}.parquet")
            for n in ("features", "remainders", "metric")
        }
        settings = AttributionSettings.from_dict(
            json.loads((folder / "attribution_settings.json").read_text())
        )
        vectors = torch.from_numpy(np.load(folder / "attribution_vectors.npy"))
        return cls(settings=settings, vectors=vectors, **frames)


def merge_attributions(parts: Sequence[SteeringAttribution]) -> SteeringAttribution:
    """One :class:`SteeringAttribution` from parts over disjoint concepts (e.g. shards run on several
    workers), concepts in the parts' order. Every other setting (strengths, metric, dictionaries, prompt...)
    must agree: rows of different settings are not comparable, and merging them raises."""
    parts = list(parts)
    if not parts:
        raise ValueError("nothing to merge: no attribution parts")
    first = parts[0].settings
    for part in parts[1:]:
        mine, theirs = asdict(first), asdict(part.settings)
        differ = sorted(k for k in mine if k != "concepts" and mine[k] != theirs[k])
        if differ:
            raise ValueError(f"attribution parts differ in {differ}; only parts over other concepts merge")
    concepts = [c for part in parts for c in part.settings.concepts]
    repeated = sorted({c for c in concepts if concepts.count(c) > 1})
    if repeated:
        raise ValueError(f"concepts in more than one part: {repeated}")

    def cat(name: str) -> pd.DataFrame:
        return pd.concat([getattr(part, name) for part in parts], ignore_index=True)

    return SteeringAttribution(
        features=cat("features"),
        remainders=cat("remainders"),
        metric=cat("metric"),
        settings=replace(first, concepts=tuple(concepts)),
        vectors=torch.cat([part.vectors for part in parts]),
    )
