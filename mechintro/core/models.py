"""Models: loading a model of a supported family (or an organism) through TransformerBridge, its settings,
hook names.

Everything in mechintro addresses a model through :class:`HookNames` (the only place hook-name strings are
built) and :class:`ModelSpec` (what the paper used for that model: injection layer, strength, transcoders,
Yes/No tokens, chat markers).
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

from mechintro.core.families import (
    Family,
    UnsupportedArchitectureError,
    family_by_name,
    family_of,
    mechanism_problem,
)

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens.model_bridge import TransformerBridge

Model: TypeAlias = "TransformerBridge"
"""A model from :func:`load_model`: a TransformerLens ``TransformerBridge`` around a Hugging Face Gemma 3."""
Transcoders: TypeAlias = "Mapping[int, SAE]"
"""``{layer: transcoder}``: sae-lens objects wired by :func:`mechintro.core.transcoders.load_transcoders`."""

ORGANISM_NAMES = ("organism", "organism-base", "organism-olmo", "organism-olmo-base")
SPEC_FILENAME = "mechintro_spec.json"

# The paper's Gemma3-27B-IT settings (stimuli.json, paper_settings_gemma3_27b_it).
PAPER_N_LAYERS = 62
PAPER_INJECTION_LAYER = 37
PAPER_STRENGTH = 4.0
YES_WORDS = ("yes", "Yes", "YES")
NO_WORDS = ("no", "No", "NO")


def data_dir() -> Path:
    """The folder holding the model organism and its split and report: the user's (``MECHINTRO_DATA``, else
    the per-user data folder) when it has one, else the package data (see :mod:`mechintro.core.resources`)."""
    from mechintro.core import resources

    return resources.organism_root() or resources.package_data()


class _by_family:
    """A :class:`HookNames` method: called on an instance, it reads that instance's family; called on the
    class (``HookNames.resid_post(3)``), it reads Gemma 3's (the organism's), the layout mechintro began
    with."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__

    def __get__(self, obj: Any, owner: type) -> Any:
        return self.fn.__get__(obj if obj is not None else owner.of_family("gemma3"), owner)


class HookNames:
    """Hook-point names of a TransformerBridge, built from its family's description
    (:class:`mechintro.core.families.Family`). The only place these strings are built.

    ``hook_names(model)`` gives the names of ``model``'s family; ``HookNames.resid_post(3)`` on the class
    gives Gemma 3's (the organism's). The residual stream, ``hook_attn_out`` / ``hook_mlp_out`` (the
    sublayers' updates of the residual), the heads entering ``o_proj`` and the final norm have the same names
    in every family; the transcoder input does not. For Gemma 3 it is the *pre-feedforward-norm output*
    (``ln2.hook_out``) and its output is the *post-feedforward-norm output* (``hook_mlp_out``);
    ``hook_mlp_in`` (what sae-lens's Gemma Scope 2 metadata names) is the residual before that norm, so it is
    deliberately not the transcoder input. For OLMo 2 / 3 (norms on the sublayer outputs) it is the MLP's own
    input (``mlp.hook_in``): there the bridge's ``ln2`` is the post-feedforward norm.
    """

    _cache: dict[tuple[str, str | None], HookNames] = {}

    def __init__(self, family: Any, *, problem: str | None = None) -> None:
        self.family = family
        self.problem = problem
        """Why the model these names are for has no mechanism support (a Gemma 4 variant with per-layer
        embeddings, say), or None: the transcoder sites refuse with it."""

    @classmethod
    def of_family(cls, name: str, *, problem: str | None = None) -> HookNames:
        """The names of the family called ``name`` (one instance per family and ``problem``)."""
        key = (name, problem)
        if key not in cls._cache:
            from mechintro.core.families import family_by_name

            cls._cache[key] = cls(family_by_name(name), problem=problem)
        return cls._cache[key]

    def __repr__(self) -> str:
        return f"HookNames({self.family.title})"

    def _require_mechanism(self, what: str) -> None:
        self.family.require_mechanism(what)
        if self.problem is not None:
            raise UnsupportedArchitectureError(f"{what} is not available: {self.problem}")

    @_by_family
    def site(self, name: str, layer: int | None = None) -> str:
        """The hook point of the family's site ``name`` (:attr:`~mechintro.core.families.Family.sites`)."""
        return self.family.site(name).hook_name(layer)

    @_by_family
    def resid_pre(self, layer: int) -> str:
        return self.site("resid_pre", layer)

    @_by_family
    def resid_mid(self, layer: int) -> str:
        return self.site("resid_mid", layer)

    @_by_family
    def resid_post(self, layer: int) -> str:
        return self.site("resid_post", layer)

    @_by_family
    def attn_out(self, layer: int) -> str:
        """The attention sublayer's update of the residual (after any post-attention norm)."""
        return self.site("attn_out", layer)

    @_by_family
    def o_proj_out(self, layer: int) -> str:
        """The attention output: what ``o_proj`` returns, before any post-attention norm."""
        return self.site("o_proj_out", layer)

    @_by_family
    def mlp_out(self, layer: int) -> str:
        """The MLP sublayer's update of the residual (after any post-feedforward norm)."""
        return self.site("mlp_out", layer)

    @_by_family
    def attn_z(self, layer: int) -> str:
        """The concatenated head outputs entering the attention output projection (``o_proj``).

        The bridge's own hook point; ``blocks.L.attn.hook_z`` (the name sae-lens attention SAEs record) is
        TransformerLens's alias for the same point. It carries ``[batch, pos, n_heads, d_head]``. Not
        ``hook_attn_out``: in Gemma 3 that is the post-attention-norm output, after ``o_proj``.
        """
        return self.site("o_proj_in", layer)

    @_by_family
    def mlp_in_prenorm(self, layer: int) -> str:
        """The residual entering the feed-forward norm: what sae-lens's ``hook_mlp_in`` means in TL.

        (``hook_mlp_in`` itself is gated off in the bridge; ``ln2.hook_in`` is the same tensor.) Families with
        no norm before the MLP (OLMo 2 / 3) have no such site.
        """
        return self.site("mlp_in_prenorm", layer)

    @staticmethod
    def sae_lens_mlp_in(layer: int) -> str:
        """The input name sae-lens's Gemma Scope 2 configs give (``hook_mlp_in``); recorded, never hooked."""
        return f"blocks.{layer}.hook_mlp_in"

    @_by_family
    def transcoder_in(self, layer: int) -> str:
        """The MLP's input (what a transcoder reads)."""
        self._require_mechanism("a transcoder site")
        return self.site("mlp_in", layer)

    @_by_family
    def transcoder_out(self, layer: int) -> str:
        """The MLP sublayer's update of the residual (what a transcoder predicts)."""
        self._require_mechanism("a transcoder site")
        return self.site("mlp_out", layer)

    @_by_family
    def final_norm_in(self) -> str:
        """The residual stream entering the final norm (the last block's output, after its hooks)."""
        return self.site("final_norm_in")

    @_by_family
    def final_norm_out(self) -> str:
        return self.site("final_norm_out")

    @_by_family
    def component(self, kind: str, layer: int) -> str:
        """``kind`` in {"attn", "mlp", "resid_pre", "resid_mid", "resid_post"}."""
        table = {
            "attn": self.attn_out,
            "mlp": self.mlp_out,
            "resid_pre": self.resid_pre,
            "resid_mid": self.resid_mid,
            "resid_post": self.resid_post,
        }
        if kind not in table:
            raise ValueError(f"unknown component {kind!r}; valid: {sorted(table)}")
        return table[kind](layer)


@dataclass(frozen=True)
class ModelSpec:
    """The settings mechintro uses for one model."""

    name: str
    """Registered name, HF id or local folder the model was loaded from."""
    n_layers: int
    """Number of transformer blocks."""
    d_model: int
    """Residual-stream width."""
    injection_layer: int
    """Default injection layer (resid_post of this block): the paper's 37/62 at the same relative depth."""
    strength: float
    """Default injection strength (multiplies the raw concept vector)."""
    strength_sweep: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    """Strengths for dose-response sweeps."""
    operating_points: dict[str, float] = field(default_factory=dict, compare=False, hash=False)
    """Named strengths: ``"default"`` (= :attr:`strength`) and any other recorded one, e.g. the organism's
    ``"saturated"`` 4.0 (:meth:`resolve_strength` turns a name into its value)."""
    transcoder_release: str | None = None
    """sae-lens release of the Gemma Scope 2 transcoders, or a local folder, or None."""
    transcoder_id_pattern: str | None = None
    """sae-lens id pattern with ``{layer}``, e.g. ``layer_{layer}_width_262k_l0_big_affine``."""
    yes_ids: tuple[int, ...] = ()
    """Token ids of yes/Yes/YES with and without a leading space (those that are single tokens)."""
    no_ids: tuple[int, ...] = ()
    """Token ids of no/No/NO likewise."""
    turn_start: str = "<start_of_turn>"
    """Chat-template marker opening a turn."""
    turn_end: str = "<end_of_turn>"
    """Chat-template marker closing a turn."""
    user_role: str = "user"
    """Role word after ``turn_start`` for the user."""
    model_role: str = "model"
    """Role word after ``turn_start`` for the assistant."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Anything else recorded with the model (for the organism: training settings)."""
    family: str = "gemma3"
    """The model's family (:attr:`mechintro.core.families.Family.name`): where its sites sit."""
    mechanism_problem: str | None = None
    """Why this model has no mechanism support (dictionaries, patching, attribution); None when it has."""
    calibrated: bool = False
    """Whether the injection point was chosen from a measured sweep (the paper's Gemma3-27B-IT point, the
    organism's calibration); False for a default (the paper's relative depth, or the released code's
    fallback)."""
    provenance: str = ""
    """Where :attr:`injection_layer` and :attr:`strength` come from, in words (see :meth:`describe`)."""

    def valid_layers(self) -> range:
        return range(self.n_layers)

    def describe(self) -> str:
        """One line: the injection point and where it comes from (says when it is only a default)."""
        kind = "calibrated point" if self.calibrated else "default, not a calibrated point"
        return (
            f"{self.name}: inject at layer {self.injection_layer} of {self.n_layers}, strength "
            f"{self.strength:g} ({kind}: {self.provenance})"
        )

    def resolve_strength(self, strength: float | str | None) -> float:
        """A strength given as a number, as the name of an operating point (``"default"``,
        ``"saturated"``...),
        or None (the default)."""
        if strength is None:
            return self.strength
        if isinstance(strength, str):
            points = {"default": self.strength, **self.operating_points}
            if strength not in points:
                raise ValueError(f"unknown operating point {strength!r}; valid: {sorted(points)} or a number")
            return float(points[strength])
        return float(strength)

    def check_layer(self, layer: int) -> int:
        """Return ``layer`` or raise naming the valid range."""
        from mechintro.core import validate

        return validate.layer(layer, n_layers=self.n_layers, model=self.name)


# Gemma 3 instruction-tuned sizes: number of layers per HF id.
GEMMA3_LAYERS = {
    "google/gemma-3-270m-it": 18,
    "google/gemma-3-1b-it": 26,
    "google/gemma-3-4b-it": 34,
    "google/gemma-3-12b-it": 48,
    "google/gemma-3-27b-it": 62,
}


def paper_layer(n_layers: int) -> int:
    """The paper's injection layer (37 of 62) at the same relative depth of an ``n_layers`` model."""
    return min(n_layers - 1, round(PAPER_INJECTION_LAYER / PAPER_N_LAYERS * n_layers))


RELATIVE_DEPTH = (
    f"the paper's layer {PAPER_INJECTION_LAYER} of {PAPER_N_LAYERS} at the same relative depth, strength "
    f"{PAPER_STRENGTH:g}: a default, not a calibrated point; sweep layers and strengths (mi.sweep) to find "
    "this model's"
)
"""The provenance of the injection point of a model neither the paper names nor records its own."""


def _gemma_scope_release(hf_id: str) -> str | None:
    if hf_id not in GEMMA3_LAYERS:
        return None
    size = hf_id.split("gemma-3-")[1].removesuffix("-it")
    return f"gemma-scope-2-{size}-it-transcoders-all"


# ----------------------------------------------------------------------------------------------- loading


class ModelNotAvailableError(OSError):
    """The weights of a model cannot be found locally and the hub cannot be reached."""


_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _resolve(name_or_path: str | os.PathLike) -> tuple[str, Path | None]:
    """(name, local folder or None for a hub id)."""
    name = str(name_or_path)
    if name in ORGANISM_NAMES:
        from mechintro.core import resources

        folder = resources.organism_checkpoint(name)
        if folder is None:
            raise ModelNotAvailableError(
                f"the model organism {name!r} is in none of {[str(p) for p in resources.search_path()]}; "
                "train it with `mechintro organism train`"
            )
        return name, folder
    from mechintro.core.paper_models import paper_model

    record = paper_model(name)
    if record is not None and name == record.key:  # the released code's short name, e.g. "olmo_dpo"
        return record.hf_id, None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotAvailableError(f"{path} is not a Hugging Face model folder (no config.json)")
        return name, path
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise ValueError(
            f"{name!r} is neither a registered name {ORGANISM_NAMES}, an existing folder, nor an HF id like "
            f"'google/gemma-3-27b-it' (known Gemma 3 ids: {sorted(GEMMA3_LAYERS)}; the paper's models by the "
            f"released code's names: {[m.key for m in _paper_models()]})"
        )
    return name, None


def _hub_snapshot(hf_id: str) -> Path:
    """The local snapshot folder of ``hf_id``, or a clear error when it is missing and we are offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return Path(snapshot_download(hf_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        if offline:
            raise ModelNotAvailableError(
                f"{hf_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading "
                "it. "
                "Download it where the hub is reachable, or pass a local folder saved with save_pretrained."
            ) from err
    try:
        return Path(snapshot_download(hf_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # network errors come in many types
        raise ModelNotAvailableError(
            f"could not download {hf_id} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Without hub access, pass a local folder that holds the weights."
        ) from err


def peek_n_layers(name_or_path: str | os.PathLike) -> int | None:
    """The number of layers of a model, read from its ``config.json`` without loading it (None if unknown).

    Lets the command line check a ``--layer`` before spending time on loading.
    """
    try:
        name, folder = _resolve(name_or_path)
    except (ModelNotAvailableError, ValueError):
        return None
    if folder is None:
        from mechintro.core.paper_models import paper_model

        record = paper_model(name)
        return record.n_layers if record is not None else GEMMA3_LAYERS.get(name)
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    n = config.get("num_hidden_layers")
    return int(n) if isinstance(n, int) else None


def peek_operating_points(name_or_path: str | os.PathLike) -> dict[str, float] | None:
    """The named strengths a model records (``"default"`` included), read without loading it; None when the
    model records nothing (its default is then the paper's)."""
    try:
        _, folder = _resolve(name_or_path)
    except (ModelNotAvailableError, ValueError):
        return None
    if folder is None or not (folder / SPEC_FILENAME).exists():
        return None
    recorded = json.loads((folder / SPEC_FILENAME).read_text())
    return {
        "default": float(recorded.get("strength", PAPER_STRENGTH)),
        **recorded.get("operating_points", {}),
    }


def require_peft() -> Any:
    """The ``peft`` module, or an ImportError saying how to install it (``mechintro[train]``)."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            "LoRA adapters (mi.posttrain, load_model(..., adapter=...)) need peft: "
            "pip install 'mechintro[train]'"
        ) from err
    return peft


ADAPTER_METADATA = "mechintro_posttrain.json"
"""What :func:`mechintro.studies.posttrain.posttrain` writes beside an adapter (the base's fingerprint)."""


def check_adapter_base(hf_model: Any, adapter: str | os.PathLike, *, name: str, folder: Path) -> None:
    """Refuse ``adapter`` unless it was trained on ``hf_model`` (the base ``name`` loaded from ``folder``).

    An adapter written by ``mi.posttrain`` records its base's weights fingerprint, which must equal
    ``hf_model``'s; any other peft adapter records ``base_model_name_or_path`` in ``adapter_config.json``,
    which must name ``name`` or ``folder``. Either mismatch raises naming both models.
    """
    from mechintro.core.fingerprint import weights_fingerprint

    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} is not a peft adapter folder (no adapter_config.json)")
    if (path / ADAPTER_METADATA).is_file():
        recorded = json.loads((path / ADAPTER_METADATA).read_text())
        base = recorded.get("base", {})
        if not recorded.get("complete", False):
            raise ValueError(f"{path}: the adapter's training is not complete (resume mi.posttrain first)")
        actual = weights_fingerprint(hf_model)
        if base.get("fingerprint") != actual:
            raise ValueError(
                f"the adapter {path} was trained on {base.get('name')!r} ({base.get('path')}, weights "
                f"fingerprint {str(base.get('fingerprint'))[:12]}), not on {name!r} ({folder}, fingerprint "
                f"{actual[:12]})"
            )
        return
    config = json.loads((path / "adapter_config.json").read_text())
    recorded_base = config.get("base_model_name_or_path")
    if not recorded_base:
        return
    same = recorded_base in (name, str(folder))
    if not same and Path(recorded_base).expanduser().exists():
        same = Path(recorded_base).expanduser().resolve() == Path(folder).resolve()
    if not same:
        raise ValueError(
            f"the adapter {path} was made for {recorded_base!r} (its adapter_config.json "
            f"base_model_name_or_path), not for {name!r} ({folder}); pass check_adapter_base=False if it is "
            "the same model under another name"
        )


def merge_adapter(
    hf_model: Any, adapter: str | os.PathLike, *, name: str, folder: Path, check_base: bool = True
) -> Any:
    """``hf_model`` with the peft ``adapter`` applied and merged into its weights (``merge_and_unload``),
    after :func:`check_adapter_base` (unless ``check_base`` is False)."""
    peft = require_peft()
    if check_base:
        check_adapter_base(hf_model, adapter, name=name, folder=folder)
    wrapped = peft.PeftModel.from_pretrained(hf_model, str(Path(adapter).expanduser()), is_trainable=False)
    return wrapped.merge_and_unload()


def _adapters(adapter: Any) -> tuple[str, ...]:
    if adapter is None:
        return ()
    if isinstance(adapter, (str, os.PathLike)):
        return (str(adapter),)
    return tuple(str(a) for a in adapter)


def _merged_hf_model(
    name: str, folder: Path, adapters: tuple[str, ...], *, dtype: torch.dtype, check_base: bool
) -> Any:
    """The base's HF model with ``adapters`` merged in order (each checked against the model it meets)."""
    from transformers import AutoModelForCausalLM

    require_peft()
    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    for adapter in adapters:
        hf_model = merge_adapter(hf_model, adapter, name=name, folder=folder, check_base=check_base)
    return hf_model


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    hf_model: Any = None,
    adapter: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    check_adapter_base: bool = True,
) -> Any:
    """Load a model of a supported family (:mod:`mechintro.core.families`: Gemma 3 / 4, Qwen3, Llama 3,
    OLMo 2 / 3) or an organism as a TransformerBridge with raw HF weights.

    Args:
        name_or_path: an organism (``"organism"``, ``"organism-base"``, ``"organism-olmo"``,
            ``"organism-olmo-base"``), an HF id such as ``"google/gemma-3-27b-it"``, one of the paper's
            short names (``"olmo_dpo"``: :data:`mechintro.core.paper_models.PAPER_MODELS`), or a local
            folder saved with ``save_pretrained`` (works with ``HF_HUB_OFFLINE=1``).
        device: defaults to CUDA when available, else CPU.
        dtype: defaults to float32 (bfloat16 for the real 27B on GPU is the caller's choice).
        hf_model: a Hugging Face model already in memory to wrap instead of loading weights (e.g. random
            weights at a real size, for a benchmark); ``name_or_path`` then gives only the tokenizer and the
            recorded settings.
        adapter: a peft adapter folder (e.g. from :func:`mechintro.posttrain`), or several applied in order:
            each is merged into the base's HF weights (``merge_and_unload``) before bridging; the spec is the
            base's, named ``"<base>+<adapter>"`` so trial stores keep the two apart. An adapter recorded for
            another base is refused naming both (``check_adapter_base=False`` skips the check). Needs peft
            (``pip install 'mechintro[train]'``).
        check_adapter_base: check each adapter's recorded base (see :func:`check_adapter_base`).
    """
    from transformer_lens.model_bridge import TransformerBridge

    from mechintro.core.kvcache import install_bridge_shim

    install_bridge_shim()
    name, folder = _resolve(name_or_path)
    if folder is None:
        folder = _hub_snapshot(name)
    family_of(hf_model.config if hf_model is not None else folder)  # an unsupported family: a clear error
    adapters = _adapters(adapter)
    if adapters:
        if hf_model is not None:
            raise ValueError("pass either hf_model or adapter, not both")
        hf_model = _merged_hf_model(
            name, folder, adapters, dtype=dtype or torch.float32, check_base=check_adapter_base
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = TransformerBridge.boot_transformers(
        str(folder), device=device, dtype=dtype or torch.float32, hf_model=hf_model
    )
    model.eval()
    tok = model.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    spec = _build_spec(model, name=name, folder=folder)
    if adapters:
        spec = replace(
            spec,
            name="+".join([name, *adapters]),
            extra={**spec.extra, "base": name, "adapters": list(adapters)},
        )
    _SPECS[model] = spec
    return model


def _token_ids(tokenizer: Any, words: tuple[str, ...]) -> tuple[int, ...]:
    """Ids of ``words`` with and without a leading space that encode to exactly one known token."""
    ids: list[int] = []
    for word in words:
        for text in (word, " " + word):
            enc = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(enc) == 1 and enc[0] != tokenizer.unk_token_id and enc[0] not in ids:
                ids.append(int(enc[0]))
    return tuple(ids)


def _build_spec(model: Model, *, name: str, folder: Path) -> ModelSpec:
    cfg = model.cfg
    n_layers, d_model = int(cfg.n_layers), int(cfg.d_model)
    recorded: dict[str, Any] = {}
    if (folder / SPEC_FILENAME).exists():
        recorded = json.loads((folder / SPEC_FILENAME).read_text())
    hf_id = name if name in GEMMA3_LAYERS else None
    release = recorded.get("transcoder_release", _gemma_scope_release(hf_id) if hf_id else None)
    if (
        release is not None and (folder / release).is_dir()
    ):  # the organism records a folder beside its weights
        release = str(folder / release)
    tok = model.tokenizer
    family = family_of(model.original_model.config)
    yes_ids, no_ids = _token_ids(tok, family.yes_words), _token_ids(tok, family.no_words)
    if not yes_ids or not no_ids:
        raise ValueError(
            f"{name}: the tokenizer has no single-token Yes/No ({family.yes_words}, {family.no_words})"
        )
    layer, strength, calibrated, provenance = _injection_point(name, n_layers, recorded)
    spec = ModelSpec(
        name=name,
        n_layers=n_layers,
        d_model=d_model,
        injection_layer=layer,
        strength=strength,
        strength_sweep=tuple(float(s) for s in recorded.get("strength_sweep", (1.0, 2.0, 4.0, 8.0))),
        operating_points={k: float(v) for k, v in recorded.get("operating_points", {}).items()},
        transcoder_release=release,
        transcoder_id_pattern=recorded.get(
            "transcoder_id_pattern", "layer_{layer}_width_262k_l0_big_affine" if hf_id else None
        ),
        yes_ids=yes_ids,
        no_ids=no_ids,
        extra={
            k: v
            for k, v in recorded.items()
            if k not in {"injection_layer", "strength", "strength_sweep", "operating_points"}
        },
        family=family.name,
        mechanism_problem=mechanism_problem(family, model.original_model.config),
        calibrated=calibrated,
        provenance=provenance,
    )
    spec.check_layer(spec.injection_layer)
    return spec


def _paper_models() -> tuple[Any, ...]:
    from mechintro.core.paper_models import PAPER_MODELS

    return PAPER_MODELS


def _injection_point(name: str, n_layers: int, recorded: Mapping[str, Any]) -> tuple[int, float, bool, str]:
    """(layer, strength, calibrated, provenance): what the model folder records, else what the paper's
    released code uses for a model it names, else the paper's relative depth."""
    from mechintro.core.paper_models import injection_point, paper_model

    if "injection_layer" in recorded or "strength" in recorded:
        calibrated = "calibration" in recorded
        how = "calibrated on held-out concepts" if calibrated else "recorded"
        point = paper_layer(n_layers), PAPER_STRENGTH
        layer = int(recorded.get("injection_layer", point[0]))
        return layer, float(recorded.get("strength", point[1])), calibrated, f"{how} ({SPEC_FILENAME})"
    found = injection_point(name, n_layers)
    if found is not None:
        layer, strength, provenance = found
        return layer, strength, paper_model(name).calibrated, provenance
    return paper_layer(n_layers), PAPER_STRENGTH, False, RELATIVE_DEPTH


def spec_for(model: Model) -> ModelSpec:
    """The :class:`ModelSpec` recorded when ``model`` was loaded with :func:`load_model`."""
    try:
        return _SPECS[model]
    except (KeyError, TypeError):
        raise ValueError("spec_for() needs a model loaded with mechintro.load_model") from None


def hook_names(model: Model) -> HookNames:
    """The :class:`HookNames` of ``model``'s family (whose transcoder sites refuse when the model lacks
    mechanism support)."""
    spec = spec_for(model)
    return HookNames.of_family(spec.family, problem=spec.mechanism_problem)


def family(model: Model) -> Family:
    """The architecture description of ``model``'s family."""
    return family_by_name(spec_for(model).family)


def require_mechanism(model: Model, what: str = "this analysis") -> None:
    """Raise :class:`~mechintro.core.families.UnsupportedArchitectureError` unless ``model`` has mechanism
    support (dictionaries, patching, attribution)."""
    problem = spec_for(model).mechanism_problem
    if problem is not None:
        raise UnsupportedArchitectureError(f"{what} is not available: {problem}")


def with_spec(model: Model, **changes: Any) -> ModelSpec:
    """Replace fields of ``model``'s spec (e.g. a different default layer) and return the new spec."""
    spec = replace(spec_for(model), **changes)
    spec.check_layer(spec.injection_layer)
    _SPECS[model] = spec
    return spec


# ----------------------------------------------------------------------------------------------- chat


def chat_text(
    model_or_tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
) -> str:
    """Render ``messages`` with the model's own chat template (the BOS token included)."""
    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if getattr(tok, "chat_template", None) is None:
        raise ValueError("this tokenizer has no chat template; use a raw-text persona variant instead")
    spec = _SPECS.get(model_or_tokenizer) if hasattr(model_or_tokenizer, "tokenizer") else None
    extra = dict(family_by_name(spec.family).chat_template_kwargs) if spec is not None else {}
    return tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )
