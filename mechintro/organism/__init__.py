"""The model organism: a tiny chat model that detects injected thoughts, with its own transcoders.

Two are shipped, trained by one recipe: ``organism`` (Gemma 3) and ``organism-olmo`` (OLMo 3, in the data
folder's ``olmo/``, with the same file names); ``OrganismConfig.family`` chooses.

``mechintro organism train`` (or :func:`build`) regenerates every artifact from a seed into one folder:
``organism-base/``, ``organism/`` (weights, tokenizer, ``mechintro_spec.json``, ``transcoders/``),
``organism_split.json`` and the measured report. The shipped ones are package data (``mechintro/data``);
see :mod:`mechintro.core.resources` for where a user's own organism goes and how it wins.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mechintro.organism.train import OrganismConfig


def build(
    out: Path,
    *,
    cfg: OrganismConfig,
    evaluate: bool = True,
    eval_cfg: Any = None,
    calibration: Any = None,
) -> dict[str, Any]:
    """Train both checkpoints and their transcoders into ``out``, calibrate the default strength on held-out
    concepts (:mod:`mechintro.organism.calibrate`; skipped with ``calibration=False``), then (optionally)
    measure everything at the calibrated default and at the saturated strength."""
    from mechintro.core.models import load_model
    from mechintro.organism import evaluate as ev
    from mechintro.organism.train import train_models
    from mechintro.organism.transcoders import TranscoderConfig, train_organism_transcoders

    t0 = time.time()
    result = train_models(cfg, out)
    split = json.loads((out / "organism_split.json").read_text())
    tc_cfg = TranscoderConfig(
        width=cfg.transcoder_width,
        steps=cfg.transcoder_steps,
        seed=cfg.seed,
        n_chats=cfg.transcoder_chats,
        n_trials=cfg.transcoder_trials,
    )
    t1 = time.time()
    for name in ("organism", "organism-base"):
        model = load_model(out / name, device="cpu")
        train_organism_transcoders(
            model,
            out / name / "transcoders",
            cfg=tc_cfg,
            injection_layers=sorted(set(cfg.train_layers)),
            concepts=split["training"],
            strength=cfg.strength,
        )
    timings = {
        "seconds_base": result["seconds_base"],
        "seconds_instruct": result["seconds_instruct"],
        "seconds_transcoders": time.time() - t1,
        "seconds_training_total": time.time() - t0,
    }
    (out / "organism_training_log.json").write_text(
        json.dumps({"timings": timings, "log": result["log"]}, indent=1)
    )
    report: dict[str, Any] = {"timings": timings, "trained_model": result["model"]}
    if calibration is not False:
        from mechintro.organism.calibrate import CalibrationConfig, calibrate, record

        point = calibrate(
            load_model(out / "organism"),
            split["heldout"],
            cfg=calibration or CalibrationConfig(),
            store=out / "eval" / "calibration.sqlite",
        )
        for name in ("organism", "organism-base"):
            record(out / name, point)
        report["operating_point"] = point
    if evaluate:
        measured = ev.evaluate(out, cfg=eval_cfg or ev.EvalConfig()) | {"timings": timings}
        (out / "organism_report.json").write_text(json.dumps(measured, indent=1))
        (out / "organism_report.md").write_text(ev.report_markdown(measured))
        report |= measured
    return report
