"""Per-layer attention / MLP mean ablation and activation patching, batched across interventions.

For every layer after the injection layer and each component (attention output ``hook_attn_out``, MLP output
``hook_mlp_out``; both are what the block adds to the residual stream, after Gemma's post-norms):

1. **ablation** -- in steered runs, replace the component's output with its mean over matched unsteered
   runs; metric: the Yes-vs-No logit gap at the last prompt token.
2. **patching** -- put the steered output into an unsteered run; metric: the same gap.
3. **forced_ablation** -- the ablation on the forced-identification prompt (the prefill appended); metric:
   P(concept's first token) at the last prompt token.

The metrics are those of :mod:`mechintro.core.readout` (``yes_no_gap``, ``concept_logprob``), i.e. the
LogitJudge's scores.

**Matched unsteered runs.** The unsteered run of a steered trial is the same prompt (same trial number) with
no injection. A forward pass over the prompt is deterministic, so at prompt positions the mean over repeated
unsteered runs is that one run's value: with ``reference="matched"`` (default) each steered (concept, trial)
row is ablated with the unsteered run of its own trial number. ``reference="trial_mean"`` uses the mean over
every trial number's unsteered run instead (positions aligned from the injection start; the prompts must
then have equal lengths from there on).

**Positions.** ``positions="from_start"`` (default) replaces every position from the injection start to the
last prompt token (before the start the steered and unsteered runs are identical anyway);
``positions="last"`` replaces only the last prompt token.

**Batching.** One cached unsteered run and one cached steered run (all concepts in one batch) per prompt;
then batched forwards with one row per (layer, component, concept) intervention, each row with a hook that
overwrites its own (layer, component) with the stored values (:func:`replacement_hooks`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechintro.core.concepts import check_concepts, concept_vectors
from mechintro.core.hooks import capture, check_layer, hooks_context, tracker
from mechintro.core.models import HookNames, Model, require_mechanism, spec_for
from mechintro.core.progress import progress_bar
from mechintro.core.prompts import TrialPrompt, forced_prefill, trial_prompt
from mechintro.core.readout import (
    DetectionWeights,
    concept_log_odds,
    concept_logprob,
    concept_token_ids,
    detection_log_odds,
    detection_weights,
    yes_no_gap,
)
from mechintro.core.settings import BATCHING, COMPONENTS, EXPERIMENTS, TRIALS, Component, Experiment
from mechintro.core.stats import mean_ci
from mechintro.core.steering import inject

__all__ = [
    "COMPONENTS",
    "EXPERIMENTS",
    "PatchingConfig",
    "Replacement",
    "capture_sites",
    "component_patching",
    "replacement_hooks",
    "summarize_patching",
]

LayerComponent = tuple[int, str]
"""A (layer, component) pair."""


@dataclass(frozen=True)
class PatchingConfig:
    """Settings of :func:`component_patching`."""

    layers: tuple[int, ...] | None = None
    """Layers to intervene on (default: every layer after the injection layer)."""
    components: tuple[Component, ...] = COMPONENTS
    """Components per layer, from :data:`COMPONENTS`."""
    experiments: tuple[Experiment, ...] = EXPERIMENTS
    """Experiments to run, from :data:`EXPERIMENTS`."""
    positions: Literal["from_start", "last"] = "from_start"
    """``"from_start"`` (every prompt position from the injection start) or ``"last"`` (last prompt token)."""
    reference: Literal["matched", "trial_mean"] = "matched"
    """Ablation values: ``"matched"`` (the same trial's unsteered run) or ``"trial_mean"`` (mean over
    trials)."""
    trials: tuple[int, ...] = (TRIALS.trial,)
    """Trial numbers; each is its own prompt."""
    strength: float | None = None
    """Injection strength (default: the model's)."""
    injection_layer: int | None = None
    """Injection layer (default: the model's)."""
    variant: str = TRIALS.variant
    """Prompt variant."""
    batch_size: int = BATCHING.batch_size
    """Rows per batched forward (results do not depend on it)."""
    metric: Literal["gap", "log_odds"] = "gap"
    """``"gap"``: the Yes-No logit gap (P(concept) for forced rows), mechintro's readout; ``"log_odds"``: the
    paper's released per-layer metric, detection-weighted log-odds (concept log-odds for forced rows)."""

    def __post_init__(self) -> None:
        for name, values, valid in (
            ("components", self.components, COMPONENTS),
            ("experiments", self.experiments, EXPERIMENTS),
        ):
            bad = [v for v in values if v not in valid]
            if bad or not values:
                raise ValueError(f"unknown {name} {bad or list(values)}; valid: {list(valid)}")
        if self.positions not in ("from_start", "last"):
            raise ValueError(f"unknown positions {self.positions!r}; valid: ['from_start', 'last']")
        if self.reference not in ("matched", "trial_mean"):
            raise ValueError(f"unknown reference {self.reference!r}; valid: ['matched', 'trial_mean']")
        if self.metric not in ("gap", "log_odds"):
            raise ValueError(f"unknown metric {self.metric!r}; valid: ['gap', 'log_odds']")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


# ----------------------------------------------------------------------------------------------- hooks


def _hook_name(site: LayerComponent) -> str:
    layer, component = site
    return HookNames.component(component, layer)


@dataclass(frozen=True)
class Replacement:
    """Overwrite one site in some batch rows with stored values."""

    rows: Int[Tensor, " n"]
    """Batch rows to overwrite."""
    values: Float[Tensor, "n pos d_model"] | Float[Tensor, "1 pos d_model"]
    """Their new values at ``positions`` (one row is broadcast to every listed row)."""


def replacement_hooks(
    model: Model,
    replacements: Mapping[LayerComponent, Replacement | Sequence[Replacement]],
    *,
    positions: slice,
) -> list[tuple[str, Any]]:
    """A hook list that overwrites ``x[rows, positions]`` of each site with the stored values.

    ``positions`` is a slice of absolute positions (``start`` and ``stop`` given). Each forward call
    overwrites
    the part of it that it covers (read from the model's :class:`mechintro.core.hooks.PositionTracker`), so
    the
    hooks compose with a shared prefix cache and with generation (decoding steps past ``stop`` are left
    alone).
    """
    if positions.start is None or positions.stop is None or positions.step not in (None, 1):
        raise ValueError(f"positions must be a slice with a start and a stop, got {positions!r}")
    track = tracker(model)

    def make(reps: Sequence[Replacement]):
        def hook(x: Float[Tensor, "b s d"], hook: Any = None) -> Float[Tensor, "b s d"]:
            seq = x.shape[1]
            offset = track.offset if track.seq == seq else 0
            lo, hi = max(positions.start, offset), min(positions.stop, offset + seq)
            if lo >= hi:
                return x
            x = x.clone()
            for rep in reps:
                rows = rep.rows.to(x.device)
                values = rep.values[:, lo - positions.start : hi - positions.start]
                x[rows, lo - offset : hi - offset] = values.to(device=x.device, dtype=x.dtype).expand(
                    len(rows), -1, -1
                )
            return x

        return hook

    out = []
    for site, reps in replacements.items():
        reps = [reps] if isinstance(reps, Replacement) else list(reps)
        out.append((_hook_name(site), make(reps)))
    return out


@torch.no_grad()
def capture_sites(
    model: Model, tokens: Int[Tensor, "batch seq"], sites: Sequence[LayerComponent], *, positions: slice
) -> tuple[dict[LayerComponent, Float[Tensor, "batch pos d_model"]], Float[Tensor, "batch vocab"]]:
    """Outputs of ``sites`` at ``positions`` (a slice of absolute positions) and the last-position logits,
    from one forward of ``tokens``. Install ``inject`` (or anything else) around the call for a steered run.
    """
    names = {_hook_name(site): site for site in sites}
    wanted = list(range(positions.start, positions.stop))
    with capture(model, list(names), positions=wanted) as acts:
        logits = model(tokens.to(model.cfg.device))[:, -1].float()
    return {site: acts[name] for name, site in names.items()}, logits


# ----------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class _Prompt:
    experiment: str
    trial: int
    prompt: TrialPrompt


@dataclass(frozen=True)
class _Reader:
    """Reads the metric of an experiment off last-position logits (see :attr:`PatchingConfig.metric`)."""

    model: Model
    metric: str
    detection: DetectionWeights | None

    def __call__(self, logits: Tensor, experiment: str, concepts: Sequence[str]) -> tuple[str, Tensor]:
        forced = experiment == "forced_ablation"
        if forced:
            ids = concept_token_ids(self.model, list(concepts))
            if self.metric == "log_odds":
                return "concept_log_odds", concept_log_odds(logits, ids)
            return "p_concept", concept_logprob(logits, ids).exp()
        if self.metric == "log_odds":
            return "detection_log_odds", detection_log_odds(logits, self.detection)
        return "gap", yes_no_gap(logits, spec_for(self.model))


def _rows_frame(
    experiment: str, kind: str, trial: int, metric: str, values: Tensor, *, concepts, sites
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "experiment": experiment,
            "kind": kind,
            "layer": pd.array([s[0] if s else pd.NA for s in sites], dtype="Int64"),
            "component": [s[1] if s else "" for s in sites],
            "concept": list(concepts),
            "trial": trial,
            "metric": metric,
            "value": values.cpu().numpy(),
        }
    )


def _interventions(
    model: Model,
    tokens: Tensor,
    *,
    rows: list[tuple[LayerComponent, int]],
    values: Mapping[LayerComponent, Tensor],
    steered_rows: bool,
    vectors: Tensor,
    strength: float,
    injection_layer: int,
    start: int,
    positions: slice,
    batch_size: int,
) -> Tensor:
    """Last-position logits of every (site, concept) row, in chunks; ``values[site]`` is [1 | concept, pos,
    d]."""
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        reps: dict[LayerComponent, list[Replacement]] = {}
        for r, (site, c) in enumerate(chunk):
            v = values[site]
            reps.setdefault(site, []).append(
                Replacement(torch.tensor([r]), v[c : c + 1] if v.shape[0] > 1 else v)
            )
        concept_idx = torch.tensor([c for _, c in chunk])
        batch = tokens[None].expand(len(chunk), -1).to(model.cfg.device)
        with (
            inject(
                model,
                vectors[concept_idx],
                layer=injection_layer,
                strength=strength if steered_rows else 0.0,
                start=start,
            ),
            hooks_context(model, replacement_hooks(model, reps, positions=positions)),
        ):
            out.append(model(batch)[:, -1].float())
    return torch.cat(out)


def _positions(cfg: PatchingConfig, prompt: TrialPrompt) -> slice:
    seq = len(prompt.tokens)
    return slice(seq - 1, seq) if cfg.positions == "last" else slice(prompt.injection_start, seq)


def _trial_mean(clean: dict[int, dict[LayerComponent, Tensor]]) -> dict[LayerComponent, Tensor]:
    shapes = {t: next(iter(v.values())).shape[1] for t, v in clean.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(
            f"reference='trial_mean' needs equal prompt lengths from the injection start; got {shapes}"
        )
    sites = next(iter(clean.values())).keys()
    return {s: torch.stack([clean[t][s] for t in clean]).mean(0) for s in sites}


@torch.no_grad()
def component_patching(
    model: Model,
    concepts: Sequence[str],
    *,
    vectors: Float[Tensor, "concept d_model"] | None = None,
    config: PatchingConfig | None = None,
    detection: DetectionWeights | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-layer attention / MLP ablation and patching (see the module docstring).

    Args:
        concepts: concept words.
        vectors: ``[concept, d_model]`` concept vectors (computed at the injection layer when None).
        config: the settings (:class:`PatchingConfig`).
        detection: the weights of ``metric="log_odds"`` (:func:`mechintro.core.readout.detection_weights`
            of judged trials); default: Yes tokens weigh 1 and No tokens 0.
        progress: show a progress bar over the intervention rows.

    Returns a tidy DataFrame: experiment, kind (``"intervention"``, or the baselines ``"steered"`` and
    ``"unsteered"``), layer and component (NA / "" for baselines), concept, trial, metric (``"gap"`` or
    ``"p_concept"``, or ``"detection_log_odds"`` / ``"concept_log_odds"``), value. :func:`summarize_patching`
    averages it across concepts with 95% CIs.
    """
    require_mechanism(model, "component patching")
    cfg = config or PatchingConfig()
    concepts = check_concepts(concepts)
    spec = spec_for(model)
    inj = spec.injection_layer if cfg.injection_layer is None else check_layer(model, cfg.injection_layer)
    strength = spec.strength if cfg.strength is None else float(cfg.strength)
    layers = cfg.layers if cfg.layers is not None else tuple(range(inj + 1, spec.n_layers))
    sites = [(check_layer(model, layer), comp) for layer in layers for comp in cfg.components]
    if vectors is None:
        vectors = concept_vectors(model, list(concepts), layer=inj)
    vectors = torch.as_tensor(vectors).float()
    read = _Reader(model, cfg.metric, detection if detection is not None else detection_weights(model))
    frames = []
    total = len(cfg.experiments) * len(cfg.trials) * len(sites) * len(concepts)
    bar = progress_bar(total=total, desc="component patching", unit="row", enabled=progress)
    for forced in (False, True):
        experiments = [e for e in cfg.experiments if (e == "forced_ablation") == forced]
        if not experiments:
            continue
        prompts = {
            t: trial_prompt(model, trial=t, variant=cfg.variant, prefill=forced_prefill() if forced else None)
            for t in cfg.trials
        }
        frames += _run_prompts(
            model,
            prompts,
            experiments,
            concepts=concepts,
            vectors=vectors,
            sites=sites,
            cfg=cfg,
            inj=inj,
            strength=strength,
            read=read,
            bar=bar,
        )
    bar.close()
    return pd.concat(frames, ignore_index=True)


def _run_prompts(
    model: Model,
    prompts: dict[int, TrialPrompt],
    experiments: list[str],
    *,
    concepts,
    vectors,
    sites,
    cfg,
    inj,
    strength,
    read,
    bar,
) -> list[pd.DataFrame]:
    clean, steered, baselines = {}, {}, {}
    for t, p in prompts.items():
        pos = _positions(cfg, p)
        clean[t], clean_logits = capture_sites(model, p.tokens[None], sites, positions=pos)
        batch = p.tokens[None].expand(len(concepts), -1)
        with inject(model, vectors, layer=inj, strength=strength, start=p.injection_start):
            steered[t], steered_logits = capture_sites(model, batch, sites, positions=pos)
        baselines[t] = (clean_logits.expand(len(concepts), -1), steered_logits)
    reference = _trial_mean(clean) if cfg.reference == "trial_mean" else None
    frames = []
    for t, p in prompts.items():
        pos = _positions(cfg, p)
        for experiment in experiments:
            for kind, logits in (("unsteered", baselines[t][0]), ("steered", baselines[t][1])):
                metric, value = read(logits, experiment, concepts)
                frames.append(
                    _rows_frame(
                        experiment, kind, t, metric, value, concepts=concepts, sites=[None] * len(concepts)
                    )
                )
            patch = experiment == "patching"
            values = steered[t] if patch else (reference if reference is not None else clean[t])
            rows = [(site, c) for site in sites for c in range(len(concepts))]
            logits = _interventions(
                model,
                p.tokens,
                rows=rows,
                values=values,
                steered_rows=not patch,
                vectors=vectors,
                strength=strength,
                injection_layer=inj,
                start=p.injection_start,
                positions=pos,
                batch_size=cfg.batch_size,
            )
            metric, value = read(logits, experiment, [concepts[c] for _, c in rows])
            bar.update(len(rows))
            frames.append(
                _rows_frame(
                    experiment,
                    "intervention",
                    t,
                    metric,
                    value,
                    concepts=[concepts[c] for _, c in rows],
                    sites=[s for s, _ in rows],
                )
            )
    return frames


def summarize_patching(df: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """Mean over concepts (trials averaged within a concept) with a Student-t CI, per experiment, kind,
    layer and component. Columns: experiment, kind, layer, component, metric, mean, lo, hi, sem, n."""
    by = ["experiment", "kind", "layer", "component", "metric"]
    return mean_ci(df, by, value="value", unit="concept", level=level)
