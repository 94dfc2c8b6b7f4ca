"""Transcoders: Gemma Scope 2 (sae-lens releases or Google's raw files), sae-lens folders, the organism's.

Every transcoder returned here is a sae-lens object whose metadata is re-wired to mechintro's hook names:
input ``blocks.L.ln2.hook_out`` (the pre-feedforward-norm output) and output ``blocks.L.hook_mlp_out`` (the
post-feedforward-norm output). sae-lens's Gemma Scope 2 configs name ``hook_mlp_in``, which in
TransformerLens is the residual *before* that norm; the name it gave is kept as ``metadata.source_hook_name``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from torch import Tensor

from mechintro.models import GEMMA3_LAYERS, HookNames, spec_for
from mechintro.steering import check_layer, hooks_context

RAW_PARAMS = "params.safetensors"
SAE_LENS_CFG = "cfg.json"
LOCAL_LAYER_PATTERN = "layer_{layer}"

Transcoders = dict[int, Any]


class TranscoderMismatchError(ValueError):
    """A transcoder does not fit the model it is used with."""


# ----------------------------------------------------------------------------------------------- building


def _wire(tc: Any, *, layer: int, model_name: str | None = None) -> Any:
    meta = tc.cfg.metadata
    if "source_hook_name" not in meta:
        meta.source_hook_name = meta.hook_name
    meta.hook_name = HookNames.transcoder_in(layer)
    meta.hook_name_out = HookNames.transcoder_out(layer)
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
    params: dict[str, Tensor], *, layer: int, model_name: str | None = None, device: str = "cpu"
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
        "metadata": {"hook_name": f"blocks.{layer}.hook_mlp_in", "model_name": model_name},
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
    return _wire(tc, layer=layer, model_name=model_name)


def load_folder(folder: str | Path, *, layer: int, device: str = "cpu") -> Any:
    """One transcoder from a local folder, in sae-lens format (cfg.json) or Google's raw
    params.safetensors."""
    from sae_lens import SAE

    folder = Path(folder)
    if (folder / SAE_LENS_CFG).exists():
        return _wire(SAE.load_from_disk(folder, device=device), layer=layer)
    if (folder / RAW_PARAMS).exists():
        return from_raw_params(load_file(folder / RAW_PARAMS), layer=layer, device=device)
    raise FileNotFoundError(f"{folder} holds neither a sae-lens transcoder ({SAE_LENS_CFG}) nor {RAW_PARAMS}")


def save_transcoder(tc: Any, folder: str | Path) -> Path:
    """Save in sae-lens format (loadable by ``SAE.load_from_disk`` and :func:`load_folder`)."""
    folder = Path(folder)
    tc.save_model(folder)
    return folder


def _from_release(release: str, sae_id: str, *, layer: int, device: str) -> Any:
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
            SAE.from_pretrained(release, sae_id, device=device), layer=layer, model_name=lookup.model
        )
    try:
        path = hf_hub_download(lookup.repo_id, f"{lookup.saes_map[sae_id]}/{RAW_PARAMS}")
    except Exception as err:  # offline / no cache / no network
        raise FileNotFoundError(
            f"cannot get {lookup.repo_id}/{lookup.saes_map[sae_id]}/{RAW_PARAMS}: not in the local Hugging "
            "Face "
            f"cache and the hub is unreachable ({type(err).__name__}). Download it first, or pass source= a "
            "local "
            "folder."
        ) from err
    return from_raw_params(load_file(path), layer=layer, model_name=lookup.model, device=device)


# ----------------------------------------------------------------------------------------------- loading


def check_transcoder(model: Any, tc: Any, *, layer: int) -> None:
    """Raise :class:`TranscoderMismatchError` unless ``tc`` reads and writes the model's residual width."""
    d_model = int(model.cfg.d_model)
    d_in, d_out = int(tc.cfg.d_in), int(getattr(tc.cfg, "d_out", tc.cfg.d_in))
    if d_in != d_model or d_out != d_model:
        raise TranscoderMismatchError(
            f"the layer-{layer} transcoder maps d_in={d_in} -> d_out={d_out}, but the model's d_model is "
            f"{d_model}"
        )
    made_for, spec_name = tc.cfg.metadata.get("model_name"), spec_for(model).name
    if made_for in GEMMA3_LAYERS and spec_name in GEMMA3_LAYERS and made_for != spec_name:
        raise TranscoderMismatchError(
            f"the layer-{layer} transcoder is for {made_for}, but the model is {spec_name}"
        )


def load_transcoders(
    model: Any,
    layers: Sequence[int] | int | None = None,
    *,
    source: str | Path | None = None,
    id_pattern: str | None = None,
    device: str | None = None,
) -> Transcoders:
    """Load transcoders for ``layers`` (default: all) as ``{layer: sae-lens transcoder}``.

    Args:
        source: a sae-lens release (e.g. ``"gemma-scope-2-27b-it-transcoders-all"``), or a local folder
        holding
            one sub-folder per layer named by ``id_pattern`` (each in sae-lens format or Google's raw
            ``params.safetensors``). Default: the model's own (the organism's, or Gemma Scope 2 for Gemma 3).
        id_pattern: id / sub-folder pattern with ``{layer}``, e.g.
        ``"layer_{layer}_width_16k_l0_small_affine"``.
    """
    spec = spec_for(model)
    n_layers = spec.n_layers
    if layers is None:
        layers = list(range(n_layers))
    elif isinstance(layers, int):
        layers = [layers]
    for layer in layers:
        check_layer(model, layer)
    source = source if source is not None else spec.transcoder_release
    if source is None:
        raise ValueError(
            f"{spec.name} has no default transcoders; pass source= a sae-lens release or a folder"
        )
    local = Path(source).expanduser()
    pattern = id_pattern or (LOCAL_LAYER_PATTERN if local.is_dir() else spec.transcoder_id_pattern)
    if pattern is None or "{layer}" not in pattern:
        raise ValueError(f"id_pattern must contain '{{layer}}', got {pattern!r}")
    device = device or str(model.cfg.device)
    out: Transcoders = {}
    for layer in layers:
        if local.is_dir():
            tc = load_folder(local / pattern.format(layer=layer), layer=layer, device=device)
        else:
            tc = _from_release(str(source), pattern.format(layer=layer), layer=layer, device=device)
        check_transcoder(model, tc, layer=layer)
        out[layer] = tc
    return out


# ----------------------------------------------------------------------------------------------- encoding


def _positions(positions: int | Sequence[int] | str | None, seq: int) -> list[int]:
    if positions is None or positions == "last":
        return [seq - 1]
    if positions == "all":
        return list(range(seq))
    pos = [positions] if isinstance(positions, int) else list(positions)
    out = [p + seq if p < 0 else p for p in pos]
    if any(not 0 <= p < seq for p in out):
        raise ValueError(f"positions {pos} outside the sequence of length {seq}")
    return out


def transcoder_inputs(
    model: Any,
    layers: Sequence[int],
    tokens: Tensor,
    *,
    positions: int | Sequence[int] | str | None = None,
    attention_mask: Tensor | None = None,
) -> dict[int, Float[Tensor, "batch pos d_model"]]:
    """The transcoder inputs (``ln2.hook_out``) of ``layers`` at ``positions``, from one forward pass."""
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    pos = _positions(positions, tokens.shape[1])
    got: dict[int, Tensor] = {}

    def grab(layer: int):
        def hook(x: Tensor, hook: Any = None) -> None:
            got[layer] = x[:, pos, :].detach()

        return hook

    hooks = [(HookNames.transcoder_in(layer), grab(layer)) for layer in layers]
    with torch.no_grad(), hooks_context(model, hooks):
        model(tokens, attention_mask=attention_mask, stop_at_layer=max(layers) + 1)
    return got


def encode_at(
    model: Any,
    transcoders: Transcoders,
    tokens: Tensor,
    *,
    positions: int | Sequence[int] | str | None = None,
    attention_mask: Tensor | None = None,
    sparse: bool = False,
) -> dict[int, Tensor]:
    """Feature activations of every transcoder at ``positions`` (default: the last prompt token).

    Args:
        tokens: ``[seq]`` or ``[batch, seq]`` (left-padded batches: the last position is the last prompt
        token).
        positions: ``"last"`` (default), ``"all"``, an index or a list of indices.
        sparse: return torch sparse COO tensors (for 262k-wide layers).

    Returns ``{layer: [batch, n_positions, d_sae]}``.
    """
    inputs = transcoder_inputs(
        model, sorted(transcoders), tokens, positions=positions, attention_mask=attention_mask
    )
    out: dict[int, Tensor] = {}
    with torch.no_grad():
        for layer, tc in transcoders.items():
            acts = tc.encode(inputs[layer].to(tc.W_enc.dtype))
            out[layer] = acts.to_sparse() if sparse else acts
    return out


def mlp_replacement_hooks(model: Any, transcoders: Transcoders) -> list[tuple[str, Any]]:
    """Hooks that replace each layer's MLP output by its transcoder's prediction from the MLP input.

    The transcoder reads ``ln2.hook_out`` and its output overwrites ``hook_mlp_out`` of the same layer in the
    same call, so the replacement also holds position by position during KV-cached generation.
    """
    for layer, tc in transcoders.items():
        check_transcoder(model, tc, layer=layer)
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

    hooks = [(HookNames.transcoder_in(layer), read(layer)) for layer in transcoders]
    return hooks + [(HookNames.transcoder_out(layer), write(layer)) for layer in transcoders]


def replace_mlps(model: Any, transcoders: Transcoders) -> Any:
    """Context manager: run the model with every given layer's MLP replaced by its transcoder."""
    return hooks_context(model, mlp_replacement_hooks(model, transcoders))
