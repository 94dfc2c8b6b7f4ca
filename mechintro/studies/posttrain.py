"""The paper's post-training conditions (section 3.3, Table 3), as a tool: LoRA-finetune a checkpoint on
preference pairs under one named condition and save a peft adapter.

``mi.posttrain(model, pairs, condition="dpo", out=...)`` loads the plain Hugging Face model of ``model`` (any
name :func:`mechintro.load_model` understands), wraps it with a peft LoRA, trains it with the condition's loss
(written here on torch, not TRL) and writes a peft adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) with ``mechintro_posttrain.json`` beside it: every setting, the base model's
name, path and weights fingerprint, the pairs' count, domains and digest, and the loss of every optimizer
step. ``mi.load_model(base, adapter=out)`` merges it and bridges the result.

**The losses**, as the released script (``experiments/03f_dpo_mechanism_ablation.py``) has them. ``lp`` is a
response's summed token log-probability (the prompt's tokens carry no loss), ``len`` its number of tokens:

* DPO: ``-log σ(β [(lp_c - ref_c) - (lp_r - ref_r)])``, β = 0.1, the reference being the starting model
  (the adapter disabled, frozen);
* DPO without reference: the same with ``ref_c = ref_r = 0``;
* margin-contrastive: ``relu(1 - (lp_c / len_c - lp_r / len_r))``: length-normalized, no β, no reference;
* SFT: token-mean cross-entropy on the chosen (or the rejected) responses;
* KL: ``λ KL(π ‖ ref)`` over the full vocabulary at each response token of the chosen (for
  ``kl_rejected``: the rejected) response, averaged over those tokens, λ = 0.1; added to the margin loss
  (``contrastive_margin_kl``) or to SFT (``kl_chosen`` / ``kl_rejected``).

Each batch's loss is the mean over its pairs; a step accumulates ``grad_accum`` batches (each divided by
their number), clips the gradient norm at 1, and takes an AdamW step (β = (0.9, 0.999), weight decay 0.01,
torch's default) at a learning rate warmed up linearly over ``min(50, steps // 10)`` steps and decayed
linearly to 0, as the released script does.

**Setups.** The default :class:`PosttrainConfig` is the paper's text: an SFT checkpoint as the start, 5,000
pairs, one epoch. :meth:`PosttrainConfig.released` is the released script's: all pairs, prompts cut to 500
and responses to 1,500 characters, a space before each response, bfloat16, gradient checkpointing, and
(``base_adapters``) an external LoRA SFT adapter merged into Gemma 3 27B pretrained before the new LoRA.

**Where mechintro differs from the released script** (each compared against
``experiments/03f_dpo_mechanism_ablation.py``):

* it trains on every selected pair and saves the final adapter; the script holds out 10% of the pairs,
  evaluates every 200 steps and restores the checkpoint with the best validation loss (early stopping with
  patience 10);
* the reference log-probs are computed on the fly with the adapter disabled (the script caches them before
  training, from the same frozen model: the same numbers);
* the prompt and the response are tokenized separately and concatenated, so the loss starts exactly at the
  response (the script tokenizes the joined text and finds the last response marker);
* the end-of-sequence token is appended by id (the script appends the tokenizer's ``eos_token`` text);
* the order of the pairs is a seeded permutation per epoch, and the label shuffle is seeded (the script uses
  unseeded global RNGs), so a run is reproducible and resumable;
* a last, partial accumulation group still takes a step (the script's step count is
  ``batches × epochs // grad_accum``);
* ``random_lora`` draws its adapter with ``seed`` (the script: peft's ``init_lora_weights=False``, unseeded);
* the script's ``margin_kl_nli`` / ``_fact_checking`` / ``_hallucination`` / ``_prompt_injection`` tasks are
  ``contrastive_margin_kl`` on other datasets: pass those pairs; ``sft_external`` (SFT on another dataset) is
  ``sft_chosen`` on them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mechintro.core.fingerprint import weights_fingerprint
from mechintro.core.progress import progress_bar
from mechintro.core.prompts import token_at
from mechintro.studies.preferences import (
    PreferencePair,
    domain_counts,
    load_pairs,
    pairs_digest,
    reverse,
    select_pairs,
    shuffle_labels,
)

__all__ = [
    "CONDITIONS",
    "METADATA_FILENAME",
    "PAPER_TABLE3",
    "PRESETS",
    "Condition",
    "LoraSettings",
    "PairInjection",
    "PosttrainConfig",
    "beta_sweep",
    "condition_spec",
    "dpo_loss",
    "format_prompt",
    "margin_loss",
    "posttrain",
    "read_posttrain",
    "sequence_logprobs",
    "sft_loss",
    "token_kl",
]

METADATA_FILENAME = "mechintro_posttrain.json"
CHECKPOINT_DIR = "checkpoint"
FORMAT_VERSION = 1
IGNORE = -100

# ----------------------------------------------------------------------------------------------- conditions


@dataclass(frozen=True)
class Condition:
    """One post-training condition: which loss, which reference, which labels."""

    name: str
    """mechintro's name (the released script's task name where it has one)."""
    loss: Literal["dpo", "margin", "sft", "none"]
    """The main loss: DPO, the length-normalized margin, cross-entropy, or none (untrained)."""
    description: str
    """What the condition does, in words."""
    reference: bool = True
    """DPO only: log-probs relative to the frozen reference (False: the reference log-probs are 0)."""
    target: Literal["chosen", "rejected"] = "chosen"
    """SFT only: which response is trained on (the KL term is taken on the same tokens)."""
    kl: bool = False
    """Whether ``kl_weight × KL(π ‖ ref)`` on the target (margin: chosen) tokens is added."""
    labels: Literal["as_given", "shuffled", "reversed"] = "as_given"
    """The pairs as given, each swapped with probability 0.5 (seeded), or all swapped."""
    lora_init: Literal["zero", "random"] = "zero"
    """peft's default (B = 0: the adapter starts as the identity), or random A and B (``random_lora``)."""
    released: str | None = None
    """The released script's task name (``ALL_TASKS`` in ``03f``), if any."""
    paper_row: str | None = None
    """The Table 3 row it reproduces (paper's text), if any."""
    paper_value: str | None = None
    """That row's TPR - FPR as the paper's text gives it, if it gives one."""


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition(
            "dpo",
            "dpo",
            "DPO with the starting model, frozen, as the reference",
            released="dpo_external",
            paper_row="DPO",
        ),
        Condition(
            "dpo_no_ref",
            "dpo",
            "DPO with the reference log-probs set to 0",
            reference=False,
            released="dpo_no_ref",
            paper_row="DPO without reference model",
            paper_value="12.8%",
        ),
        Condition(
            "dpo_shuffled",
            "dpo",
            "DPO on pairs whose chosen and rejected are swapped with probability 0.5",
            labels="shuffled",
            released="dpo_shuffled",
            paper_row="Shuffled preference labels",
            paper_value="0.6%",
        ),
        Condition(
            "dpo_reversed",
            "dpo",
            "DPO on pairs with chosen and rejected swapped",
            labels="reversed",
            released="dpo_reversed",
            paper_row="Reversed preferences",
            paper_value="-21.8%",
        ),
        Condition(
            "contrastive_margin",
            "margin",
            "relu(margin - (lp_c/len_c - lp_r/len_r)), no reference",
            released="contrastive_margin",
        ),
        Condition(
            "contrastive_margin_kl",
            "margin",
            "the margin loss plus kl_weight x KL(pi || ref) on the chosen tokens",
            kl=True,
            released="contrastive_margin_kl",
            paper_row="Margin-based contrastive with explicit KL",
            paper_value="14.3%",
        ),
        Condition(
            "sft_chosen",
            "sft",
            "cross-entropy on the chosen responses",
            released="dpo_chosen_sft",
            paper_row="SFT on chosen responses",
            paper_value="-13.5%",
        ),
        Condition(
            "sft_rejected",
            "sft",
            "cross-entropy on the rejected responses",
            target="rejected",
            released="dpo_rejected_sft",
        ),
        Condition(
            "kl_chosen",
            "sft",
            "cross-entropy on the chosen responses plus kl_weight x KL(pi || ref) on them",
            kl=True,
            released="kl_chosen",
            paper_row="SFT on chosen with KL penalty",
            paper_value="-15.6%",
        ),
        Condition(
            "kl_rejected",
            "sft",
            "cross-entropy on the rejected responses plus kl_weight x KL(pi || ref) on them",
            target="rejected",
            kl=True,
            released="kl_rejected",
        ),
        Condition(
            "random_lora",
            "none",
            "an untrained LoRA with random A and B (peft's init_lora_weights=False)",
            lora_init="random",
            released="random_lora",
        ),
    )
}
"""The conditions by name. The released script's names that differ are accepted as aliases
(``dpo_external``, ``dpo_chosen_sft``, ``dpo_rejected_sft``)."""

ALIASES = {c.released: c.name for c in CONDITIONS.values() if c.released and c.released != c.name}

PAPER_TABLE3: tuple[tuple[str, str | None, str], ...] = (
    ("DPO", None, "condition='dpo' on the SFT checkpoint"),
    ("DPO without reference model", "12.8%", "condition='dpo_no_ref'"),
    ("Margin-based contrastive with explicit KL", "14.3%", "condition='contrastive_margin_kl'"),
    ("SFT on chosen responses", "-13.5%", "condition='sft_chosen'"),
    ("SFT on chosen with KL penalty", "-15.6%", "condition='kl_chosen'"),
    ("DPO applied to the base", "8.4%", "condition='dpo' on the base checkpoint"),
    ("Shuffled preference labels", "0.6%", "condition='dpo_shuffled'"),
    ("Reversed preferences", "-21.8%", "condition='dpo_reversed'"),
    ("Leave-one-domain-out", "8.3% to 14.2%", "condition='dpo' on domain_selections(kind='leave_one_out')"),
    ("Single domains", "3.8% to 14.9%", "condition='dpo' on domain_selections(kind='single')"),
)
"""Table 3's rows (TPR - FPR, paper's text) and how each is run here."""


def condition_spec(name: str | Condition) -> Condition:
    """The condition called ``name`` (or the released script's name for it); raises naming the valid ones."""
    if isinstance(name, Condition):
        return name
    key = ALIASES.get(name, name)
    if key not in CONDITIONS:
        raise ValueError(
            f"unknown post-training condition {name!r}; valid: {sorted(CONDITIONS)} "
            f"(or the released script's names {sorted(ALIASES)})"
        )
    return CONDITIONS[key]


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter (the released script's defaults)."""

    r: int = 64
    """Rank."""
    alpha: int = 128
    """Scale numerator: the update is ``(alpha / r) B A``."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: str = "all-linear"
    """peft's ``target_modules``: ``"all-linear"`` (every linear layer but the output layer, ``lm_head``;
    what the script uses) or a comma-separated list of module names."""

    def peft_config(self, *, random_init: bool) -> Any:
        """The ``peft.LoraConfig``."""
        peft = _peft()
        targets: Any = self.target_modules
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return peft.LoraConfig(
            task_type=peft.TaskType.CAUSAL_LM,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            init_lora_weights=not random_init,
        )


@dataclass(frozen=True)
class PosttrainConfig:
    """Training settings. The defaults are the paper's text (5,000 pairs, one epoch) with the released
    script's optimizer settings; :meth:`released` is the script's setup."""

    beta: float = 0.1
    """DPO's β (the strength of the implicit KL constraint)."""
    margin: float = 1.0
    """The margin-contrastive loss's margin."""
    kl_weight: float = 0.1
    """λ of the KL term (``contrastive_margin_kl``, ``kl_chosen``, ``kl_rejected``)."""
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    epochs: int = 1
    """Passes over the pairs."""
    batch_size: int = 1
    """Pairs per forward pass."""
    grad_accum: int = 8
    """Batches accumulated per optimizer step."""
    max_length: int = 2048
    """Tokens per sequence (prompt + response), cut from the right."""
    n_pairs: int | None = 5000
    """Pairs drawn (seeded) from those given: the paper's text's 5,000; None uses all (the script's 0)."""
    seed: int = 0
    """Seeds the pair draw, the label shuffle, the LoRA init and the order of the pairs."""
    warmup_steps: int | None = None
    """Linear warm-up steps; None is the script's ``min(50, steps // 10)``."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    weight_decay: float = 0.01
    """AdamW's weight decay (torch's default, which the script keeps)."""
    adam_beta1: float = 0.9
    """AdamW's β1."""
    adam_beta2: float = 0.999
    """AdamW's β2."""
    prompt_format: Literal["auto", "chat", "gemma_turns", "raw"] = "auto"
    """``"chat"``: the tokenizer's chat template, one user turn; ``"gemma_turns"``: BOS + Gemma's turn
    markers written out; ``"raw"``: BOS + ``User: {prompt}\\n\\nAssistant:`` (the released code's base
    format). ``"auto"``: chat when the tokenizer has a template (and the model is not one of the paper's
    base checkpoints), else gemma_turns when ``<start_of_turn>`` is one token, else raw (the script's
    rule)."""
    max_prompt_chars: int | None = None
    """Cut each prompt to this many characters (the script: 500); None keeps it whole."""
    max_response_chars: int | None = None
    """Cut each response to this many characters (the script: 1,500); None keeps it whole."""
    leading_space: bool = False
    """Prefix a space to each response that lacks one (the script does)."""
    dtype: str = "float32"
    """Training dtype (``"float32"``, ``"bfloat16"``, ``"float16"``)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (the script does; it saves memory, not numbers)."""
    base_adapters: tuple[str, ...] = ()
    """peft adapters merged into the model, in order, before the new LoRA (the script's ``--base-adapter``:
    the external LoRA SFT adapter on Gemma 3 27B pretrained)."""

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "grad_accum", "max_length")
        bad = [name for name in positive if getattr(self, name) < 1]
        if bad:
            raise ValueError(f"{bad} must be at least 1")
        if self.n_pairs is not None and self.n_pairs < 1:
            raise ValueError(f"n_pairs must be at least 1 or None (all), not {self.n_pairs}")
        formats = ("auto", "chat", "gemma_turns", "raw")
        if self.prompt_format not in formats:
            raise ValueError(f"unknown prompt_format {self.prompt_format!r}; valid: {list(formats)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: ['float32', 'bfloat16', 'float16']")
        object.__setattr__(self, "base_adapters", tuple(str(a) for a in self.base_adapters))

    @classmethod
    def released(cls, **changes: Any) -> PosttrainConfig:
        """The released script's setup: all pairs, prompts cut to 500 and responses to 1,500 characters, a
        space before each response, bfloat16, gradient checkpointing. Its start is Gemma 3 27B pretrained
        (:data:`RELEASED_MODEL`) with an external LoRA SFT adapter merged in: pass that adapter as
        ``base_adapters=(path,)``."""
        settings = dict(
            n_pairs=None,
            max_prompt_chars=500,
            max_response_chars=1500,
            leading_space=True,
            dtype="bfloat16",
            gradient_checkpointing=True,
        )
        return cls(**{**settings, **changes})


RELEASED_MODEL = "google/gemma-3-27b-pt"
"""The released script's default model (``DEFAULT_MODEL = "gemma3_27b_pt"``)."""

PRESETS: dict[str, PosttrainConfig] = {"text": PosttrainConfig(), "released": PosttrainConfig.released()}
"""``"text"``: the paper's text's setup (the default); ``"released"``: the released script's."""


# ----------------------------------------------------------------------------------------------- losses


def _upcast(t: Tensor) -> Tensor:
    """Half-precision logits in float32 (float32 and float64 stay as they are)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def sequence_logprobs(
    logits: Float[Tensor, "batch pos vocab"], labels: Int[Tensor, "batch pos"]
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """(summed log-probability of the labelled tokens, their number) per sequence.

    ``labels[b, t]`` is the token at position t, or -100 where there is no loss (the prompt, padding); the
    logits at t - 1 predict it.
    """
    target = labels[:, 1:]
    mask = target != IGNORE
    logp = F.log_softmax(_upcast(logits[:, :-1]), dim=-1)
    token = logp.gather(2, target.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (token * mask).sum(dim=1), mask.sum(dim=1).to(token.dtype)


def dpo_loss(
    policy_chosen: Float[Tensor, " batch"],
    policy_rejected: Float[Tensor, " batch"],
    ref_chosen: Float[Tensor, " batch"],
    ref_rejected: Float[Tensor, " batch"],
    *,
    beta: float,
) -> Float[Tensor, ""]:
    """``mean(-log σ(β [(π_c - ref_c) - (π_r - ref_r)]))`` over the batch (summed log-probs)."""
    logits = beta * (policy_chosen - ref_chosen) - beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(logits).mean()


def margin_loss(
    policy_chosen: Float[Tensor, " batch"],
    policy_rejected: Float[Tensor, " batch"],
    len_chosen: Float[Tensor, " batch"],
    len_rejected: Float[Tensor, " batch"],
    *,
    margin: float,
) -> Float[Tensor, ""]:
    """``mean(relu(margin - (π_c / len_c - π_r / len_r)))``: length-normalized, no β (lengths at least 1)."""
    diff = policy_chosen / len_chosen.clamp(min=1) - policy_rejected / len_rejected.clamp(min=1)
    return F.relu(margin - diff).mean()


def sft_loss(logits: Float[Tensor, "batch pos vocab"], labels: Int[Tensor, "batch pos"]) -> Float[Tensor, ""]:
    """Cross-entropy averaged over every labelled token of the batch."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        _upcast(logits[:, :-1]).reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


def token_kl(
    policy_logits: Float[Tensor, "batch pos vocab"],
    ref_logits: Float[Tensor, "batch pos vocab"],
    labels: Int[Tensor, "batch pos"],
) -> Float[Tensor, ""]:
    """``Σ_v π (log π - log ref)`` at every position that predicts a labelled token, averaged over those
    positions of the whole batch."""
    logp = F.log_softmax(_upcast(policy_logits[:, :-1]), dim=-1)
    logq = F.log_softmax(_upcast(ref_logits[:, :-1]), dim=-1)
    mask = (labels[:, 1:] != IGNORE).to(logp.dtype)
    per_token = (logp.exp() * (logp - logq)).sum(dim=-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------- data


def _resolved_format(tokenizer: Any, wanted: str, name: str) -> str:
    if wanted != "auto":
        if wanted == "chat" and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"{name}: prompt_format='chat' but the tokenizer has no chat template")
        return wanted
    from mechintro.core.paper_models import paper_model

    record = paper_model(name)
    if getattr(tokenizer, "chat_template", None) is not None and (record is None or record.chat):
        return "chat"
    try:
        if len(tokenizer.encode("<start_of_turn>", add_special_tokens=False)) == 1:
            return "gemma_turns"
    except Exception:  # tokenizers differ in what they refuse
        pass
    return "raw"


RAW_ROLES = {"user": "User", "assistant": "Assistant"}
GEMMA_ROLES = {"user": "user", "assistant": "model"}


def format_prompt(
    tokenizer: Any, prompt: str | Sequence[dict[str, str]], *, style: str, chat_kwargs: dict | None = None
) -> str:
    """The text before the response, BOS included, in ``style`` (``"chat"``, ``"gemma_turns"`` or ``"raw"``;
    see :attr:`PosttrainConfig.prompt_format`): one user turn, or a conversation (chat messages ending in a
    user turn). Without a chat template a system message is written as the first user turn's first
    paragraph."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    bos = tokenizer.bos_token or ""
    if style == "chat":
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **(chat_kwargs or {})
        )
    if style not in ("gemma_turns", "raw"):
        raise ValueError(f"unknown prompt style {style!r}; valid: ['chat', 'gemma_turns', 'raw']")
    if messages[0]["role"] == "system" and len(messages) > 1:
        system, messages = messages[0]["content"], messages[1:]
        messages[0] = {**messages[0], "content": f"{system}\n\n{messages[0]['content']}"}
    if style == "gemma_turns":
        turns = "".join(
            f"<start_of_turn>{GEMMA_ROLES.get(m['role'], m['role'])}\n{m['content']}<end_of_turn>\n"
            for m in messages
        )
        return f"{bos}{turns}<start_of_turn>model\n"
    turns = "\n\n".join(f"{RAW_ROLES.get(m['role'], m['role'])}: {m['content']}" for m in messages)
    return f"{bos}{turns}\n\nAssistant:"


@dataclass(frozen=True)
class PairInjection:
    """How the pairs that carry an ``injection`` are run: each such pair's prompt and both responses get
    ``strength * vectors[concept]`` added to the residual stream after block ``layer`` (the output of HF's
    ``layers[layer]``, the bridge's ``blocks.{layer}.hook_resid_post``, as
    :func:`mechintro.core.steering.inject`) at every position from the token before the last user turn's
    text (a trial prompt's ``injection_start``) on, in the policy's and the reference's forwards alike."""

    layer: int
    """The block whose output receives the vector."""
    vectors: Mapping[str, Tensor]
    """``{concept: [d_model] vector}``, e.g. ``dict(zip(concepts, mi.concept_vectors(base, concepts,
    layer=layer)))`` on the model being trained."""

    def record(self) -> dict[str, Any]:
        """What the adapter's metadata keeps of it: the layer and a digest of the vectors."""
        digest = hashlib.sha256()
        for concept in sorted(self.vectors):
            digest.update(concept.encode())
            digest.update(self.vectors[concept].detach().to(torch.float64).cpu().numpy().tobytes())
        return {"layer": self.layer, "concepts": len(self.vectors), "vectors_sha256": digest.hexdigest()}


@dataclass(frozen=True)
class _Example:
    chosen: tuple[int, ...]
    chosen_start: int
    rejected: tuple[int, ...]
    rejected_start: int
    injection: tuple[str, float, int] | None = None
    """(concept, strength, first injected position), or None."""


def _last_turn_position(tokenizer: Any, text: str, content: str) -> int:
    """The token before the one holding the last occurrence of ``content`` in ``text`` (the position a
    trial prompt's injection starts at, :func:`mechintro.core.prompts.tokenize_trial`)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return max(token_at(enc["offset_mapping"], text.rfind(content)) - 1, 0)


def _encode(
    tokenizer: Any, pairs: Sequence[PreferencePair], *, config: PosttrainConfig, style: str, chat_kwargs: dict
) -> list[_Example]:
    def text(s: str, limit: int | None) -> str:
        return s[:limit] if limit is not None else s

    def prompt_of(pair: PreferencePair) -> str | list[dict[str, str]]:
        if isinstance(pair.prompt, str):
            return text(pair.prompt, config.max_prompt_chars)
        return [{**m, "content": text(m["content"], config.max_prompt_chars)} for m in pair.prompt]

    def ids(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    eos = tokenizer.eos_token_id
    examples = []
    for pair in pairs:
        rendered = format_prompt(tokenizer, prompt_of(pair), style=style, chat_kwargs=chat_kwargs)
        prompt = ids(rendered)
        injection = None
        if pair.injection is not None:
            last = pair.prompt if isinstance(pair.prompt, str) else pair.prompt[-1]["content"]
            start = _last_turn_position(tokenizer, rendered, text(last, config.max_prompt_chars))
            injection = (pair.injection[0], pair.injection[1], start)
        seqs = []
        for response in (pair.chosen, pair.rejected):
            response = text(response, config.max_response_chars)
            if config.leading_space and not response.startswith(" "):
                response = " " + response
            full = (prompt + ids(response) + ([eos] if eos is not None else []))[: config.max_length]
            seqs.append(tuple(full))
        start = min(len(prompt), config.max_length)
        examples.append(_Example(seqs[0], start, seqs[1], start, injection))
    return examples


def _collate(
    examples: Sequence[_Example], which: str, pad_id: int
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """(input_ids, attention_mask, labels) of the chosen or rejected sequences, right-padded."""
    seqs = [(getattr(e, which), getattr(e, f"{which}_start")) for e in examples]
    width = max(len(s) for s, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, (seq, start) in enumerate(seqs):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, start : len(seq)] = torch.tensor(seq[start:], dtype=torch.long)
    return input_ids, mask, labels


# ----------------------------------------------------------------------------------------------- one batch


def _decoder_layers(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


@contextlib.contextmanager
def _injected(model: Any, examples: Sequence[_Example], injection: PairInjection | None) -> Iterator[None]:
    """Add each row's ``strength * vector`` to the output of block ``injection.layer`` from its start on."""
    rows = [(i, e.injection) for i, e in enumerate(examples) if e.injection is not None]
    if not rows:
        yield
        return
    if injection is None:
        raise ValueError("pairs carry an injection, but posttrain was given no injection= (a PairInjection)")
    missing = sorted({inj[0] for _, inj in rows} - set(injection.vectors))
    if missing:
        raise ValueError(
            f"no vector for the injected concept(s) {missing}; PairInjection.vectors has "
            f"{len(injection.vectors)} concepts"
        )

    def hook(_module: Any, _args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        add = torch.zeros_like(hidden)
        for i, (concept, strength, start) in rows:
            vector = injection.vectors[concept].to(device=hidden.device, dtype=hidden.dtype)
            add[i, start:] = strength * vector
        hidden = hidden + add
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = _decoder_layers(model)[injection.layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _logits(model: Any, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    input_ids, mask, _ = batch
    return model(input_ids=input_ids, attention_mask=mask).logits


def _reference_logits(model: Any, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """The frozen reference: the same model with its adapter disabled, without gradients."""
    with torch.no_grad(), model.disable_adapter():
        return _logits(model, batch)


def batch_loss(
    model: Any,
    cond: Condition,
    examples: Sequence[_Example],
    *,
    config: PosttrainConfig,
    pad_id: int,
    device: Any = "cpu",
    injection: PairInjection | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The condition's loss on one batch of encoded pairs, and its parts (floats) for the log; pairs with an
    injection run under it (:class:`PairInjection`), in the reference's forwards too."""
    with _injected(model, examples, injection):
        return _batch_loss(model, cond, examples, config=config, pad_id=pad_id, device=device)


def _batch_loss(
    model: Any,
    cond: Condition,
    examples: Sequence[_Example],
    *,
    config: PosttrainConfig,
    pad_id: int,
    device: Any,
) -> tuple[Tensor, dict[str, float]]:

    def on(which: str) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(t.to(device) for t in _collate(examples, which, pad_id))  # type: ignore[return-value]

    parts: dict[str, float] = {}
    if cond.loss == "sft":
        batch = on(cond.target)
        logits = _logits(model, batch)
        loss = sft_loss(logits, batch[2])
        parts["sft"] = float(loss.detach())
        kl_batch, kl_logits = batch, logits
    else:
        chosen, rejected = on("chosen"), on("rejected")
        logits_c, logits_r = _logits(model, chosen), _logits(model, rejected)
        lp_c, len_c = sequence_logprobs(logits_c, chosen[2])
        lp_r, len_r = sequence_logprobs(logits_r, rejected[2])
        if cond.loss == "dpo":
            if cond.reference:
                ref_c, _ = sequence_logprobs(_reference_logits(model, chosen), chosen[2])
                ref_r, _ = sequence_logprobs(_reference_logits(model, rejected), rejected[2])
            else:
                ref_c, ref_r = torch.zeros_like(lp_c), torch.zeros_like(lp_r)
            loss = dpo_loss(lp_c, lp_r, ref_c, ref_r, beta=config.beta)
            parts["dpo"] = float(loss.detach())
        elif cond.loss == "margin":
            loss = margin_loss(lp_c, lp_r, len_c, len_r, margin=config.margin)
            parts["margin"] = float(loss.detach())
        else:
            raise ValueError(f"condition {cond.name!r} has no training loss")
        kl_batch, kl_logits = chosen, logits_c
    if cond.kl:
        kl = token_kl(kl_logits, _reference_logits(model, kl_batch), kl_batch[2])
        parts["kl"] = float(kl.detach())
        loss = loss + config.kl_weight * kl
    return loss, parts


# ----------------------------------------------------------------------------------------------- helpers


def _peft() -> Any:
    from mechintro.core.models import require_peft

    return require_peft()


def _learning_rate_factor(step: int, *, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _schedule(n_examples: int, config: PosttrainConfig) -> tuple[list[list[int]], int, int]:
    """(batches of example indices in order over all epochs, optimizer steps, warm-up steps)."""
    batches: list[list[int]] = []
    for epoch in range(config.epochs):
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(config.seed + epoch))
        order_list = order.tolist()
        batches += [order_list[i : i + config.batch_size] for i in range(0, n_examples, config.batch_size)]
    steps = math.ceil(len(batches) / config.grad_accum)
    warmup = min(50, steps // 10) if config.warmup_steps is None else config.warmup_steps
    return batches, steps, warmup


def _config_digest(folder: Path) -> str:
    return hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()


def _trained_pairs(
    pairs: Any, cond: Condition, config: PosttrainConfig
) -> tuple[tuple[PreferencePair, ...], dict[str, Any]]:
    given = load_pairs(pairs) if not _all_pairs(pairs) else tuple(pairs)
    selected = select_pairs(given, n=config.n_pairs, seed=config.seed)
    if cond.labels == "shuffled":
        trained = shuffle_labels(selected, seed=config.seed)
    elif cond.labels == "reversed":
        trained = reverse(selected)
    else:
        trained = selected
    record = {
        "n_given": len(given),
        "n": len(trained),
        "domains": domain_counts(trained),
        "digest_selected": pairs_digest(selected),
        "digest_trained": pairs_digest(trained),
        "n_swapped": sum(a != b for a, b in zip(selected, trained, strict=True)),
    }
    return trained, record


def _all_pairs(pairs: Any) -> bool:
    return (
        isinstance(pairs, (tuple, list)) and bool(pairs) and all(isinstance(p, PreferencePair) for p in pairs)
    )


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_posttrain(adapter: str | os.PathLike) -> dict[str, Any]:
    """The ``mechintro_posttrain.json`` of an adapter folder (settings, base identity, pairs, log)."""
    path = Path(adapter) / METADATA_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{adapter}: no {METADATA_FILENAME} (not an adapter written by mi.posttrain)")
    return json.loads(path.read_text())


def _identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


# ----------------------------------------------------------------------------------------------- training


def posttrain(
    model: str | os.PathLike,
    pairs: str | os.PathLike | Iterable[Any],
    *,
    condition: str = "dpo",
    out: str | os.PathLike,
    config: PosttrainConfig | None = None,
    lora: LoraSettings | None = None,
    resume: bool = True,
    progress: bool = True,
    checkpoint_every: int = 50,
    max_steps: int | None = None,
    device: str | None = None,
    injection: PairInjection | None = None,
) -> Path:
    """LoRA-finetune ``model`` on ``pairs`` under ``condition`` (:data:`CONDITIONS`) and save a peft adapter
    at ``out``; returns ``out``.

    Args:
        model: anything :func:`mechintro.load_model` understands (an organism name, an HF id, a folder);
            its plain Hugging Face model and tokenizer are trained.
        pairs: a JSONL file or an iterable of pairs (:func:`mechintro.studies.preferences.load_pairs`);
            ``config.n_pairs`` of them are drawn, then the condition's label change is applied.
        condition: a name of :data:`CONDITIONS` (or the released script's name for it).
        out: the adapter folder (created).
        config, lora: :class:`PosttrainConfig` (default: the paper's text's setup) and :class:`LoraSettings`.
        resume: continue from the checkpoint in ``out`` (or return ``out`` when it is complete) if it was made
            with the same settings, base and pairs; differing ones raise. False starts over.
        progress: show a progress bar.
        checkpoint_every: write a resumable checkpoint (adapter, optimizer, step, RNG, log) every this many
            optimizer steps.
        max_steps: stop after this many optimizer steps in this call (leaving a checkpoint); a later call
            continues. None trains to the end.
        device: default CUDA when available, else CPU.
        injection: the layer and vectors for pairs that carry an ``injection`` (:class:`PairInjection`);
            required when any does.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechintro.core.families import family_by_name, family_of
    from mechintro.core.models import _hub_snapshot, _resolve, merge_adapter

    peft = _peft()
    cond = condition_spec(condition)
    config = config or PosttrainConfig()
    lora = lora or LoraSettings()
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be at least 1, not {checkpoint_every}")
    out = Path(out).expanduser()
    trained, pair_record = _trained_pairs(pairs, cond, config)

    name, folder = _resolve(model)
    if folder is None:
        folder = _hub_snapshot(name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, config.dtype)
    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    for adapter in config.base_adapters:
        hf_model = merge_adapter(hf_model, adapter, name=name, folder=folder)
    hf_model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    base = {
        "name": name,
        "path": str(folder),
        "fingerprint": weights_fingerprint(hf_model),
        "config_sha256": _config_digest(folder),
        "base_adapters": list(config.base_adapters),
    }
    style = _resolved_format(tokenizer, config.prompt_format, name)
    identity = {
        "condition": cond.name,
        "config": json.loads(json.dumps(asdict(config))),
        "lora": asdict(lora),
        "base_fingerprint": base["fingerprint"],
        "pairs_digest": pair_record["digest_trained"],
        "injection": None if injection is None else injection.record(),
        "prompt_format": style,
    }
    out.mkdir(parents=True, exist_ok=True)
    meta_path, ckpt = out / METADATA_FILENAME, out / CHECKPOINT_DIR
    if not resume:
        for stale in (meta_path, out / "adapter_model.safetensors", out / "adapter_config.json"):
            stale.unlink(missing_ok=True)
        shutil.rmtree(ckpt, ignore_errors=True)
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        diff = _identity_diff(old.get("identity", {}), identity)
        if diff:
            raise ValueError(
                f"{out} holds an adapter trained with other settings ({diff} differ); pass another out, or "
                "resume=False to overwrite it"
            )
        if old.get("complete"):
            return out

    torch.manual_seed(config.seed)
    peft_model = peft.get_peft_model(hf_model, lora.peft_config(random_init=cond.lora_init == "random"))
    metadata: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "identity": identity,
        "condition": asdict(cond),
        "config": identity["config"],
        "lora": identity["lora"],
        "base": base,
        "pairs": pair_record,
        "prompt_format": style,
        "setup": "released"
        if config == PosttrainConfig.released(base_adapters=config.base_adapters)
        else ("text" if config == PosttrainConfig() else "custom"),
        "complete": False,
        "log": [],
    }
    if cond.loss == "none":
        peft_model.save_pretrained(str(out))
        metadata.update(complete=True, steps=0)
        _write_json(meta_path, metadata)
        return out

    chat_kwargs = dict(family_by_name(family_of(hf_model.config).name).chat_template_kwargs)
    examples = _encode(tokenizer, trained, config=config, style=style, chat_kwargs=chat_kwargs)
    batches, total, warmup = _schedule(len(examples), config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    step, log = 0, []
    if resume and (ckpt / "state.json").exists():
        state = json.loads((ckpt / "state.json").read_text())
        diff = _identity_diff(state["identity"], identity)
        if diff:
            raise ValueError(
                f"{ckpt} is a checkpoint of a run with other settings ({diff} differ); pass another out, or "
                "resume=False to start over"
            )
        _load_checkpoint(peft_model, optimizer, ckpt, device=device)
        step, log = int(state["step"]), list(state["log"])
    if config.gradient_checkpointing:
        peft_model.enable_input_require_grads()
        peft_model.gradient_checkpointing_enable()
    peft_model.train()
    stop = total if max_steps is None else min(total, step + max_steps)
    with progress_bar(total=total, desc=f"posttrain {cond.name}", unit="step", enabled=progress) as bar:
        bar.update(step)
        while step < stop:
            group = batches[step * config.grad_accum : (step + 1) * config.grad_accum]
            factor = _learning_rate_factor(step, total=total, warmup=warmup)
            for group_params in optimizer.param_groups:
                group_params["lr"] = config.lr * factor
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            total_loss = 0.0
            for indices in group:
                loss, parts = batch_loss(
                    peft_model,
                    cond,
                    [examples[i] for i in indices],
                    config=config,
                    pad_id=pad_id,
                    device=device,
                    injection=injection,
                )
                (loss / len(group)).backward()
                total_loss += float(loss.detach()) / len(group)
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0.0) + value / len(group)
            norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            step += 1
            log.append(
                {"step": step, "loss": total_loss, "lr": config.lr * factor, "grad_norm": float(norm), **sums}
            )
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss:.4f}")
            if step % checkpoint_every == 0 or step == stop:
                if step < total:
                    _save_checkpoint(
                        peft_model, optimizer, ckpt, {"identity": identity, "step": step, "log": log}
                    )
    metadata["log"] = log
    metadata["steps"] = step
    metadata["total_steps"] = total
    metadata["warmup_steps"] = warmup
    if step < total:
        _write_json(meta_path, metadata)
        return out
    peft_model.save_pretrained(str(out))
    metadata["complete"] = True
    _write_json(meta_path, metadata)
    shutil.rmtree(ckpt, ignore_errors=True)
    return out


def _save_checkpoint(model: Any, optimizer: Any, folder: Path, state: dict[str, Any]) -> None:
    """Write adapter weights, optimizer state, RNG states and ``state`` to ``folder`` atomically."""
    from safetensors.torch import save_file

    peft = _peft()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in peft.get_peft_model_state_dict(model).items()}
    save_file(weights, str(tmp / "adapter_model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
    _write_json(tmp / "state.json", state)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(model: Any, optimizer: Any, folder: Path, *, device: Any) -> None:
    from safetensors.torch import load_file

    peft = _peft()
    weights = load_file(str(folder / "adapter_model.safetensors"), device=str(device))
    result = peft.set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{folder}: the checkpoint's adapter does not fit this model ({unexpected[:3]}...)")
    saved = torch.load(folder / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(saved)
    rng = torch.load(folder / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])


def beta_sweep(
    model: str | os.PathLike,
    pairs: str | os.PathLike | Iterable[Any],
    *,
    betas: Sequence[float],
    out: str | os.PathLike,
    condition: str = "dpo",
    config: PosttrainConfig | None = None,
    **kwargs: Any,
) -> dict[float, Path]:
    """The β sweep: one adapter per β at ``out/beta_<β>`` (each resumable); ``{β: folder}``."""
    if not betas:
        raise ValueError("betas is empty")
    config = config or PosttrainConfig()
    pairs = load_pairs(pairs) if not _all_pairs(pairs) else tuple(pairs)
    return {
        float(b): posttrain(
            model,
            pairs,
            condition=condition,
            out=Path(out) / f"beta_{float(b):g}",
            config=replace(config, beta=float(b)),
            **kwargs,
        )
        for b in betas
    }
