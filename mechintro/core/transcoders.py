"""Transcoders: Gemma Scope 2 (sae-lens releases or Google's raw files), sae-lens folders and releases,
circuit-tracer's per-layer files, the organism's.

Every transcoder returned here is a sae-lens object whose metadata is re-wired to the site the dictionary
itself names (:mod:`mechintro.core.dictionary_sites`), among its model family's candidates: for Gemma 3's
Gemma Scope 2, input ``blocks.L.ln2.hook_out`` (the pre-feedforward-norm output) and output
``blocks.L.hook_mlp_out`` (the post-feedforward-norm output). ``metadata.hook_name`` / ``hook_name_out`` are
then the bridge hook points it reads and writes (the single source of truth every reader uses:
:func:`transcoder_hooks`), ``metadata.site`` / ``site_out`` the family's site names, and
``metadata.source_hook_name`` / ``source_hook_name_out`` the names the dictionary recorded (sae-lens's Gemma
Scope 2 configs name ``hook_mlp_in``, which in TransformerLens is the residual *before* that norm).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file
from torch import Tensor

from mechintro.core import dictionary_formats as formats
from mechintro.core.dictionary_sites import (
    SiteCheck,
    WrongSiteError,
    check_reconstruction,
    family_of_model_name,
    fvu,
    recorded_fvu,
    site_from_recorded,
    stack_positions,
)
from mechintro.core.families import Family
from mechintro.core.fingerprint import weights_fingerprint
from mechintro.core.hooks import Positions, capture, check_layer, hooks_context
from mechintro.core.models import (
    GEMMA3_LAYERS,
    HookNames,
    Model,
    Transcoders,
    family,
    hook_names,
    require_mechanism,
    spec_for,
)

__all__ = [
    "CHECKS",
    "LazyTranscoders",
    "SiteCheck",
    "TranscoderMismatchError",
    "WrongSiteError",
    "check_transcoder",
    "encode_at",
    "encode_features",
    "feature_name",
    "from_raw_params",
    "input_candidates",
    "load_folder",
    "load_transcoders",
    "mlp_replacement_hooks",
    "parse_feature",
    "parse_features",
    "replace_mlps",
    "save_transcoder",
    "site_check_prompts",
    "transcoder_hooks",
    "transcoder_inputs",
    "transcoder_site",
]

RAW_PARAMS = "params.safetensors"
SAE_LENS_CFG = "cfg.json"
LOCAL_LAYER_PATTERN = "layer_{layer}"
Check = Literal["reconstruction", "hook", "none"]
CHECKS: tuple[Check, ...] = ("reconstruction", "hook", "none")
"""``check=`` of :func:`load_transcoders`: ``"reconstruction"`` (default: the site comes from the recorded
hook and the reconstruction error confirms it), ``"hook"`` (from the recorded hook only), ``"none"`` (the
recorded hook where it names a candidate, else the family's default; nothing refused on site grounds)."""


class TranscoderMismatchError(ValueError):
    """A transcoder does not fit the model it is used with."""


# ----------------------------------------------------------------------------------------------- building


def _recorded_layer(tc: Any) -> int | None:
    """The layer a transcoder's own metadata names (``metadata.layer``, else its hook name), if any."""
    meta = tc.cfg.metadata
    if meta.get("layer") is not None:
        return int(meta.get("layer"))
    match = re.match(r"^(?:blocks|model\.layers|layers)\.(\d+)\.", str(meta.get("hook_name") or ""))
    return int(match.group(1)) if match else None


def _choose_site(
    fam: Family, meta: Any, *, side: Literal["input", "output"], layer: int, fmt: str, check: Check
) -> str:
    """The family site a dictionary's metadata names on ``side``."""
    default = "mlp_in" if side == "input" else "mlp_out"
    out = side == "output"
    site = meta.get("site_out" if out else "site")
    if site is not None:  # wired by mechintro before: the site itself
        candidates = fam.transcoder_out_candidates if out else fam.transcoder_in_candidates
        if site in candidates or check == "none":
            return str(site) if site in candidates else default
        raise WrongSiteError(f"the dictionary's recorded {side} site {site!r} is none of {list(candidates)}")
    # a Hugging Face module name, where the format records one (sae-lens's hf_hook_name), is literal
    name = meta.get("hf_hook_name_out" if out else "hf_hook_name") or meta.get(
        "hook_name_out" if out else "hook_name"
    )
    if name is None:
        return default
    try:
        return site_from_recorded(fam, str(name), side=side, layer=layer, fmt=fmt)
    except WrongSiteError:
        if check == "none":
            return default
        raise


def _wire(
    tc: Any,
    *,
    layer: int,
    model_name: str | None = None,
    where: str = "",
    names: HookNames | None = None,
    fmt: str = "sae_lens",
    check: Check = "hook",
) -> Any:
    """Point a transcoder's metadata at the bridge hook points of the sites it names for ``layer``
    (refusing another layer's).

    ``names``: the model family's (:func:`~mechintro.core.models.hook_names`); default Gemma 3's. ``fmt``:
    the dictionary's format, which decides how its recorded hook is read.
    """
    fam = (names or HookNames.of_family("gemma3")).family
    meta = tc.cfg.metadata
    recorded = _recorded_layer(tc)
    if recorded is not None and recorded != layer:
        raise TranscoderMismatchError(
            f"the transcoder{where} was made for layer {recorded}, not layer {layer} (are the layer folders "
            "swapped?)"
        )
    if "source_hook_name" in meta and meta.get("site") is None:
        fmt = "mechintro"  # wired by an earlier mechintro: hook_name is already a bridge hook point
    try:
        site_in = _choose_site(fam, meta, side="input", layer=layer, fmt=fmt, check=check)
        site_out = _choose_site(fam, meta, side="output", layer=layer, fmt=fmt, check=check)
    except WrongSiteError as err:
        raise WrongSiteError(f"the layer-{layer} transcoder{where}: {err}") from None
    if "source_hook_name" not in meta:
        meta.source_hook_name = meta.get("hook_name")
        meta.source_hook_name_out = meta.get("hook_name_out")
    meta.site, meta.site_out = site_in, site_out
    meta.hook_name = fam.site(site_in).hook_name(layer)
    meta.hook_name_out = fam.site(site_out).hook_name(layer)
    meta.layer = layer
    if meta.get("dictionary_format") is None:
        meta.dictionary_format = fmt
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


def transcoder_hooks(tc: Any) -> tuple[str, str]:
    """``(input hook, output hook)``: the bridge hook points a (mechintro-wired) transcoder reads and
    writes, from its ``metadata.hook_name`` / ``hook_name_out``."""
    meta = tc.cfg.metadata
    wired = meta.get("site") is not None or "source_hook_name" in meta  # the latter: an older mechintro's
    if not wired or meta.get("hook_name") is None or meta.get("hook_name_out") is None:
        raise ValueError(
            "this transcoder was not wired by mechintro (no metadata.site); load it with load_transcoders"
        )
    return str(meta.hook_name), str(meta.hook_name_out)


def transcoder_site(model: Model, transcoders: Mapping[int, Any] | None, layer: int) -> tuple[str, str]:
    """``(input hook, output hook)`` of layer ``layer``'s transcoder in ``transcoders``: the site it records
    (:func:`transcoder_hooks`, chosen from its recorded hook when it was loaded), or the family's default (the
    MLP's input, and the MLP sublayer's update of the residual) for a layer without one or a dictionary
    mechintro did not wire. The one place the readers, interventions and attribution get a transcoder's
    hooks from. A :class:`LazyTranscoders` answers from the hooks it recorded when it last loaded the layer.
    """
    if transcoders is not None and layer in transcoders:
        recorded = getattr(transcoders, "hooks_of", None)
        if recorded is not None:
            return recorded(layer)
        meta = transcoders[layer].cfg.metadata
        if meta.get("site") is not None or "source_hook_name" in meta:
            return transcoder_hooks(transcoders[layer])
    names = hook_names(model)
    return names.transcoder_in(layer), names.transcoder_out(layer)


def input_candidates(model: Model, transcoders: Mapping[int, Any] | None, layer: int) -> list[str]:
    """The hooks where layer ``layer``'s transcoder may read, without loading it: its input hook when known
    (a loaded mapping, or a :class:`LazyTranscoders` that has loaded the layer before), else every input
    candidate of the family (:attr:`~mechintro.core.families.Family.transcoder_in_candidates`). Capture
    them all, then encode from ``transcoder_site(model, transcoders, layer)[0]`` once the layer is loaded:
    a lazy mapping then loads each layer once."""
    known = getattr(transcoders, "known_hooks", None)
    if known is None or known(layer) is not None:
        return [transcoder_site(model, transcoders, layer)[0]]
    names = hook_names(model)
    names._require_mechanism("a transcoder site")
    return list(dict.fromkeys(names.site(c, layer) for c in names.family.transcoder_in_candidates))


def from_raw_params(
    params: dict[str, Tensor],
    *,
    layer: int,
    model_name: str | None = None,
    device: str = "cpu",
    names: HookNames | None = None,
    dtype: str | torch.dtype | None = None,
) -> Any:
    """A sae-lens JumpReLU (skip) transcoder from Google's raw Gemma Scope 2 tensors.

    ``params`` has ``w_enc [d_in, d_sae]``, ``w_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, ``threshold`` and,
    for the affine variant, ``affine_skip_connection [d_in, d_out]``. It reads the pre-feedforward-norm output
    and writes the post-feedforward-norm output (recorded as sae-lens records them: ``hook_mlp_in`` /
    ``hook_mlp_out``). ``dtype``: of the weights (default float32).
    """
    meta = {
        "hook_name": HookNames.sae_lens_mlp_in(layer),
        "hook_name_out": f"blocks.{layer}.hook_mlp_out",
        "model_name": model_name,
        "dictionary_format": "gemma_scope_2",
    }
    tc = formats.from_gemma_scope_2(params, metadata=meta, dtype=dtype, device=device)
    return _wire(tc, layer=layer, model_name=model_name, names=names, fmt="gemma_scope_2")


def _is_gemma_scope_2_cfg(meta: Any) -> bool:
    """A sae-lens config of a Gemma Scope 2 dictionary (sae-lens records ``hook_mlp_in`` for them)."""
    return str(meta.get("model_name") or "").startswith("google/gemma-3") and str(
        meta.get("hook_name") or ""
    ).endswith(".hook_mlp_in")


def load_folder(
    folder: str | Path,
    *,
    layer: int,
    device: str = "cpu",
    names: HookNames | None = None,
    dtype: str | torch.dtype | None = None,
    check: Check = "hook",
) -> Any:
    """One transcoder from a local path: a sae-lens folder (cfg.json), a folder with Google's raw
    params.safetensors, or a circuit-tracer per-layer file (``layer_L.safetensors``, its set's
    ``config.yaml`` beside it).

    ``names``: the hook names of the model family it is wired to (default Gemma 3's). ``dtype``: of the
    weights (default: the sae-lens config's, float32 for raw tensors).
    """
    from sae_lens import SAE

    folder = Path(folder)
    if (folder / SAE_LENS_CFG).exists():
        formats.topk_classes()  # registers mechintro's TopK class, so sae-lens can read one back
        tc = SAE.load_from_disk(folder, device=device)
        if dtype is not None:
            tc = formats.cast(tc, dtype)
        fmt = "gemma_scope_2" if _is_gemma_scope_2_cfg(tc.cfg.metadata) else "sae_lens"
        return _wire(tc, layer=layer, where=f" in {folder}", names=names, fmt=fmt, check=check)
    if (folder / RAW_PARAMS).exists():
        return from_raw_params(
            load_file(folder / RAW_PARAMS), layer=layer, device=device, names=names, dtype=dtype
        )
    file = folder if folder.suffix == ".safetensors" else folder.with_name(folder.name + ".safetensors")
    if file.is_file():
        return _from_circuit_tracer_file(
            file, layer=layer, device=device, names=names, dtype=dtype, check=check
        )
    raise formats.UnknownFormatError(
        f"{folder} holds no dictionary in a known format; formats: {list(formats.FORMATS)} (a sae-lens "
        f"folder with {SAE_LENS_CFG}, a Gemma Scope 2 folder with {RAW_PARAMS}, or a circuit-tracer file "
        f"{folder.name}.safetensors with its set's {formats.CIRCUIT_TRACER_CONFIG})"
    )


def _from_circuit_tracer_file(
    file: Path,
    *,
    layer: int,
    device: str,
    names: HookNames | None,
    dtype: str | torch.dtype | None,
    check: Check,
    set_config: Mapping[str, Any] | None = None,
    model_name: str | None = None,
) -> Any:
    cfg = dict(set_config if set_config is not None else formats.circuit_tracer_config(file.parent) or {})

    def hook(key: str) -> str | None:
        value = cfg.get(key)
        return None if value is None else f"blocks.{layer}.{value}"

    meta = {
        "hook_name": hook("feature_input_hook"),
        "hook_name_out": hook("feature_output_hook"),
        "model_name": model_name or cfg.get("model_name"),
        "dictionary_format": "circuit_tracer",
    }
    tc = formats.from_circuit_tracer(
        file, metadata=meta, activation=cfg.get("activation"), k=cfg.get("k"), dtype=dtype, device=device
    )
    return _wire(tc, layer=layer, where=f" in {file}", names=names, fmt="circuit_tracer", check=check)


def save_transcoder(tc: Any, folder: str | Path) -> Path:
    """Save in sae-lens format (loadable by ``SAE.load_from_disk`` and :func:`load_folder`)."""
    folder = Path(folder)
    tc.save_model(folder)
    return folder


def _hub_file(repo_id: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename)
    except Exception as err:  # offline / no cache / no network
        raise FileNotFoundError(
            f"cannot get {repo_id}/{filename}: not in the local Hugging Face cache and the hub is "
            f"unreachable ({type(err).__name__}). Download it first, or pass source= a local folder."
        ) from err


def _from_release(
    release: str,
    sae_id: str,
    *,
    layer: int,
    device: str,
    names: HookNames | None = None,
    dtype: str | torch.dtype | None = None,
    check: Check = "hook",
) -> Any:
    """A sae-lens release: Gemma Scope 2 (``gemma_3``) and mwhanna's Qwen3 transcoders (circuit-tracer's
    per-layer files, ``mwhanna_transcoder``) are read here from the local Hub cache first; others through
    sae-lens."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = sorted(r for r in directory if "transcoder" in r and ("gemma-scope-2" in r or "qwen3" in r))
        raise ValueError(f"unknown sae-lens release {release!r}; transcoder releases: {close}")
    lookup = directory[release]
    if sae_id not in lookup.saes_map:
        same_layer = sorted(
            i for i in lookup.saes_map if i == f"layer_{layer}" or i.startswith(f"layer_{layer}_")
        )
        raise ValueError(f"{release} has no id {sae_id!r}; ids for layer {layer}: {same_layer}")
    if lookup.conversion_func == "gemma_3":
        path = _hub_file(lookup.repo_id, f"{lookup.saes_map[sae_id]}/{RAW_PARAMS}")
        return from_raw_params(
            load_file(path), layer=layer, model_name=lookup.model, device=device, names=names, dtype=dtype
        )
    if lookup.conversion_func == "mwhanna_transcoder":  # sae-lens records mlp.hook_in -> hook_mlp_out
        path = _hub_file(lookup.repo_id, lookup.saes_map[sae_id])
        hooks = {"feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out"}
        return _from_circuit_tracer_file(
            Path(path),
            layer=layer,
            device=device,
            names=names,
            dtype=dtype,
            check=check,
            set_config=hooks,
            model_name=lookup.model,
        )
    tc = SAE.from_pretrained(release, sae_id, device=device)
    tc = formats.cast(tc, dtype) if dtype is not None else tc
    return _wire(tc, layer=layer, model_name=lookup.model, names=names, check=check)


# ----------------------------------------------------------------------------------------------- loading


def check_transcoder(model: Model, tc: Any, *, layer: int) -> None:
    """Raise :class:`TranscoderMismatchError` unless ``tc`` fits layer ``layer`` of ``model``.

    Checked: ``d_in`` and ``d_out`` equal the model's ``d_model``; the layer the transcoder records is
    ``layer``; the model it records is of the model's family (from its name: ``google/gemma-3-…``,
    ``qwen3-4b``, ``meta-llama/Llama-3.2-1B``, …), is this Gemma 3 when both are Gemma 3 ids, and, for the
    weight fingerprint of :func:`~mechintro.core.fingerprint.weights_fingerprint` that mechintro-trained
    transcoders carry, is this model.
    """
    d_model = int(model.cfg.d_model)
    d_in, d_out = int(tc.cfg.d_in), int(getattr(tc.cfg, "d_out", tc.cfg.d_in))
    meta, spec = tc.cfg.metadata, spec_for(model)
    made_for = meta.get("model_name")
    fam, made_fam = family(model), family_of_model_name(made_for)
    if made_fam is not None and made_fam.name != fam.name:
        raise TranscoderMismatchError(
            f"the layer-{layer} transcoder is for {made_for} ({made_fam.title}), but the model is "
            f"{spec.name} ({fam.title})"
        )
    if d_in != d_model or d_out != d_model:
        raise TranscoderMismatchError(
            f"the layer-{layer} transcoder maps d_in={d_in} -> d_out={d_out}, but the model's d_model is "
            f"{d_model}" + (f" (the transcoder is for {made_for})" if made_for else "")
        )
    recorded = _recorded_layer(tc)
    if recorded is not None and recorded != layer:
        raise TranscoderMismatchError(f"the transcoder given for layer {layer} was made for layer {recorded}")
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


CHECK_VARIANTS = (
    "original",
    "unprompted",
    "skeptical",
    "alternative_path",
    "structured_format",
    "phenomenology",
)
"""Prompt variants the reconstruction check reads, in turn (different lengths and words)."""


def site_check_prompts(model: Model, settings: SiteCheck | None = None) -> list[Int[Tensor, " seq"]]:
    """The token ids the reconstruction check measures errors on: ``settings.n_prompts`` trial prompts of
    :data:`CHECK_VARIANTS` in turn (trial ``i`` of the ``i``-th)."""
    from mechintro.core.prompts import trial_prompt  # prompts needs models only; no circle

    n = (settings or SiteCheck()).n_prompts
    return [
        trial_prompt(model, trial=i + 1, variant=CHECK_VARIANTS[i % len(CHECK_VARIANTS)]).tokens
        for i in range(n)
    ]


class _SiteActivations:
    """Every candidate site's activations on a few trial prompts, captured once (on first use) for all
    ``layers``; what the reconstruction check measures errors on."""

    def __init__(self, model: Model, layers: Sequence[int], settings: SiteCheck) -> None:
        self.model, self.layers, self.settings = model, list(layers), settings
        self._acts: dict[str, Tensor] | None = None

    def _names(self, layer: int) -> list[str]:
        fam = family(self.model)
        sites = (*fam.transcoder_in_candidates, *fam.transcoder_out_candidates)
        return list(dict.fromkeys(fam.site(s).hook_name(layer) for s in sites))

    def get(self, hook: str) -> Tensor:
        if self._acts is None:
            names = [n for layer in self.layers for n in self._names(layer)]
            got: dict[str, list[Tensor]] = {n: [] for n in names}
            device = self.model.cfg.device
            with torch.no_grad():
                for tokens in site_check_prompts(self.model, self.settings):
                    tokens = tokens[None].to(device)
                    with capture(self.model, names, positions="all") as acts:
                        self.model(tokens, stop_at_layer=max(self.layers) + 1)
                    for n in names:
                        got[n].append(acts[n])
            self._acts = {n: stack_positions(v) for n, v in got.items()}
        return self._acts[hook]


def _reconstruction_errors(
    model: Model, tc: Any, layer: int, acts: _SiteActivations
) -> dict[tuple[str, str], float]:
    """FVU of ``tc`` at every (input candidate, output candidate) pair of ``layer``."""
    fam = family(model)
    out: dict[tuple[str, str], float] = {}
    with torch.no_grad():
        for site_in in fam.transcoder_in_candidates:
            x = acts.get(fam.site(site_in).hook_name(layer))
            pred = tc(x.to(tc.W_enc.device, tc.W_enc.dtype)).float().cpu()
            for site_out in fam.transcoder_out_candidates:
                out[(site_in, site_out)] = fvu(pred, acts.get(fam.site(site_out).hook_name(layer)).float())
    return out


def _layer_loader(
    model: Model,
    *,
    source: str | Path | None,
    id_pattern: str | None,
    device: str | None,
    dtype: str | torch.dtype | None = None,
    check: Check = "reconstruction",
    site_check: SiteCheck | None = None,
    layers: Sequence[int] = (),
) -> Callable[[int], Any]:
    """A function loading (and checking) the transcoder of one layer."""
    require_mechanism(model, "loading transcoders")
    if check not in CHECKS:
        raise ValueError(f"unknown check {check!r}; valid: {list(CHECKS)}")
    spec = spec_for(model)
    names = hook_names(model)
    source = source if source is not None else spec.transcoder_release
    if source is None:
        raise ValueError(
            f"{spec.name} has no default transcoders; pass source= a sae-lens release or a folder"
        )
    local = Path(source).expanduser()
    is_folder = local.is_dir()  # decided once: a lazy mapping keeps its meaning if the folder goes away
    set_config = formats.circuit_tracer_config(local) if is_folder else None
    pattern = id_pattern or (LOCAL_LAYER_PATTERN if is_folder else spec.transcoder_id_pattern)
    if pattern is None or "{layer}" not in pattern:
        raise ValueError(f"id_pattern must contain '{{layer}}', got {pattern!r}")
    device = device or str(model.cfg.device)
    settings = site_check or SiteCheck()
    acts = _SiteActivations(model, layers, settings) if check == "reconstruction" else None

    def load_one(layer: int) -> Any:
        listed = (set_config or {}).get("transcoders")
        if is_folder and listed and id_pattern is None:  # a circuit-tracer set listing its files
            if layer >= len(listed):
                raise ValueError(f"{local / formats.CIRCUIT_TRACER_CONFIG} lists no file for layer {layer}")
            file = Path(str(listed[layer]))
            file = file if file.is_absolute() else local / file
            return _from_circuit_tracer_file(
                file, layer=layer, device=device, names=names, dtype=dtype, check=check, set_config=set_config
            )
        if is_folder:
            return load_folder(
                local / pattern.format(layer=layer),
                layer=layer,
                device=device,
                names=names,
                dtype=dtype,
                check=check,
            )
        return _from_release(
            str(source),
            pattern.format(layer=layer),
            layer=layer,
            device=device,
            names=names,
            dtype=dtype,
            check=check,
        )

    def load(layer: int) -> Any:
        tc = load_one(layer)
        check_transcoder(model, tc, layer=layer)
        if acts is not None:
            meta = tc.cfg.metadata
            errors = _reconstruction_errors(model, tc, layer, acts)
            check_reconstruction(
                errors,
                (meta.site, meta.site_out),
                layer=layer,
                recorded=recorded_fvu(meta),
                settings=settings,
            )
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
        self._hooks: dict[int, tuple[str, str]] = {}

    def __getitem__(self, layer: int) -> Any:
        if layer not in self._layers:
            raise KeyError(f"no transcoder for layer {layer}; this mapping has layers {self._layers}")
        if layer in self._loaded:
            self._loaded.move_to_end(layer)
            return self._loaded[layer]
        tc = self._load(layer)
        self._loaded[layer] = tc
        self._hooks[layer] = transcoder_hooks(tc)
        while len(self._loaded) > self.keep:
            self._loaded.popitem(last=False)
        return tc

    def known_hooks(self, layer: int) -> tuple[str, str] | None:
        """``(input hook, output hook)`` of ``layer``'s transcoder if it was loaded before, else None (never
        loads)."""
        return self._hooks.get(layer)

    def hooks_of(self, layer: int) -> tuple[str, str]:
        """``(input hook, output hook)`` of ``layer``'s transcoder: recorded when it was first loaded (kept
        after it is evicted), loading it now if it never was."""
        if layer not in self._hooks:
            self[layer]
        return self._hooks[layer]

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
    dtype: str | torch.dtype | None = None,
    check: Check = "reconstruction",
    site_check: SiteCheck | None = None,
    lazy: bool = False,
    keep: int = 1,
) -> Transcoders:
    """Load transcoders for ``layers`` (default: all) as ``{layer: sae-lens transcoder}``.

    Args:
        source: a sae-lens release (e.g. ``"gemma-scope-2-27b-it-transcoders-all"``,
            ``"mwhanna-qwen3-4b-transcoders"``), or a local folder with one entry per layer named by
            ``id_pattern``: a sub-folder in sae-lens format or with Google's raw ``params.safetensors``, or a
            circuit-tracer file ``layer_L.safetensors`` (its set's ``config.yaml``, when the folder has one,
            names the hooks, the activation and may list the files). Default: the model's own (the
            organism's, or Gemma Scope 2 for Gemma 3).
        id_pattern: id / sub-folder pattern with ``{layer}``, e.g.
            ``"layer_{layer}_width_16k_l0_small_affine"``.
        device: where the weights go (default: the model's device).
        dtype: the weights' dtype, e.g. ``torch.bfloat16`` for 262k-wide layers (default: float32 for raw
            tensors, the config's for sae-lens folders); inputs are cast to it when encoding.
        check: how the dictionary's site is decided (:data:`CHECKS`): ``"reconstruction"`` (default) takes it
            from the recorded hook and refuses a dictionary whose reconstruction error there is far above the
            one it records or that at another candidate site (the wrong side of a norm); ``"hook"`` takes it
            from the recorded hook alone; ``"none"`` falls back to the family's default site when the
            recorded hook names no candidate.
        site_check: the reconstruction check's settings (:class:`SiteCheck`).
        lazy: return a :class:`LazyTranscoders` that loads each layer on first use, holding at most ``keep``.

    Every transcoder is checked against the model (:func:`check_transcoder`): width, recorded layer,
    recorded model and family.
    """
    layers = _layer_list(model, layers)
    load = _layer_loader(
        model,
        source=source,
        id_pattern=id_pattern,
        device=device,
        dtype=dtype,
        check=check,
        site_check=site_check,
        layers=layers,
    )
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
    transcoders: Transcoders | None = None,
) -> dict[int, Float[Tensor, "batch pos d_model"]]:
    """The transcoder inputs of ``layers`` at ``positions``, from one forward pass.

    Each layer's is what its transcoder in ``transcoders`` reads (:func:`transcoder_hooks`); without
    ``transcoders``, the family's default (the MLP's input: Gemma 3's ``ln2.hook_out``).
    """
    tokens = _check_tokens(tokens)
    layers = [check_layer(model, layer) for layer in layers]
    names: dict[str, list[int]] = {}
    for layer in layers:
        names.setdefault(transcoder_site(model, transcoders, layer)[0], []).append(layer)
    device = model.cfg.device
    mask = None if attention_mask is None else attention_mask.to(device)
    with torch.no_grad(), capture(model, list(names), positions=positions) as acts:
        model(tokens.to(device), attention_mask=mask, stop_at_layer=max(layers) + 1)
    return {layer: acts[name] for name, group in names.items() for layer in group}


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
    inputs = transcoder_inputs(
        model, layers, tokens, positions=positions, attention_mask=attention_mask, transcoders=transcoders
    )
    out: dict[int, Tensor] = {}
    with torch.no_grad():
        for layer in layers:
            tc = transcoders[layer]
            acts = tc.encode(inputs[layer].to(tc.W_enc.dtype))
            out[layer] = acts.to_sparse() if sparse else acts
    return out


def mlp_replacement_hooks(model: Model, transcoders: Transcoders) -> list[tuple[str, Any]]:
    """Hooks that replace each layer's MLP output by its transcoder's prediction from the MLP input.

    Each transcoder reads its own input site (Gemma 3's Gemma Scope 2: ``ln2.hook_out``) and its output
    overwrites its own output site (``hook_mlp_out``) of the same layer in the same call, so the replacement
    also holds position by position during KV-cached generation.
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

    sites = {layer: transcoder_site(model, transcoders, layer) for layer in layers}
    hooks = [(sites[layer][0], read(layer)) for layer in layers]
    return hooks + [(sites[layer][1], write(layer)) for layer in layers]


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
    """``tc.encode(x)[..., indices]``, without the full ``d_sae``-wide product where the activation allows.

    ReLU and JumpReLU (skip) transcoders: ``relu(pre)``, times ``pre > threshold`` for JumpReLU, with
    ``pre = process_sae_in(x) @ W_enc[:, indices] + b_enc[indices]``. TopK: a feature's activation depends on
    every other feature's pre-activation, so the full encoding is computed and indexed (exact, not cheaper).
    """
    arch = str(tc.cfg.architecture())
    idx = torch.as_tensor(indices, dtype=torch.long, device=tc.W_enc.device)
    if arch == "topk_transcoder":
        return tc.encode(x.to(tc.W_enc.device))[..., idx]
    if arch not in _PER_FEATURE:
        raise ValueError(
            f"per-feature encoding supports {sorted(_PER_FEATURE)} and 'topk_transcoder', not {arch!r}"
        )
    sae_in = tc.process_sae_in(x.to(tc.W_enc.device))
    pre = sae_in @ tc.W_enc[:, idx] + tc.b_enc[idx]
    acts = torch.relu(pre)
    threshold = getattr(tc, "threshold", None)
    if threshold is not None:
        acts = acts * (pre > threshold[idx]).to(acts.dtype)
    return acts


_PER_FEATURE = frozenset({"transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"})
