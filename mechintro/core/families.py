"""Model families: one architecture description per family, the only place that knows where things sit.

A :class:`Family` states, for one family of Hugging Face decoder models, where each tensor mechintro reads or
writes lives: as a TransformerBridge hook point (what :class:`mechintro.core.models.HookNames` hands out)
and as the Hugging Face module whose input or output it is (what the fast path replays, and what the tests
compare against plain Hugging Face). :func:`family_of` finds the description of a model, a config or a
``config.json``.

The layouts differ around the norms:

* **Gemma 3 / Gemma 4 (text):** sandwich norms (a norm before and after attention and the MLP) and QK-norm;
* **Qwen3 / Qwen3-MoE:** one pre-norm per sublayer, plus QK-norm;
* **Llama 3:** one pre-norm per sublayer, no QK-norm;
* **OLMo 2 / OLMo 3:** norms on the sublayer *outputs* (no pre-norm: the MLP reads the residual itself), plus
  QK-norm.

Gemma 4 gets mechanism support only in its dense layout without per-layer embeddings, without the MoE
branch and without KV-shared layers (the 31B layout, see :data:`GEMMA4_MECHANISM`); every Gemma 4 decoder
layer also multiplies the residual stream by a per-layer scalar, so its residual update is not purely
additive. Qwen3-MoE is supported for behaviour (injection, trials) only: its MLP is a routed mixture with no
single dictionary site.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "FAMILIES",
    "GEMMA4_MECHANISM",
    "Family",
    "BridgeSite",
    "UnsupportedArchitectureError",
    "family_by_name",
    "family_of",
]

Side = Literal["input", "output"]
Support = Literal["mechanism", "behaviour"]


class UnsupportedArchitectureError(ValueError):
    """A model of an architecture mechintro has no description for (or only behaviour support)."""


@dataclass(frozen=True)
class BridgeSite:
    """One named tensor: a bridge hook point and the Hugging Face module input or output that is the same."""

    hook: str
    """Bridge hook-point template with ``{layer}`` (an alias the bridge resolves, e.g. ``hook_mlp_out``)."""
    module: str
    """Dotted Hugging Face module template with ``{layer}``, relative to the causal-LM model."""
    side: Side
    """``"input"``: the module's first argument (hidden states); ``"output"``: what it returns (the first
    element of a tuple)."""

    def hook_name(self, layer: int | None = None) -> str:
        """The hook point, for ``layer`` when the site is per layer."""
        return self.hook.format(layer=layer)

    def module_name(self, layer: int | None = None) -> str:
        """The Hugging Face module, for ``layer`` when the site is per layer."""
        return self.module.format(layer=layer)


LAYER = "model.layers.{layer}"


def _site(hook: str, module: str, side: Side) -> BridgeSite:
    return BridgeSite(hook=hook, module=module, side=side)


def _common_sites() -> dict[str, BridgeSite]:
    """The sites every family has at the same place (residual stream, attention, final norm)."""
    return {
        "resid_pre": _site("blocks.{layer}.hook_resid_pre", LAYER, "input"),
        "resid_post": _site("blocks.{layer}.hook_resid_post", LAYER, "output"),
        "o_proj_in": _site("blocks.{layer}.attn.o.hook_in", LAYER + ".self_attn.o_proj", "input"),
        "o_proj_out": _site("blocks.{layer}.attn.o.hook_out", LAYER + ".self_attn.o_proj", "output"),
        "mlp_module_out": _site("blocks.{layer}.mlp.hook_out", LAYER + ".mlp", "output"),
        "final_norm_in": _site("ln_final.hook_in", "model.norm", "input"),
        "final_norm_out": _site("ln_final.hook_out", "model.norm", "output"),
    }


def _sandwich_sites() -> dict[str, BridgeSite]:
    """Gemma 3 / 4: norms before and after attention and the MLP."""
    return _common_sites() | {
        "resid_mid": _site("blocks.{layer}.hook_resid_mid", LAYER + ".pre_feedforward_layernorm", "input"),
        "attn_out": _site("blocks.{layer}.hook_attn_out", LAYER + ".post_attention_layernorm", "output"),
        "mlp_in_prenorm": _site("blocks.{layer}.ln2.hook_in", LAYER + ".pre_feedforward_layernorm", "input"),
        "mlp_in": _site("blocks.{layer}.ln2.hook_out", LAYER + ".pre_feedforward_layernorm", "output"),
        "mlp_out": _site("blocks.{layer}.hook_mlp_out", LAYER + ".post_feedforward_layernorm", "output"),
    }


def _prenorm_sites() -> dict[str, BridgeSite]:
    """Qwen3 / Llama: one pre-norm per sublayer (``post_attention_layernorm`` is the MLP's pre-norm)."""
    return _common_sites() | {
        "resid_mid": _site("blocks.{layer}.hook_resid_mid", LAYER + ".post_attention_layernorm", "input"),
        "attn_out": _site("blocks.{layer}.hook_attn_out", LAYER + ".self_attn", "output"),
        "mlp_in_prenorm": _site("blocks.{layer}.ln2.hook_in", LAYER + ".post_attention_layernorm", "input"),
        "mlp_in": _site("blocks.{layer}.ln2.hook_out", LAYER + ".post_attention_layernorm", "output"),
        "mlp_out": _site("blocks.{layer}.hook_mlp_out", LAYER + ".mlp", "output"),
    }


def _postnorm_sites() -> dict[str, BridgeSite]:
    """OLMo 2 / 3: norms on the sublayer outputs; the MLP reads the residual directly.

    The bridge's adapters map ``ln2`` to ``post_feedforward_layernorm`` here, so ``ln2.hook_out`` is the MLP's
    (normed) *output*; the MLP's input is ``mlp.hook_in`` (what the adapter aliases ``hook_resid_mid`` to).
    """
    return _common_sites() | {
        "resid_mid": _site("blocks.{layer}.hook_resid_mid", LAYER + ".mlp", "input"),
        "attn_out": _site("blocks.{layer}.hook_attn_out", LAYER + ".post_attention_layernorm", "output"),
        "mlp_in": _site("blocks.{layer}.mlp.hook_in", LAYER + ".mlp", "input"),
        "mlp_out": _site("blocks.{layer}.hook_mlp_out", LAYER + ".post_feedforward_layernorm", "output"),
    }


@dataclass(frozen=True)
class Family:
    """Where things sit in one model family, as bridge hook points and as Hugging Face modules."""

    name: str
    """Short identifier, e.g. ``"gemma3"``."""
    title: str
    """Human name, e.g. ``"Gemma 3"``."""
    model_types: tuple[str, ...]
    """Hugging Face ``config.model_type`` values of the family (text configs)."""
    architectures: tuple[str, ...]
    """Hugging Face causal-LM classes (``config.architectures``) of the family."""
    support: Support
    """``"mechanism"``: every analysis (dictionaries, patching, attribution); ``"behaviour"``: injection and
    trials only."""
    norm_layout: Literal["sandwich", "pre", "post"]
    """Norms before and after each sublayer (``"sandwich"``), before it (``"pre"``) or after it
    (``"post"``)."""
    qk_norm: bool
    """Whether attention normalizes queries and keys."""
    sites: Mapping[str, BridgeSite]
    """Named sites: ``resid_pre``, ``resid_mid``, ``resid_post`` (the residual stream); ``attn_out`` (the
    attention sublayer's update of the residual, after any post-attention norm); ``o_proj_in`` /
    ``o_proj_out`` (the heads entering and the attention output leaving ``o_proj``, before any
    post-attention norm); ``mlp_in`` (the MLP's input: the transcoder input), ``mlp_in_prenorm`` (the residual
    before the MLP's pre-norm, where there is one), ``mlp_module_out`` (the MLP module's output, before any
    post-feedforward norm), ``mlp_out`` (the MLP sublayer's update of the residual: the transcoder output);
    ``final_norm_in`` / ``final_norm_out``."""
    transcoder_in_candidates: tuple[str, ...]
    """Site names a dictionary may read, one on each side of the MLP's pre-norm where there is one."""
    transcoder_out_candidates: tuple[str, ...]
    """Site names a dictionary may write, one on each side of the MLP's post-norm where there is one."""
    norms: Mapping[str, str]
    """The per-layer norms, bridge component (``ln1``, ``ln1_post``, ``ln2``, ``ln2_post``) -> Hugging Face
    module name inside ``model.layers.L`` (what the bridge's adapter wraps)."""
    final_norm: str = "model.norm"
    """Hugging Face module of the final norm."""
    unembed: str = "lm_head"
    """Hugging Face module of the unembedding."""
    embed: str = "model.embed_tokens"
    """Hugging Face module of the token embedding."""
    yes_words: tuple[str, ...] = ("yes", "Yes", "YES")
    """Words whose single-token encodings (with and without a leading space) form the Yes set."""
    no_words: tuple[str, ...] = ("no", "No", "NO")
    """Words whose single-token encodings form the No set."""
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Extra arguments to ``apply_chat_template`` (Qwen3: ``enable_thinking=False``)."""
    chat_notes: str = ""
    """How the family's chat template is used."""
    relative_depth: float = 37 / 62
    """The paper's injection depth relative to the number of layers (Gemma3-27B-IT: layer 37 of 62)."""

    def site(self, name: str) -> BridgeSite:
        """The site called ``name``, or an error naming this family's sites."""
        if name not in self.sites:
            raise KeyError(f"{self.title} has no site {name!r}; its sites: {sorted(self.sites)}")
        return self.sites[name]

    def require_mechanism(self, what: str = "this analysis") -> None:
        """Raise unless the family has mechanism support."""
        if self.support != "mechanism":
            mech = [f.title for f in FAMILIES if f.support == "mechanism"]
            raise UnsupportedArchitectureError(
                f"{what} needs mechanism support, which {self.title} lacks (behaviour only); families with "
                f"mechanism support: {mech}"
            )


_SANDWICH_NORMS = {
    "ln1": "input_layernorm",
    "ln1_post": "post_attention_layernorm",
    "ln2": "pre_feedforward_layernorm",
    "ln2_post": "post_feedforward_layernorm",
}
_PRE_NORMS = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
_POST_NORMS = {"ln1": "post_attention_layernorm", "ln2": "post_feedforward_layernorm"}

GEMMA3 = Family(
    name="gemma3",
    title="Gemma 3",
    model_types=("gemma3_text",),
    architectures=("Gemma3ForCausalLM",),
    support="mechanism",
    norm_layout="sandwich",
    qk_norm=True,
    sites=_sandwich_sites(),
    transcoder_in_candidates=("mlp_in_prenorm", "mlp_in"),
    transcoder_out_candidates=("mlp_module_out", "mlp_out"),
    norms=_SANDWICH_NORMS,
    chat_notes="<start_of_turn>user / <start_of_turn>model turns; the system prompt folds into the first "
    "user turn.",
)
GEMMA4_TEXT = Family(
    name="gemma4_text",
    title="Gemma 4 (text)",
    model_types=("gemma4_text",),
    architectures=("Gemma4ForCausalLM",),
    support="mechanism",
    norm_layout="sandwich",
    qk_norm=True,
    sites=_sandwich_sites(),
    transcoder_in_candidates=("mlp_in_prenorm", "mlp_in"),
    transcoder_out_candidates=("mlp_module_out", "mlp_out"),
    norms=_SANDWICH_NORMS,
    chat_notes="Gemma 4's own template (its tokenizer's); each decoder layer scales the residual by a "
    "scalar.",
)
QWEN3 = Family(
    name="qwen3",
    title="Qwen3 (dense)",
    model_types=("qwen3",),
    architectures=("Qwen3ForCausalLM",),
    support="mechanism",
    norm_layout="pre",
    qk_norm=True,
    sites=_prenorm_sites(),
    transcoder_in_candidates=("mlp_in_prenorm", "mlp_in"),
    transcoder_out_candidates=("mlp_out",),
    norms=_PRE_NORMS,
    chat_template_kwargs={"enable_thinking": False},
    chat_notes="ChatML turns (<|im_start|>user ... <|im_end|>); thinking mode off (enable_thinking=False).",
)
QWEN3_MOE = Family(
    name="qwen3_moe",
    title="Qwen3-MoE",
    model_types=("qwen3_moe",),
    architectures=("Qwen3MoeForCausalLM",),
    support="behaviour",
    norm_layout="pre",
    qk_norm=True,
    sites={k: v for k, v in _prenorm_sites().items() if k not in ("mlp_in", "mlp_in_prenorm")},
    transcoder_in_candidates=(),
    transcoder_out_candidates=(),
    norms=_PRE_NORMS,
    chat_template_kwargs={"enable_thinking": False},
    chat_notes="ChatML turns; thinking mode off (enable_thinking=False). Qwen3-235B-A22B-Instruct-2507 has "
    "no thinking mode at all.",
)
LLAMA3 = Family(
    name="llama",
    title="Llama 3",
    model_types=("llama",),
    architectures=("LlamaForCausalLM",),
    support="mechanism",
    norm_layout="pre",
    qk_norm=False,
    sites=_prenorm_sites(),
    transcoder_in_candidates=("mlp_in_prenorm", "mlp_in"),
    transcoder_out_candidates=("mlp_out",),
    norms=_PRE_NORMS,
    chat_notes="<|start_header_id|>role<|end_header_id|> turns closed by <|eot_id|>.",
)
OLMO2 = Family(
    name="olmo2",
    title="OLMo 2",
    model_types=("olmo2",),
    architectures=("Olmo2ForCausalLM",),
    support="mechanism",
    norm_layout="post",
    qk_norm=True,
    sites=_postnorm_sites(),
    transcoder_in_candidates=("mlp_in",),
    transcoder_out_candidates=("mlp_module_out", "mlp_out"),
    norms=_POST_NORMS,
    chat_notes="<|user|> / <|assistant|> turns (the Tulu template).",
)
OLMO3 = Family(
    name="olmo3",
    title="OLMo 3",
    model_types=("olmo3",),
    architectures=("Olmo3ForCausalLM",),
    support="mechanism",
    norm_layout="post",
    qk_norm=True,
    sites=_postnorm_sites(),
    transcoder_in_candidates=("mlp_in",),
    transcoder_out_candidates=("mlp_module_out", "mlp_out"),
    norms=_POST_NORMS,
    chat_notes="ChatML turns (<|im_start|>user ... <|im_end|>) in the Instruct stages.",
)

FAMILIES: tuple[Family, ...] = (GEMMA3, GEMMA4_TEXT, QWEN3, QWEN3_MOE, LLAMA3, OLMO2, OLMO3)
"""Every supported family."""

GEMMA4_MECHANISM = {"hidden_size_per_layer_input": 0, "enable_moe_block": False, "num_kv_shared_layers": 0}
"""The Gemma 4 text config values that mechanism support needs (the dense 31B layout): no per-layer
embeddings, no MoE branch, no KV-shared layers."""


def family_by_name(name: str) -> Family:
    """The family called ``name`` (:attr:`Family.name`)."""
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise UnsupportedArchitectureError(f"unknown family {name!r}; valid: {[f.name for f in FAMILIES]}")


def _config_dict(config: Any) -> dict[str, Any]:
    """A config as a plain dict: from a ``config.json`` path or folder, a dict, or a transformers config."""
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        return json.loads(path.read_text())
    if isinstance(config, Mapping):
        return dict(config)
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


def _supported_list() -> str:
    return ", ".join(f"{f.title} ({'/'.join(f.architectures)})" for f in FAMILIES)


def family_of(config: Any) -> Family:
    """The family of a model: a bridge or HF model, a transformers config, a dict, or a ``config.json``.

    Matched on ``model_type`` (a multimodal config's ``text_config`` is read), else on ``architectures``; an
    unknown architecture raises :class:`UnsupportedArchitectureError` naming the supported families.
    """
    for attr in ("original_model", "config"):
        inner = getattr(config, attr, None)
        if inner is not None and not isinstance(config, Mapping):
            config = inner
    cfg = _config_dict(config)
    text = cfg.get("text_config") or {}
    types = [
        t for t in (cfg.get("model_type"), text.get("model_type") if isinstance(text, dict) else None) if t
    ]
    archs = list(cfg.get("architectures") or [])
    for fam in FAMILIES:
        if any(t in fam.model_types for t in types) or any(a in fam.architectures for a in archs):
            return fam
    raise UnsupportedArchitectureError(
        f"no supported model family for model_type={types or None}, architectures={archs or None}; "
        f"supported: {_supported_list()}"
    )


def mechanism_problem(family: Family, config: Any) -> str | None:
    """Why a model of ``family`` with ``config`` lacks mechanism support (None when it has it)."""
    if family.support != "mechanism":
        return f"{family.title} is supported for behaviour only"
    if family is GEMMA4_TEXT:
        cfg = _config_dict(getattr(config, "config", config))
        for key, want in GEMMA4_MECHANISM.items():
            got = cfg.get(key) or (0 if isinstance(want, int) else False)
            if got != want:
                return (
                    f"Gemma 4 variants with {key}={cfg.get(key)!r} (per-layer embeddings, MoE or KV sharing) "
                    f"have no mechanism support; supported: the dense layout {GEMMA4_MECHANISM}"
                )
    return None
