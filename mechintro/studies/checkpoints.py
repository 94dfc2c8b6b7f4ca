"""Checkpoint series: the same introspection trials on every checkpoint of a training pipeline (Figure 5), and
one gate's activation against strength on each (Figure 14).

:func:`compare_checkpoints` runs, for each checkpoint in turn (loaded, run, freed before the next):

* **concept vectors computed on that checkpoint**, at every injection layer of the grid;
* a **layer-fraction x strength grid**: layer ``fraction_layer(fraction, n_layers)`` (the released code's
  ``get_layer_at_fraction``, ``int(fraction x n_layers)`` clamped), as
  ``experiments/03_behavioral_robustness.py`` sweeps fractions 0.4-0.8 x strengths {1, 2, 4, 8} on every OLMo
  stage;
* the same trials (the same trial numbers, seeds and judge) and the controls;
* **base checkpoints in the released raw format**: BOS, then
  ``User: {explanation}\\n\\nAssistant: Ok.\\n\\nUser: Trial {n}: Do you detect an injected thought? If so,
  what is the injected thought about?\\n\\nAssistant:``
  (``experiments/03``'s ``build_base_model_prompt``; mechintro's ``standard_assistant_raw`` persona has this
  exact text), their concept vectors from BOS + ``Tell me about {word}`` without a chat template
  (``extract_concept_vector_base_model``); chat checkpoints through their own chat template.

Every trial goes to one :class:`~mechintro.behaviour.store.TrialStore`, keyed by the checkpoint's identity
(the ``model`` column: the name it was loaded from, plus its adapter) and its prompt format (``persona``), so
one store holds a whole series and a rerun resumes where it stopped.

:func:`compare_gates` measures one gate feature's activation against injection strength on every checkpoint
(:func:`mechintro.mechanism.curves.gate_response`), each with its own concept vectors, and reports beside it
how well the dictionary reconstructs that checkpoint's MLP (:func:`dictionary_fvu`): a dictionary trained
on one checkpoint need not fit another.

:func:`series` names the paper's checkpoint series (the OLMo 3 stages, Gemma 3 27B's base / instruct /
abliterated, the organisms').

Where mechintro differs from ``experiments/03_behavioral_robustness.py`` (compared with the script):

* controls run once per (checkpoint, layer) and serve every strength (the script runs 10 controls per
  concept at every (fraction, strength) configuration); with ``n_trials`` the controls per concept equal
  the injection trials per concept (the script: 100 injection, 10 control per concept);
* a base checkpoint's response is judged whole; the script cuts it at the first hallucinated new turn
  (``extract_first_response``: ``\\nUser:``, ``\\nAssistant:``...) before judging;
* BOS is the tokenizer's ``bos_token`` written before the text (the script calls ``encode()``, which adds
  BOS only when the tokenizer is set to);
* the script's stage plot pools every configuration of a stage and shows standard errors; here each
  configuration has its own row, the pooled row is ``scope == "pooled"``, and intervals are Wilson's;
* the script's third bar is P(correct identification | injected) from its judge; ``introspection`` here is
  P(detected and identified | injected).
"""

from __future__ import annotations

import gc
import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechintro.behaviour.judges import check_judge
from mechintro.behaviour.metrics import detection_metrics
from mechintro.behaviour.plan import SweepConfig, make_config
from mechintro.behaviour.store import TrialStore, opened_store
from mechintro.behaviour.trials import sweep
from mechintro.core import validate
from mechintro.core.concepts import check_concepts, concept_vectors
from mechintro.core.dictionary_sites import fvu, stack_positions
from mechintro.core.hooks import capture
from mechintro.core.models import ORGANISM_NAMES, Model, load_model, spec_for, with_spec
from mechintro.core.paper_models import (
    OLMO_SWEEP_FRACTIONS,
    OLMO_SWEEP_STRENGTHS,
    PAPER_MODELS,
    fraction_layer,
    paper_model,
)
from mechintro.core.prompts import trial_prompt
from mechintro.core.settings import BATCHING
from mechintro.core.transcoders import (
    load_transcoders,
    parse_feature,
    site_check_prompts,
    transcoder_hooks,
)
from mechintro.mechanism.curves import gate_response

__all__ = [
    "CHAT_PERSONA",
    "RAW_PERSONA",
    "SERIES",
    "Checkpoint",
    "compare_checkpoints",
    "compare_gates",
    "dictionary_fvu",
    "prompt_persona",
    "resolve_checkpoints",
    "series",
]

CHAT_PERSONA = "standard_assistant"
"""The persona of a chat checkpoint's trials: the original prompt through its chat template."""
RAW_PERSONA = "standard_assistant_raw"
"""The persona of a base checkpoint's trials: BOS + the released raw ``User: ... Assistant:`` text."""

_SET_BY_STUDY = ("layers", "strengths", "variants", "personas")
"""SweepConfig fields :func:`compare_checkpoints` sets itself (per checkpoint)."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a series: where it comes from, what to call it, how to prompt it."""

    source: Any
    """What to load: a registered name (``"organism-base"``), one of the paper's short names
    (``"olmo_sft"``), a Hugging Face id, a local folder, or a model already loaded with
    :func:`mechintro.load_model` (then used as is, never freed)."""
    label: str | None = None
    """Its name in the results and figures, unique in a series (default: the source's name; a paper model's
    short name)."""
    stage: str | None = None
    """Its training stage (Base, SFT, DPO, Instruct, Abliterated...; default: the paper's record, else
    the stage the model folder records, else the label)."""
    chat: bool | None = None
    """True: prompted through its chat template; False: the released raw format after BOS (a base
    checkpoint). Default: the paper's record, else whether its tokenizer has a chat template (the released
    code's rule)."""
    adapter: str | Path | None = None
    """A peft adapter folder merged into ``source`` when loading (``load_model(source, adapter=...)``);
    part of the checkpoint's identity in the store."""

    def __post_init__(self) -> None:
        """Check the fields (errors name them)."""
        if self.source is None or (isinstance(self.source, str) and not self.source.strip()):
            raise ValueError(
                f"a Checkpoint needs a source (a name, HF id, folder or model), got {self.source!r}"
            )
        for name in ("label", "stage"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"Checkpoint {name} must be non-empty text or None, got {value!r}")
        if self.chat is not None and not isinstance(self.chat, bool):
            raise TypeError(f"Checkpoint chat must be True, False or None, got {self.chat!r}")
        if self.adapter is not None and _is_model(self.source):
            raise ValueError(
                "a Checkpoint with an adapter needs a source to load, not a model already loaded"
            )

    @property
    def name(self) -> str:
        """The label, or the source's name when no label was given."""
        if self.label is not None:
            return self.label
        return _source_name(self.source) + (f"+{Path(self.adapter).name}" if self.adapter else "")


def _is_model(source: Any) -> bool:
    return hasattr(source, "tokenizer") and hasattr(source, "cfg")


def _source_name(source: Any) -> str:
    if _is_model(source):
        return spec_for(source).name
    return str(source)


def _olmo_series() -> tuple[Checkpoint, ...]:
    return tuple(
        Checkpoint(r.key, label=r.stage, stage=r.stage, chat=r.chat)
        for r in PAPER_MODELS
        if r.family == "olmo3"
    )


def _gemma_series() -> tuple[Checkpoint, ...]:
    keys = ("gemma3_27b_pt", "gemma3_27b", "gemma3_27b_abliterated")
    records = [paper_model(k) for k in keys]
    return tuple(Checkpoint(r.key, label=r.stage, stage=r.stage, chat=r.chat) for r in records)


SERIES: dict[str, Any] = {
    "olmo": _olmo_series,
    "gemma3-27b": _gemma_series,
    "organism": lambda: (
        Checkpoint("organism-base", stage="Base"),
        Checkpoint("organism", stage="Instruct"),
    ),
    "organism-olmo": lambda: (
        Checkpoint("organism-olmo-base", stage="Base"),
        Checkpoint("organism-olmo", stage="Instruct"),
    ),
}
"""Named checkpoint series: ``olmo`` (the OLMo 3 stages of Figure 5, labels Base / SFT / DPO / Instruct, the
base prompted raw), ``gemma3-27b`` (Figure 14's base / instruct / abliterated checkpoints), ``organism`` and
``organism-olmo`` (each organism's base and instruct checkpoints; both have a chat template, on which the
base was trained)."""


def series(name: str) -> tuple[Checkpoint, ...]:
    """The checkpoints of the named series (:data:`SERIES`), in training order."""
    if name not in SERIES:
        raise ValueError(f"unknown checkpoint series {name!r}; valid: {sorted(SERIES)}")
    return SERIES[name]()


def resolve_checkpoints(checkpoints: Any) -> list[Checkpoint]:
    """``checkpoints`` as a list of :class:`Checkpoint`: a series name, or a list of checkpoints, names,
    ids, folders or loaded models. Refuses an empty list and two checkpoints with one label or one source."""
    if isinstance(checkpoints, str) and checkpoints in SERIES:
        return list(series(checkpoints))
    if isinstance(checkpoints, (str, Path, Checkpoint)) or _is_model(checkpoints):
        checkpoints = [checkpoints]
    out = [c if isinstance(c, Checkpoint) else Checkpoint(c) for c in checkpoints]
    if not out:
        raise ValueError(
            f"no checkpoints given; pass a list of checkpoints, names or models, or a series of "
            f"{sorted(SERIES)}"
        )
    labels = [c.name for c in out]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ValueError(
            f"checkpoint labels must be unique, got {repeated} more than once (labels: {labels})"
        )
    sources = [_source_key(c) for c in out]
    twice = sorted({str(s) for s in sources if sources.count(s) > 1})
    if twice:
        raise ValueError(
            f"the same checkpoint is listed more than once ({twice}): its trials would be one set of rows in "
            "the store; list it once, or give the copies different adapters"
        )
    return out


def _source_key(cp: Checkpoint) -> tuple:
    if _is_model(cp.source):
        return ("model", id(cp.source))
    record = paper_model(str(cp.source))
    name = record.hf_id if record is not None else str(cp.source)
    return (name, None if cp.adapter is None else str(cp.adapter))


def prompt_persona(chat: bool) -> str:
    """The trial persona of a chat (:data:`CHAT_PERSONA`) or base (:data:`RAW_PERSONA`) checkpoint."""
    return CHAT_PERSONA if chat else RAW_PERSONA


# ----------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Loaded:
    """A checkpoint loaded: the model and the settings resolved on it."""

    model: Model
    label: str
    stage: str
    chat: bool
    identity: str
    """The store's ``model`` column for its trials."""


def _default_stage(cp: Checkpoint, model: Model) -> str:
    if cp.stage is not None:
        return cp.stage
    record = paper_model(str(cp.source)) if not _is_model(cp.source) else None
    if record is not None:
        return record.stage
    spec = spec_for(model)
    if spec.name in ORGANISM_NAMES:
        return "Base" if spec.name.endswith("-base") else "Instruct"
    recorded = spec.extra.get("stage")
    return str(recorded).capitalize() if recorded else cp.name


def _default_chat(cp: Checkpoint, model: Model) -> bool:
    if cp.chat is not None:
        return cp.chat
    record = paper_model(spec_for(model).name)
    if record is not None:
        return record.chat
    return getattr(model.tokenizer, "chat_template", None) is not None


def _load_source(cp: Checkpoint, *, device: Any, dtype: Any) -> Model:
    kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    if cp.adapter is not None:
        if "adapter" not in inspect.signature(load_model).parameters:
            raise NotImplementedError(
                f"checkpoint {cp.name!r} has an adapter, but this mechintro's load_model takes no adapter="
            )
        kwargs["adapter"] = cp.adapter
    return load_model(cp.source, **kwargs)


@contextmanager
def _loaded(cp: Checkpoint, *, device: Any, dtype: Any, seen: set[str]) -> Iterator[_Loaded]:
    """The checkpoint loaded (a model given is used as is); a model loaded here is freed on leaving."""
    owned = not _is_model(cp.source)
    model = _load_source(cp, device=device, dtype=dtype) if owned else cp.source
    try:
        identity = spec_for(model).name
        if cp.adapter is not None and str(cp.adapter) not in identity:
            identity = with_spec(model, name=f"{identity}+adapter:{cp.adapter}").name
        if identity in seen:
            raise ValueError(
                f"checkpoint {cp.name!r} is {identity!r}, which another checkpoint of the series is too; "
                "their trials would be one set of rows in the store"
            )
        seen.add(identity)
        yield _Loaded(
            model=model,
            label=cp.name,
            stage=_default_stage(cp, model),
            chat=_default_chat(cp, model),
            identity=identity,
        )
    finally:
        if owned:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- Figure 5


def _check_fractions(fractions: Sequence[float] | None) -> list[float] | None:
    if fractions is None:
        return None
    if isinstance(fractions, (int, float)):
        fractions = [fractions]
    out = [validate.finite_number("layer fraction", f) for f in fractions]
    bad = [f for f in out if not 0.0 <= f <= 1.0]
    if not out or bad or len(set(out)) != len(out):
        raise ValueError(
            f"layer_fractions must be distinct numbers in [0, 1] (the released sweep: "
            f"{list(OLMO_SWEEP_FRACTIONS)}), got {list(fractions)!r}"
        )
    return out


def _layers(model: Model, fractions: list[float] | None) -> dict[float, int]:
    """``{fraction: layer}``; without fractions, ``{nan: the model's injection layer}``."""
    spec = spec_for(model)
    if fractions is None:
        return {math.nan: spec.injection_layer}
    return {f: fraction_layer(f, spec.n_layers) for f in fractions}


def checkpoint_vectors(
    model: Model,
    concepts: Sequence[str],
    *,
    layers: Sequence[int],
    chat: bool,
    baseline: Sequence[str] | None = None,
) -> dict[int, Float[Tensor, "concept d_model"]]:
    """``{layer: [n_concepts, d_model]}`` concept vectors computed on ``model`` at each layer, in its prompt
    format (``chat=False``: BOS + raw text, as the released code does for a base checkpoint)."""
    return {
        layer: concept_vectors(model, concepts, layer=layer, baseline=baseline, chat=chat) for layer in layers
    }


def _checkpoint_frame(
    loaded: _Loaded,
    concepts: list[str],
    config: SweepConfig,
    fractions: list[float] | None,
    *,
    judge: Any,
    store: TrialStore,
    baseline: Sequence[str] | None,
    executor: Any,
) -> pd.DataFrame:
    """One checkpoint's cells (one row per fraction and strength) and its pooled row."""
    model = loaded.model
    by_fraction = _layers(model, fractions)
    layers = sorted(set(by_fraction.values()))
    vectors = checkpoint_vectors(model, concepts, layers=layers, chat=loaded.chat, baseline=baseline)
    run = replace(
        config, layers=tuple(layers), variants=("original",), personas=(prompt_persona(loaded.chat),)
    )
    trials = sweep(model, concepts, run, judge=judge, store=store, vectors=vectors, executor=executor)
    cells = detection_metrics(trials, by=["layer", "strength"])
    grid = pd.DataFrame({"layer_fraction": list(by_fraction), "layer": list(by_fraction.values())})
    cells = grid.merge(cells, on="layer", how="left").assign(scope="cell")
    pooled = detection_metrics(trials, by=[]).assign(
        scope="pooled", layer_fraction=math.nan, strength=math.nan
    )
    pooled = pooled.assign(layer=pd.array([pd.NA], dtype="Int64"))
    frame = pd.concat([cells.astype({"layer": "Int64"}), pooled], ignore_index=True)
    head = {
        "checkpoint": loaded.label,
        "stage": loaded.stage,
        "model": loaded.identity,
        "chat": loaded.chat,
        "persona": prompt_persona(loaded.chat),
        "n_layers": spec_for(model).n_layers,
    }
    frame = frame.assign(**head)
    front = [*head, "scope", "layer_fraction", "layer", "strength"]
    return frame[front + [c for c in frame.columns if c not in front]]


def compare_checkpoints(
    checkpoints: Any,
    concepts: Sequence[str],
    *,
    n_trials: int,
    judge: Any,
    layer_fractions: Sequence[float] | None = OLMO_SWEEP_FRACTIONS,
    strengths: Sequence[float] = OLMO_SWEEP_STRENGTHS,
    store: TrialStore | str | Path | None = None,
    baseline: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    executor: Any = "local",
    **settings: Any,
) -> pd.DataFrame:
    """Run the same introspection trials on every checkpoint of a series; one tidy metrics frame (Figure 5).

    Args:
        checkpoints: a series name (:data:`SERIES`, e.g. ``"olmo"``), or a list of :class:`Checkpoint` s,
            names / ids / folders (loaded in turn, each freed before the next) or loaded models.
        concepts: the concept words (their vectors are computed on each checkpoint).
        n_trials: trials per concept and condition (the paper: 100).
        judge: one judge for every checkpoint (``RuleJudge()``, ``LLMJudge(...)``, ``LogitJudge()``).
        layer_fractions: injection depths; the layer is ``fraction_layer(fraction, n_layers)`` on each
            checkpoint (default: the released sweep 0.4..0.8). Two fractions that give one layer share its
            trials. None: each checkpoint's own injection layer (``layer_fraction`` NaN).
        strengths: injection strengths (default: the released sweep 1, 2, 4, 8).
        store: a :class:`~mechintro.behaviour.store.TrialStore` or its path; every trial of every checkpoint
            is written there (the checkpoint's identity in the ``model`` column), and a rerun runs only what
            is missing. None: an in-memory store for this call.
        baseline: the baseline words of the concept vectors (default: the paper's 99).
        device / dtype: for the checkpoints loaded here (:func:`mechintro.load_model`'s).
        executor: where the batches run (``"local"``; ``"ray"`` loads each checkpoint by name in its actors,
            so not a checkpoint with an adapter).
        **settings: other :class:`~mechintro.behaviour.plan.SweepConfig` fields (``forced=True`` for forced
            identification, ``controls``, ``temperature``, ``max_new_tokens``, ``seed``, ``trials``,
            ``batch_size``, ``progress``...); the layers, strengths, variant and persona are set here.

    Returns one row per (checkpoint, layer fraction, strength) with ``scope == "cell"``, and one per
    checkpoint with ``scope == "pooled"`` (every injection and control trial of its grid pooled, as the
    released stage plot does): checkpoint (the label), stage, model (the store identity), chat, persona,
    n_layers, scope, layer_fraction, layer, strength, then the columns of
    :func:`~mechintro.behaviour.metrics.detection_metrics`: n_injection, n_control, n_forced, n_errors...,
    tpr, fpr, discrimination (TPR - FPR, Newcombe interval), introspection, id_given_detection, forced_id
    (NaN unless ``forced=True``), each rate with its 95% Wilson ``_lo`` / ``_hi``.
    """
    set_here = sorted(set(settings) & set(_SET_BY_STUDY))
    if set_here:
        raise TypeError(
            f"compare_checkpoints sets {set_here} itself; give layer_fractions= and strengths= instead"
        )
    checkpoints = resolve_checkpoints(checkpoints)
    concepts = check_concepts(concepts)
    check_judge(judge)
    fractions = _check_fractions(layer_fractions)
    config = make_config(SweepConfig, None, {"n_trials": n_trials, "strengths": tuple(strengths), **settings})
    frames, seen = [], set()
    with opened_store(store) as opened:
        for cp in checkpoints:
            with _loaded(cp, device=device, dtype=dtype, seen=seen) as loaded:
                frames.append(
                    _checkpoint_frame(
                        loaded,
                        concepts,
                        config,
                        fractions,
                        judge=judge,
                        store=opened,
                        baseline=baseline,
                        executor=executor,
                    )
                )
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------------------------- Figure 14


def _fvu_prompts(model: Model, *, chat: bool, n_prompts: int) -> list[Tensor]:
    """Trial prompts in the checkpoint's own format: the reconstruction check's (chat), or the raw format's
    trials 1..n (base)."""
    from mechintro.core.dictionary_sites import SiteCheck

    if chat:
        return site_check_prompts(model, SiteCheck(n_prompts=n_prompts))
    return [trial_prompt(model, trial=i + 1, persona=RAW_PERSONA).tokens for i in range(n_prompts)]


def dictionary_fvu(model: Model, transcoder: Any, *, chat: bool = True, n_prompts: int = 3) -> float:
    """The fraction of variance a transcoder leaves unexplained on ``model``: ``Σ|tc(x) - y|² / Σ|y - ȳ|²``.

    ``x`` and ``y`` are the model's activations at the sites the transcoder is wired to
    (:func:`~mechintro.core.transcoders.transcoder_hooks`) at every position but the first (the attention
    sink), over ``n_prompts`` trial prompts in the checkpoint's format: with ``chat`` the prompts of the
    loading check (:func:`~mechintro.core.transcoders.site_check_prompts`, so the number equals the one
    that check compares), else the raw format's trials 1..n. 0 is perfect; 1 is no better than the mean.
    """
    n_prompts = validate.count("n_prompts", n_prompts)
    hook_in, hook_out = transcoder_hooks(transcoder)
    layer = int(hook_in.split(".")[1])
    xs, ys = [], []
    device = model.cfg.device
    with torch.no_grad():
        for tokens in _fvu_prompts(model, chat=chat, n_prompts=n_prompts):
            with capture(model, [hook_in, hook_out], positions="all") as acts:
                model(tokens[None].to(device), stop_at_layer=layer + 1)
            xs.append(acts[hook_in])
            ys.append(acts[hook_out])
        x, y = stack_positions(xs), stack_positions(ys)
        w = transcoder.W_enc
        pred = transcoder(x.to(w.device, w.dtype)).float().cpu()
    return fvu(pred, y.float())


def _dictionary(
    transcoders: Any, loaded: _Loaded, layer: int, *, id_pattern: str | None
) -> tuple[Mapping[int, Any], str]:
    """``({layer: transcoder}, its source)`` loaded on one checkpoint: its own (``"own"`` or None), or
    ``transcoders`` (a source)."""
    source = None if transcoders == "own" else transcoders
    tcs = load_transcoders(loaded.model, [layer], source=source, id_pattern=id_pattern)
    return tcs, str(source if source is not None else spec_for(loaded.model).transcoder_release)


def compare_gates(
    checkpoints: Any,
    gate: str | tuple[int, int],
    concepts: Sequence[str],
    *,
    transcoders: str | Path | Mapping[int, Any] | None = None,
    reference: str | None = None,
    id_pattern: str | None = None,
    strengths: Sequence[float] | None = None,
    layer_fraction: float | None = None,
    injection_layer: int | None = None,
    baseline: Sequence[str] | None = None,
    n_prompts: int = 3,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = BATCHING.batch_size,
) -> pd.DataFrame:
    """One gate feature's activation against injection strength on every checkpoint (Figure 14), with the
    dictionary's reconstruction error on each.

    Each checkpoint uses its own concept vectors (in its own prompt format) and its own trial prompt (raw
    for a base checkpoint); the gate is read at the last prompt token, with no intervention
    (:func:`mechintro.mechanism.curves.gate_response`).

    Args:
        gate: ``"L3 F12"`` or ``(layer, feature)``.
        transcoders: the dictionary whose feature the gate is. None (default): the ``reference``
            checkpoint's own, loaded (and checked) on it and used on every checkpoint, so the feature is
            the same one everywhere; a source (a sae-lens release or a folder), loaded on the reference
            likewise; a ``{layer: transcoder}`` mapping already loaded; ``"own"``: each checkpoint's own
            dictionary (then feature ``F`` is a different feature on each, unless the dictionaries are one).
        reference: the label of the checkpoint the dictionary is loaded on (default: the last one).
        strengths: injection strengths (default: the reference's strength sweep).
        layer_fraction / injection_layer: where to inject: ``fraction_layer(fraction, n_layers)`` on each
            checkpoint, or one absolute layer; default: each checkpoint's injection layer.
        n_prompts: trial prompts the reconstruction error is measured on (:func:`dictionary_fvu`).

    Returns columns checkpoint, stage, model, chat, layer (the injection layer), concept, strength, gate,
    gate_activation, fvu (the dictionary's reconstruction error on this checkpoint, the same on each of its
    rows) and dictionary (its source).
    """
    checkpoints = resolve_checkpoints(checkpoints)
    concepts = check_concepts(concepts)
    gate = parse_feature(gate)
    labels = [c.name for c in checkpoints]
    if reference is not None and reference not in labels:
        raise ValueError(f"unknown reference checkpoint {reference!r}; valid: {labels}")
    if layer_fraction is not None and injection_layer is not None:
        raise ValueError("give layer_fraction or injection_layer, not both")
    fraction = None if layer_fraction is None else _check_fractions([layer_fraction])[0]
    ref = labels.index(reference) if reference is not None else len(labels) - 1
    order = [ref, *[i for i in range(len(checkpoints)) if i != ref]]  # the reference first: its dictionary
    shared, source, frames, seen = None, "", {}, set()
    if isinstance(transcoders, Mapping):
        if gate[0] not in transcoders:
            raise ValueError(f"transcoders has no layer {gate[0]} (the gate's); it has {sorted(transcoders)}")
        shared, source = {gate[0]: transcoders[gate[0]]}, "given"
    for i in order:
        with _loaded(checkpoints[i], device=device, dtype=dtype, seen=seen) as loaded:
            model, spec = loaded.model, spec_for(loaded.model)
            if transcoders == "own" or (shared is None and i == ref):
                tcs, used = _dictionary(transcoders, loaded, gate[0], id_pattern=id_pattern)
                if transcoders != "own":
                    shared, source = tcs, used
            else:
                tcs, used = shared, source
            if strengths is None:
                strengths = spec.strength_sweep
            if injection_layer is not None:
                layer = spec.check_layer(injection_layer)
            elif fraction is not None:
                layer = fraction_layer(fraction, spec.n_layers)
            else:
                layer = spec.injection_layer
            vectors = concept_vectors(model, concepts, layer=layer, baseline=baseline, chat=loaded.chat)
            df = gate_response(
                model,
                tcs,
                gate,
                concepts,
                vectors=vectors,
                strengths=strengths,
                injection_layer=layer,
                persona=prompt_persona(loaded.chat),
                batch_size=batch_size,
            )
            error = dictionary_fvu(model, tcs[gate[0]], chat=loaded.chat, n_prompts=n_prompts)
            head = {
                "checkpoint": loaded.label,
                "stage": loaded.stage,
                "model": loaded.identity,
                "chat": loaded.chat,
                "layer": layer,
            }
            frames[i] = df.assign(**head, fvu=error, dictionary=used)[
                [*head, "concept", "strength", "gate", "gate_activation", "fvu", "dictionary"]
            ]
    return pd.concat([frames[i] for i in range(len(checkpoints))], ignore_index=True)
