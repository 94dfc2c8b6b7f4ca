"""Where the organism's detection comes from: its counterpart of the paper's section 3.3 (Figure 5, Table 3,
Figure 14), measured on held-out concepts.

The shipped organism learned detection by supervised training on injected trials (``organism``), which is
not how the paper's models got it. This study asks whether a preference stage whose data never contain an
injection (:mod:`mechintro.organism.preferences`) gives ``organism-base`` detection:

1. **SFT**: ``sft_chosen`` on the clean pairs from ``organism-base``, merged and saved (the counterpart of
   OLMo's SFT checkpoint, which the paper's Table 3 starts from);
2. **each condition** of Table 3 as a LoRA adapter on the SFT checkpoint (``dpo`` also on the base), with
   :func:`mechintro.studies.posttrain.posttrain`, and the positive control: DPO on pairs that *do* involve
   injections (:func:`~mechintro.organism.preferences.injected_pairs`, training concepts only);
3. **the checkpoint series** Base -> SFT -> DPO -> Instruct (the injection-trained organism) and every
   condition, through :func:`mechintro.studies.checkpoints.compare_checkpoints` on held-out concepts at the
   calibrated and the saturated strength (concept vectors computed on each checkpoint);
4. **Figure 14**: the instruct organism's top gate against strength on Base, DPO and Instruct
   (:func:`~mechintro.studies.checkpoints.compare_gates`, the instruct organism's dictionary on each, with
   its reconstruction error there).

Where the organism's recipe differs from the paper's text (Table 3: LoRA on OLMo's SFT checkpoint, 5,000
pairs, one epoch, learning rate 1e-5, batch 1 x 8): :attr:`PosttrainStudyConfig.n_pairs` pairs of the
organism's own rule-built data (not Dolci's), batch 8 x 1 (the same 8 pairs a step), and the learning rate
:attr:`PosttrainStudyConfig.lr` = 1e-3, the smallest of 1e-5, 1e-4 and 1e-3 at which DPO on 2,000 clean
pairs fits its own objective on this 2.4M-parameter model (the DPO loss below half of log 2 = 0.35): 1e-5
ended at 0.53, 1e-4 was at 0.45 after 200 of 250 steps, 1e-3 at 0.17 after 100. Chosen on the DPO loss before
any checkpoint was measured, never on a detection number.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from mechintro.behaviour.dialogue import NO_RESPONSE, YES_UNNAMED
from mechintro.behaviour.judges import RuleJudge
from mechintro.behaviour.store import TrialStore
from mechintro.core import resources
from mechintro.core.concepts import concept_vectors
from mechintro.core.models import load_model, merge_adapter, spec_for
from mechintro.organism import preferences
from mechintro.studies.checkpoints import Checkpoint, compare_checkpoints, compare_gates
from mechintro.studies.posttrain import PAPER_TABLE3, LoraSettings, PairInjection, PosttrainConfig, posttrain
from mechintro.studies.preferences import PreferencePair, load_pairs, select_pairs

BASES = {"organism": "organism-base", "organism-olmo": "organism-olmo-base"}
"""Each instruct organism and the base checkpoint the study post-trains."""


@dataclass(frozen=True)
class Row:
    """One row of the organism's Table 3: a condition, where it starts, and on which pairs."""

    key: str
    """A short name (``--rows`` on the command line, the adapter's folder)."""
    name: str
    """The row's label (the paper's Table 3 wording where the row is the paper's)."""
    condition: str
    """A :data:`mechintro.studies.posttrain.CONDITIONS` name."""
    start: str = "sft"
    """``"sft"`` (the organism's SFT checkpoint, as Table 3) or ``"base"`` (``organism-base``)."""
    data: str = "clean"
    """``"clean"`` (every domain), ``"without:<domain>"``, ``"only:<domain>"``, or ``"injected"`` (the
    positive control's pairs)."""
    paper: str | None = None
    """The paper's TPR - FPR for the row (paper's text, Table 3), or None."""


def _paper(label: str) -> str | None:
    return next(value for name, value, _ in PAPER_TABLE3 if name == label)


ROWS: tuple[Row, ...] = (
    Row("dpo", "DPO", "dpo", paper=_paper("DPO")),
    Row(
        "dpo-no-ref", "DPO without reference model", "dpo_no_ref", paper=_paper("DPO without reference model")
    ),
    Row(
        "margin-kl",
        "Margin-based contrastive with explicit KL",
        "contrastive_margin_kl",
        paper=_paper("Margin-based contrastive with explicit KL"),
    ),
    Row("sft-chosen", "SFT on chosen responses", "sft_chosen", paper=_paper("SFT on chosen responses")),
    Row(
        "sft-chosen-kl",
        "SFT on chosen with KL penalty",
        "kl_chosen",
        paper=_paper("SFT on chosen with KL penalty"),
    ),
    Row("dpo-base", "DPO applied to the base", "dpo", start="base", paper=_paper("DPO applied to the base")),
    Row("shuffled", "Shuffled preference labels", "dpo_shuffled", paper=_paper("Shuffled preference labels")),
    Row("reversed", "Reversed preferences", "dpo_reversed", paper=_paper("Reversed preferences")),
    Row("random-lora", "Random LoRA (untrained)", "random_lora"),
    *(
        Row(
            f"without-{d}", f"Leave out {d}", "dpo", data=f"without:{d}", paper=_paper("Leave-one-domain-out")
        )
        for d in preferences.DOMAINS
    ),
    *(
        Row(f"only-{d}", f"Only {d}", "dpo", data=f"only:{d}", paper=_paper("Single domains"))
        for d in preferences.DOMAINS
    ),
    Row("positive-control", "Positive control: DPO on injected trials", "dpo", data="injected"),
    Row("positive-control-sft", "Positive control: SFT on injected trials", "sft_chosen", data="injected"),
)
"""The organism's Table 3: the paper's rows, the random-LoRA control, the domain selections one by one, and
the positive control."""


@dataclass(frozen=True)
class PosttrainStudyConfig:
    """Settings of the organism's post-training study."""

    n_pairs: int = 1000
    """Clean preference pairs (the paper's text: 5,000 Dolci pairs); a domain selection takes its share."""
    lr: float = 1e-3
    """Learning rate of every adapter (see the module docstring for how it was chosen)."""
    pairs_per_step: int = 8
    """Pairs per forward and optimizer step (the released code: 1 a forward, 8 accumulated)."""
    lora_r: int = 64
    """LoRA rank (the released code's)."""
    lora_alpha: int = 128
    """LoRA alpha (the released code's)."""
    injected_strengths: tuple[float, float] = (1.0, 4.0)
    """The positive control's injection strengths are drawn uniformly from this range."""
    n_concepts: int = 100
    """Held-out concepts each checkpoint is measured on (the first of the split's held-out list)."""
    n_trials: int = 10
    """Trials per concept, condition and strength (injection, control and forced)."""
    max_new_tokens: int = 20
    """Generation budget of a trial (the organism's answers are about 15 tokens)."""
    trial_batch: int = 128
    """Trials per generation batch."""
    rows: tuple[str, ...] = tuple(r.key for r in ROWS)
    """The rows of :data:`ROWS` to run, by key (``dpo`` always runs: it is the DPO stage)."""
    seed: int = 0
    """Seed of the pairs, the label shuffle and the adapters."""

    def __post_init__(self) -> None:
        unknown = [r for r in self.rows if r not in {row.key for row in ROWS}]
        if unknown:
            raise ValueError(f"unknown rows {unknown}; valid: {[r.key for r in ROWS]}")

    @classmethod
    def quick(cls) -> PosttrainStudyConfig:
        """CI's tiny version: a few pairs, four rows, a few concepts."""
        return cls(
            n_pairs=32,
            n_concepts=4,
            n_trials=1,
            max_new_tokens=16,
            trial_batch=32,
            rows=("dpo", "reversed", "random-lora", "positive-control"),
        )

    def train_config(self) -> PosttrainConfig:
        return PosttrainConfig(
            lr=self.lr, batch_size=self.pairs_per_step, grad_accum=1, n_pairs=self.n_pairs, seed=self.seed
        )

    def lora(self) -> LoraSettings:
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha)


def split_of(model: str) -> dict[str, list[str]]:
    return json.loads(resources.organism_file("organism_split.json", name=model).read_text())


def study_pairs(cfg: PosttrainStudyConfig, training: Sequence[str]) -> dict[str, tuple[PreferencePair, ...]]:
    """``{"clean": ..., "injected": ...}``: the rule-built pairs (training concepts only)."""
    clean = preferences.clean_pairs(training, n=cfg.n_pairs, seed=cfg.seed)
    injected = preferences.injected_pairs(
        training[:100], n=cfg.n_pairs, seed=cfg.seed, strengths=cfg.injected_strengths
    )
    return {"clean": load_pairs(clean), "injected": load_pairs(injected)}


def row_pairs(row: Row, pairs: dict[str, tuple[PreferencePair, ...]]) -> tuple[PreferencePair, ...]:
    if row.data in ("clean", "injected"):
        return pairs[row.data]
    kind, _, domain = row.data.partition(":")
    if kind == "without":
        return select_pairs(pairs["clean"], leave_out=domain)
    return select_pairs(pairs["clean"], domains=domain)


def save_merged(base: str | Path, adapter: Path, folder: Path) -> Path:
    """``base`` with ``adapter`` merged, saved as a plain checkpoint (weights, tokenizer, the base's
    ``mechintro_spec.json``) that :func:`~mechintro.core.models.load_model` and
    :func:`~mechintro.studies.posttrain.posttrain` take like any folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechintro.core.models import _resolve

    name, source = _resolve(base)
    if (folder / "config.json").exists():
        return folder
    # eager attention: the organism config records output_attentions (the bridge's), which sdpa cannot save
    plain = AutoModelForCausalLM.from_pretrained(str(source), attn_implementation="eager")
    hf = merge_adapter(plain, adapter, name=name, folder=source)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(tmp)
    spec = Path(source) / "mechintro_spec.json"
    if spec.exists():
        shutil.copy(spec, tmp / spec.name)
    tmp.rename(folder)
    return folder


def _train(
    start: str | Path,
    pairs: Sequence[PreferencePair],
    *,
    condition: str,
    out: Path,
    cfg: PosttrainStudyConfig,
    injection: PairInjection | None = None,
    progress: bool,
) -> Path:
    config = replace(cfg.train_config(), n_pairs=min(cfg.n_pairs, len(pairs)))
    return posttrain(
        start,
        pairs,
        condition=condition,
        out=out,
        config=config,
        lora=cfg.lora(),
        injection=injection,
        progress=progress,
    )


def _injection(start: Path, pairs: Sequence[PreferencePair]) -> PairInjection:
    model = load_model(start)
    layer = spec_for(model).injection_layer
    concepts = sorted({p.injection[0] for p in pairs if p.injection is not None})
    vectors = concept_vectors(model, concepts, layer=layer)
    return PairInjection(layer=layer, vectors=dict(zip(concepts, vectors, strict=True)))


def train_study(
    out: Path, *, cfg: PosttrainStudyConfig, model: str = "organism", progress: bool = True
) -> dict[str, Any]:
    """Train the SFT checkpoint and every row's adapter into ``out`` (each resumes); returns
    ``{"base", "sft", "instruct", "adapters": {row: (start folder, adapter)}}``."""
    if model not in BASES:
        raise ValueError(f"unknown organism {model!r}; valid: {list(BASES)}")
    base = BASES[model]
    pairs = study_pairs(cfg, split_of(model)["training"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.jsonl").write_text("".join(json.dumps(asdict(p)) + "\n" for p in pairs["clean"]))
    sft_adapter = _train(
        base, pairs["clean"], condition="sft_chosen", out=out / "sft-adapter", cfg=cfg, progress=progress
    )
    sft = save_merged(base, sft_adapter, out / "sft")
    adapters = {}
    rows = [r for r in ROWS if r.key in cfg.rows or r.key == "dpo"]
    for row in rows:
        start = sft if row.start == "sft" else base
        chosen = row_pairs(row, pairs)
        injection = _injection(sft, chosen) if row.data == "injected" else None
        adapters[row.name] = (
            start,
            _train(
                start,
                chosen,
                condition=row.condition,
                out=out / "adapters" / row.key,
                cfg=cfg,
                injection=injection,
                progress=progress,
            ),
        )
    return {"base": base, "sft": sft, "instruct": model, "adapters": adapters}


def _eval_settings(cfg: PosttrainStudyConfig, spec: Any) -> dict[str, Any]:
    saturated = spec.operating_points.get("saturated", 4.0)
    return {
        "layer_fractions": (spec.injection_layer / spec.n_layers,),
        "strengths": (spec.strength, saturated),
        "n_trials": cfg.n_trials,
        "judge": RuleJudge(),
        "forced": True,
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.trial_batch,
    }


def stage_checkpoints(trained: dict[str, Any]) -> list[Checkpoint]:
    """Base -> SFT -> DPO -> Instruct (the counterpart of OLMo 3's four public checkpoints)."""
    sft_start, dpo = trained["adapters"]["DPO"]
    return [
        Checkpoint(trained["base"], label="Base", stage="Base", chat=True),
        Checkpoint(str(trained["sft"]), label="SFT", stage="SFT", chat=True),
        Checkpoint(str(sft_start), label="DPO", stage="DPO", chat=True, adapter=dpo),
        Checkpoint(trained["instruct"], label="Instruct (injection-trained)", stage="Instruct", chat=True),
    ]


def condition_checkpoints(trained: dict[str, Any]) -> list[Checkpoint]:
    return [
        Checkpoint(str(start), label=name, stage="condition", chat=True, adapter=adapter)
        for name, (start, adapter) in trained["adapters"].items()
        if name != "DPO"
    ]


WELL_FORMED = (NO_RESPONSE, YES_UNNAMED.split(".")[0] + ".")
"""The openings of the answers the organism was trained to give (the "No" answer, and "Yes, I detect an
injected thought." that every "Yes" answer begins with)."""


def well_formed(store: str | Path) -> pd.DataFrame:
    """Per store identity (``model``) and trial condition, the share of responses that open with one of the
    organism's trained answers (:data:`WELL_FORMED`): a post-trained checkpoint's detection numbers are read
    beside it, since a stage that wrecks the answers moves TPR and FPR by no introspection at all."""
    with TrialStore(store) as opened:
        rows = opened.load()
    rows = rows[rows["condition"].isin(["injection", "control"])]
    ok = rows["response"].fillna("").str.strip().str.startswith(WELL_FORMED)
    return (
        rows.assign(well_formed=ok)
        .groupby(["model", "condition"])["well_formed"]
        .mean()
        .unstack("condition")
        .add_prefix("well_formed_")
        .reset_index()
    )


def run_study(
    out: str | Path,
    *,
    cfg: PosttrainStudyConfig = PosttrainStudyConfig(),
    model: str = "organism",
    gate: str | None = None,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """The whole study into ``out`` (resumable: adapters and trials are kept there): ``{"stages",
    "conditions", "gates"}`` frames (``gates`` empty when no ``gate`` is given)."""
    out = Path(out).expanduser()
    trained = train_study(out, cfg=cfg, model=model, progress=progress)
    concepts = split_of(model)["heldout"][: cfg.n_concepts]
    spec = spec_for(load_model(model))
    settings = {**_eval_settings(cfg, spec), "store": out / "trials.sqlite", "progress": progress}
    series = stage_checkpoints(trained)
    stages = compare_checkpoints(series, concepts, **settings)
    conditions = compare_checkpoints([series[2], *condition_checkpoints(trained)], concepts, **settings)
    rows = {r.name: r for r in ROWS}
    conditions["paper"] = [rows[c].paper for c in conditions["checkpoint"]]
    formed = well_formed(settings["store"])
    stages, conditions = (df.merge(formed, on="model", how="left") for df in (stages, conditions))
    gates = pd.DataFrame()
    if gate is not None:
        picked = [c for c in series if c.label != "SFT"]
        gates = compare_gates(
            picked,
            gate,
            concepts[: min(len(concepts), 20)],
            strengths=(0.0, 1.0, 2.0, spec.strength, 4.0, 8.0),
            injection_layer=spec.injection_layer,
        )
    return {"stages": stages, "conditions": conditions, "gates": gates}
