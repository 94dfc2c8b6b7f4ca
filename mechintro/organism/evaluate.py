"""Measuring the organism with mechintro's own trial code and the offline rule judge.

Everything here is measured, store-backed (resumable) and written to a report table: the instruct and base
checkpoints' detection numbers on held-out and training concepts, the graded dose-response, the
injection-layer profile, coherence, the transcoders' reconstruction and sparsity, and the behaviour with every
MLP replaced by its transcoder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mechintro.behaviour.judges import RuleJudge
from mechintro.behaviour.metrics import detection_metrics
from mechintro.behaviour.trials import run_trials, sweep
from mechintro.core.models import Model, load_model, spec_for
from mechintro.core.prompts import chat_prompt_tokens, left_pad
from mechintro.core.sampling import sample
from mechintro.core.transcoders import load_transcoders, replace_mlps
from mechintro.organism import corpus
from mechintro.organism.calibrate import CalibrationConfig, band_checks, operating_point
from mechintro.organism.transcoders import TranscoderConfig, collect_activations

METRIC_COLUMNS = ["tpr", "fpr", "introspection", "forced_id", "discrimination"]


@dataclass(frozen=True)
class EvalConfig:
    """How many trials each measurement uses."""

    n_trials: int = 20
    """Injection (and control, and forced) trials per concept for the headline numbers (100 concepts ->
    2000)."""
    n_training_concepts: int = 100
    """Training concepts measured for comparison."""
    profile_trials: int = 3
    """Trials per concept and cell of the layer x strength profile."""
    profile_concepts: int = 50
    """Held-out concepts in the profile."""
    replacement_trials: int = 10
    """Trials per concept with every MLP replaced by its transcoder."""
    coherence_concepts: int = 100
    """Held-out concepts asked "Tell me about {concept}"."""
    batch_size: int = 128
    """Rows per batch."""
    max_new_tokens: int = 40
    """Generation budget (the organism's answers are about 15 tokens)."""

    @classmethod
    def quick(cls) -> EvalConfig:
        return cls(
            n_trials=2,
            n_training_concepts=10,
            profile_trials=1,
            profile_concepts=10,
            replacement_trials=1,
            coherence_concepts=10,
            batch_size=64,
            max_new_tokens=20,
        )


def _metrics(df: pd.DataFrame, by: Sequence[str] = ("layer", "strength")) -> pd.DataFrame:
    return detection_metrics(df, by=list(by))


def headline(
    model: Model, concepts: Sequence[str], *, cfg: EvalConfig, store: Path, layer: int, strength: float
) -> dict:
    df = run_trials(
        model,
        concepts,
        layer=layer,
        strength=strength,
        n_trials=cfg.n_trials,
        judge=RuleJudge(),
        forced=True,
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        store=store,
    )
    row = _metrics(df).iloc[0]
    return {k: float(row[k]) for k in METRIC_COLUMNS} | {
        "n_injection": int(row["n_injection"]),
        "n_control": int(row["n_control"]),
        "n_forced": int(row["n_forced"]),
        **{f"{k}_lo": float(row[f"{k}_lo"]) for k in ("tpr", "fpr", "introspection", "forced_id")},
        **{f"{k}_hi": float(row[f"{k}_hi"]) for k in ("tpr", "fpr", "introspection", "forced_id")},
    }


def layer_profile(model: Model, concepts: Sequence[str], *, cfg: EvalConfig, store: Path) -> pd.DataFrame:
    spec = spec_for(model)
    df = sweep(
        model,
        concepts,
        layers=list(range(spec.n_layers)),
        strengths=list(spec.strength_sweep),
        n_trials=cfg.profile_trials,
        judge=RuleJudge(),
        forced=True,
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        store=store,
    )
    return _metrics(df)


def coherence(model: Model, concepts: Sequence[str], *, max_new_tokens: int = 30) -> dict:
    """Share of "Tell me about {concept}" answers (no injection, temperature 1) that mention the concept."""
    prompts = [chat_prompt_tokens(model, corpus.ASKS[0].format(c=c)) for c in concepts]
    batch = left_pad(prompts, pad_id=model.tokenizer.pad_token_id)
    texts = sample(model, batch, max_new_tokens=max_new_tokens, seeds=list(range(len(prompts)))).texts(
        model.tokenizer
    )
    hits = [c.lower() in t.lower() for c, t in zip(concepts, texts, strict=True)]
    return {"on_topic": sum(hits) / len(hits), "n": len(hits), "examples": texts[:3]}


def transcoder_quality(
    model: Model, transcoders: dict, *, heldout: Sequence[str], layer: int, strength: float
) -> pd.DataFrame:
    """FVU of hook_mlp_out, mean L0 and dead share per layer, on held-out prompts (held-out concepts)."""
    cfg = TranscoderConfig(n_chats=400, n_trials=200, seed=12345)
    data = collect_activations(
        model,
        cfg=cfg,
        injection_layers=[layer],
        concepts=heldout,
        strength=strength,
        concepts_for_chats=heldout,
    )
    rows = []
    for lay, tc in sorted(transcoders.items()):
        x, y = data[lay]
        with torch.no_grad():
            acts = tc.encode(x)
            pred = tc(x)
        fvu = float(((pred - y) ** 2).sum(-1).mean() / ((y - y.mean(0)) ** 2).sum(-1).mean())
        rows.append(
            {
                "layer": lay,
                "fvu": fvu,
                "l0": float((acts > 0).float().sum(-1).mean()),
                "dead_frac": float((acts.amax(0) <= 0).float().mean()),
                "n_positions": len(x),
                "width": int(acts.shape[-1]),
            }
        )
    return pd.DataFrame(rows)


def evaluate(out: Path, *, cfg: EvalConfig = EvalConfig(), progress_note: Any = print) -> dict:
    """Measure everything the organism must reach; writes ``out/organism_report.json`` and returns it."""
    split = json.loads((out / "organism_split.json").read_text())
    heldout, training = split["heldout"], split["training"][: cfg.n_training_concepts]
    stores = out / "eval"
    stores.mkdir(exist_ok=True)
    report: dict[str, Any] = {"eval_config": asdict(cfg)}
    instruct = load_model(out / "organism")
    spec = spec_for(instruct)
    layer, strength = spec.injection_layer, spec.strength
    saturated = spec.operating_points.get("saturated")
    report["operating_point"] = {
        "layer": layer,
        "strength": strength,
        "saturated": saturated,
        "calibration": spec.extra.get("calibration"),
    }
    progress_note("instruct: held-out and training concepts")
    report["instruct_heldout"] = headline(
        instruct, heldout, cfg=cfg, store=stores / "instruct.sqlite", layer=layer, strength=strength
    )
    point = operating_point(
        instruct,
        heldout,
        strength=strength,
        cfg=CalibrationConfig(
            check_trials=cfg.n_trials, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens
        ),
        store=stores / "instruct.sqlite",
        progress=False,
    )
    report["bands"] = {"measured": point, "met": band_checks(point)}
    if saturated is not None:
        report["instruct_heldout_saturated"] = headline(
            instruct, heldout, cfg=cfg, store=stores / "instruct.sqlite", layer=layer, strength=saturated
        )
    report["instruct_training"] = headline(
        instruct, training, cfg=cfg, store=stores / "instruct.sqlite", layer=layer, strength=strength
    )
    report["coherence"] = coherence(instruct, heldout[: cfg.coherence_concepts])
    progress_note("instruct: layer x strength profile")
    profile = layer_profile(
        instruct, heldout[: cfg.profile_concepts], cfg=cfg, store=stores / "profile.sqlite"
    )
    profile.to_csv(out / "organism_layer_profile.csv", index=False)
    report["profile"] = _profile_summary(profile, layer=layer, strength=strength)
    if saturated is not None:
        report["profile"]["tpr_by_layer_at_saturated_strength"] = _profile_summary(
            profile, layer=layer, strength=saturated
        )["tpr_by_layer_at_default_strength"]
    progress_note("base")
    base = load_model(out / "organism-base")
    report["base_heldout"] = headline(
        base, heldout, cfg=cfg, store=stores / "base.sqlite", layer=layer, strength=strength
    )
    progress_note("transcoders")
    for name, model in (("instruct", instruct), ("base", base)):
        tcs = load_transcoders(model)
        quality = transcoder_quality(model, tcs, heldout=heldout, layer=layer, strength=strength)
        report[f"transcoders_{name}"] = quality.to_dict(orient="records")
    tcs = load_transcoders(instruct)
    with replace_mlps(instruct, tcs):
        replaced = run_trials(
            instruct,
            heldout,
            layer=layer,
            strength=strength,
            n_trials=cfg.replacement_trials,
            judge=RuleJudge(),
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            store=stores / "replaced.sqlite",
        )
    row = _metrics(replaced).iloc[0]
    report["replacement"] = {
        "tpr": float(row["tpr"]),
        "fpr": float(row["fpr"]),
        "n_injection": int(row["n_injection"]),
    }
    (out / "organism_report.json").write_text(json.dumps(report, indent=1))
    return report


def _profile_summary(profile: pd.DataFrame, *, layer: int, strength: float) -> dict:
    at_default = profile[profile["strength"] == strength].set_index("layer")["tpr"]
    by_strength = profile[profile["layer"] == layer].set_index("strength")["tpr"]
    return {
        "tpr_by_layer_at_default_strength": {int(k): float(v) for k, v in at_default.items()},
        "tpr_by_strength_at_default_layer": {float(k): float(v) for k, v in by_strength.items()},
        "best_minus_worst_layer": float(at_default.max() - at_default.min()),
    }


TARGETS = {
    "instruct_heldout.tpr": (">=", 0.60),
    "instruct_heldout.fpr": ("<=", 0.05),
    "instruct_heldout.introspection": (">=", 0.30),
    "instruct_heldout.forced_id": (">=", 0.50),
    "base_heldout.discrimination": ("<=", 0.10),
}


def _fmt(entry: dict, key: str) -> str:
    value = entry.get(key)
    if value is None:
        return "-"
    lo, hi = entry.get(f"{key}_lo"), entry.get(f"{key}_hi")
    return f"{value:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def report_markdown(report: dict) -> str:
    """The measured numbers as a markdown table (what `mechintro organism train` writes)."""
    parts = ["instruct_heldout", "instruct_training", "base_heldout"]
    header = "| measure | instruct, held-out | instruct, training | base, held-out |"
    if "instruct_heldout_saturated" in report:
        parts.append("instruct_heldout_saturated")
        header += " instruct, held-out, saturated |"
    lines = [header, "|---" * (len(parts) + 1) + "|"]
    for key, name in (
        ("tpr", "TPR"),
        ("fpr", "FPR"),
        ("discrimination", "TPR - FPR"),
        ("introspection", "introspection (detect and name)"),
        ("forced_id", "forced identification"),
    ):
        cells = [_fmt(report.get(part, {}), key) for part in parts]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    h = report.get("instruct_heldout", {})
    lines.append(
        f"| trials (injection / control / forced) | {h.get('n_injection')} / {h.get('n_control')} / "
        f"{h.get('n_forced')} |" + " |" * (len(parts) - 1)
    )
    out = []
    point = report.get("operating_point")
    if point:
        out += [
            "## Operating point",
            "",
            f"Injection layer {point['layer']}, default strength {point['strength']:g} (calibrated so that "
            "held-out "
            "detection is about the paper's 0.411: by construction), saturated strength "
            f"{point['saturated']}.",
            "",
        ]
        curve = (point.get("calibration") or {}).get("curve")
        if curve:
            out += [
                "| strength | " + " | ".join(f"{c['strength']:g}" for c in curve) + " |",
                "|---|" + "---|" * len(curve),
                "| held-out TPR (calibration) | " + " | ".join(f"{c['tpr']:.2f}" for c in curve) + " |",
                "",
            ]
    bands = report.get("bands")
    if bands:
        m = bands["measured"]
        out += [
            f"At the default, over {m['trials_per_concept']} trials per held-out concept: "
            f"{m['concepts_detected_ge_0.7']} of {m['n_concepts']} concepts detected in >= 70% of trials, "
            f"{m['concepts_detected_le_0.2']} in <= 20%. Requirements met: "
            + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in bands["met"].items())
            + ".",
            "",
        ]
    out += ["## Behaviour (rule judge, temperature 1, Wilson 95% CIs)", "", *lines, ""]
    prof = report.get("profile", {})
    if prof:
        out += [
            "## Graded response (held-out, default layer)",
            "",
            "| strength | " + " | ".join(str(k) for k in prof["tpr_by_strength_at_default_layer"]) + " |",
            "|---|" + "---|" * len(prof["tpr_by_strength_at_default_layer"]),
            "| TPR | "
            + " | ".join(f"{v:.3f}" for v in prof["tpr_by_strength_at_default_layer"].values())
            + " |",
            "",
            "## Injection-layer profile (held-out, default strength)",
            "",
            "| layer | " + " | ".join(str(k) for k in prof["tpr_by_layer_at_default_strength"]) + " |",
            "|---|" + "---|" * len(prof["tpr_by_layer_at_default_strength"]),
            "| TPR | "
            + " | ".join(f"{v:.3f}" for v in prof["tpr_by_layer_at_default_strength"].values())
            + " |",
            "",
            f"best minus worst layer: {prof['best_minus_worst_layer']:.3f}",
            "",
        ]
        if "tpr_by_layer_at_saturated_strength" in prof:
            sat = prof["tpr_by_layer_at_saturated_strength"]
            out += [
                "Saturated strength: " + ", ".join(f"layer {k} {v:.2f}" for k, v in sat.items()) + ".",
                "",
            ]
    if "coherence" in report:
        out += [
            f"Coherence: {report['coherence']['on_topic']:.2f} of {report['coherence']['n']} "
            "'Tell me about {concept}' answers (held-out, no injection) mention the concept.",
            "",
        ]
    for name in ("instruct", "base"):
        rows = report.get(f"transcoders_{name}")
        if rows:
            out += [
                f"## Transcoders ({name}), held-out prompts",
                "",
                "| layer | FVU | mean L0 | dead |",
                "|---|---|---|---|",
            ]
            out += [f"| {r['layer']} | {r['fvu']:.3f} | {r['l0']:.1f} | {r['dead_frac']:.2f} |" for r in rows]
            out.append("")
    if "replacement" in report:
        r, h = report["replacement"], report.get("instruct_heldout", {})
        out += [
            f"With every MLP replaced by its transcoder: TPR {r['tpr']:.3f} (vs "
            f"{h.get('tpr', float('nan')):.3f}), "
            f"FPR {r['fpr']:.3f} (vs {h.get('fpr', float('nan')):.3f}).",
            "",
        ]
    if "timings" in report:
        t = report["timings"]
        out += [
            f"Training time: {t['seconds_training_total'] / 60:.1f} min (base {t['seconds_base'] / 60:.1f}, "
            f"instruct {t['seconds_instruct'] / 60:.1f}, transcoders {t['seconds_transcoders'] / 60:.1f}).",
            "",
        ]
    return "\n".join(out)
