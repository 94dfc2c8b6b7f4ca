"""Dictionary file formats, each read into a sae-lens transcoder: Gemma Scope 2's raw tensors, sae-lens
folders, circuit-tracer's per-layer safetensors; plus a TopK transcoder class and the memory a layer takes.

Conventions, from the raw tensors:

* **Gemma Scope 2** (``params.safetensors``): ``w_enc [d_in, d_sae]``, ``w_dec [d_sae, d_out]``, ``b_enc``,
  ``b_dec``, ``threshold`` and for the affine variant ``affine_skip_connection [d_in, d_out]``, applied as
  ``x @ affine_skip_connection``. JumpReLU.
* **circuit-tracer** (``layer_L.safetensors``, one file per layer): ``W_enc [d_transcoder, d_model]``
  (applied as ``x @ W_enc.T``), ``W_dec [d_transcoder, d_model]``, ``b_enc``, ``b_dec``, optionally
  ``W_skip [d_model, d_model]`` applied as ``x @ W_skip.T``, ``activation_function.threshold`` (JumpReLU:
  ``pre * (pre > threshold)``) or ``k`` (TopK: the ``k`` largest pre-activations kept as they are); else
  ReLU. A ``config.yaml`` beside the files (``model_kind: transcoder_set``) names ``feature_input_hook`` /
  ``feature_output_hook``, the activation and ``k``.
* **sae-lens** (``cfg.json`` + ``sae_weights.safetensors``): ``W_enc [d_in, d_sae]``, ``W_dec [d_sae,
  d_out]``, ``W_skip [d_out, d_in]`` applied as ``x @ W_skip.T``; the hook in ``metadata.hook_name`` /
  ``hook_name_out``.

sae-lens objects compute ``x @ W_enc``, ``acts @ W_dec`` and ``x @ W_skip.T``; the readers transpose to
that.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

__all__ = [
    "CIRCUIT_TRACER_CONFIG",
    "cast",
    "FORMATS",
    "UnknownFormatError",
    "build_transcoder",
    "circuit_tracer_config",
    "dictionary_bytes",
    "from_circuit_tracer",
    "from_gemma_scope_2",
    "memory_table",
    "topk_classes",
]

FORMATS = ("gemma_scope_2", "sae_lens", "circuit_tracer")
"""Dictionary formats :func:`mechintro.core.transcoders.load_transcoders` reads from local folders."""
CIRCUIT_TRACER_CONFIG = "config.yaml"


class UnknownFormatError(FileNotFoundError):
    """A path holds no dictionary in a format mechintro reads."""


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    got = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(got, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; e.g. 'float32', 'bfloat16', 'float16', 'float64'")
    return got


# --------------------------------------------------------------------------------------------- TopK class


def _sae_lens_classes() -> tuple[Any, Any]:
    from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

    return Transcoder, TranscoderConfig


@functools.cache
def topk_classes() -> tuple[type, type]:
    """``(TopKTranscoder, TopKTranscoderConfig)``, defined (and registered with sae-lens as
    ``"topk_transcoder"``, so ``SAE.load_from_disk`` reads them back) on first use: sae-lens is imported
    only when a dictionary is."""
    from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
    from sae_lens.saes.sae import SAEMetadata

    Transcoder, TranscoderConfig = _sae_lens_classes()

    @dataclass
    class TopKTranscoderConfig(TranscoderConfig):  # type: ignore[misc, valid-type]
        """A TopK transcoder: ``k`` features kept per token; ``skip``: a ``W_skip`` term."""

        k: int = 1
        """Features kept per token (the ``k`` largest pre-activations, kept as they are)."""
        skip: bool = False
        """Whether the transcoder has a linear skip ``x @ W_skip.T``."""

        @classmethod
        def architecture(cls) -> str:
            return "topk_transcoder"

        @classmethod
        def from_dict(cls, config_dict: dict[str, Any]) -> Any:
            fields = set(cls.__dataclass_fields__)
            res = cls(**{k: v for k, v in config_dict.items() if k in fields and k != "metadata"})
            if "metadata" in config_dict:
                res.metadata = SAEMetadata(**config_dict["metadata"])
            return res

        def to_dict(self) -> dict[str, Any]:
            return super().to_dict() | {"k": self.k, "skip": self.skip}

    class TopKTranscoder(Transcoder):  # type: ignore[misc, valid-type]
        """TopK (optionally skip) transcoder, as circuit-tracer computes it: the ``k`` largest
        pre-activations of each token kept as they are (no ReLU), the rest zero."""

        cfg: Any

        def initialize_weights(self) -> None:
            super().initialize_weights()
            if self.cfg.skip:
                self.W_skip = torch.nn.Parameter(
                    torch.zeros(self.cfg.d_out, self.cfg.d_in, dtype=self.dtype, device=self.device)
                )

        def encode(self, x: Tensor) -> Tensor:
            pre = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)
            top = torch.topk(pre, k=int(self.cfg.k), dim=-1).indices
            gate = torch.zeros_like(pre).scatter_(-1, top, 1.0)
            return self.hook_sae_acts_post(pre * gate)

        def forward(self, x: Tensor) -> Tensor:
            out = self.decode(self.encode(x))
            if self.cfg.skip:
                out = out + x.to(self.W_skip.dtype) @ self.W_skip.T
            return out

        @classmethod
        def from_dict(cls, config_dict: dict[str, Any]) -> Any:
            return cls(TopKTranscoderConfig.from_dict(config_dict))

    if "topk_transcoder" not in SAE_CLASS_REGISTRY:
        register_sae_class("topk_transcoder", TopKTranscoder, TopKTranscoderConfig)
        return TopKTranscoder, TopKTranscoderConfig
    return SAE_CLASS_REGISTRY["topk_transcoder"]


# -------------------------------------------------------------------------------------------- building


def build_transcoder(
    state: Mapping[str, Tensor],
    *,
    activation: str,
    metadata: Mapping[str, Any],
    k: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
) -> Any:
    """A sae-lens transcoder from tensors already in sae-lens's layout (``W_enc [d_in, d_sae]``, ``W_dec
    [d_sae, d_out]``, ``W_skip [d_out, d_in]``): ``activation`` ``"relu"``, ``"jumprelu"`` or ``"topk"``."""
    from sae_lens import SAE

    if activation not in ("relu", "jumprelu", "topk"):
        raise ValueError(f"unknown activation {activation!r}; valid: ['relu', 'jumprelu', 'topk']")
    dt = _dtype(dtype)
    d_in, d_sae = state["W_enc"].shape
    d_out = state["W_dec"].shape[1]
    skip = "W_skip" in state
    if skip and tuple(state["W_skip"].shape) != (d_out, d_in):
        raise ValueError(
            f"W_skip is {tuple(state['W_skip'].shape)}, expected [d_out, d_in] = {[d_out, d_in]}"
        )
    cfg: dict[str, Any] = {
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "d_out": int(d_out),
        "dtype": str(dt).removeprefix("torch."),
        "device": device,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": dict(metadata),
    }
    if activation == "topk":
        if k is None or int(k) < 1:
            raise ValueError(f"a TopK transcoder needs k >= 1, got {k!r}")
        if int(k) > int(d_sae):
            raise ValueError(f"TopK k={int(k)} exceeds the dictionary's width d_sae={int(d_sae)}")
        cfg |= {"architecture": "topk_transcoder", "k": int(k), "skip": skip}
        tc = topk_classes()[0].from_dict(cfg)
    else:
        base = "jumprelu_transcoder" if activation == "jumprelu" else "transcoder"
        cfg["architecture"] = base.replace("transcoder", "skip_transcoder") if skip else base
        if activation == "jumprelu" and "threshold" not in state:
            raise ValueError("a JumpReLU transcoder needs a threshold tensor")
        tc = SAE.from_dict(cfg)
    keep = {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"W_skip"} if skip else set())
    keep |= {"threshold"} if activation == "jumprelu" else set()
    tc.load_state_dict({n: state[n].to(device=device, dtype=dt) for n in keep})
    return cast(tc, dt)


def cast(tc: Any, dtype: str | torch.dtype | None) -> Any:
    """``tc`` with every floating-point parameter and buffer in ``dtype``. ``tc.to(dtype)`` alone is not
    enough on sae-lens 6.37 (the lowest version supported), which keeps a skip transcoder's ``W_skip`` in
    float32."""
    dt = _dtype(dtype)
    tc = tc.to(dt)
    for t in [*tc.parameters(), *tc.buffers()]:
        if t.is_floating_point() and t.dtype != dt:
            t.data = t.data.to(dt)
    return tc


def from_gemma_scope_2(
    params: Mapping[str, Tensor],
    *,
    metadata: Mapping[str, Any],
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
) -> Any:
    """A JumpReLU (skip) transcoder from Google's raw Gemma Scope 2 tensors (see the module docstring)."""
    need = {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"}
    if missing := need - set(params):
        raise ValueError(f"raw transcoder params lack {sorted(missing)}; found {sorted(params)}")
    state = {
        "W_enc": params["w_enc"],
        "W_dec": params["w_dec"],
        "b_enc": params["b_enc"],
        "b_dec": params["b_dec"],
        "threshold": params["threshold"],
    }
    if "affine_skip_connection" in params:
        state["W_skip"] = params["affine_skip_connection"].T.contiguous()
    return build_transcoder(state, activation="jumprelu", metadata=metadata, dtype=dtype, device=device)


def circuit_tracer_config(folder: str | Path) -> dict[str, Any] | None:
    """circuit-tracer's ``config.yaml`` in ``folder`` (or None); a cross-layer transcoder is refused."""
    path = Path(folder) / CIRCUIT_TRACER_CONFIG
    if not path.exists():
        return None
    import yaml

    cfg = yaml.safe_load(path.read_text()) or {}
    kind = cfg.get("model_kind", "transcoder_set")
    if kind != "transcoder_set":
        raise NotImplementedError(
            f"{path} describes a {kind!r}; mechintro loads per-layer transcoder sets ('transcoder_set') "
            "only. Cross-layer transcoders: see docs/families.md, 'Cross-layer transcoders'."
        )
    return cfg


def from_circuit_tracer(
    path: str | Path,
    *,
    metadata: Mapping[str, Any],
    activation: str | None = None,
    k: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
) -> Any:
    """A transcoder from one circuit-tracer per-layer file (see the module docstring).

    ``activation`` (``"relu"``, ``"jumprelu"``, ``"topk"``; default from the tensors: a threshold means
    JumpReLU, a ``k`` tensor TopK, else ReLU) and ``k`` come from the set's ``config.yaml`` when it has them.
    """
    raw = load_file(str(path))
    if missing := {"W_enc", "W_dec", "b_enc", "b_dec"} - set(raw):
        raise ValueError(f"{path} is not a circuit-tracer transcoder: it lacks {sorted(missing)}")
    threshold = raw.get("activation_function.threshold")
    if activation is None:
        activation = "jumprelu" if threshold is not None else "topk" if "k" in raw else "relu"
    if activation == "topk" and k is None:
        if "k" not in raw:
            raise ValueError(f"{path}: a TopK transcoder needs k (in the file or the set's config.yaml)")
        k = int(raw["k"].item())
    d_tc, d_model = raw["W_enc"].shape
    if raw["W_dec"].shape[0] != d_tc:
        raise ValueError(
            f"{path}: W_dec is {tuple(raw['W_dec'].shape)}, but W_enc [d_transcoder, d_model] is "
            f"{(d_tc, d_model)}"
        )
    state = {
        "W_enc": raw["W_enc"].T.contiguous(),
        "W_dec": raw["W_dec"],
        "b_enc": raw["b_enc"],
        "b_dec": raw["b_dec"],
    }
    if "W_skip" in raw:
        state["W_skip"] = raw["W_skip"]
    if activation == "jumprelu":
        if threshold is None:
            raise ValueError(f"{path}: a JumpReLU transcoder needs activation_function.threshold")
        if (threshold < 0).any():
            raise ValueError(
                f"{path}: negative JumpReLU thresholds (circuit-tracer keeps negative pre-activations above "
                "them; sae-lens's JumpReLU does not, so the two would differ)"
            )
        state["threshold"] = threshold
    return build_transcoder(state, activation=activation, metadata=metadata, k=k, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------- memory


def dictionary_bytes(
    d_model: int,
    d_sae: int,
    *,
    dtype: str | torch.dtype = "float32",
    skip: bool = True,
    threshold: bool = True,
    d_out: int | None = None,
) -> int:
    """Bytes one layer's transcoder takes: ``W_enc`` + ``W_dec`` + ``b_enc`` + ``b_dec`` (+ ``threshold``,
    + ``W_skip``), at ``dtype``."""
    d_out = d_model if d_out is None else d_out
    n = d_model * d_sae + d_sae * d_out + d_sae + d_out
    n += d_sae if threshold else 0
    n += d_model * d_out if skip else 0
    return n * torch.empty((), dtype=_dtype(dtype)).element_size()


MEMORY_MODELS = (
    ("Gemma3-1B", 1152),
    ("Gemma3-4B", 2560),
    ("Gemma3-12B", 3840),
    ("Gemma3-27B", 5376),
    ("Qwen3-0.6B", 1024),
    ("Qwen3-1.7B", 2048),
    ("Qwen3-4B", 2560),
    ("Qwen3-8B", 4096),
    ("Qwen3-14B", 5120),
    ("Llama-3.2-1B", 2048),
)
"""(model, d_model) rows of the docs' memory table."""
MEMORY_WIDTHS = (("16k", 16384), ("65k", 65536), ("131k", 131072), ("160k", 163840), ("262k", 262144))
"""(name, d_sae) columns of the docs' memory table."""


def memory_table() -> str:
    """The docs' memory table (markdown): MiB per layer of a JumpReLU skip transcoder, float32 / bfloat16."""
    head = "| model | d_model | " + " | ".join(f"{w} (f32 / bf16)" for w, _ in MEMORY_WIDTHS) + " |"
    rows = [head, "|---|---|" + "---|" * len(MEMORY_WIDTHS)]
    for name, d in MEMORY_MODELS:
        cells = []
        for _, width in MEMORY_WIDTHS:
            f32, bf16 = (dictionary_bytes(d, width, dtype=t) / 2**20 for t in ("float32", "bfloat16"))
            cells.append(f"{f32:,.0f} / {bf16:,.0f}")
        rows.append(f"| {name} | {d} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
