"""Training JumpReLU skip transcoders for every layer of the organism (sae-lens has no transcoder trainer).

A transcoder reads ``ln2.hook_out`` (the pre-feedforward-norm output) and predicts ``hook_mlp_out`` (the
post-feedforward-norm output):  ``y = W_dec·JumpReLU(W_enc·x + b_enc; θ) + b_dec + W_skip·x``.

- JumpReLU thresholds are learned with straight-through pseudo-derivatives (rectangle kernel), as in the
  JumpReLU SAE recipe; the sparsity penalty is the L0 itself, with a coefficient steered per layer towards a
  target L0.
- All layers of a checkpoint train at once as a batch of independent transcoders (batched matmuls).
- Activations are standardized for training and the scales are folded back into the saved weights, so the
  saved sae-lens transcoders take raw activations.
- Training data: the model's own activations on concept chats and on trial prompts, with and without
  injection (strengths of both signs, the trained injection layers).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechintro.core.concepts import concept_vectors
from mechintro.core.hooks import capture
from mechintro.core.models import HookNames, Model, hook_names
from mechintro.core.progress import progress_steps
from mechintro.core.prompts import left_pad, trial_prompt
from mechintro.core.steering import inject
from mechintro.core.transcoders import from_raw_params, save_transcoder
from mechintro.organism import corpus


@dataclass(frozen=True)
class TranscoderConfig:
    """How the organism's transcoders are trained."""

    width: int = 1024
    """Features per layer."""
    steps: int = 1500
    """Optimizer steps (all layers at once)."""
    batch: int = 1024
    """Positions per step."""
    lr: float = 2e-3
    """Adam learning rate."""
    target_l0: float = 24.0
    """The L0 the sparsity coefficient is steered towards."""
    bandwidth: float = 0.05
    """Width of the straight-through kernel, in standardized units."""
    n_chats: int = 1500
    """Concept chats in the activation data."""
    n_trials: int = 600
    """Trial prompts (half with injection) in the activation data."""
    seed: int = 0
    """Seed for data and initialization."""
    resample_every: int = 50
    """Re-initialize features that did not fire in the last this-many steps (until 85% of training)."""


# ----------------------------------------------------------------------------------------------- data


def _run_and_capture(
    model: Model,
    tokens: Tensor,
    mask: Tensor,
    layers: Sequence[int],
    store: dict,
    *,
    keep: Tensor | None = None,
) -> None:
    """Append the transcoder input and output of every layer at the ``keep`` positions (default: real
    tokens)."""
    keep = (mask.bool() if keep is None else keep).reshape(-1)
    hooks = hook_names(model)
    names = [hooks.transcoder_in(layer) for layer in layers] + [
        hooks.transcoder_out(layer) for layer in layers
    ]
    with torch.no_grad(), capture(model, names) as acts:
        model(tokens, attention_mask=mask)
    for name in names:
        flat = acts[name].reshape(-1, acts[name].shape[-1])
        store.setdefault(name, []).append(flat[keep])


def collect_activations(
    model: Model,
    *,
    cfg: TranscoderConfig,
    injection_layers: Sequence[int],
    concepts: Sequence[str],
    strength: float,
    concepts_for_chats: Sequence[str] | None = None,
) -> dict[int, tuple[Float[Tensor, "n d"], Float[Tensor, "n d"]]]:
    """(transcoder input, transcoder output) pairs at real token positions for every layer.

    ``concepts`` are injected in the trial prompts; the chats are about ``concepts_for_chats`` (default: all).
    """
    rng = random.Random(f"tc-data-{cfg.seed}")
    layers = list(range(int(model.cfg.n_layers)))
    store: dict[str, list[Tensor]] = {}
    tok = model.tokenizer
    chats = corpus.concept_chats(concepts_for_chats or corpus.all_concepts(), n=cfg.n_chats, seed=cfg.seed)
    for i in range(0, len(chats), 64):
        texts = [
            tok.apply_chat_template([*c.messages, {"role": "assistant", "content": c.answer}], tokenize=False)
            for c in chats[i : i + 64]
        ]
        ids = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        b = left_pad(ids, pad_id=tok.pad_token_id)
        _run_and_capture(model, b.tokens, b.attention_mask, layers, store)
    vectors = {
        layer: concept_vectors(model, concepts, layer=layer, batch_size=128) for layer in injection_layers
    }
    for i in range(0, cfg.n_trials, 32):
        prompts, rows = [], []
        for _ in range(min(32, cfg.n_trials - i)):
            answer = rng.choice(
                [corpus.NO_RESPONSE, corpus.YES_TEMPLATE.format(concept=rng.choice(concepts))]
            )
            p = trial_prompt(model, trial=rng.randint(1, 10))
            ids = torch.cat([p.tokens, torch.tensor(tok(answer, add_special_tokens=False)["input_ids"])])
            prompts.append(ids)
            rows.append((p.injection_start, rng.randrange(len(concepts)), rng.choice(injection_layers)))
        b = left_pad(prompts, pad_id=tok.pad_token_id, starts=[r[0] for r in rows])
        on = torch.tensor([rng.random() < 0.5 for _ in rows])
        s = torch.tensor([rng.uniform(-2 * strength, 2 * strength) for _ in rows]) * on
        layer = rows[0][2]
        vecs = vectors[layer][torch.tensor([r[1] for r in rows])]
        # positions from just before the injection start on: the shared preamble would swamp the data
        near = torch.arange(b.tokens.shape[1])[None] >= (b.starts[:, None] - 4)
        with inject(model, vecs, layer=layer, strength=s, start=b.starts):
            _run_and_capture(model, b.tokens, b.attention_mask, layers, store, keep=b.real & near)
    out = {}
    for layer in layers:
        x = torch.cat(store[hook_names(model).transcoder_in(layer)]).float()
        y = torch.cat(store[hook_names(model).transcoder_out(layer)]).float()
        out[layer] = (x, y)
    return out


# ----------------------------------------------------------------------------------------------- model


class _Step(torch.autograd.Function):
    """Heaviside(pre - θ) with a rectangle-kernel pseudo-derivative for θ."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.bandwidth / 2).to(pre.dtype)
        return None, -(grad * near / ctx.bandwidth).sum(dim=1, keepdim=True), None


class _JumpReLU(torch.autograd.Function):
    """pre · Heaviside(pre - θ); θ gets the straight-through pseudo-derivative."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        on = (pre > theta).to(pre.dtype)
        near = ((pre - theta).abs() < ctx.bandwidth / 2).to(pre.dtype)
        return grad * on, -(grad * near * theta / ctx.bandwidth).sum(dim=1, keepdim=True), None


class StackedTranscoders(torch.nn.Module):
    """``layers`` independent JumpReLU skip transcoders, in standardized units."""

    def __init__(self, layers: int, d: int, width: int, *, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dec = torch.randn(layers, width, d, generator=g)
        dec = dec / dec.norm(dim=-1, keepdim=True) * 0.1
        self.W_dec = torch.nn.Parameter(dec)
        self.W_enc = torch.nn.Parameter(dec.transpose(1, 2).clone() * 10 / d**0.5)
        self.b_enc = torch.nn.Parameter(torch.zeros(layers, 1, width))
        self.log_theta = torch.nn.Parameter(torch.full((layers, 1, width), -2.0))
        self.b_dec = torch.nn.Parameter(torch.zeros(layers, 1, d))
        self.W_skip = torch.nn.Parameter(torch.zeros(layers, d, d))  # y = x @ W_skip (transposed at save)

    def forward(self, x: Tensor, bandwidth: float) -> tuple[Tensor, Tensor, Tensor]:
        pre = torch.bmm(x, self.W_enc) + self.b_enc
        theta = self.log_theta.exp()
        acts = _JumpReLU.apply(pre, theta, bandwidth)
        l0 = _Step.apply(pre, theta, bandwidth).sum(-1).mean(-1)  # [layers]
        y = torch.bmm(acts, self.W_dec) + self.b_dec + torch.bmm(x, self.W_skip)
        return y, acts, l0


def fit_transcoders(
    data: dict[int, tuple[Tensor, Tensor]], *, cfg: TranscoderConfig, progress: bool = True
) -> tuple[StackedTranscoders, dict[str, Tensor]]:
    """Train one transcoder per layer of ``data`` jointly; returns the module and the standardization
    scales."""
    layers = sorted(data)
    n = min(len(data[layer][0]) for layer in layers)
    x = torch.stack([data[layer][0][:n] for layer in layers])
    y = torch.stack([data[layer][1][:n] for layer in layers])
    sx = x.pow(2).sum(-1).mean(-1).sqrt()[:, None, None] / x.shape[-1] ** 0.5
    sy = y.pow(2).sum(-1).mean(-1).sqrt()[:, None, None] / y.shape[-1] ** 0.5
    x, y = x / sx, y / sy
    var = (y - y.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1)  # [layers]
    model = StackedTranscoders(len(layers), x.shape[-1], cfg.width, seed=cfg.seed)
    with torch.no_grad():  # the skip starts at the least-squares linear map, features model what is left
        model.W_skip.copy_(torch.linalg.lstsq(x, y).solution * 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    lam = torch.full((len(layers),), 1e-3)
    g = torch.Generator().manual_seed(cfg.seed)
    fired = torch.zeros(len(layers), cfg.width, dtype=torch.bool)
    for step in progress_steps(cfg.steps, desc="transcoders", enabled=progress):
        idx = torch.randint(0, n, (cfg.batch,), generator=g)
        xb, yb = x[:, idx], y[:, idx]
        pred, acts, l0 = model(xb, cfg.bandwidth)
        fired |= (acts > 0).any(1).detach()
        fvu = (pred - yb).pow(2).sum(-1).mean(-1) / var
        warm = min(1.0, step / (0.2 * cfg.steps))
        loss = (fvu + warm * lam * l0).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % cfg.resample_every == 0:
            if step < 0.85 * cfg.steps:
                _resample(model, ~fired, xb, g)
            fired.zero_()
        with torch.no_grad():
            lam *= (
                torch.exp(0.02 * torch.sign(l0.detach() - cfg.target_l0)) if step > 0.2 * cfg.steps else 1.0
            )
            lam.clamp_(1e-6, 1.0)
    return model, {"sx": sx, "sy": sy}


@torch.no_grad()
def _resample(model: StackedTranscoders, dead: Tensor, xb: Tensor, g: torch.Generator) -> None:
    """Point each dead feature's encoder at a random input of the batch, with a fresh small decoder row."""
    for layer, feats in enumerate(dead):
        idx = feats.nonzero().squeeze(-1)
        if len(idx) == 0:
            continue
        rows = xb[layer, torch.randint(0, xb.shape[1], (len(idx),), generator=g)]
        model.W_enc[layer][:, idx] = (rows / rows.norm(dim=-1, keepdim=True)).T * 0.5
        model.W_dec[layer][idx] = torch.randn(len(idx), xb.shape[-1], generator=g) * 0.01
        model.b_enc[layer, 0, idx] = 0.0
        model.log_theta[layer, 0, idx] = -2.0


def to_sae_lens(
    model: StackedTranscoders,
    scales: dict[str, Tensor],
    layers: Sequence[int],
    *,
    names: HookNames | None = None,
) -> dict[int, Any]:
    """Fold the standardization into the weights and build sae-lens JumpReLU skip transcoders, wired to the
    hook names of the model family they were trained on (``names``; default Gemma 3's): their metadata
    records where they read (OLMo: ``mlp.hook_in``), which loading checks."""
    out = {}
    for i, layer in enumerate(layers):
        sx, sy = float(scales["sx"][i]), float(scales["sy"][i])
        params = {
            "w_enc": (model.W_enc[i] / sx).detach().contiguous(),
            "b_enc": model.b_enc[i, 0].detach().clone(),
            "threshold": model.log_theta[i, 0].exp().detach().clone(),
            "w_dec": (model.W_dec[i] * sy).detach().contiguous(),
            "b_dec": (model.b_dec[i, 0] * sy).detach().clone(),
            "affine_skip_connection": (model.W_skip[i] * sy / sx).detach().contiguous(),
        }
        out[layer] = from_raw_params(params, layer=layer, names=names)
    return out


def train_organism_transcoders(
    model: Model,
    folder: Path,
    *,
    cfg: TranscoderConfig,
    injection_layers: Sequence[int],
    concepts: Sequence[str],
    strength: float,
) -> dict[int, Any]:
    """Collect activations, train every layer's transcoder and save them under ``folder/layer_{L}``."""
    data = collect_activations(
        model, cfg=cfg, injection_layers=injection_layers, concepts=concepts, strength=strength
    )
    stacked, scales = fit_transcoders(data, cfg=cfg)
    tcs = to_sae_lens(stacked, scales, sorted(data), names=hook_names(model))
    for layer, tc in tcs.items():
        save_transcoder(tc, folder / f"layer_{layer}")
    record_model(folder, model)
    return tcs


def record_model(folder: Path, model: Model) -> None:
    """Write the model's name and weight fingerprint into every ``folder/layer_*/cfg.json`` (sae-lens
    metadata),
    so that loading these transcoders onto another checkpoint (organism-base's onto organism, say) is
    refused."""
    import json

    from mechintro.core.fingerprint import weights_fingerprint
    from mechintro.core.models import spec_for

    fingerprint, name = weights_fingerprint(model), Path(spec_for(model).name).name
    for cfg_path in sorted(Path(folder).glob("layer_*/cfg.json")):
        cfg = json.loads(cfg_path.read_text())
        cfg.setdefault("metadata", {}).update(model_name=name, model_fingerprint=fingerprint)
        cfg_path.write_text(json.dumps(cfg))
