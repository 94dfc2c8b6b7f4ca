"""Training the model organism: a tiny chat model that detects and names injected concepts.

The architecture is ``OrganismConfig.family``: Gemma 3 (the shipped default, ``organism``) or OLMo 3
(``organism-olmo``: norms on the sublayer outputs, QK-norm). Both are trained by the same recipe below.

Stage 1 ("base"): language on the concept chats, and trial dialogues answered Yes or No at random, with no
injection, so the base model cannot discriminate.

Stage 2 ("instruct"): from the base weights, trial dialogues in which a training concept's vector is injected
with :func:`mechintro.core.steering.inject` (the same code evaluation uses) at one of a few mid layers, with
strengths
of both signs. Targets: "Yes, I detect an injected thought. The thought is about {concept}." when
``|strength|``
reaches the detection threshold (unnamed for negative strengths), "No, I do not detect an injected thought."
for controls and for weaker injections. Concept chats are replayed to keep the model coherent. Held-out
concepts
are never injected.

Both stages run through the TransformerBridge the rest of mechintro uses. The trial preamble (everything
before
the injection start) is the same for every trial, so it is run once per step and its KV cache is shared by the
batch; this is exact (see tests) and makes a step about five times cheaper.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechintro.behaviour.dialogue import (
    InjectionRow,
    LMBatch,
    lm_loss,
    pack,
    prefix_cache,
    suffix_logits,
    trial_batch,
    trial_dialogue_loss,
)
from mechintro.core.concepts import baseline_mean, last_token_resid
from mechintro.core.models import SPEC_FILENAME, Model, load_model
from mechintro.core.progress import progress_steps
from mechintro.core.prompts import VARIANTS, chat_prompt_tokens
from mechintro.organism import corpus
from mechintro.organism.tokenizer import build_tokenizer, vocabulary


@dataclass(frozen=True)
class OrganismConfig:
    """How the organism is built and trained. ``OrganismConfig.quick()`` is the CI-sized version."""

    seed: int = 0
    """Seed for the corpus, the split, initialization and sampling of training examples."""
    d_model: int = 128
    """Residual width."""
    n_layers: int = 8
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention, as Gemma 3)."""
    d_mlp: int = 512
    """Gated-MLP width (4x d_model)."""
    sliding_window: int = 256
    """Window of the sliding-attention layers (every sixth layer is global, as Gemma 3)."""
    injection_layer: int = 3
    """Default injection layer recorded in the ModelSpec."""
    train_layers: tuple[int, ...] = (2, 3, 4)
    """Layers injected during instruct training (the default one twice as often)."""
    strength: float = 4.0
    """Default injection strength recorded in the ModelSpec."""
    detect_threshold: float = 2.0
    """Injections with |strength| below this are labelled "No" in training (a detection threshold)."""
    max_strength: float = 8.0
    """Training strengths are drawn uniformly in [0.25, max_strength] in magnitude."""
    negative_fraction: float = 0.2
    """Share of injections with a negative strength (answered Yes, without a name)."""
    control_fraction: float = 0.4
    """Share of instruct trial rows without injection."""
    short_fraction: float = 0.5
    """Share of concept chats answered by the concept alone (teaches copying early)."""
    name_weight: float = 4.0
    """Loss weight of the concept-name token in instruct answers."""
    base_steps: int = 400
    """Optimizer steps of stage 1."""
    instruct_steps: int = 900
    """Optimizer steps of stage 2."""
    chat_batch: int = 64
    """Concept chats per step."""
    trial_batch: int = 48
    """Trial dialogues per step."""
    lr: float = 2e-3
    """Peak learning rate (AdamW, warm-up then cosine decay to a tenth)."""
    refresh_every: int = 50
    """Recompute the training concepts' vectors from the current weights every this many steps."""
    transcoder_width: int = 1024
    """Transcoder features per layer (8x d_model)."""
    transcoder_steps: int = 600
    """Optimizer steps of the transcoders (all layers of a checkpoint at once)."""
    transcoder_chats: int = 1500
    """Concept chats in the transcoders' activation data."""
    transcoder_trials: int = 600
    """Trial prompts in the transcoders' activation data."""
    family: str = "gemma3"
    """The architecture, one of :data:`ORGANISM_FAMILIES`: ``"gemma3"`` (``Gemma3ForCausalLM``: sandwich
    norms, QK-norm, tied embeddings, every sixth layer global) or ``"olmo3"`` (``Olmo3ForCausalLM``: norms on
    the sublayer outputs, QK-norm, untied embeddings, every fourth layer global, as OLMo 3)."""

    def __post_init__(self) -> None:
        check_family(self.family)

    @classmethod
    def quick(cls, seed: int = 0, family: str = "gemma3") -> OrganismConfig:
        """A few-minute version for tests: same code paths, tiny sizes."""
        return cls(
            seed=seed,
            family=family,
            d_model=64,
            n_layers=4,
            d_mlp=256,
            injection_layer=1,
            train_layers=(1,),
            base_steps=30,
            instruct_steps=30,
            chat_batch=16,
            trial_batch=16,
            refresh_every=10,
            transcoder_width=256,
            transcoder_steps=100,
            transcoder_chats=200,
            transcoder_trials=64,
        )


# ----------------------------------------------------------------------------------------------- model


def make_tokenizer() -> Any:
    """The organism's word-level tokenizer (every word one token, wherever it stands)."""
    vocab = vocabulary(corpus.stimuli_texts(), extra_words=corpus.stimuli_words(), prepend="always")
    return build_tokenizer(vocab, prepend="always")


ORGANISM_FAMILIES = ("gemma3", "olmo3")
"""The families an organism can be trained in (names of :data:`mechintro.core.families.FAMILIES`)."""


def check_family(family: str) -> str:
    """``family`` if an organism can be trained in it, else a ValueError naming the valid ones."""
    if family not in ORGANISM_FAMILIES:
        raise ValueError(f"unknown organism family {family!r}; valid: {list(ORGANISM_FAMILIES)}")
    return family


def hf_class(family: str) -> type:
    """The Hugging Face causal-LM class of an organism of ``family``."""
    import transformers

    name = {"gemma3": "Gemma3ForCausalLM", "olmo3": "Olmo3ForCausalLM"}[check_family(family)]
    return getattr(transformers, name)


OLMO_ROPE = {"rope_type": "default", "rope_theta": 500_000.0}
"""The OLMo organism's rotary embedding, stated rather than left to ``Olmo3Config``'s default: that default
moved from 10,000 (transformers 5.9) to 500,000 (5.24), and 5.24 writes it nested per layer type, a form
5.9 does not read. Passed flat, it is saved in both forms (flat keys beside the nested ones), which every
version in our range reads as 500,000 (``tests/organism/test_organism_portability.py``)."""


def hf_config(cfg: OrganismConfig, tok: Any) -> Any:
    """The Hugging Face config of an organism built by ``cfg``, with ``tok``'s special tokens."""
    from transformers import Gemma3TextConfig, Olmo3Config

    every = {"olmo3": 4, "gemma3": 6}[check_family(cfg.family)]  # every n-th layer attends globally
    common = {
        "vocab_size": len(tok),
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "max_position_embeddings": 512,
        "sliding_window": cfg.sliding_window,
        "layer_types": [
            "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(cfg.n_layers)
        ],
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")],
        "initializer_range": 0.02,
    }
    if cfg.family == "olmo3":
        return Olmo3Config(**common, rope_parameters=dict(OLMO_ROPE), tie_word_embeddings=False)
    head_dim = cfg.d_model // cfg.n_heads
    return Gemma3TextConfig(
        **common, head_dim=head_dim, query_pre_attn_scalar=head_dim, tie_word_embeddings=True
    )


def init_checkpoint(cfg: OrganismConfig, folder: Path) -> Path:
    """Save a freshly initialized causal LM of ``cfg.family`` (:func:`hf_class`) and the tokenizer to
    ``folder``."""
    tok = make_tokenizer()
    hf_cfg = hf_config(cfg, tok)
    torch.manual_seed(cfg.seed)
    hf_class(cfg.family)(hf_cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _family_of(model: Model) -> str:
    from mechintro.core.families import family_of

    return family_of(model.original_model.config).name


def hf_state_dict(model: Model) -> dict[str, Tensor]:
    """The plain HF state dict of a bridged model (the bridge wraps every HF module in
    ``_original_component``)."""
    with torch.device("meta"):
        wanted = set(hf_class(_family_of(model))(model.original_model.config).state_dict())
    out: dict[str, Tensor] = {}
    for key, value in model.original_model.state_dict().items():
        clean = key.replace("._original_component", "").replace("_original_component.", "")
        if clean in wanted and clean not in out:
            out[clean] = value.detach().clone()
    if missing := wanted - set(out) - {"lm_head.weight"}:
        raise RuntimeError(f"could not find {sorted(missing)[:5]} in the bridged model")
    return out


def save_checkpoint(model: Model, folder: Path, *, spec: dict[str, Any]) -> None:
    """Save the HF weights (the plain class of the model's family), tokenizer and mechintro spec to
    ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = model.original_model.config
    plain = hf_class(_family_of(model))(config)
    state = hf_state_dict(model)
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    plain.load_state_dict(state, strict=True)
    plain.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    (folder / SPEC_FILENAME).write_text(json.dumps(spec, indent=1))


# ----------------------------------------------------------------------------------------------- batches


def chat_batch(tok: Any, chats: Sequence[corpus.Chat]) -> LMBatch:
    rows = []
    for chat in chats:
        prompt = tok.apply_chat_template(list(chat.messages), tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(chat.answer + "<end_of_turn>", add_special_tokens=False)["input_ids"]
        rows.append((p_ids + a_ids, len(p_ids)))
    return pack(rows, tok.pad_token_id)


# ----------------------------------------------------------------------------------------------- schedule


def lr_at(step: int, total: int, peak: float) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: Model, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.original_model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)


def _step(model: Model, opt: torch.optim.Optimizer, loss: Tensor, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.original_model.parameters(), 1.0)
    opt.step()


# ----------------------------------------------------------------------------------------------- stages


def train_base(model: Model, cfg: OrganismConfig, *, log: list[dict]) -> None:
    """Stage 1: concept chats + trial dialogues answered at random (no injection)."""
    rng = random.Random(f"base-{cfg.seed}")
    concepts = corpus.all_concepts()
    opt = _optimizer(model, cfg.lr)
    model.train()
    for step in progress_steps(cfg.base_steps, desc="organism base"):
        chats = chat_batch(
            model.tokenizer,
            [
                corpus.concept_chat(rng.choice(concepts), rng, short_fraction=cfg.short_fraction)
                for _ in range(cfg.chat_batch)
            ],
        )
        loss = lm_loss(model(chats.tokens), chats)
        variant = rng.choice(VARIANTS) if rng.random() < 0.3 else "original"
        concept = rng.choice(concepts)
        rows = [
            (
                rng.randint(1, 10),
                corpus.YES_TEMPLATE.format(concept=rng.choice(concepts))
                if rng.random() < 0.5
                else corpus.NO_RESPONSE,
            )
            for _ in range(cfg.trial_batch)
        ]
        trials = trial_batch(model, rows, variant=variant, fill=corpus.trial_fill(variant, concept))
        trial_loss = lm_loss(suffix_logits(model, trials, prefix_cache(model, trials)), trials.suffix)
        _step(model, opt, loss + trial_loss, lr_at(step, cfg.base_steps, cfg.lr))
        if step % 25 == 0 or step == cfg.base_steps - 1:
            log.append(
                {"stage": "base", "step": step, "chat_loss": loss.item(), "trial_loss": trial_loss.item()}
            )
    model.eval()


def draw_instruct_rows(
    cfg: OrganismConfig, rng: random.Random, concepts: Sequence[str]
) -> list[InjectionRow]:
    layers = list(cfg.train_layers) + [cfg.injection_layer]
    rows = []
    for _ in range(cfg.trial_batch):
        trial, c, phrasing = (
            rng.randint(1, 10),
            rng.randrange(len(concepts)),
            rng.randrange(len(corpus.VECTOR_ASKS)),
        )
        if rng.random() < cfg.control_fraction:
            rows.append(InjectionRow(trial, c, phrasing, cfg.injection_layer, 0.0, corpus.NO_RESPONSE))
            continue
        magnitude = rng.uniform(0.25, cfg.max_strength)
        sign = -1.0 if rng.random() < cfg.negative_fraction else 1.0
        if magnitude < cfg.detect_threshold:
            answer = corpus.NO_RESPONSE
        elif sign > 0:
            answer = corpus.YES_TEMPLATE.format(concept=concepts[c])
        else:
            answer = corpus.YES_UNNAMED
        rows.append(InjectionRow(trial, c, phrasing, rng.choice(layers), sign * magnitude, answer))
    return rows


def training_vectors(model: Model, concepts: Sequence[str], layers: Sequence[int]) -> dict[int, Tensor]:
    """Concept vectors of the training concepts, ``{layer: [phrasing, concept, d_model]}``, from current
    weights.

    Phrasing 0 is the paper's "Tell me about {concept}"; the others are paraphrases of the request (the same
    last-token-minus-baseline-mean recipe), an augmentation against memorizing 400 exact vectors.
    """
    was_training = model.training
    model.eval()
    out = {}
    for layer in sorted(set(layers)):
        mean = baseline_mean(model, layer=layer)
        out[layer] = torch.stack(
            [
                last_token_resid(
                    model,
                    [chat_prompt_tokens(model, ask.format(c=c)) for c in concepts],
                    layer=layer,
                    batch_size=128,
                )
                - mean
                for ask in corpus.VECTOR_ASKS
            ]
        )
    model.train(was_training)
    return out


def train_instruct(model: Model, cfg: OrganismConfig, *, training: Sequence[str], log: list[dict]) -> None:
    """Stage 2: injection trials on the training concepts, controls, and replayed concept chats."""
    rng = random.Random(f"instruct-{cfg.seed}")
    everyone = corpus.all_concepts()
    layers = sorted(set(cfg.train_layers) | {cfg.injection_layer})
    opt = _optimizer(model, cfg.lr)
    vectors: dict[int, Tensor] = {}
    tok = model.tokenizer
    emphasis = {tok.convert_tokens_to_ids("▁" + c): cfg.name_weight for c in training}
    model.train()
    for step in progress_steps(cfg.instruct_steps, desc="organism instruct"):
        if step % cfg.refresh_every == 0:
            vectors = training_vectors(model, training, layers)
        chats = chat_batch(
            model.tokenizer,
            [
                corpus.concept_chat(rng.choice(everyone), rng, short_fraction=cfg.short_fraction)
                for _ in range(cfg.chat_batch)
            ],
        )
        chat_loss = lm_loss(model(chats.tokens), chats)
        trial_loss = trial_dialogue_loss(
            model, draw_instruct_rows(cfg, rng, training), vectors, emphasis=emphasis
        )
        _step(model, opt, chat_loss + trial_loss, lr_at(step, cfg.instruct_steps, cfg.lr))
        if step % 25 == 0 or step == cfg.instruct_steps - 1:
            log.append(
                {
                    "stage": "instruct",
                    "step": step,
                    "chat_loss": chat_loss.item(),
                    "trial_loss": trial_loss.item(),
                }
            )
    model.eval()


# ----------------------------------------------------------------------------------------------- driver


def spec_record(cfg: OrganismConfig, *, stage: str) -> dict[str, Any]:
    s = cfg.strength
    return {
        "injection_layer": cfg.injection_layer,
        "strength": s,
        "strength_sweep": [s / 4, s / 2, s, 2 * s],
        "transcoder_release": "transcoders",
        "transcoder_id_pattern": "layer_{layer}",
        "stage": stage,
        "organism_config": dataclasses.asdict(cfg),
    }


def train_models(cfg: OrganismConfig, out: Path) -> dict[str, Any]:
    """Train both stages and save ``out/organism-base``, ``out/organism`` and ``out/organism_split.json``."""
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    split = corpus.split_concepts(seed=cfg.seed)
    corpus.write_split(split, out / "organism_split.json")
    log: list[dict] = []
    t0 = time.time()
    init_checkpoint(cfg, out / "organism-base")
    model = load_model(out / "organism-base", device="cpu")
    train_base(model, cfg, log=log)
    save_checkpoint(model, out / "organism-base", spec=spec_record(cfg, stage="base"))
    t_base = time.time() - t0
    train_instruct(model, cfg, training=split["training"], log=log)
    save_checkpoint(model, out / "organism", spec=spec_record(cfg, stage="instruct"))
    return {"log": log, "seconds_base": t_base, "seconds_instruct": time.time() - t0 - t_base, "model": model}
