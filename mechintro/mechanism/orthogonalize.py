"""Weight orthogonalization: a checkpoint with one residual direction removed from every write.

:func:`orthogonalize` returns a plain Hugging Face model in which every matrix that writes into the residual
stream of the listed blocks has the unit direction ``r`` projected out of its output space:
``W <- (I - r r^T) W`` for each attention output projection (``o_proj``) and MLP output projection
(``down_proj``; each expert's in a mixture), ``b <- b - (b . r) r`` for their biases, and, when block 0 is
listed, ``E <- E (I - r r^T)`` for every token embedding row. It is the weight-space form of the runtime
ablation ``ablate_directions(model, r, layers=..., weight=1.0, site="writes")``
(:mod:`mechintro.mechanism.directions`), and equal to it at every position where each write is a linear map
of those weights:

* **exact**: Llama 3, Qwen3 and Qwen3-MoE (one pre-norm per sublayer; the sublayer's output *is* the
  write, and a mixture's write is a routed sum of the experts' ``down_proj`` outputs, linear in each);
* **refused by default**: Gemma 3 / 4 and OLMo 2 / 3, whose writes pass through a norm *after* the
  sublayer (``post_attention_layernorm`` / ``post_feedforward_layernorm``). The write is
  ``g * h / rms(h)`` with ``h`` the projection's output: removing ``r`` from ``h`` neither removes it from
  ``g * h`` (the gain mixes coordinates back in unless ``r`` is an axis) nor keeps the other components
  (``rms(h)`` changes per token). ``post_norm="approximate"`` orthogonalizes the projections anyway, what
  public "abliterated" Gemma 3 checkpoints do; the runtime ablation is then the exact alternative.

The runtime ablation at the paper's default site (``site="resid_post"``) is a different intervention: it
edits the stream after each block, so block 0 reads the embeddings with their ``r`` component and each MLP
reads the attention write before it is ablated. No weight edit equals it.

Fractional weights, per-layer weights and per-layer directions are refused: the checkpoint removes one
direction completely, and those stay runtime ablations. (At ``site="writes"`` each would have a weight-space
form, ``(I - w_L r_L r_L^T) W``; at ``site="resid_post"`` none does, as the edits compound through the
stream.)

Where mechintro differs from public abliterated checkpoints: they orthogonalize Gemma 3's projections
although its post-norms make that inexact; here that takes ``post_norm="approximate"``, and the measured gap
is in ``docs/studies/elicitation.md``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, TypeAlias

import torch
from jaxtyping import Float
from torch import Tensor

from mechintro.core import validate
from mechintro.core.families import Family, UnsupportedArchitectureError, family_of

__all__ = [
    "EXACT_FAMILIES",
    "ORTHOGONALIZE_RECORD",
    "POST_NORM_MODES",
    "Orthogonalization",
    "orthogonalize",
]

PostNorm: TypeAlias = Literal["refuse", "approximate"]
"""What :func:`orthogonalize` does in a family whose writes pass through a post-sublayer norm."""

POST_NORM_MODES: tuple[PostNorm, ...] = ("refuse", "approximate")
"""The valid ``post_norm=`` of :func:`orthogonalize`."""

EXACT_FAMILIES: tuple[str, ...] = ("llama", "qwen3", "qwen3_moe")
"""Families (:attr:`Family.name`) where the orthogonalized model equals the runtime ``site="writes"``
ablation: their residual writes are linear in the edited weights."""

ORTHOGONALIZE_RECORD = "mechintro_orthogonalize.json"
"""The record written beside a saved checkpoint: source, direction (and its hash), layers, mode."""


@dataclass(frozen=True)
class Orthogonalization:
    """What one :func:`orthogonalize` call did (also written as :data:`ORTHOGONALIZE_RECORD`)."""

    source: str
    """The source model: its name or folder, or ``"<in memory>"``."""
    family: str
    """The source's family (:attr:`Family.name`)."""
    layers: tuple[int, ...]
    """The blocks whose writes were orthogonalized (block 0 includes the embeddings)."""
    direction_sha256: str
    """SHA-256 of the unit direction as little-endian float64 bytes."""
    direction: tuple[float, ...]
    """The unit direction (float64), so the record alone reproduces the edit."""
    exact: bool
    """Whether the model equals the runtime ``site="writes"`` ablation (False: ``post_norm="approximate"``,
    the model is then only the abliteration-style edit)."""
    edited: tuple[str, ...]
    """The edited tensors (Hugging Face parameter names)."""

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready data."""
        return {
            "source": self.source,
            "family": self.family,
            "layers": list(self.layers),
            "direction_sha256": self.direction_sha256,
            "direction": list(self.direction),
            "exact": self.exact,
            "edited": list(self.edited),
            "equivalent_to": "ablate_directions(model, direction, layers=layers, weight=1.0, site='writes')",
        }


# ----------------------------------------------------------------------------------------------- inputs


def _no_init() -> Any:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _plain_copy(bridge: Any) -> Any:
    """A plain Hugging Face copy of a bridged model's weights (the bridge wraps every HF module in
    ``_original_component``, so its ``original_model`` is no longer a plain model)."""
    from transformers import AutoModelForCausalLM

    inner = bridge.original_model
    dtype = next(inner.parameters()).dtype
    config = copy.deepcopy(inner.config)
    with _no_init():
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for key, value in inner.state_dict().items():
        clean = key.replace("._original_component", "").replace("_original_component.", "")
        state.setdefault(clean, value)
    wanted = set(plain.state_dict())
    tied = _tied_config(plain) and plain.get_output_embeddings() is not None
    missing = wanted - set(state) - ({"lm_head.weight"} if tied else set())
    if missing:
        raise RuntimeError(f"could not find {sorted(missing)[:5]} in the bridged model")
    plain.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False)
    if tied:  # one tensor, as in the source (from_config does not tie them here)
        plain.get_output_embeddings().weight = plain.get_input_embeddings().weight
    return plain.to(next(inner.parameters()).device).eval()


def _source(model: Any) -> tuple[Any, Any, str]:
    """(a plain HF model this call may edit, its tokenizer or None, the source's name)."""
    if isinstance(model, (str, os.PathLike)):
        from mechintro.core.models import load_model

        bridge = load_model(model, device="cpu")
        return _plain_copy(bridge), bridge.tokenizer, str(model)
    if hasattr(model, "original_model"):  # a TransformerBridge
        from mechintro.core.models import spec_for

        try:
            name = spec_for(model).name
        except ValueError:
            name = "<in memory>"
        return _plain_copy(model), model.tokenizer, name
    if hasattr(model, "get_input_embeddings") and hasattr(model, "config"):
        return copy.deepcopy(model), None, str(getattr(model.config, "_name_or_path", "") or "<in memory>")
    raise TypeError(
        f"model must be a bridged model, a Hugging Face causal LM, a name or a folder; got {type(model)}"
    )


def _direction(direction: Any, d_model: int) -> Float[Tensor, " d_model"]:
    if isinstance(direction, Mapping):
        raise ValueError(
            "orthogonalize takes one shared direction [d_model]; per-layer directions ({layer: vector}) "
            "remove different directions at different blocks and stay runtime ablations: use "
            "ablate_directions(model, directions, site='writes')"
        )
    t = torch.as_tensor(direction).detach().double().cpu()
    if t.ndim != 1:
        raise ValueError(
            f"orthogonalize takes one shared direction [d_model], got shape {tuple(t.shape)}; a "
            "[layer, d_model] stack (one direction per layer) stays a runtime ablation: use "
            "ablate_directions(model, directions, site='writes')"
        )
    if t.shape[0] != d_model:
        raise ValueError(f"the direction has width {t.shape[0]}, but the model's d_model is {d_model}")
    if not torch.isfinite(t).all():
        raise ValueError("the direction has NaN or inf entries")
    norm = t.norm()
    if not norm > 0:
        raise ValueError("the direction is zero: there is nothing to project out")
    return t / norm


def _check_weight(weight: Any) -> None:
    scalar = not isinstance(weight, (Mapping, Sequence, Tensor)) or (
        torch.is_tensor(weight) and weight.ndim == 0
    )
    if not scalar or isinstance(weight, str):
        raise ValueError(
            f"orthogonalize takes weight=1.0 only, got per-layer weights {weight!r}; weights that differ by "
            "layer stay runtime ablations: use ablate_directions(model, direction, weight=..., site='writes')"
        )
    w = validate.finite_number("weight", float(weight))
    if w != 1.0:
        raise ValueError(
            f"orthogonalize removes the direction completely (weight=1.0), got weight={w}; a fractional "
            "ablation stays a runtime ablation: use ablate_directions(model, direction, weight=w, "
            "site='writes')"
        )


def _layers(layers: Any, n_layers: int) -> tuple[int, ...]:
    from mechintro.mechanism.directions import layer_list

    if layers is None:
        return tuple(range(n_layers))
    return layer_list(SimpleNamespace(cfg=SimpleNamespace(n_layers=n_layers)), layers, what="layers")


def _check_family(family: Family, post_norm: str) -> bool:
    """True when the edit is exact; raise in a post-norm family unless ``post_norm="approximate"``."""
    if post_norm not in POST_NORM_MODES:
        raise ValueError(f"unknown post_norm {post_norm!r}; valid: {list(POST_NORM_MODES)}")
    if family.name in EXACT_FAMILIES:
        return True
    if post_norm == "approximate":
        return False
    norms = [family.norms[k] for k in ("ln1_post", "ln1", "ln2_post", "ln2") if k in family.norms]
    post = [n for n in norms if n.startswith("post_")]
    raise UnsupportedArchitectureError(
        f"{family.title} writes into the residual stream through post-sublayer norms ({', '.join(post)}): "
        "the norm rescales each token's write, so removing the direction from o_proj / down_proj is not "
        "removing it from the write, and no weight edit equals the runtime ablation. Use the runtime "
        "ablation ablate_directions(model, direction, site='writes') (exact), or orthogonalize(..., "
        "post_norm='approximate') for the abliteration-style weight edit (not equivalent). Exact families: "
        f"{list(EXACT_FAMILIES)}"
    )


# ----------------------------------------------------------------------------------------------- the edit


def _project_rows(w: Tensor, r: Tensor, *, dim: int) -> None:
    """In place: remove the component along ``r`` from axis ``dim`` of ``w`` (computed in float64)."""
    x = w.detach().double().movedim(dim, -1)
    x = x - (x @ r)[..., None] * r
    w.data.copy_(x.movedim(-1, dim).to(w.dtype))


def _writes(layer: torch.nn.Module, index: int, d_model: int) -> list[tuple[str, Tensor, int]]:
    """(name, tensor, residual axis) of every tensor of block ``index`` whose output is written into the
    residual stream: o_proj, the MLP's down_proj (each expert's and a shared expert's), their biases."""
    prefix = f"model.layers.{index}"
    out: list[tuple[str, Tensor, int]] = []

    def linear(name: str, module: Any) -> None:
        if not isinstance(module, torch.nn.Linear) or module.out_features != d_model:
            raise UnsupportedArchitectureError(f"{prefix}.{name} is not a Linear writing d_model={d_model}")
        out.append((f"{prefix}.{name}.weight", module.weight, 0))
        if module.bias is not None:
            out.append((f"{prefix}.{name}.bias", module.bias, 0))

    linear("self_attn.o_proj", getattr(layer.self_attn, "o_proj", None))
    mlp = layer.mlp
    if isinstance(getattr(mlp, "down_proj", None), torch.nn.Linear):
        linear("mlp.down_proj", mlp.down_proj)
    elif isinstance(getattr(getattr(mlp, "experts", None), "down_proj", None), torch.Tensor):
        down = mlp.experts.down_proj  # [expert, d_model, d_expert]
        if down.ndim != 3 or down.shape[1] != d_model:
            raise UnsupportedArchitectureError(
                f"{prefix}.mlp.experts.down_proj has shape {tuple(down.shape)}"
            )
        out.append((f"{prefix}.mlp.experts.down_proj", down, 1))
        if getattr(mlp, "shared_expert", None) is not None:
            linear("mlp.shared_expert.down_proj", mlp.shared_expert.down_proj)
    else:
        raise UnsupportedArchitectureError(
            f"{prefix}.mlp has no down_proj mechintro knows ({type(mlp).__name__})"
        )
    return out


def _configs(hf: Any) -> list[Any]:
    return list({id(c): c for c in (hf.config, hf.config.get_text_config())}.values())


def _tied_config(hf: Any) -> bool:
    return any(bool(getattr(c, "tie_word_embeddings", False)) for c in _configs(hf))


def _untie(hf: Any) -> None:
    """Give the unembedding its own copy of tied weights (it keeps the original values), and record the
    model as untied so that saving and loading do not tie them again."""
    head, embed = hf.get_output_embeddings(), hf.get_input_embeddings()
    if head is None or (head.weight is not embed.weight and not _tied_config(hf)):
        return
    if head.weight is embed.weight:
        head.weight = torch.nn.Parameter(
            embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad
        )
    for cfg in _configs(hf):
        cfg.tie_word_embeddings = False


def orthogonalize(
    model: Any,
    direction: Float[Tensor, " d_model"],
    *,
    layers: int | Sequence[int] | Literal["all"] | None = None,
    weight: float = 1.0,
    post_norm: PostNorm = "refuse",
    out: str | os.PathLike | None = None,
    tokenizer: Any = None,
) -> Any:
    """A copy of ``model`` with ``direction`` removed from every residual-stream write of ``layers``.

    Equal, at every position and every generated token, to running the source under
    ``ablate_directions(model, direction, layers=layers, weight=1.0, site="writes")`` in the families of
    :data:`EXACT_FAMILIES` (see the module docstring for why post-norm families are refused).

    Args:
        model: a bridged model (:func:`~mechintro.core.models.load_model`), a Hugging Face causal LM, or a
            name / folder ``load_model`` accepts. It is never modified.
        direction: one ``[d_model]`` direction shared by every listed block (normalized here).
        layers: as ``ablate_directions``: a layer, a list, or ``"all"``; default every block. The token
            embeddings are orthogonalized when block 0 is listed. A tied unembedding is untied and keeps its
            original values (the runtime ablation does not touch the unembedding).
        weight: must be 1.0. Fractional or per-layer weights (and per-layer directions) are refused; they stay
            runtime ablations.
        post_norm: ``"refuse"`` (default) in Gemma 3 / 4 and OLMo 2 / 3; ``"approximate"`` orthogonalizes
            their ``o_proj`` / ``down_proj`` anyway (the abliteration recipe), which is **not** the runtime
            ablation.
        out: a folder to save the model (``save_pretrained``), its tokenizer and :data:`ORTHOGONALIZE_RECORD`
            into; ``load_model(out)`` loads it like any checkpoint.
        tokenizer: the tokenizer to save with ``out`` when ``model`` is a plain HF model (a bridged or named
            model brings its own).

    Returns the plain Hugging Face model (same dtype and device as the source), with the
    :class:`Orthogonalization` record as its ``mechintro_orthogonalization`` attribute. Weights are edited in
    float64 and cast back, so a bfloat16 model keeps a rounding-size remainder along ``direction``.
    ``load_model(name, hf_model=returned)`` bridges it without saving (the bridge wraps its modules in place).
    """
    _check_weight(weight)
    hf, tok, name = _source(model)
    family = family_of(hf.config)
    exact = _check_family(family, post_norm)
    text = hf.config.get_text_config()
    d_model, n_layers = int(text.hidden_size), int(text.num_hidden_layers)
    r = _direction(direction, d_model)
    chosen = _layers(layers, n_layers)
    device = next(hf.parameters()).device
    rd = r.to(device)
    edited: list[str] = []
    with torch.no_grad():
        if 0 in chosen:
            _untie(hf)
            _project_rows(hf.get_input_embeddings().weight, rd, dim=1)
            edited.append("model.embed_tokens.weight")
        for index in chosen:
            for param_name, tensor, dim in _writes(hf.model.layers[index], index, d_model):
                _project_rows(tensor, rd, dim=dim)
                edited.append(param_name)
    record = Orthogonalization(
        source=name,
        family=family.name,
        layers=chosen,
        direction_sha256=hashlib.sha256(r.numpy().astype("<f8").tobytes()).hexdigest(),
        direction=tuple(float(v) for v in r.tolist()),
        exact=exact,
        edited=tuple(edited),
    )
    hf.mechintro_orthogonalization = record
    if out is not None:
        tok = tokenizer if tokenizer is not None else tok
        if tok is None:
            raise ValueError("saving a plain Hugging Face model needs tokenizer= (for load_model(out))")
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(folder)
        tok.save_pretrained(folder)
        (folder / ORTHOGONALIZE_RECORD).write_text(json.dumps(record.to_json(), indent=1))
    return hf.eval()
