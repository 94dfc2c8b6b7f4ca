"""The models the paper's released code names, the injection point it uses for each, and its source.

The released code (safety-research/introspection-mechanisms) names models by short keys
(``src/model_utils.py``, ``MODEL_NAME_MAP``) and places the injection at a *layer fraction*: the layer is
``int(fraction × n_layers)``, clamped to the model (``get_layer_at_fraction``).
``experiments/03c_prompt_variants.py`` takes the fraction and strength with the best introspection rate in its
own earlier sweep (``02``, results not released) and falls back to fraction 0.61 and strength 4
(``DEFAULT_LAYER_FRACTION``, ``DEFAULT_STRENGTH``).
``experiments/03_behavioral_robustness.py`` sweeps fractions 0.4-0.8 × strengths {1, 2, 4, 8} on each OLMo
stage. For Gemma3-27B-IT the paper fixes layer 37 of 62 at strength 4 (``stimuli.json``,
``paper_settings_gemma3_27b_it``); ``int(0.61 × 62)`` is 37 too.

:func:`paper_model` finds a record by short key or Hugging Face id; :func:`injection_point` turns it into a
layer for the loaded model's own number of layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "FALLBACK_FRACTION",
    "FALLBACK_STRENGTH",
    "OLMO_SWEEP_FRACTIONS",
    "OLMO_SWEEP_STRENGTHS",
    "PAPER_MODELS",
    "PaperModel",
    "fraction_layer",
    "injection_point",
    "paper_model",
]

FALLBACK_FRACTION = 0.61
"""``experiments/03c``'s ``DEFAULT_LAYER_FRACTION``: used when no sweep result exists for a model."""
FALLBACK_STRENGTH = 4.0
"""``experiments/03c``'s ``DEFAULT_STRENGTH``."""
OLMO_SWEEP_FRACTIONS = (0.4, 0.5, 0.6, 0.7, 0.8)
"""``experiments/03``'s ``DEFAULT_LAYER_SWEEP`` (layer fractions swept on every OLMo stage)."""
OLMO_SWEEP_STRENGTHS = (1.0, 2.0, 4.0, 8.0)
"""``experiments/03``'s ``DEFAULT_STRENGTH_SWEEP``."""

Stage = Literal["Base", "SFT", "DPO", "Instruct", "Abliterated"]


@dataclass(frozen=True)
class PaperModel:
    """One model the released code names, and the injection point mechintro uses for it."""

    key: str
    """The released code's short name (``MODEL_NAME_MAP`` in ``src/model_utils.py``), e.g. ``"olmo_sft"``."""
    hf_id: str
    """Hugging Face id."""
    family: str
    """mechintro family name (:attr:`mechintro.core.families.Family.name`)."""
    n_layers: int
    """Number of decoder layers of the checkpoint (from its ``config.json``); the layer is recomputed from the
    loaded config, this is only for looking the layer up before loading."""
    strength: float
    """Default injection strength."""
    layer_fraction: float = FALLBACK_FRACTION
    """Relative injection depth; the layer is ``int(layer_fraction × n_layers)`` unless :attr:`layer` is
    set."""
    layer: int | None = None
    """A fixed injection layer (Gemma3-27B-IT: 37), overriding the fraction."""
    stage: Stage = "Instruct"
    """Training stage, for checkpoint series (Figure 5): Base, SFT, DPO, Instruct or Abliterated."""
    chat: bool = True
    """Whether the model is prompted through its chat template; base checkpoints are prompted in the released
    code's raw ``User: ... Assistant:`` format instead."""
    sweep_fractions: tuple[float, ...] = ()
    """Layer fractions of the released code's own sweep for this model (empty: none recorded)."""
    sweep_strengths: tuple[float, ...] = ()
    """Strengths of that sweep."""
    calibrated: bool = False
    """True when the point is one the paper chose from a measured sweep; False when it is the released code's
    fallback (its sweep results were not released)."""
    source: str = ""
    """Where the id and the point come from (script, constant or file)."""

    def injection_layer(self, n_layers: int | None = None) -> int:
        """The injection layer for a model with ``n_layers`` layers (default: this record's)."""
        n = self.n_layers if n_layers is None else int(n_layers)
        if self.layer is not None and n == self.n_layers:
            return self.layer
        return fraction_layer(self.layer_fraction, n)


def fraction_layer(fraction: float, n_layers: int) -> int:
    """The released code's ``get_layer_at_fraction``: ``int(fraction × n_layers)``, clamped to the model."""
    return max(0, min(int(n_layers * fraction), n_layers - 1))


_MAP = "src/model_utils.py MODEL_NAME_MAP"
_FALLBACK = "experiments/03c_prompt_variants.py fallback (DEFAULT_LAYER_FRACTION 0.61, DEFAULT_STRENGTH 4.0)"
_SWEEP = "experiments/03_behavioral_robustness.py sweep (DEFAULT_LAYER_SWEEP, DEFAULT_STRENGTH_SWEEP)"


def _olmo(key: str, hf_id: str, stage: Stage) -> PaperModel:
    return PaperModel(
        key=key,
        hf_id=hf_id,
        family="olmo3",
        n_layers=64,
        strength=FALLBACK_STRENGTH,
        stage=stage,
        chat=stage != "Base",
        sweep_fractions=OLMO_SWEEP_FRACTIONS,
        sweep_strengths=OLMO_SWEEP_STRENGTHS,
        source=f"id: {_MAP}; stage: experiments/03 STAGE_LABELS; sweep: {_SWEEP}; default point: {_FALLBACK}",
    )


def _gemma27b(key: str, hf_id: str, stage: Stage) -> PaperModel:
    """A Gemma3-27B checkpoint other than the instruct model, injected at the instruct model's point."""
    return PaperModel(
        key=key,
        hf_id=hf_id,
        family="gemma3",
        n_layers=62,
        strength=4.0,
        layer=37,
        stage=stage,
        chat=stage != "Base",
        source=f"id: {_MAP}; point: the instruct model's",
    )


PAPER_MODELS: tuple[PaperModel, ...] = (
    PaperModel(
        key="gemma3_27b",
        hf_id="google/gemma-3-27b-it",
        family="gemma3",
        n_layers=62,
        strength=4.0,
        layer=37,
        calibrated=True,
        source=f"id: {_MAP}; point: data/stimuli.json paper_settings_gemma3_27b_it (layer 37 of 62, strength "
        "4; int(0.61 × 62) = 37 as well)",
    ),
    _gemma27b("gemma3_27b_pt", "google/gemma-3-27b-pt", "Base"),
    _gemma27b("gemma3_27b_abliterated", "uzaymacar/gemma-3-27b-abliterated", "Abliterated"),
    PaperModel(
        key="qwen3_235b",
        hf_id="Qwen/Qwen3-235B-A22B-Instruct-2507",
        family="qwen3_moe",
        n_layers=94,
        strength=FALLBACK_STRENGTH,
        source=f"id: {_MAP} (MoE, 235B total, 22B active); point: {_FALLBACK}",
    ),
    _olmo("olmo_base", "allenai/Olmo-3-1125-32B", "Base"),
    _olmo("olmo_sft", "allenai/Olmo-3.1-32B-Instruct-SFT", "SFT"),
    _olmo("olmo_dpo", "allenai/Olmo-3.1-32B-Instruct-DPO", "DPO"),
    _olmo("olmo_instruct", "allenai/Olmo-3.1-32B-Instruct", "Instruct"),
)
"""Every model the paper's experiments name, in the released code's order of stages."""


def paper_model(name: str) -> PaperModel | None:
    """The record of ``name`` (a short key such as ``"olmo_dpo"`` or a Hugging Face id), or None."""
    for record in PAPER_MODELS:
        if name in (record.key, record.hf_id):
            return record
    return None


def injection_point(name: str, n_layers: int) -> tuple[int, float, str] | None:
    """``(layer, strength, provenance)`` for a model the paper names, at its loaded ``n_layers``; else
    None."""
    record = paper_model(name)
    if record is None:
        return None
    layer = record.injection_layer(n_layers)
    how = (
        "the paper's point"
        if record.calibrated
        else "the released code's fallback point, not a calibrated one"
    )
    return layer, record.strength, f"{record.key} ({record.hf_id}): {how}; {record.source}"
