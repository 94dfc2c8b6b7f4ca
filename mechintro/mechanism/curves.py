"""Progressive curves: gates ablated or patched in growing numbers, carriers ablated, base vs instruct.

* **Gate curves** (:func:`gate_curves_sampled`, :func:`gate_curves_logit`): for the top ``k`` gates (ranked by
  :func:`mechintro.mechanism.features.find_gates`), for each ``k`` in ``ks``,

  - ``ablation``: steered runs with the gates set to their control (unsteered) activation;
  - ``patching``: unsteered runs with the gates set to their steered activation (per concept);
  - ``forced_ablation``: steered runs of the forced-identification prompt with the gates ablated.

  The sampled version generates and judges trials (detection rate, forced-identification rate, 95% Wilson
  CIs from :func:`summarize_gate_curves`); the logit version scores one forward pass per row (Yes-vs-No gap,
  P(concept)) -- cheap, no sampling. All ``k`` of a curve share batches: a row's mask selects its gates.
* **Carrier curves** (:func:`carrier_curves`): the gate's activation at the last prompt token against the
  injection strength while ablating (to their control activation) all, the top 20% or the top 5% of its
  evidence carriers (by attribution), with the weakest 10% (smallest ``|attribution|``) as a control.
* **Model variants** (:func:`gate_response`): the gate's activation against strength, to compare organism-base
  with organism (the analysis script concatenates the two with a ``model`` column).

Interventions edit the last prompt token by default (``positions="last"``; ``"from_start"`` edits every
position from the injection start, generated tokens included) -- see :mod:`mechintro.mechanism.interventions`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechintro.behaviour.judges import Scorer, error_mask, judge_kind
from mechintro.behaviour.metrics import wilson_interval
from mechintro.core.concepts import concept_vectors
from mechintro.core.hooks import capture, check_layer
from mechintro.core.models import Model, Transcoders, spec_for
from mechintro.core.progress import progress_bar
from mechintro.core.prompts import TrialPrompt, forced_prefill, left_pad, trial_prompt
from mechintro.core.readout import concept_logprob, concept_token_ids, yes_no_gap
from mechintro.core.sampling import sample, trial_seed
from mechintro.core.settings import BATCHING, EXPERIMENTS, SAMPLING, TRIALS
from mechintro.core.stats import mean_ci
from mechintro.core.steering import inject
from mechintro.core.transcoders import (
    encode_features,
    feature_name,
    parse_feature,
    parse_features,
    transcoder_site,
)
from mechintro.mechanism.features import default_strengths
from mechintro.mechanism.interventions import intervene, read_features

__all__ = [
    "CARRIER_SETS",
    "GATE_EXPERIMENTS",
    "carrier_curves",
    "carrier_sets",
    "default_ks",
    "gate_curves_logit",
    "gate_curves_sampled",
    "gate_response",
    "success_failure",
    "summarize_gate_curves",
]

GATE_EXPERIMENTS = EXPERIMENTS
"""Gate-curve experiments."""

_CONDITION = {"ablation": "injection", "patching": "control", "forced_ablation": "forced"}
"""The trial condition each experiment's rows correspond to."""

CARRIER_SETS = (
    "none",
    "all",
    "top20",
    "top5",
    "suppressors:all",
    "suppressors:top20",
    "suppressors:top5",
    "bottom10",
)
"""Carrier sets: nothing ablated, all carriers, the top 20% / 5% by attribution, the weakest 10%."""

_SET = re.compile(r"^(?:(carriers|suppressors):)?(all|(top|bottom)(\d+(?:\.\d+)?))$")


def default_ks(n_gates: int) -> list[int]:
    """0, 1, 2, 5, 10, 20, 50, 100, 200 below ``n_gates``, then ``n_gates``."""
    return [k for k in (0, 1, 2, 5, 10, 20, 50, 100, 200) if k < n_gates] + [n_gates]


@dataclass(frozen=True)
class _Setting:
    """What every row of a curve shares."""

    injection_layer: int
    strength: float
    vectors: Float[Tensor, "concept d_model"]


def _setting(
    model: Model,
    concepts: Sequence[str],
    vectors: Tensor | None,
    strength: float | None,
    injection_layer: int | None,
) -> _Setting:
    spec = spec_for(model)
    inj = spec.injection_layer if injection_layer is None else check_layer(model, injection_layer)
    if vectors is None:
        vectors = concept_vectors(model, list(concepts), layer=inj)
    vectors = torch.as_tensor(vectors).float()
    if vectors.shape[0] != len(concepts):
        raise ValueError(f"vectors has {vectors.shape[0]} rows for {len(concepts)} concepts")
    return _Setting(inj, spec.strength if strength is None else float(strength), vectors)


def _check_experiments(experiments: Sequence[str]) -> list[str]:
    bad = [e for e in experiments if e not in GATE_EXPERIMENTS]
    if bad or not experiments:
        raise ValueError(f"unknown experiments {bad or list(experiments)}; valid: {list(GATE_EXPERIMENTS)}")
    return list(experiments)


# ----------------------------------------------------------------------------------------------- gate curves


@dataclass(frozen=True)
class _Rows:
    """The rows of one gate-curve experiment: one per (k, concept)."""

    prompt: TrialPrompt
    concept: list[int]
    k: list[int]
    strength: Float[Tensor, " rows"]
    target: Float[Tensor, "rows gate"]
    mask: Bool[Tensor, "rows gate"]


def _gate_rows(
    model: Model,
    transcoders: Transcoders,
    gates: list[tuple[int, int]],
    n_concepts: int,
    st: _Setting,
    *,
    experiment: str,
    ks: Sequence[int],
    trial: int,
    variant: str,
) -> _Rows:
    prompt = trial_prompt(
        model,
        trial=trial,
        variant=variant,
        prefill=forced_prefill() if experiment == "forced_ablation" else None,
    )
    control = read_features(model, transcoders, gates, prompt.tokens)  # [1, G]
    patch = experiment == "patching"
    if patch:
        batch = prompt.tokens[None].expand(n_concepts, -1)
        with inject(
            model, st.vectors, layer=st.injection_layer, strength=st.strength, start=prompt.injection_start
        ):
            steered = read_features(model, transcoders, gates, batch)  # [C, G]
    pairs = [(k, c) for k in ks for c in range(n_concepts)]
    order = torch.arange(len(gates))
    return _Rows(
        prompt=prompt,
        concept=[c for _, c in pairs],
        k=[k for k, _ in pairs],
        strength=torch.full((len(pairs),), 0.0 if patch else st.strength),
        target=steered[[c for _, c in pairs]] if patch else control.expand(len(pairs), -1),
        mask=torch.stack([order < k for k, _ in pairs]),
    )


def _check_ks(ks: Sequence[int] | None, n_gates: int) -> list[int]:
    ks = default_ks(n_gates) if ks is None else [int(k) for k in ks]
    bad = [k for k in ks if not 0 <= k <= n_gates]
    if bad:
        raise ValueError(f"ks must lie in 0..{n_gates} (the number of gates), got {bad}")
    return ks


@torch.no_grad()
def gate_curves_logit(
    model: Model,
    transcoders: Transcoders,
    gates: Any,
    concepts: Sequence[str],
    *,
    vectors: Float[Tensor, "concept d_model"] | None = None,
    ks: Sequence[int] | None = None,
    experiments: Sequence[str] = GATE_EXPERIMENTS,
    strength: float | None = None,
    injection_layer: int | None = None,
    trial: int = TRIALS.trial,
    variant: str = TRIALS.variant,
    positions: str = "last",
    scale: str = "unit",
    batch_size: int = BATCHING.batch_size,
    progress: bool = True,
) -> pd.DataFrame:
    """Gate curves scored from logits: Yes-vs-No gap (ablation, patching) or P(concept) (forced_ablation).

    Args:
        gates: ranked gates (a :func:`~mechintro.mechanism.features.find_gates` table, names, or pairs);
            the top ``k``.
        ks: numbers of gates (default :func:`default_ks`).
        experiments: from :data:`GATE_EXPERIMENTS`.
        positions / scale: of the feature intervention (:func:`mechintro.mechanism.interventions.intervene`).
        progress: show a progress bar over the (experiment, k, concept) rows.

    Returns columns experiment, k, concept, trial, metric, value.
    """
    gates = parse_features(gates)
    ks, st = _check_ks(ks, len(gates)), _setting(model, concepts, vectors, strength, injection_layer)
    experiments = _check_experiments(experiments)
    frames = []
    total = len(experiments) * len(ks) * len(concepts)
    bar = progress_bar(total=total, desc="gate curves", unit="row", enabled=progress)
    for experiment in experiments:
        rows = _gate_rows(
            model,
            transcoders,
            gates,
            len(concepts),
            st,
            experiment=experiment,
            ks=ks,
            trial=trial,
            variant=variant,
        )
        values = []
        for i in range(0, len(rows.k), batch_size):
            sl = slice(i, i + batch_size)
            c_idx = rows.concept[sl]
            batch = rows.prompt.tokens[None].expand(len(c_idx), -1).to(model.cfg.device)
            start = rows.prompt.injection_start
            with (
                inject(
                    model,
                    st.vectors[c_idx],
                    layer=st.injection_layer,
                    strength=rows.strength[sl],
                    start=start,
                ),
                intervene(
                    model,
                    transcoders,
                    gates,
                    target=rows.target[sl],
                    mask=rows.mask[sl],
                    positions=positions,
                    start=start,
                    scale=scale,
                ),
            ):
                logits = model(batch)[:, -1].float()
            if experiment == "forced_ablation":
                ids = concept_token_ids(model, [concepts[c] for c in c_idx])
                values.append(concept_logprob(logits, ids).exp().cpu())
            else:
                values.append(yes_no_gap(logits, spec_for(model)).cpu())
            bar.update(len(c_idx))
        frames.append(
            pd.DataFrame(
                {
                    "experiment": experiment,
                    "k": rows.k,
                    "concept": [concepts[c] for c in rows.concept],
                    "trial": trial,
                    "metric": "p_concept" if experiment == "forced_ablation" else "gap",
                    "value": torch.cat(values).numpy(),
                }
            )
        )
    bar.close()
    return pd.concat(frames, ignore_index=True)


@torch.no_grad()
def gate_curves_sampled(
    model: Model,
    transcoders: Transcoders,
    gates: Any,
    concepts: Sequence[str],
    *,
    judge: Any,
    vectors: Float[Tensor, "concept d_model"] | None = None,
    ks: Sequence[int] | None = None,
    experiments: Sequence[str] = GATE_EXPERIMENTS,
    n_samples: int = 10,
    trial: int = TRIALS.trial,
    strength: float | None = None,
    injection_layer: int | None = None,
    variant: str = TRIALS.variant,
    positions: str = "last",
    scale: str = "unit",
    max_new_tokens: int = SAMPLING.max_new_tokens,
    temperature: float = SAMPLING.temperature,
    seed: int = SAMPLING.seed,
    batch_size: int = BATCHING.batch_size,
    progress: bool = True,
) -> pd.DataFrame:
    """Gate curves from sampled, judged trials (the paper's version).

    Each (experiment, k, concept) gets ``n_samples`` samples of the trial prompt under its injection and gate
    intervention, judged by ``judge`` (``judge(*, responses, concepts, forced) -> list[Verdict]``). Sample
    ``i`` of a concept uses the same seed for every ``k`` (that of
    :func:`mechintro.core.sampling.trial_seed`), so
    curves differ only by the intervention (``progress``: a progress bar over the samples). Returns columns
    experiment, k, concept, trial, sample, condition
    (injection / control / forced), response, detected, identified, forced_identified, judge_error.
    """
    if judge_kind(judge) == "logits":
        return _logit_verdicts(
            judge,
            gate_curves_logit(
                model,
                transcoders,
                gates,
                concepts,
                vectors=vectors,
                ks=ks,
                experiments=experiments,
                strength=strength,
                injection_layer=injection_layer,
                trial=trial,
                variant=variant,
                positions=positions,
                scale=scale,
                batch_size=batch_size,
                progress=progress,
            ),
        )
    gates = parse_features(gates)
    ks, st = _check_ks(ks, len(gates)), _setting(model, concepts, vectors, strength, injection_layer)
    pad_id = model.tokenizer.pad_token_id
    frames = []
    experiments = _check_experiments(experiments)
    total = len(experiments) * len(ks) * len(concepts) * n_samples
    bar = progress_bar(total=total, desc="gate curves (sampled)", unit="trial", enabled=progress)
    for experiment in experiments:
        rows = _gate_rows(
            model,
            transcoders,
            gates,
            len(concepts),
            st,
            experiment=experiment,
            ks=ks,
            trial=trial,
            variant=variant,
        )
        condition = _CONDITION[experiment]
        plan = [(r, s) for r in range(len(rows.k)) for s in range(n_samples)]
        out = []
        for i in range(0, len(plan), batch_size):
            chunk = plan[i : i + batch_size]
            r_idx = [r for r, _ in chunk]
            c_idx = [rows.concept[r] for r in r_idx]
            names = [concepts[c] for c in c_idx]
            batch = left_pad([rows.prompt] * len(chunk), pad_id=pad_id)
            seeds = [trial_seed(seed, concepts[rows.concept[r]], trial, s, condition) for r, s in chunk]
            with (
                inject(
                    model,
                    st.vectors[c_idx],
                    layer=st.injection_layer,
                    strength=rows.strength[r_idx],
                    start=batch.starts,
                ),
                intervene(
                    model,
                    transcoders,
                    gates,
                    target=rows.target[r_idx],
                    mask=rows.mask[r_idx],
                    positions=positions,
                    start=batch.starts,
                    scale=scale,
                ),
            ):
                sampled = sample(
                    model, batch, max_new_tokens=max_new_tokens, seeds=seeds, temperature=temperature
                )
            texts = sampled.texts(model.tokenizer)
            forced = [experiment == "forced_ablation"] * len(chunk)
            verdicts = judge.judge(responses=texts, concepts=names, forced=forced)
            out += [
                {
                    "experiment": experiment,
                    "k": rows.k[r],
                    "concept": name,
                    "trial": trial,
                    "sample": s,
                    "condition": condition,
                    "response": text,
                    "detected": v.detected,
                    "identified": v.identified,
                    "forced_identified": v.forced_identified,
                    "judge_error": v.error,
                }
                for (r, s), name, text, v in zip(chunk, names, texts, verdicts, strict=True)
            ]
            bar.update(len(chunk))
        frames.append(pd.DataFrame(out))
    bar.close()
    return pd.concat(frames, ignore_index=True)


def _logit_verdicts(judge: Scorer, scores: pd.DataFrame) -> pd.DataFrame:
    """Sampled-curve rows from logit scores: one deterministic "sample" per row, judged by ``judge``."""
    forced = (scores["experiment"] == "forced_ablation").tolist()
    gaps = scores["value"].where(~pd.Series(forced, index=scores.index), 0.0).tolist()
    p_concepts = scores["value"].where(pd.Series(forced, index=scores.index), 0.0).tolist()
    verdicts = judge.score(gaps=gaps, p_concepts=p_concepts, forced=forced)
    return pd.DataFrame(
        {
            "experiment": scores["experiment"],
            "k": scores["k"],
            "concept": scores["concept"],
            "trial": scores["trial"],
            "sample": 0,
            "condition": scores["experiment"].map(_CONDITION),
            "response": None,
            "detected": [v.detected for v in verdicts],
            "identified": [v.identified for v in verdicts],
            "forced_identified": [v.forced_identified for v in verdicts],
            "judge_error": [v.error for v in verdicts],
        }
    )


def summarize_gate_curves(df: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """One row per (experiment, k): ``mean``, ``lo``, ``hi``, ``n``.

    Sampled curves (a ``detected`` column): the detection rate (``forced_identified`` rate for
    forced_ablation), judge errors left out, with 95% Wilson intervals. Logit curves (a ``value`` column):
    the mean over concepts with a Student-t interval, and a ``metric`` column.
    """
    if "value" in df.columns:
        return mean_ci(df, ["experiment", "metric", "k"], value="value", unit="concept", level=level)
    rows = []
    for (experiment, k), group in df.groupby(["experiment", "k"], sort=True):
        if "judge_error" in group.columns:
            group = group[~error_mask(group["judge_error"])]
        column = "forced_identified" if experiment == "forced_ablation" else "detected"
        verdicts = group[column].dropna().astype(bool)
        hits, n = int(verdicts.sum()), len(verdicts)
        lo, hi = wilson_interval(hits, n)
        rows.append(
            {
                "experiment": experiment,
                "k": k,
                "rate": column,
                "mean": hits / n if n else math.nan,
                "lo": lo,
                "hi": hi,
                "n": n,
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------- carriers


def carrier_sets(
    carriers: pd.DataFrame,
    sets: Sequence[str] = CARRIER_SETS,
    *,
    weak_from: Literal["all", "carriers"] = "all",
) -> dict[str, list[str]]:
    """Feature names of each ablation set, from a
    :func:`~mechintro.mechanism.features.find_evidence_carriers` table.

    A set is ``"none"``, or ``[role:]selector`` with role ``carriers`` (the default, attribution < 0) or
    ``suppressors`` (attribution > 0) and selector ``all``, ``top<P>`` (the ``max(1, floor(P% x n))`` with the
    largest ``|attribution|`` of the role, the paper's released code's count) or ``bottom<P>``: the weak-
    attribution control, the ``max(1, floor(P% x n))`` features with the smallest ``|attribution|`` among
    every nonzero attribution (``weak_from="all"``, the paper's code) or among the carriers only.
    """
    if weak_from not in ("all", "carriers"):
        raise ValueError(f"unknown weak_from {weak_from!r}; valid: ['all', 'carriers']")
    roles = carriers["role"] if "role" in carriers.columns else pd.Series("carrier", index=carriers.index)

    def ranked(table: pd.DataFrame) -> list[str]:
        return (
            table.assign(_a=-table["attribution"].abs()).sort_values("_a", kind="stable")["feature"].tolist()
        )

    by_role = {
        "carriers": ranked(carriers[roles == "carrier"]),
        "suppressors": ranked(carriers[roles == "suppressor"]),
    }
    pool = carriers[carriers["attribution"] != 0] if weak_from == "all" else carriers[roles == "carrier"]
    weakest = ranked(pool)[::-1]
    out = {}
    for name in sets:
        match = _SET.match(name)
        if name == "none":
            out[name] = []
            continue
        if match is None:
            raise ValueError(
                f"unknown ablation set {name!r}; valid: 'none', or [carriers:|suppressors:] followed by "
                "'all', "
                f"'top<P>' or 'bottom<P>' (e.g. {list(CARRIER_SETS)})"
            )
        role, selector, side, percent = match.groups()
        members = by_role[role or "carriers"]
        if selector == "all":
            out[name] = members
            continue
        source = members if side == "top" else weakest
        n = max(1, int(float(percent) * len(source) // 100)) if source else 0
        out[name] = source[:n]
    return out


@torch.no_grad()
def carrier_curves(
    model: Model,
    transcoders: Transcoders,
    gate: str | tuple[int, int],
    carriers: pd.DataFrame,
    concepts: Sequence[str],
    *,
    vectors: Float[Tensor, "concept d_model"] | None = None,
    strengths: Sequence[float] | None = None,
    sets: Sequence[str] = CARRIER_SETS,
    weak_from: Literal["all", "carriers"] = "all",
    injection_layer: int | None = None,
    trial: int = TRIALS.trial,
    variant: str = TRIALS.variant,
    persona: str = TRIALS.persona,
    positions: str = "last",
    scale: str = "unit",
    batch_size: int = BATCHING.batch_size,
) -> pd.DataFrame:
    """The gate's activation at the last prompt token against strength, with carrier sets ablated.

    Ablated carriers are set to their control (unsteered) activation (:func:`carrier_sets` names the sets).
    Rows are (concept, set, strength), batched. Returns columns concept, carrier_set, n_ablated, strength,
    gate, gate_activation.
    """
    gate = parse_feature(gate)
    st = _setting(model, concepts, vectors, None, injection_layer)
    strengths = list(default_strengths(model) if strengths is None else strengths)
    members = carrier_sets(carriers, sets, weak_from=weak_from)
    union = list(dict.fromkeys(f for name in sets for f in members[name]))
    prompt = trial_prompt(model, trial=trial, variant=variant, persona=persona)
    control = read_features(model, transcoders, union, prompt.tokens) if union else None
    plan = [(c, name, s) for c in range(len(concepts)) for name in sets for s in strengths]
    acts: list[Tensor] = []
    gate_site = transcoder_site(model, transcoders, gate[0])[0]
    for i in range(0, len(plan), batch_size):
        chunk = plan[i : i + batch_size]
        c_idx = [c for c, _, _ in chunk]
        batch = prompt.tokens[None].expand(len(chunk), -1).to(model.cfg.device)
        row_strengths = torch.tensor([s for _, _, s in chunk], dtype=torch.float32)
        with (
            inject(
                model,
                st.vectors[c_idx],
                layer=st.injection_layer,
                strength=row_strengths,
                start=prompt.injection_start,
            ),
            capture(model, [gate_site], positions="last") as read,
        ):
            if union:
                mask = torch.tensor([[f in members[name] for f in union] for _, name, _ in chunk])
                with intervene(
                    model,
                    transcoders,
                    union,
                    target=control,
                    mask=mask,
                    positions=positions,
                    start=prompt.injection_start,
                    scale=scale,
                ):
                    model(batch, stop_at_layer=gate[0] + 1)
            else:
                model(batch, stop_at_layer=gate[0] + 1)
        gate_acts = encode_features(transcoders[gate[0]], read[gate_site][:, 0], torch.tensor([gate[1]]))
        acts.append(gate_acts[:, 0].float().cpu())
    return pd.DataFrame(
        {
            "concept": [concepts[c] for c, _, _ in plan],
            "carrier_set": [n for _, n, _ in plan],
            "n_ablated": [len(members[n]) for _, n, _ in plan],
            "strength": [s for _, _, s in plan],
            "gate": feature_name(*gate),
            "gate_activation": torch.cat(acts).numpy(),
        }
    )


def gate_response(
    model: Model,
    transcoders: Transcoders,
    gate: str | tuple[int, int],
    concepts: Sequence[str],
    *,
    vectors: Float[Tensor, "concept d_model"] | None = None,
    strengths: Sequence[float] | None = None,
    injection_layer: int | None = None,
    trial: int = TRIALS.trial,
    variant: str = TRIALS.variant,
    persona: str = TRIALS.persona,
    batch_size: int = BATCHING.batch_size,
) -> pd.DataFrame:
    """The gate's activation against strength (no intervention): columns concept, strength, gate,
    gate_activation.

    For the base-vs-instruct comparison, call it on both models (each with its own concept vectors, the same
    transcoders) and concatenate with a ``model`` column. ``persona="standard_assistant_raw"`` gives the base
    model the raw ``User: ... Assistant:`` text instead of the chat template (what the paper's released code
    falls back to for a tokenizer without one).
    """
    empty = pd.DataFrame({"feature": [], "attribution": [], "role": []})
    df = carrier_curves(
        model,
        transcoders,
        gate,
        empty,
        concepts,
        vectors=vectors,
        strengths=strengths,
        sets=("none",),
        injection_layer=injection_layer,
        trial=trial,
        variant=variant,
        persona=persona,
        batch_size=batch_size,
    )
    return df.drop(columns=["carrier_set", "n_ablated"])


def success_failure(
    rates: pd.DataFrame, *, n: int = 3, column: str = "detection_rate"
) -> dict[str, list[str]]:
    """The ``n`` concepts with the highest and the lowest ``column`` (e.g. from
    :func:`mechintro.mechanism.features.concept_rates`): ``{"success": [...], "failure": [...]}``."""
    if column not in rates.columns:
        raise ValueError(f"rates has no column {column!r}; it has {list(rates.columns)}")
    ranked = rates.dropna(subset=[column]).sort_values(
        [column, "concept"], ascending=[False, True], kind="stable"
    )
    success = ranked["concept"].head(n).tolist()
    failure = [c for c in ranked["concept"].tail(n).tolist()[::-1] if c not in success]
    return {"success": success, "failure": failure}
