"""The one weights fingerprint: which exact weights a model holds.

Every artifact that is only valid for one set of weights records it and is checked against it: a transcoder
trained by mechintro, a bias vector, a cached feature grid, and each Ray actor's copy of the driver's model.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

__all__ = ["FULL_DIGEST_MAX", "weights_fingerprint"]

FULL_DIGEST_MAX = 50_000_000
"""Models with at most this many parameters are hashed whole by :func:`weights_fingerprint`."""

SAMPLED_VALUES = 4096
"""Values hashed per tensor (evenly spaced, plus the tensor's sum) for models above
:data:`FULL_DIGEST_MAX`."""


def weights_fingerprint(model: Any, *, full: bool | None = None) -> str:
    """SHA-256 (hex) over the HF model's parameters and buffers: names, shapes, dtypes and values, in name
    order.

    ``model`` is a bridge (its ``original_model`` is read) or a plain ``torch.nn.Module``. ``full=None``
    hashes every value of models up to :data:`FULL_DIGEST_MAX` parameters (the organism) and, for larger ones
    (a 27B
    Gemma), :data:`SAMPLED_VALUES` evenly spaced values of each tensor plus its sum: enough to tell two
    checkpoints of one architecture apart without reading every byte. The same weights in another dtype, or
    on another device, give the same digest only if their values are bit-identical in the recorded dtype.
    """
    module = getattr(model, "original_model", model)
    params = module.state_dict()
    if full is None:
        full = sum(p.numel() for p in params.values()) <= FULL_DIGEST_MAX
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(params.items()):
            t = p.detach()
            digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            if not t.numel():
                continue
            if not full:
                flat = t.reshape(-1)
                step = max(1, flat.numel() // SAMPLED_VALUES)
                t = torch.cat([flat[::step], flat.float().sum().reshape(1).to(t.dtype)])
            digest.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
