"""Transcoders: Gemma Scope 2 (sae-lens releases or Google's raw files), sae-lens folders, the organism's.

Every transcoder returned here is a sae-lens object whose metadata is re-wired to mechintro's hook names of
the model's family (:func:`mechintro.core.models.hook_names`): input the MLP's input (Gemma 3:
``blocks.L.ln2.hook_out``, the pre-feedforward-norm output; OLMo 2 / 3: ``blocks.L.mlp.hook_in``) and output
``blocks.L.hook_mlp_out`` (the MLP sublayer's update of the residual: for Gemma 3, the post-feedforward-norm
output). sae-lens's Gemma Scope 2 configs name ``hook_mlp_in``, which in
TransformerLens is the residual *before* that norm; the name it gave is kept as ``metadata.source_hook_name``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file
from torch import Tensor

from mechintro.core.fingerprint import weights_fingerprint
from mechintro.core.hooks import Positions, capture, check_layer, hooks_context
from mechintro.core.models import (
    GEMMA3_LAYERS,
    HookNames,
    Model,
    Transcoders,
    hook_names,
    require_mechanism,
    spec_for,
)

__all__ = [
    "LazyTranscoders",
    "TranscoderMismatchError",
    "check_transcoder",
    "encode_at",
    "encode_features",
    "feature_name",
    "from_raw_params",
    "load_folder",
    "load_transcoders",
    "mlp_replacement_hooks",
    "parse_feature",
    "parse_features",
    "replace_mlps",
    "save_transcoder",
    "transcoder_inputs",
]

RAW_PARAMS = "params.safetensors"
SAE_LENS_CFG = "cfg.json"
LOCAL_LAYER_PATTERN = "layer_{layer}"


class TranscoderMismatchError(ValueError):
    """A transcoder does not fit the model it is used with."""


# ----------------------------------------------------------------------------------------------- building


def _recorded_layer(tc: Any) -> int | None:
    """The layer a transcoder's own metadata names (``metadata.layer``, else its hook name), if any."""
    meta = tc.cfg.metadata
    if meta.get("layer") is not None:
        return int(meta.get("layer"))
    match = re.match(r"^blocks\.(\d+)\.", str(meta.get("hook_name") or ""))
    return int(match.group(1)) if match else None


def _wire(
    tc: Any, *, layer: int, model_name: str | None = None, where: str = "", names: HookNames | None = None
) -> Any:
    """Point a transcoder's metadata at mechintro's hook names for ``layer`` (refusing another layer's).

    ``names``: the model family's (:func:`~mechintro.core.models.hook_names`); default Gemma 3's.
    """
    names = names or HookNames.of_family("gemma3")
    meta = tc.cfg.metadata
    recorded = _recorded_layer(tc)
    if recorded is not None and recorded != layer:
        raise TranscoderMismatchError(
            f"the transcoder{where} was made for layer {recorded}, not layer {layer} (are the layer folders "
            "swapped?)"
        )
    if "source_hook_name" not in meta:
        meta.source_hook_name = meta.hook_name
    meta.hook_name = names.transcoder_in(layer)
    meta.hook_name_out = names.transcoder_out(layer)
    meta.layer = layer
    if model_name is not None:
        meta.model_name = model_name
    tc.eval()
    return tc


def transcoder_layer(tc: Any) -> int:
    """The layer a (mechintro-wired) transcoder belongs to."""
    layer = tc.cfg.metadata.get("layer")
    if layer is None:
        raise ValueError("this transcoder was not loaded through mechintro (no metadata.layer)")
    return int(layer)


def from_raw_params(
    params: dict[str, Tensor],
    *,
    layer: int,
    model_name: str | None = None,
    device: str = "cpu",
    names: HookNames | None = None,
) -> Any:
    """A sae-lens JumpReLU (skip) transcoder from Google's raw Gemma Scope 2 tensors.

    ``params`` has ``w_enc [d_in, d_sae]``, ``w_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, ``threshold`` and,
    for the affine variant, ``affine_skip_connection [d_in, d_out]``.
    """
    from sae_lens import SAE

    need = {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"}
    if missing := need - set(params):
        raise ValueError(f"raw transcoder params lack {sorted(missing)}; found {sorted(params)}")
    d_in, d_sae = params["w_enc"].shape
    d_out = params["w_dec"].shape[1]
    skip = "affine_skip_connection" in params
    cfg = {
        "architecture": "jumprelu_skip_transcoder" if skip else "jumprelu_transcoder",
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "d_out": int(d_out),
        "dtype": "float32",
        "device": device,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"hook_name": HookNames.sae_lens_mlp_in(layer), "model_name": model_name},
    }
    state = {
        "W_enc": params["w_enc"],
        "W_dec": params["w_dec"],
        "b_enc": params["b_enc"],
        "b_dec": params["b_dec"],
        "threshold": params["threshold"],
    }
    if skip:
        state["W_skip"] = params["affine_skip_connection"].T.contiguous()
    tc = SAE.from_dict(cfg)
    tc.load_state_dict({k: v.float().to(device) for k, v in state.items()})
    return _wire(tc, layer=layer, model_name=model_name, names=names)


def load_folder(
    folder: str | Path, *, layer: int, device: str = "cpu", names: HookNames | None = None
) -> Any:
    """One transcoder from a local folder: sae-lens format (cfg.json) or Google's raw params.safetensors.

    ``names``: the hook names of the model family it is wired to (default Gemma 3's).
    """
    from sae_lens import SAE

    folder = Path(folder)
    if (folder / SAE_LENS_CFG).exists():
        tc = SAE.load_from_disk(folder, device=device)
        return _wire(tc, layer=layer, where=f" in {folder}", names=names)
    if (folder / RAW_PARAMS).exists():
        return from_raw_params(load_file(folder / RAW_PARAMS), layer=layer, device=device, names=names)
    raise FileNotFoundError(f"{folder} holds neither a sae-lens transcoder ({SAE_LENS_CFG}) nor {RAW_PARAMS}")


def save_transcoder(tc: Any, folder: str | Path) -> Path:
    """Save in sae-lens format (loadable by ``SAE.load_from_disk`` and :func:`load_folder`)."""
    folder = Path(folder)
    tc.save_model(folder)
    return folder


def _from_release(
    release: str, sae_id: str, *, layer: int, device: str, names: HookNames | None = None
) -> Any:
    """Gemma Scope 2 through sae-lens's release directory; Hub files are read from the local cache first."""
    from huggingface_hub import hf_hub_download
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = sorted(r for r in directory if "transcoder" in r and "gemma-scope-2" in r)
        raise ValueError(f"unknown sae-lens release {release!r}; Gemma Scope 2 transcoder releases: {close}")
    lookup = directory[release]
    if sae_id not in lookup.saes_map:
        same_layer = sorted(i for i in lookup.saes_map if i.startswith(f"layer_{layer}_"))
        raise ValueError(f"{release} has no id {sae_id!r}; ids for layer {layer}: {same_layer}")
    if lookup.conversion_func != "gemma_3":
        return _wire(
            SAE.from_pretrained(release, sae_id, device=device),
            layer=layer,
            model_name=lookup.model,
            names=names,
        )
    try:
        path = hf_hub_download(lookup.repo_id, f"{lookup.saes_map[sae_id]}/{RAW_PARAMS}")
    except Exception as err:  # offline / no cache / no network
        raise FileNotFoundError(
            f"cannot get {lookup.repo_id}/{lookup.saes_map[sae_id]}/{RAW_PARAMS}: not in the local Hugging "
            f"Face cache and the hub is unreachable ({type(err).__name__}). Download it first, or pass "
            "source= a local folder."
        ) from err
    return from_raw_params(load_file(path), layer=layer, model_name=lookup.model, device=device, names=names)


# ----------------------------------------------------------------------------------------------- loading


def check_transcoder(model: Model, tc: Any, *, layer: int) -> None:
    """Raise :class:`TranscoderMismatchError` unless ``tc`` fits layer ``layer`` of ``model``.

    Checked: ``d_in`` and ``d_out`` equal the model's ``d_model``; the layer the transcoder records is
    ``layer``; the model it records (a Gemma 3 HF id, or the weight fingerprint of
    :func:`~mechintro.core.fingerprint.weights_fingerprint`
    that mechintro-trained transcoders carry) is this model.
    """
    d_model = int(model.cfg.d_model)
    d_in, d_out = int(tc.cfg.d_in), int(getattr(tc.cfg, "d_out", tc.cfg.d_in))
    if d_in != d_model or d_out != d_model:
        raise TranscoderMismatchError(
            f"the layer-{layer} transcoder maps d_in={d_in} -> d_out={d_out}, but the model's d_model is "
            f"{d_model}"
        )
    recorded = _recorded_layer(tc)
    if recorded is not None and recorded != layer:
        raise TranscoderMismatchError(f"the transcoder given for layer {layer} was made for layer {recorded}")
    meta, spec = tc.cfg.metadata, spec_for(model)
    made_for = meta.get("model_name")
    if made_for in GEMMA3_LAYERS and spec.name in GEMMA3_LAYERS and made_for != spec.name:
        raise TranscoderMismatchError(
            f"the layer-{layer} transcoder is for {made_for}, but the model is {spec.name}"
        )
    fingerprint = meta.get("model_fingerprint")
    if fingerprint and fingerprint != weights_fingerprint(model):
        raise TranscoderMismatchError(
            f"the layer-{layer} transcoder was trained on other weights ({made_for or 'unnamed model'}, "
            f"fingerprint {fingerprint}) than {spec.name} (fingerprint {weights_fingerprint(model)})"
        )


def _layer_list(model: Model, layers: Sequence[int] | int | None) -> list[int]:
    if layers is None:
        return list(range(spec_for(model).n_layers))
    layers = [layers] if not isinstance(layers, (Sequence, range)) or isinstance(layers, str) else layers
    return [check_layer(model, layer) for layer in layers]


def _layer_loader(
    model: Model, *, source: str | Path | None, id_pattern: str | None, device: str | None
) -> Callable[[int], Any]:
    """A function loading (and checking) the transcoder of one layer."""
    require_mechanism(model, "loading transcoders")
    spec = spec_for(model)
    names = hook_names(model)
    source = source if source is not None else spec.transcoder_release
    if source is None:
        raise ValueError(
            f"{spec.name} has no default transcoders; pass source= a sae-lens release or a folder"
        )
    local = Path(source).expanduser()
    is_folder = local.is_dir()  # decided once: a lazy mapping keeps its meaning if the folder goes away
    pattern = id_pattern or (LOCAL_LAYER_PATTERN if is_folder else spec.transcoder_id_pattern)
    if pattern is None or "{layer}" not in pattern:
        raise ValueError(f"id_pattern must contain '{{layer}}', got {pattern!r}")
    device = device or str(model.cfg.device)

    def load(layer: int) -> Any:
        if is_folder:
            tc = load_folder(local / pattern.format(layer=layer), layer=layer, device=device, names=names)
        else:
            tc = _from_release(
                str(source), pattern.format(layer=layer), layer=layer, device=device, names=names
            )
        check_transcoder(model, tc, layer=layer)
        return tc

    return load


class LazyTranscoders(Mapping[int, Any]):
    """``{layer: transcoder}`` that loads a layer when it is first used and keeps at most ``keep`` loaded.

    For 262k-wide Gemma Scope 2 transcoders: iterating layer by layer (as
    :func:`mechintro.mechanism.features` and the
    attribution code do) never holds more than ``keep`` layers' dictionaries in memory.
    """

    def __init__(self, layers: Sequence[int], load: Callable[[int], Any], *, keep: int = 1) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self._layers, self._load, self.keep = list(layers), load, keep
        self._loaded: OrderedDict[int, Any] = OrderedDict()

    def __getitem__(self, layer: int) -> Any:
        if layer not in self._layers:
            raise KeyError(f"no transcoder for layer {layer}; this mapping has layers {self._layers}")
        if layer in self._loaded:
            self._loaded.move_to_end(layer)
            return self._loaded[layer]
        tc = self._load(layer)
        self._loaded[layer] = tc
        while len(self._loaded) > self.keep:
            self._loaded.popitem(last=False)
        return tc

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __contains__(self, layer: object) -> bool:  # Mapping's default would load the layer to answer
        return layer in self._layers

    @property
    def loaded(self) -> list[int]:
        """The layers held in memory now."""
        return list(self._loaded)

    def __repr__(self) -> str:
        return f"LazyTranscoders(layers={self._layers}, loaded={self.loaded}, keep={self.keep})"


def load_transcoders(
    model: Model,
    layers: Sequence[int] | int | None = None,
    *,
    source: str | Path | None = None,
    id_pattern: str | None = None,
    device: str | None = None,
    lazy: bool = False,
    keep: int = 1,
) -> Transcoders:
    """Load transcoders for ``layers`` (default: all) as ``{layer: sae-lens transcoder}``.

    Args:
        source: a sae-lens release (e.g. ``"gemma-scope-2-27b-it-transcoders-all"``), or a local folder with
            one sub-folder per layer named by ``id_pattern`` (each in sae-lens format or Google's raw
            ``params.safetensors``). Default: the model's own (the organism's, or Gemma Scope 2 for Gemma 3).
        id_pattern: id / sub-folder pattern with ``{layer}``, e.g.
            ``"layer_{layer}_width_16k_l0_small_affine"``.
        lazy: return a :class:`LazyTranscoders` that loads each layer on first use, holding at most ``keep``.

    Every transcoder is checked against the model (:func:`check_transcoder`): width, recorded layer,
    recorded model.
    """
    layers = _layer_list(model, layers)
    load = _layer_loader(model, source=source, id_pattern=id_pattern, device=device)
    if lazy:
        return LazyTranscoders(layers, load, keep=keep)
    return {layer: load(layer) for layer in layers}


# ----------------------------------------------------------------------------------------------- encoding


def _check_tokens(tokens: Any) -> Int[Tensor, "batch seq"]:
    tokens = torch.as_tensor(tokens)
    if tokens.is_floating_point() or tokens.dtype == torch.bool or tokens.ndim not in (1, 2):
        raise TypeError(
            f"tokens must be integer token ids of shape [seq] or [batch, seq], got a {tokens.dtype} tensor "
            "of "
            f"shape {tuple(tokens.shape)}"
        )
    return tokens[None] if tokens.ndim == 1 else tokens


def _check_transcoders(transcoders: Transcoders) -> list[int]:
    if not isinstance(transcoders, Mapping) or not transcoders:
        raise ValueError(
            "no transcoders given: pass {layer: transcoder}, e.g. load_transcoders(model) "
            f"(got {type(transcoders).__name__})"
        )
    return sorted(transcoders)


def transcoder_inputs(
    model: Model,
    layers: Sequence[int],
    tokens: Int[Tensor, "batch seq"] | Int[Tensor, " seq"],
    *,
    positions: Positions = "last",
    attention_mask: Tensor | None = None,
) -> dict[int, Float[Tensor, "batch pos d_model"]]:
    """The transcoder inputs (the MLP's input: Gemma 3's ``ln2.hook_out``) of ``layers`` at ``positions``,
    from one forward pass."""
    tokens = _check_tokens(tokens)
    layers = [check_layer(model, layer) for layer in layers]
    hooks = hook_names(model)
    names = {hooks.transcoder_in(layer): layer for layer in layers}
    device = model.cfg.device
    mask = None if attention_mask is None else attention_mask.to(device)
    with torch.no_grad(), capture(model, list(names), positions=positions) as acts:
        model(tokens.to(device), attention_mask=mask, stop_at_layer=max(layers) + 1)
    return {layer: acts[name] for name, layer in names.items()}


def encode_at(
    model: Model,
    transcoders: Transcoders,
    tokens: Int[Tensor, "batch seq"] | Int[Tensor, " seq"],
    *,
    positions: Positions = "last",
    attention_mask: Tensor | None = None,
    sparse: bool = False,
) -> dict[int, Tensor]:
    """Feature activations of every transcoder at ``positions`` (default: the last prompt token).

    Args:
        tokens: ``[seq]`` or ``[batch, seq]`` integer ids (left-padded batches: the last position is the last
            prompt token).
        positions: ``"last"`` (default), ``"all"``, an absolute index or a list of them
            (:data:`mechintro.core.hooks.Positions`).
        sparse: return torch sparse COO tensors (for 262k-wide layers).

    Returns ``{layer: [batch, n_positions, d_sae]}``.
    """
    layers = _check_transcoders(transcoders)
    inputs = transcoder_inputs(model, layers, tokens, positions=positions, attention_mask=attention_mask)
    out: dict[int, Tensor] = {}
    with torch.no_grad():
        for layer in layers:
            tc = transcoders[layer]
            acts = tc.encode(inputs[layer].to(tc.W_enc.dtype))
            out[layer] = acts.to_sparse() if sparse else acts
    return out


def mlp_replacement_hooks(model: Model, transcoders: Transcoders) -> list[tuple[str, Any]]:
    """Hooks that replace each layer's MLP output by its transcoder's prediction from the MLP input.

    The transcoder reads the MLP's input (Gemma 3's ``ln2.hook_out``) and its output overwrites
    ``hook_mlp_out`` of the same layer in the same call, so the replacement also holds position by position
    during KV-cached generation.
    """
    layers = _check_transcoders(transcoders)
    for layer in layers:
        check_transcoder(model, transcoders[layer], layer=layer)
    seen: dict[int, Tensor] = {}

    def read(layer: int):
        def hook(x: Tensor, hook: Any = None) -> None:
            seen[layer] = x

        return hook

    def write(layer: int):
        tc = transcoders[layer]

        def hook(y: Tensor, hook: Any = None) -> Tensor:
            x = seen.pop(layer)
            return tc(x.to(tc.W_enc.dtype)).to(y.dtype)

        return hook

    names = hook_names(model)
    hooks = [(names.transcoder_in(layer), read(layer)) for layer in layers]
    return hooks + [(names.transcoder_out(layer), write(layer)) for layer in layers]


def replace_mlps(model: Model, transcoders: Transcoders) -> Any:
    """Context manager: run the model with every given layer's MLP replaced by its transcoder."""
    return hooks_context(model, mlp_replacement_hooks(model, transcoders), rows="shared")


# ------------------------------------------------------------------------------------------- naming features


_NAME = re.compile(r"^L(\d+) F(\d+)$")


def feature_name(layer: int, index: int) -> str:
    """``"L{layer} F{index}"``."""
    return f"L{int(layer)} F{int(index)}"


def parse_feature(feature: str | tuple[int, int]) -> tuple[int, int]:
    """``(layer, index)`` from ``"L3 F12"`` or ``(3, 12)``."""
    if isinstance(feature, str):
        match = _NAME.match(feature.strip())
        if match is None:
            raise ValueError(f"a feature name looks like 'L3 F12', got {feature!r}")
        return int(match.group(1)), int(match.group(2))
    layer, index = feature
    return int(layer), int(index)


def parse_features(features: Any) -> list[tuple[int, int]]:
    """Features from names, ``(layer, index)`` pairs, or a DataFrame with a ``feature`` column (in its
    order)."""
    if isinstance(features, pd.DataFrame):
        if "feature" not in features.columns:
            raise ValueError(f"a feature table needs a 'feature' column; it has {list(features.columns)}")
        features = features["feature"].tolist()
    if isinstance(features, str):
        features = [features]
    return [parse_feature(f) for f in features]


# ----------------------------------------------------------------------------------------------- encoding


def encode_features(
    tc: Any, x: Float[Tensor, "... d_in"], indices: Int[Tensor, " n"]
) -> Float[Tensor, "... n"]:
    """``tc.encode(x)[..., indices]`` without the full ``d_sae``-wide product.

    Supports sae-lens's ReLU and JumpReLU (skip) transcoders: ``relu(pre)``, times ``pre > threshold`` for
    JumpReLU, with ``pre = process_sae_in(x) @ W_enc[:, indices] + b_enc[indices]``.
    """
    arch = str(tc.cfg.architecture())
    if "topk" in arch:
        raise ValueError(f"per-feature encoding needs a ReLU or JumpReLU transcoder, not {arch!r}")
    idx = torch.as_tensor(indices, dtype=torch.long, device=tc.W_enc.device)
    sae_in = tc.process_sae_in(x.to(tc.W_enc.device))
    pre = sae_in @ tc.W_enc[:, idx] + tc.b_enc[idx]
    acts = torch.relu(pre)
    threshold = getattr(tc, "threshold", None)
    if threshold is not None:
        acts = acts * (pre > threshold[idx]).to(acts.dtype)
    return acts
