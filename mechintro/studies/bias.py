"""Underelicited introspection: a trained bias vector.

The paper shows that a model's default introspection understates what it can do, with two simple
interventions: a trained bias vector (here) and directional ablation (:mod:`mechintro.mechanism.directions`).
Both are general tools.

**A trained bias vector** (:func:`train_bias_vector`). One learnable vector is added to ``hook_mlp_out`` of
one layer (or one vector per layer of a list, or of every layer), at every position, while every model weight
stays frozen. It is trained on trial dialogues of the *training* concepts only -- a concept injected at a
random layer and strength, or a control (no injection) with probability ``control_fraction`` -- with the
model's own answer grammar as targets and the loss on the answer tokens only. The loss is the behaviour
layer's trial-dialogue loss (:func:`mechintro.behaviour.dialogue.trial_dialogue_loss`: a shared-prefix KV
cache, injections through :func:`mechintro.core.steering.inject`), the one the organism is trained with, so
the bias sees exactly the computation evaluation runs.

* Labels: ``"instruct"`` (default) follows the organism's instruct rule, "Yes" iff ``|strength|`` reaches its
  detection threshold (``organism_config.detect_threshold`` in the spec); ``"injected"`` labels every
  injection "Yes".
* Held-out concepts are refused, and neither their vectors nor their names ever reach the model while
  training (tested with a spy).
* Concept vectors are always computed **without** the bias (the injected vector is the same in every arm).
* The result, a :class:`BiasVector`, is small (vectors + settings + training log), saved as safetensors +
  JSON, and applied with ``with bias_vector(model, artifact):``, which composes with ``inject``, feature
  interventions, directional ablation, captures and (KV-cached) generation: the vector is added at every
  position of every call.

**Dose-equivalent gain** (:func:`dose_equivalent_gain`): the increase in injection strength that gives,
without the bias, the TPR measured with it. It separates "the bias elicits" from "the bias moves the
threshold": a gain the no-bias curve cannot reach at any strength (``inf``) is more than a threshold shift.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechintro.behaviour import dialogue
from mechintro.behaviour.metrics import newcombe_interval, wilson_interval
from mechintro.core import resources, validate
from mechintro.core.concepts import concept_vectors, heldout_concepts
from mechintro.core.fingerprint import weights_fingerprint
from mechintro.core.hooks import check_layer, hooks_context
from mechintro.core.models import PAPER_N_LAYERS, HookNames, Model, spec_for
from mechintro.core.progress import progress_bar
from mechintro.mechanism.directions import layer_list

__all__ = [
    "LABELS",
    "PAPER_FIG2_CELLS",
    "PAPER_TEXT",
    "BiasSettings",
    "BiasVector",
    "arm_gains",
    "bias_settings",
    "bias_trials",
    "bias_vector",
    "dose_equivalent_gain",
    "dose_equivalent_strength",
    "load_bias_vector",
    "paper_bias_injection_sweep",
    "paper_bias_layer_sweep",
    "paper_default_baselines",
    "train_bias_vector",
    "train_or_load_bias",
]

Labels: TypeAlias = Literal["instruct", "injected"]

LABELS: tuple[Labels, ...] = ("instruct", "injected")
"""How training injections are labelled: the organism's instruct rule, or every injection "Yes"."""

DEFAULT_EPOCHS = 2
"""Default number of epochs of :func:`train_bias_vector`."""
DEFAULT_EPOCH_SIZE = 1600
"""Default epoch size: (concept, layer, strength, control) samples, 200 steps of batch 8."""

PAPER_TEXT = {
    "tpr": 0.747,
    "forced_id": 0.219,
    "introspection": 0.547,
    "fpr_after": 0.0,
}
"""The paper's text (the "Underelicited introspective capacity" section, Figure 16; not in the released data):
a single trained bias vector raises detection by +74.7%, forced identification by +21.9% and introspection
by +54.7% on 100 held-out concepts, with 0% FPR."""

PAPER_FIG2 = "paper_metrics/fig2_sweep_metrics_cache.parquet"
PAPER_FIG3 = "paper_metrics/fig3_metrics_cache.parquet"
PAPER_FIG1 = "paper_metrics/fig1_metrics_cache.parquet"
PAPER_FIG2_CELLS: tuple[tuple[int, float], ...] = (
    (30, 2.0),
    (30, 4.0),
    (40, 2.0),
    (40, 4.0),
    (50, 2.0),
    (50, 4.0),
)
"""The (injection layer, strength) cells of ``fig2_sweep_metrics_cache`` pooled per bias layer: the six the
release also has without a bias (``meta_layer = -1``), whose pooled TPR is the release's own aggregate row
(``meta_layer = -1, injection_layer = -1``, labelled strength 3.0). Pooled this way, bias layer 29 minus no
bias is exactly the paper's text: +74.7 points detection, +21.9 forced identification, +54.7 introspection,
FPR 0 (tested) -- so the text's baseline is this pooled one (TPR 0.203), not fig1's 0.411 or fig3's 0.226."""

_PAPER_RATES = {
    "tpr": ("detection_hit_rate", "num_injection"),
    "fpr": ("detection_false_alarm_rate", "num_control"),
    "introspection": ("combined_detection_and_identification_rate", "num_injection"),
    "forced_id": ("forced_identification_accuracy", "num_forced"),
}
"""Our rate -> (the paper's released column, its denominator column)."""

RATES = ("tpr", "fpr", "introspection", "forced_id")


# ----------------------------------------------------------------------------------------------- bias vector


@dataclass(frozen=True)
class BiasSettings:
    """How a :class:`BiasVector` was trained (saved beside it as JSON)."""

    model: str
    """``spec_for(model).name`` of the model it was trained on."""
    model_digest: str
    """SHA-256 of the model's weights (:func:`mechintro.core.fingerprint.weights_fingerprint`; the field keeps
    its name so that saved artifacts load): a retrained model invalidates the artifact."""
    layers: tuple[int, ...]
    """Blocks whose ``hook_mlp_out`` receives a vector (one learnable vector each)."""
    injection_layers: tuple[int, ...]
    """Layers a training injection is drawn from (uniformly)."""
    strength_range: tuple[float, float]
    """Training strengths are drawn uniformly in this range (positive)."""
    labels: Labels
    """``"instruct"``: "Yes" iff strength >= ``threshold``; ``"injected"``: every injection is "Yes"."""
    threshold: float | None
    """The detection threshold of the ``"instruct"`` labels (None for ``"injected"``)."""
    control_fraction: float
    """Probability that a training row is a control (no injection, labelled "No")."""
    epochs: int
    """Passes of ``epoch_size`` samples."""
    epoch_size: int
    """Samples (concept, layer, strength, control) per epoch; ``ceil(epoch_size / batch_size)`` steps."""
    batch_size: int
    """Trial dialogues per optimizer step."""
    lr: float
    """AdamW learning rate (constant)."""
    weight_decay: float
    """AdamW weight decay."""
    seed: int
    """Seed of the sampled rows (the vector starts at zero)."""
    concepts: tuple[str, ...]
    """The training concepts."""
    default_strength: float
    """``spec_for(model).strength`` when it was trained (the evaluation operating point)."""

    @property
    def steps(self) -> int:
        return self.epochs * math.ceil(self.epoch_size / self.batch_size)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BiasSettings:
        names = {f.name for f in fields(cls)}
        if missing := sorted(names - set(data)):
            raise ValueError(f"bias settings lack {missing}")
        values = {k: data[k] for k in names}
        for key in ("layers", "injection_layers", "concepts"):
            values[key] = tuple(values[key])
        values["strength_range"] = tuple(float(v) for v in values["strength_range"])
        return cls(**values)


@dataclass(frozen=True)
class BiasVector:
    """A trained bias: one vector per layer in ``settings.layers``, the settings and the training log."""

    vectors: Float[Tensor, "layer d_model"]
    """``[len(settings.layers), d_model]``, float32 on the CPU."""
    settings: BiasSettings
    """How it was trained."""
    log: tuple[dict[str, float], ...] = field(default=(), compare=False)
    """One entry per logged step: step, epoch, loss (mean since the last entry), bias_norm, grad_norm."""

    @property
    def layers(self) -> tuple[int, ...]:
        return self.settings.layers

    def digest(self) -> str:
        """A short hash of the vectors and settings (names stores and caches)."""
        h = hashlib.sha256(self.vectors.numpy().tobytes())
        h.update(json.dumps(self.settings.to_json(), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/bias.safetensors`` (the vectors) and ``folder/bias.json`` (settings + log)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"vectors": self.vectors.contiguous()}, str(folder / "bias.safetensors"))
        meta = {"settings": self.settings.to_json(), "log": list(self.log)}
        (folder / "bias.json").write_text(json.dumps(meta, indent=1))
        return folder


def load_bias_vector(folder: str | Path) -> BiasVector:
    """Load a :class:`BiasVector` written by :meth:`BiasVector.save`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in ("bias.safetensors", "bias.json"):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} is missing: save a bias with BiasVector.save(folder)")
    meta = json.loads((folder / "bias.json").read_text())
    settings = BiasSettings.from_json(meta["settings"])
    vectors = load_file(str(folder / "bias.safetensors"))["vectors"]
    if vectors.shape[0] != len(settings.layers):
        raise ValueError(f"{folder}: {vectors.shape[0]} vectors for layers {settings.layers}")
    return BiasVector(vectors=vectors, settings=settings, log=tuple(meta.get("log", ())))


def _bias_hooks(layers: Sequence[int], vectors: Tensor) -> list[tuple[str, Any]]:
    """``hook_mlp_out`` hooks adding ``vectors[i]`` at every position of layer ``layers[i]``."""

    def make(i: int):
        def hook(x: Float[Tensor, "b s d"], hook: Any = None) -> Float[Tensor, "b s d"]:
            return x + vectors[i].to(device=x.device, dtype=x.dtype)

        return hook

    return [(HookNames.mlp_out(layer), make(i)) for i, layer in enumerate(layers)]


@contextlib.contextmanager
def bias_vector(model: Model, artifact: BiasVector) -> Iterator[BiasVector]:
    """Add the artifact's vectors to ``hook_mlp_out`` of its layers, at every position of every forward call.

    Composes with :func:`~mechintro.core.steering.inject`, feature interventions (additive edits at the same
    hook
    commute), captures and KV-cached generation (the prompt's cache is built with the bias, and every
    decoding step adds it at its new position). A bias at layer ``L`` equals ``inject(model, v, layer=L,
    strength=1, start=0)`` in value: nothing lies between ``hook_mlp_out`` and ``resid_post`` of a block.
    """
    if not isinstance(artifact, BiasVector):
        raise TypeError(
            f"bias_vector needs a BiasVector (train_bias_vector, load_bias_vector), got {artifact!r}"
        )
    layers = [check_layer(model, layer) for layer in artifact.layers]
    vectors = artifact.vectors
    if vectors.ndim != 2 or vectors.shape[0] != len(layers):
        raise ValueError(f"the bias has vectors of shape {tuple(vectors.shape)} for layers {layers}")
    validate.d_model_of(model, vectors.shape[1], what="the bias vector")
    if not torch.isfinite(vectors).all():
        raise ValueError("the bias vector has NaN or inf entries")
    with hooks_context(model, _bias_hooks(layers, vectors.detach()), rows="shared"):
        yield artifact


# ----------------------------------------------------------------------------------------------- training


def _default_injection_layers(model: Model) -> tuple[int, ...]:
    """The organism's trained injection layers (``train_layers`` + the default), else the default layer."""
    spec = spec_for(model)
    cfg = spec.extra.get("organism_config") or {}
    layers = {spec.injection_layer, *cfg.get("train_layers", ())}
    return tuple(sorted(check_layer(model, la) for la in layers))


def _threshold(model: Model, labels: str, threshold: float | None) -> float | None:
    if labels not in LABELS:
        raise ValueError(f"unknown labels {labels!r}; valid: {list(LABELS)}")
    if labels == "injected":
        return None
    if threshold is None:
        cfg = spec_for(model).extra.get("organism_config") or {}
        if "detect_threshold" not in cfg:
            raise ValueError(
                "labels='instruct' needs the model's detection threshold: this model records no "
                "organism_config.detect_threshold, so pass threshold= or use labels='injected'"
            )
        threshold = cfg["detect_threshold"]
    if validate.finite_number("threshold", threshold) < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    return float(threshold)


def _check_training_concepts(concepts: Sequence[str], heldout: Sequence[str] | None) -> list[str]:
    if isinstance(concepts, str) or not concepts or not all(isinstance(c, str) and c for c in concepts):
        raise ValueError(f"concepts must be a non-empty list of concept words, got {concepts!r}")
    concepts = list(concepts)
    if len(set(concepts)) != len(concepts):
        raise ValueError("concepts are listed more than once")
    if heldout is None:
        try:
            heldout = heldout_concepts()
        except FileNotFoundError:
            heldout = []
    leaked = sorted(set(concepts) & set(heldout))
    if leaked:
        raise ValueError(
            f"{len(leaked)} held-out concepts are in the training set ({leaked[:5]}...): a bias vector is "
            "trained on training concepts only (mechintro.core.concepts.training_concepts())"
        )
    return concepts


def _strength_range(model: Model, strength_range: Any) -> tuple[float, float]:
    if strength_range is None:
        s = spec_for(model).strength
        return (0.25 * abs(s), 2.0 * abs(s))
    lo, hi = (float(v) for v in strength_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
        raise ValueError(f"strength_range must be (low, high) with 0 <= low <= high, got {strength_range!r}")
    return (lo, hi)


def bias_settings(
    model: Model,
    concepts: Sequence[str],
    *,
    layer: int | Sequence[int] | Literal["all"],
    injection_layers: Sequence[int] | None = None,
    strength_range: tuple[float, float] | None = None,
    labels: Labels = "instruct",
    threshold: float | None = None,
    control_fraction: float = 0.5,
    epochs: int = DEFAULT_EPOCHS,
    epoch_size: int = DEFAULT_EPOCH_SIZE,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    heldout: Sequence[str] | None = None,
) -> BiasSettings:
    """Validate the settings of :func:`train_bias_vector` (same arguments) and resolve their defaults."""
    spec = spec_for(model)
    concepts = _check_training_concepts(concepts, heldout)
    if not 0 <= validate.finite_number("control_fraction", control_fraction) < 1:
        raise ValueError(f"control_fraction must be in [0, 1), got {control_fraction!r}")
    if validate.finite_number("weight_decay", weight_decay) < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    return BiasSettings(
        model=spec.name,
        model_digest=weights_fingerprint(model),
        layers=layer_list(model, layer, what="layer"),
        injection_layers=(
            _default_injection_layers(model)
            if injection_layers is None
            else layer_list(model, injection_layers, what="injection_layers")
        ),
        strength_range=_strength_range(model, strength_range),
        labels=labels,
        threshold=_threshold(model, labels, threshold),
        control_fraction=float(control_fraction),
        epochs=validate.count("epochs", epochs),
        epoch_size=validate.count("epoch_size", epoch_size),
        batch_size=validate.count("batch_size", batch_size),
        lr=validate.positive_number("lr", lr),
        weight_decay=float(weight_decay),
        seed=validate.integer("seed", seed),
        concepts=tuple(concepts),
        default_strength=float(spec.strength),
    )


def train_bias_vector(
    model: Model,
    concepts: Sequence[str],
    *,
    layer: int | Sequence[int] | Literal["all"],
    log_every: int = 25,
    progress: bool = True,
    **settings: Any,
) -> BiasVector:
    """Train one vector added to ``hook_mlp_out`` of ``layer`` (or one per layer), every weight frozen.

    Args:
        concepts: training concepts only; any held-out concept (``heldout``, default
            :func:`~mechintro.core.concepts.heldout_concepts`) raises.
        layer: a block, a list of blocks (one vector each) or ``"all"``.
        log_every: steps between training-log entries.
        progress: show a progress bar.
        settings: the training settings of :func:`bias_settings` (each recorded in :class:`BiasSettings`):

            * ``injection_layers``: layers training injections are drawn from; default the organism's
              trained layers (``organism_config.train_layers`` plus the default layer), else the spec's layer;
            * ``strength_range``: training strengths, uniform in ``(low, high)``; default ``(0.25 s, 2 s)``
              with ``s = spec_for(model).strength``, which straddles the organism's threshold;
            * ``labels``: ``"instruct"`` (default; "Yes" iff strength >= ``threshold``, default the
              organism's ``detect_threshold``) or ``"injected"`` (every injection "Yes");
            * ``control_fraction`` (0.5): probability of a control row (no injection, "No");
            * ``epochs`` (2) / ``epoch_size`` (1600): ``epochs * ceil(epoch_size / batch_size)`` optimizer
              steps; one sample is one (concept, layer, strength, control) trial dialogue;
            * ``batch_size`` (8) / ``lr`` (1e-3) / ``weight_decay`` (0): AdamW, constant learning rate (the
              released code's batch and learning rate);
            * ``seed`` (0): seeds the sampled rows; the vector starts at zero, so training is deterministic;
            * ``heldout``: the concepts to refuse (default the organism's held-out split).

    Targets are the trial answers (``dialogue.YES_TEMPLATE`` with the concept, ``dialogue.NO_RESPONSE``),
    the loss is on the answer tokens only, the model is in eval mode, its parameters' ``requires_grad`` flags
    are switched off during training and restored after, so gradients reach only the bias.
    """
    _check_setting_names(settings)
    return _train(model, bias_settings(model, concepts, layer=layer, **settings), log_every, progress)


def _check_setting_names(settings: Mapping[str, Any]) -> None:
    import inspect

    valid = [n for n in inspect.signature(bias_settings).parameters if n not in ("model", "concepts")]
    if unknown := sorted(set(settings) - set(valid) - {"log_every", "progress"}):
        raise TypeError(f"unknown bias-vector settings {unknown}; valid: {valid + ['log_every', 'progress']}")


def train_or_load_bias(folder: str | Path, model: Model, concepts: Sequence[str], **kw: Any) -> BiasVector:
    """The bias saved in ``folder`` if it was trained with exactly these settings (same model weights
    included), else :func:`train_bias_vector` ``(model, concepts, **kw)``, saved to ``folder``."""
    _check_setting_names(kw)
    train_only = {k: kw.pop(k) for k in ("log_every", "progress") if k in kw}
    settings = bias_settings(model, concepts, **kw)
    folder = Path(folder)
    if (folder / "bias.json").exists() and (folder / "bias.safetensors").exists():
        found = load_bias_vector(folder)
        if found.settings == settings:
            return found
    artifact = _train(model, settings, train_only.get("log_every", 25), train_only.get("progress", True))
    artifact.save(folder)
    return artifact


def _train(model: Model, settings: BiasSettings, log_every: int, progress: bool) -> BiasVector:
    spec = spec_for(model)
    concepts, layers, inj_layers = list(settings.concepts), settings.layers, settings.injection_layers
    # Every vector injected in training: training concepts only, computed before the bias exists.
    vectors = {la: concept_vectors(model, concepts, layer=la)[None].to(model.cfg.device) for la in inj_layers}
    rng = random.Random(f"bias-{settings.seed}")
    lo, hi = settings.strength_range

    def draw() -> dialogue.InjectionRow:
        trial, c = rng.randint(1, 10), rng.randrange(len(concepts))
        if rng.random() < settings.control_fraction:
            return dialogue.InjectionRow(trial, c, 0, inj_layers[0], 0.0, dialogue.NO_RESPONSE)
        strength = rng.uniform(lo, hi)
        yes = settings.threshold is None or strength >= settings.threshold
        answer = dialogue.YES_TEMPLATE.format(concept=concepts[c]) if yes else dialogue.NO_RESPONSE
        return dialogue.InjectionRow(trial, c, 0, rng.choice(inj_layers), strength, answer)

    param = torch.zeros(len(layers), spec.d_model, device=model.cfg.device, requires_grad=True)
    opt = torch.optim.AdamW([param], lr=settings.lr, weight_decay=settings.weight_decay)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    log: list[dict[str, float]] = []
    per_epoch = math.ceil(settings.epoch_size / settings.batch_size)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        losses: list[float] = []
        with (
            hooks_context(model, _bias_hooks(layers, param)),
            progress_bar(total=settings.steps, desc=f"bias L{layers}", unit="step", enabled=progress) as bar,
        ):
            for step in range(settings.steps):
                rows = [draw() for _ in range(settings.batch_size)]
                loss = dialogue.trial_dialogue_loss(model, rows, vectors, emphasis={})
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = float(param.grad.norm())
                opt.step()
                losses.append(float(loss.detach()))
                if (step + 1) % log_every == 0 or step == settings.steps - 1:
                    log.append(
                        {
                            "step": step + 1,
                            "epoch": step // per_epoch + 1,
                            "loss": float(np.mean(losses)),
                            "bias_norm": float(param.detach().norm()),
                            "grad_norm": grad_norm,
                        }
                    )
                    losses = []
                bar.update(1)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return BiasVector(vectors=param.detach().float().cpu().clone(), settings=settings, log=tuple(log))


# ----------------------------------------------------------------------------------------------- evaluation


def bias_trials(
    model: Model,
    concepts: Sequence[str],
    *,
    bias: BiasVector | None,
    arm: str | None = None,
    layers: Sequence[int] | None = None,
    strengths: Sequence[float] | None = None,
    n_trials: int,
    judge: Any = None,
    vectors: Mapping[int, Tensor] | None = None,
    **run: Any,
) -> pd.DataFrame:
    """Introspection trials with the bias active during every forward pass (prompt and generated tokens).

    Runs :func:`mechintro.behaviour.trials.sweep` over ``layers`` (default: the spec's injection layer) and
    ``strengths`` (default: the spec's strength) inside :func:`bias_vector` (no bias for ``bias=None``).
    Concept vectors are computed **before** the bias is switched on (or taken from ``vectors``, ``{layer:
    [n_concepts, d_model]}``), so every arm injects the same vectors. ``run``: the other settings of
    ``sweep`` (forced, controls, temperature, max_new_tokens, seed, batch_size, store, progress).

    The trial store's key has no column for the bias: give each arm its own store (or none). Returns the
    trial rows with an ``arm`` column (``arm``, default ``"none"`` or ``"bias L{layers}"``).
    """
    from mechintro.behaviour.judges import RuleJudge
    from mechintro.behaviour.trials import sweep

    spec = spec_for(model)
    layers = [spec.injection_layer] if layers is None else list(layers)
    strengths = [spec.strength] if strengths is None else list(strengths)
    given = dict(vectors or {})
    vecs = {la: given[la] if la in given else concept_vectors(model, concepts, layer=la) for la in layers}
    context = contextlib.nullcontext() if bias is None else bias_vector(model, bias)
    with context:
        df = sweep(
            model,
            concepts,
            layers=layers,
            strengths=strengths,
            n_trials=n_trials,
            judge=judge if judge is not None else RuleJudge(),
            vectors=vecs,
            **run,
        )
    label = (
        arm if arm is not None else ("none" if bias is None else f"bias L{','.join(map(str, bias.layers))}")
    )
    return df.assign(arm=label)


def arm_gains(metrics: pd.DataFrame, *, baseline: str = "none", by: Sequence[str] = ()) -> pd.DataFrame:
    """Each arm's rates minus the ``baseline`` arm's, in absolute points, with Newcombe 95% intervals.

    ``metrics`` is ``detection_metrics(df, by=("arm", *by))``. Returns one row per non-baseline arm and
    ``by`` group: the ``by`` columns, arm, and for each of tpr, fpr, introspection, forced_id the arm's rate,
    the baseline's (``{rate}_before``), the difference ``d_{rate}`` and its ``d_{rate}_lo`` / ``_hi``.
    """
    if "arm" not in metrics.columns:
        raise ValueError(f"arm_gains needs detection_metrics(..., by=('arm', ...)); columns: {list(metrics)}")
    if baseline not in set(metrics["arm"]):
        raise ValueError(f"no baseline arm {baseline!r}; arms: {sorted(metrics['arm'].unique())}")
    counts = {
        "tpr": "n_injection",
        "fpr": "n_control",
        "introspection": "n_injection",
        "forced_id": "n_forced",
    }
    base = (
        metrics[metrics["arm"] == baseline].set_index(list(by)) if by else metrics[metrics["arm"] == baseline]
    )
    rows = []
    for _, row in metrics[metrics["arm"] != baseline].iterrows():
        ref = base.loc[tuple(row[c] for c in by)] if by else base.iloc[0]
        out = {c: row[c] for c in by} | {"arm": row["arm"]}
        for rate in RATES:
            n1, n0 = int(row[counts[rate]]), int(ref[counts[rate]])
            p1, p0 = float(row[rate]), float(ref[rate])
            k1 = round(p1 * n1) if n1 else 0
            k0 = round(p0 * n0) if n0 else 0
            lo, hi = newcombe_interval(k1, n1, k0, n0)
            out |= {
                rate: p1,
                f"{rate}_before": p0,
                f"d_{rate}": p1 - p0,
                f"d_{rate}_lo": lo,
                f"d_{rate}_hi": hi,
            }
        rows.append(out)
    return pd.DataFrame(rows)


def dose_equivalent_strength(curve: pd.DataFrame, tpr: float) -> float:
    """The strength at which the no-bias TPR curve reaches ``tpr``, by linear interpolation.

    ``curve`` has columns ``strength`` and ``tpr`` (measured without the bias). Only its rising branch counts
    (strengths up to the first maximum; a running maximum irons out noise), so the answer is the smallest
    strength that gives ``tpr``. Returns ``inf`` when ``tpr`` is above the curve's peak (no dose reaches it)
    and NaN when it is below the curve's first point (the curve does not reach that low).
    """
    if not {"strength", "tpr"} <= set(curve.columns):
        raise ValueError(f"the curve needs columns strength and tpr; it has {list(curve.columns)}")
    if not math.isfinite(tpr):
        raise ValueError(f"tpr must be a finite rate, got {tpr!r}")
    pts = curve[["strength", "tpr"]].dropna().sort_values("strength")
    if pts["strength"].duplicated().any():
        raise ValueError("the curve has several rows per strength; give one TPR per strength")
    if len(pts) < 2:
        raise ValueError(f"the curve needs at least two strengths, got {len(pts)}")
    s, t = pts["strength"].to_numpy(float), pts["tpr"].to_numpy(float)
    peak = int(np.argmax(t))
    s, t = s[: peak + 1], np.maximum.accumulate(t[: peak + 1])
    if tpr > t[-1]:
        return math.inf
    if tpr < t[0]:
        return math.nan
    i = int(np.argmax(t >= tpr))
    if i == 0 or t[i] == tpr:
        return float(s[i])
    return float(s[i - 1] + (tpr - t[i - 1]) * (s[i] - s[i - 1]) / (t[i] - t[i - 1]))


def dose_equivalent_gain(curve: pd.DataFrame, *, tpr: float, strength: float) -> float:
    """The strength increase that gives ``tpr`` without the bias: ``dose_equivalent_strength - strength``.

    ``strength`` is where the biased TPR was measured. ``inf``: beyond any dose; NaN: below the curve. When
    the curve has ``strength`` and its TPR there equals ``tpr`` (no change, e.g. both saturated at 1), the
    gain is 0, not the distance to the smallest strength that already gives it.
    """
    at = curve.loc[np.isclose(curve["strength"].astype(float), float(strength)), "tpr"] if len(curve) else []
    if len(at) == 1 and float(at.iloc[0]) == tpr:
        return 0.0
    return dose_equivalent_strength(curve, tpr) - float(strength)


# ----------------------------------------------------------------------------------------------- paper data


def _pooled(rows: pd.DataFrame) -> dict[str, float]:
    """Rates pooled over ``rows`` (counts recovered from rate x denominator), with Wilson intervals."""
    out: dict[str, float] = {}
    for rate, (column, denominator) in _PAPER_RATES.items():
        n = int(rows[denominator].sum())
        k = int(np.round(rows[column] * rows[denominator]).sum())
        lo, hi = wilson_interval(k, n)
        out |= {rate: k / n if n else math.nan, f"{rate}_lo": lo, f"{rate}_hi": hi, f"n_{rate}": n}
    return out


def paper_bias_layer_sweep(path: str | Path | None = None) -> pd.DataFrame:
    """The paper's sweep over the bias layer (Figure 16 left), from ``fig2_sweep_metrics_cache.parquet``.

    Rows used: for each ``meta_layer`` (the bias layer; ``-1`` = no bias), the six cells of
    :data:`PAPER_FIG2_CELLS` (injection layers 30, 40, 50 at strengths 2 and 4: the only cells the release
    also has without a bias), pooled (1000 trials each). The no-bias row's pooled TPR equals the release's own
    aggregate row (``meta_layer = -1``, ``injection_layer = -1``). Returns bias_layer, depth
    (``bias_layer / 62``, NaN for none), n_cells, and each rate with ``_lo`` / ``_hi`` and its count.
    """
    raw = pd.read_parquet(Path(path) if path else resources.reference(PAPER_FIG2))
    cells = pd.MultiIndex.from_tuples(PAPER_FIG2_CELLS, names=["injection_layer", "strength"])
    key = pd.MultiIndex.from_frame(raw[["injection_layer", "strength"]].astype({"strength": float}))
    used = raw[key.isin(cells)]
    rows = []
    for layer, group in used.groupby("meta_layer", sort=True):
        if len(group) != len(PAPER_FIG2_CELLS):
            raise ValueError(f"{PAPER_FIG2}: meta_layer {layer} has {len(group)} of the 6 pooled cells")
        depth = math.nan if layer < 0 else layer / PAPER_N_LAYERS
        rows.append({"bias_layer": int(layer), "depth": depth, "n_cells": len(group)} | _pooled(group))
    return pd.DataFrame(rows)


def paper_bias_injection_sweep(path: str | Path | None = None) -> pd.DataFrame:
    """The paper's injection-layer sweep with the bias at L20, L29, L40 and without (Figure 16 right).

    Every row of ``fig3_metrics_cache.parquet`` (strength 4, 1000 trials per cell), with our names: arm
    (``"none"`` for the release's ``baseline`` arm, else ``"bias L20"``...), bias_layer (-1 for none),
    injection_layer, depth (``injection_layer / 62``), strength, and each rate with its released 95% bounds.
    Its baseline is fig3's own (TPR 0.226 at layer 37), not fig1's (0.411): see
    :func:`paper_default_baselines`.
    """
    raw = pd.read_parquet(Path(path) if path else resources.reference(PAPER_FIG3))
    arm = raw["arm"].astype(str)
    bias_layer = arm.map(lambda a: -1 if a == "baseline" else int(a.removeprefix("L")))
    out = pd.DataFrame(
        {
            "arm": ["none" if b < 0 else f"bias L{b}" for b in bias_layer],
            "bias_layer": bias_layer.astype(int),
            "injection_layer": raw["layer_idx"].astype(int),
            "depth": raw["layer_idx"].astype(float) / PAPER_N_LAYERS,
            "strength": raw["strength"].astype(float),
        }
    )
    for rate, (column, denominator) in _PAPER_RATES.items():
        out[rate] = raw[column].astype(float)
        out[f"{rate}_lo"] = raw[f"{column}_ci_lower"].astype(float)
        out[f"{rate}_hi"] = raw[f"{column}_ci_upper"].astype(float)
        out[f"n_{rate}"] = raw[denominator].astype(int)
    return out.sort_values(["bias_layer", "injection_layer"]).reset_index(drop=True)


def paper_default_baselines(*, layer: int = 37, strength: float = 4.0) -> pd.DataFrame:
    """The paper's no-bias TPR at one cell in each release that has it: fig1, fig3's baseline arm, fig2.

    At injection layer 37, strength 4: fig1 0.411, fig3 0.226; fig2 has no no-bias row there (its no-bias
    cells are layers 30/40/50). Returns source, injection_layer, strength, tpr, n_injection.
    """
    rows = []
    fig1 = pd.read_parquet(resources.reference(PAPER_FIG1))
    hit = fig1[(fig1["layer_idx"] == layer) & (fig1["strength"] == strength)]
    fig3 = paper_bias_injection_sweep()
    hit3 = fig3[(fig3["arm"] == "none") & (fig3["injection_layer"] == layer) & (fig3["strength"] == strength)]
    fig2 = pd.read_parquet(resources.reference(PAPER_FIG2))
    hit2 = fig2[
        (fig2["meta_layer"] == -1) & (fig2["injection_layer"] == layer) & (fig2["strength"] == strength)
    ]
    for source, frame, column, n in (
        ("fig1_metrics_cache", hit, "detection_hit_rate", "num_injection"),
        ("fig3_metrics_cache (baseline arm)", hit3, "tpr", "n_tpr"),
        ("fig2_sweep_metrics_cache (meta_layer -1)", hit2, "detection_hit_rate", "num_injection"),
    ):
        value = float(frame[column].iloc[0]) if len(frame) else math.nan
        count = int(frame[n].iloc[0]) if len(frame) else 0
        rows.append(
            {
                "source": source,
                "injection_layer": layer,
                "strength": strength,
                "tpr": value,
                "n_injection": count,
            }
        )
    return pd.DataFrame(rows)
