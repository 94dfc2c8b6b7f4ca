"""The organism's operating point: the default strength where held-out detection matches the paper's.

The paper's default setting for Gemma3-27B (layer 37, strength 4) sits where the model detects 41% of
injections (its released Figure 1 metrics: TPR 0.411 at that cell). Detection there is partial, so concepts
differ: some are detected, some missed, and the per-concept analyses (correlations, success vs failure) have
something to analyse. The organism, trained to answer "Yes" from |strength| >= 2, detects every held-out
concept at strength 4. :func:`calibrate` picks the strength where its held-out TPR is about the same 0.411,
on a strength grid, and the organism records it as its ``default`` operating point, with 4.0 kept as the
named ``saturated`` one.

**By construction.** The default TPR is about 0.41 because the strength was chosen to make it so: what carries
information at the default are the per-concept analyses, not the TPR. The calibration runs on the held-out
concepts (training concepts detect far more easily, and are no calibration set) with its own sampling seed,
so the evaluation that follows samples other answers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mechintro.behaviour.judges import RuleJudge
from mechintro.behaviour.metrics import detection_metrics
from mechintro.behaviour.store import TrialStore
from mechintro.behaviour.trials import run_trials
from mechintro.core.models import SPEC_FILENAME, Model, spec_for

__all__ = ["OperatingPoint", "CalibrationConfig", "band_checks", "calibrate", "operating_point", "record"]

PAPER_DEFAULT_TPR = 0.411
"""Gemma3-27B-IT's TPR at the paper's default (layer 37, strength 4), from the released fig1 metrics."""


@dataclass(frozen=True)
class CalibrationConfig:
    """How the default strength is calibrated and checked."""

    target_tpr: float = PAPER_DEFAULT_TPR
    """The held-out TPR the default strength should give (the paper's 0.411)."""
    strengths: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
    """The coarse grid of strengths measured first."""
    refine_step: float = 0.1
    """Then every ``refine_step`` between the two coarse strengths whose TPRs bracket the target (0: none)."""
    n_trials: int = 10
    """Injection trials per concept and grid strength."""
    seed: int = 1
    """Sampling seed of the calibration trials (the evaluation uses another, 0)."""
    check_trials: int = 20
    """Trials per concept for the per-concept rates at the chosen strength (the requirements need >= 20)."""
    saturated: float = 4.0
    """The named ``saturated`` operating point (the former default)."""
    batch_size: int = 128
    """Rows per batch."""
    max_new_tokens: int = 40
    """Generation budget (the organism's answers are about 15 tokens)."""

    @classmethod
    def quick(cls) -> CalibrationConfig:
        """A few-second version for tests."""
        return cls(
            strengths=(1.0, 2.0, 3.0, 4.0),
            refine_step=0.0,
            n_trials=1,
            check_trials=2,
            batch_size=64,
            max_new_tokens=20,
        )


@dataclass(frozen=True)
class OperatingPoint:
    """The calibrated default and what was measured to choose it."""

    layer: int
    """The injection layer (the model's default)."""
    strength: float
    """The calibrated default strength (two decimals)."""
    target_tpr: float
    """What it was calibrated to."""
    curve: list[dict] = field(default_factory=list)
    """Held-out TPR per grid strength (``strength``, ``tpr``, ``n``)."""
    saturated: float = 4.0
    """The named saturated operating point."""
    seed: int = 1
    """The calibration trials' sampling seed."""
    n_trials: int = 10
    """Trials per concept and grid strength."""


def _crossing(strengths: Sequence[float], tprs: Sequence[float], target: float) -> float:
    """Where the (made monotone, then linearly interpolated) TPR curve reaches ``target``."""
    s = np.asarray(strengths, dtype=float)
    order = np.argsort(s)
    s, t = s[order], np.maximum.accumulate(np.asarray(tprs, dtype=float)[order])
    if target <= t[0]:
        return float(s[0])
    if target >= t[-1]:
        return float(s[-1])
    i = int(np.searchsorted(t, target))
    lo, hi = s[i - 1], s[i]
    if t[i] == t[i - 1]:
        return float(lo)
    return float(lo + (target - t[i - 1]) * (hi - lo) / (t[i] - t[i - 1]))


def calibrate(
    model: Model,
    concepts: Sequence[str],
    *,
    cfg: CalibrationConfig = CalibrationConfig(),
    store: TrialStore | str | Path | None = None,
    progress: bool = True,
) -> OperatingPoint:
    """Measure the held-out TPR on ``cfg.strengths`` (store-backed) and pick the strength where it reaches
    ``cfg.target_tpr`` (interpolated between grid points, two decimals)."""
    spec = spec_for(model)

    def tpr(strength: float) -> dict:
        df = run_trials(
            model,
            concepts,
            layer=spec.injection_layer,
            strength=strength,
            n_trials=cfg.n_trials,
            judge=RuleJudge(),
            controls=False,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            store=store,
            progress=progress,
        )
        m = detection_metrics(df, by=["strength"]).iloc[0]
        return {"strength": strength, "tpr": float(m["tpr"]), "n": int(m["n_injection"])}

    curve = [tpr(s) for s in sorted(cfg.strengths)]
    if cfg.refine_step > 0:
        monotone = np.maximum.accumulate([c["tpr"] for c in curve])
        above = int(np.searchsorted(monotone, cfg.target_tpr))
        if 0 < above < len(curve):
            lo, hi = curve[above - 1]["strength"], curve[above]["strength"]
            steps = int(round((hi - lo) / cfg.refine_step))
            curve += [tpr(round(lo + k * cfg.refine_step, 4)) for k in range(1, steps)]
            curve.sort(key=lambda c: c["strength"])
    chosen = round(_crossing([c["strength"] for c in curve], [c["tpr"] for c in curve], cfg.target_tpr), 2)
    return OperatingPoint(
        layer=spec.injection_layer,
        strength=chosen,
        target_tpr=cfg.target_tpr,
        curve=curve,
        saturated=cfg.saturated,
        seed=cfg.seed,
        n_trials=cfg.n_trials,
    )


def operating_point(
    model: Model,
    concepts: Sequence[str],
    *,
    strength: float,
    cfg: CalibrationConfig = CalibrationConfig(),
    store: TrialStore | str | Path | None = None,
    progress: bool = True,
) -> dict:
    """What the requirements ask at ``strength``: TPR, FPR, introspection (with Wilson intervals) and the
    per-concept detection rates over ``cfg.check_trials`` trials each (evaluation seed 0)."""
    spec = spec_for(model)
    df = run_trials(
        model,
        concepts,
        layer=spec.injection_layer,
        strength=strength,
        n_trials=cfg.check_trials,
        judge=RuleJudge(),
        forced=True,
        seed=0,
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        store=store,
        progress=progress,
    )
    m = detection_metrics(df, by=["strength"]).iloc[0]
    injected = df[df["condition"] == "injection"]
    per_concept = injected.groupby("concept")["detected"].agg(lambda x: x.astype(float).mean())
    out = {
        "layer": spec.injection_layer,
        "strength": float(strength),
        "trials_per_concept": int(cfg.check_trials),
        "n_concepts": int(len(per_concept)),
        "concepts_detected_ge_0.7": int((per_concept >= 0.7).sum()),
        "concepts_detected_le_0.2": int((per_concept <= 0.2).sum()),
    }
    for rate in ("tpr", "fpr", "introspection", "forced_id"):
        out |= {
            rate: float(m[rate]),
            f"{rate}_lo": float(m[f"{rate}_lo"]),
            f"{rate}_hi": float(m[f"{rate}_hi"]),
        }
    out |= {
        "n_injection": int(m["n_injection"]),
        "n_control": int(m["n_control"]),
        "n_forced": int(m["n_forced"]),
    }
    return out


BANDS = {
    "tpr": ("between", 0.25, 0.60),
    "fpr": ("<=", 0.05),
    "concepts_detected_ge_0.7": (">=", 15),
    "concepts_detected_le_0.2": (">=", 15),
    "introspection_lo": (">", 0.05),
    "trials_per_concept": (">=", 20),
}
"""The requirements at the calibrated default (held-out concepts, 100 of them)."""


def band_checks(point: dict) -> dict[str, bool]:
    """Each requirement of :data:`BANDS` on an :func:`operating_point` report: met or not."""
    out = {}
    for key, (op, *bounds) in BANDS.items():
        value = point[key]
        if op == "between":
            out[key] = bounds[0] <= value <= bounds[1]
        elif op == "<=":
            out[key] = value <= bounds[0]
        elif op == ">=":
            out[key] = value >= bounds[0]
        else:
            out[key] = value > bounds[0]
    return out


def record(folder: Path, point: OperatingPoint) -> None:
    """Write the operating point into ``folder/mechintro_spec.json``: ``strength`` (the default),
    ``operating_points`` (``saturated``), ``strength_sweep`` and the calibration curve."""
    path = Path(folder) / SPEC_FILENAME
    spec = json.loads(path.read_text())
    spec["strength"] = point.strength
    spec["operating_points"] = {"saturated": point.saturated}
    spec["strength_sweep"] = sorted({1.0, 2.0, point.strength, point.saturated, 8.0})
    spec["calibration"] = asdict(point) | {
        "note": "default strength: held-out TPR reaches the paper's 0.411 (by construction)"
    }
    path.write_text(json.dumps(spec, indent=1))
