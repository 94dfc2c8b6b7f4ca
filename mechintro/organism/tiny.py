"""Random tiny checkpoints in the organism's format: what ``mechintro demo``, ``--model tiny``, the benchmarks
and the tests (through :mod:`mechintro.testing`) run on when no trained weights are needed.

``save_tiny_gemma3(folder)`` writes a random ``Gemma3ForCausalLM`` and a word-level tokenizer whose vocabulary
covers every stimulus (all prompt and persona variants, the 500 concepts, the baseline words, the forced
prefill), so every mechintro code path runs on it exactly as on a real Gemma 3, offline and in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from mechintro.core.prompts import stimuli
from mechintro.organism.tokenizer import build_tokenizer, vocabulary

RESPONSE_TEXTS = (
    "Yes, I detect an injected thought. The thought is about",
    "No, I do not detect an injected thought.",
    "yes no YES NO Tell me about",
)


def stimuli_texts() -> list[str]:
    """Every prompt text in the stimuli, with placeholders left as words."""
    s = stimuli()
    texts = [s["forced_identification_prefill"], *RESPONSE_TEXTS, "user model system", "Trial 10"]
    texts += ["Tell me about", "Describe"]  # a user turn opens on these words without a leading space
    for v in s["prompt_variants"].values():
        texts += [v["system"], v["user_turn1"], v["assistant_turn1"], v["user_turn2"]]
    texts += [p["raw_text"] for p in s["persona_variants"].values() if "raw_text" in p]
    return texts


def stimuli_words() -> list[str]:
    s = stimuli()
    words = s["original_50_concepts"] + s["new_450_concepts"] + s["baseline_words"]
    words += list(s["concept_categories_for_anti_reward"]) + [str(i) for i in range(0, 101)]
    words += ["user", "model", "system", "yes", "Yes", "YES", "no", "No", "NO"]
    return words


def build_subword_tokenizer(*, vocab_size: int = 600) -> Any:
    """A small BPE tokenizer (Gemma-like ``▁`` spaces, Gemma's turn markers and chat template) trained on the
    stimuli, so that most words split into several pieces: prompts then have different lengths and batches
    need padding, as with Gemma's own tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mechintro.organism.tokenizer import SPECIAL_TOKENS, gemma_style

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    answers = ["yes Yes YES no No NO"] * 100  # frequent enough to become whole tokens, as in Gemma
    texts = stimuli_texts() + stimuli_words() + answers + ["user\nmodel\nTell me about\n\n"]
    core.train_from_iterator(texts, trainer)
    return gemma_style(core)


def _word_tokenizer() -> Any:
    """The word-level tokenizer covering every stimulus (one token per word, Gemma-style turn markers)."""
    return build_tokenizer(vocabulary(stimuli_texts(), extra_words=stimuli_words()))


def _shared_config(
    tok: Any, *, n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, d_mlp: int
) -> dict[str, Any]:
    """The config fields every tiny family shares: sizes, and special tokens from ``tok``."""
    return {
        "vocab_size": len(tok),
        "hidden_size": d_model,
        "intermediate_size": d_mlp,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "max_position_embeddings": 1024,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")],
    }


def _layer_types(n_layers: int) -> list[str]:
    """Both attention kinds: sliding-window layers and (every other layer here) global layers."""
    return ["full_attention" if i % 2 == 1 else "sliding_attention" for i in range(n_layers)]


def save_tiny_gemma3(
    folder: str | Path,
    *,
    tokenizer: Literal["word", "subword"] = "word",
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    sliding_window: int = 16,
    seed: int = 0,
) -> Path:
    """Save a random tiny ``Gemma3ForCausalLM`` + tokenizer with ``save_pretrained`` and return the folder.

    ``tokenizer="word"`` (default): one token per word, covering every stimulus; ``"subword"``: a small BPE
    (:func:`build_subword_tokenizer`), so concept prompts differ in length as with Gemma's tokenizer.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder = Path(folder)
    if tokenizer not in ("word", "subword"):
        raise ValueError(f"unknown tokenizer {tokenizer!r}; valid: ['word', 'subword']")
    tok = _word_tokenizer() if tokenizer == "word" else build_subword_tokenizer()
    sizes = {
        "n_layers": n_layers,
        "d_model": d_model,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "d_mlp": d_mlp,
    }
    cfg = Gemma3TextConfig(
        **_shared_config(tok, **sizes),
        head_dim=d_model // n_heads,
        sliding_window=sliding_window,
        layer_types=_layer_types(n_layers),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms with weight != 0 make every norm site distinguishable in tests
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


TINY_FAMILIES = ("gemma3", "gemma4_text", "qwen3", "qwen3_moe", "llama", "olmo2", "olmo3")
"""Families :func:`save_tiny` writes (the names of :data:`mechintro.core.families.FAMILIES`)."""


def _family_config(
    family: str,
    tok: Any,
    *,
    n_layers: int,
    d_model: int,
    n_heads: int,
    n_kv_heads: int,
    d_mlp: int,
    sliding_window: int,
) -> Any:
    """A tiny random config of ``family`` whose special tokens are ``tok``'s."""
    import transformers as tf

    common = _shared_config(
        tok, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, d_mlp=d_mlp
    ) | {"tie_word_embeddings": False}
    mixed = _layer_types(n_layers)
    head_dim = d_model // n_heads
    if family == "gemma4_text":
        return tf.Gemma4TextConfig(
            **common,
            head_dim=head_dim,
            sliding_window=sliding_window,
            layer_types=mixed,
            hidden_size_per_layer_input=0,
            enable_moe_block=False,
            num_kv_shared_layers=0,
            global_head_dim=head_dim,
        )
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=head_dim)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common,
            head_dim=head_dim,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=d_mlp // 2,
            decoder_sparse_step=1,
        )
    if family == "llama":
        return tf.LlamaConfig(**common, head_dim=head_dim)
    if family == "olmo2":
        return tf.Olmo2Config(**common)
    if family == "olmo3":
        return tf.Olmo3Config(**common, sliding_window=sliding_window, layer_types=mixed)
    raise ValueError(f"unknown family {family!r}; valid: {list(TINY_FAMILIES)}")


def save_tiny(
    family: str,
    folder: str | Path,
    *,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    sliding_window: int = 16,
    seed: int = 0,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Save a random tiny causal LM of ``family`` (one of :data:`TINY_FAMILIES`) + the word tokenizer with
    ``save_pretrained`` and return the folder.

    ``config``: fields that override the family's tiny config, for a variant (e.g. a Gemma 4 with
    per-layer embeddings: ``{"hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": ...}``).

    ``"gemma3"`` is :func:`save_tiny_gemma3`. The others use the same word-level tokenizer (one token per
    stimulus word, Gemma-style turn markers); their norms get random weights so every norm site is
    distinguishable, and their embeddings are untied so the unembedding is its own tensor.
    """
    from transformers import AutoModelForCausalLM

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {list(TINY_FAMILIES)}")
    sizes = {
        "n_layers": n_layers,
        "d_model": d_model,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "d_mlp": d_mlp,
        "sliding_window": sliding_window,
    }
    if family == "gemma3" and not config:
        return save_tiny_gemma3(folder, seed=seed, **sizes)
    if family == "gemma3":
        raise ValueError("config overrides are for the other families; save_tiny_gemma3 has its own options")
    folder = Path(folder)
    tok = _word_tokenizer()
    cfg = _family_config(family, tok, **sizes)
    if config:
        fields = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "transformers_version")}
        cfg = type(cfg)(**(fields | dict(config)))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.5)
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_random_transcoders(
    folder: str | Path,
    *,
    d_model: int = 64,
    d_sae: int = 96,
    n_layers: int = 4,
    seed: int = 0,
    skip: bool = True,
) -> Path:
    """Save random JumpReLU (skip) transcoders in Google's raw Gemma Scope 2 format, one ``layer_{L}`` folder
    each.

    Load them with ``load_transcoders(model, source=folder)``. Scales are chosen so that a tiny random Gemma 3
    activates a good share of the features.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    for layer in range(n_layers):
        g = torch.Generator().manual_seed(seed * 1000 + layer)
        params = {
            "w_enc": torch.randn(d_model, d_sae, generator=g) * 0.3,
            "w_dec": torch.randn(d_sae, d_model, generator=g) * 0.3,
            "b_enc": torch.randn(d_sae, generator=g) * 0.1,
            "b_dec": torch.randn(d_model, generator=g) * 0.1,
            "threshold": torch.rand(d_sae, generator=g) * 0.5,
        }
        if skip:
            params["affine_skip_connection"] = torch.randn(d_model, d_model, generator=g) * 0.1
        (folder / f"layer_{layer}").mkdir(parents=True, exist_ok=True)
        save_file(params, str(folder / f"layer_{layer}" / "params.safetensors"))
    return folder


def _random_dictionary(
    g: torch.Generator, *, d_in: int, d_sae: int, d_out: int, threshold: bool
) -> dict[str, torch.Tensor]:
    """Random dictionary tensors, encoder ``[d_in, d_sae]`` / decoder ``[d_sae, d_out]``; scales that activate
    a good share of the features on a tiny model."""
    out = {
        "enc": torch.randn(d_in, d_sae, generator=g) * 0.3,
        "dec": torch.randn(d_sae, d_out, generator=g) * 0.3,
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "b_dec": torch.randn(d_out, generator=g) * 0.1,
        "skip": torch.randn(d_out, d_in, generator=g) * 0.1,  # applied as x @ skip.T; not symmetric
    }
    if threshold:
        out["threshold"] = torch.rand(d_sae, generator=g) * 0.5
    return out


def save_circuit_tracer_transcoders(
    folder: str | Path,
    *,
    d_model: int = 64,
    d_transcoder: int = 96,
    n_layers: int = 4,
    activation: Literal["relu", "jumprelu", "topk"] = "relu",
    k: int | None = None,
    k_in_file: bool = False,
    skip: bool = True,
    seed: int = 0,
    feature_input_hook: str | None = "mlp.hook_in",
    feature_output_hook: str | None = "mlp.hook_out",
    model_name: str | None = None,
) -> Path:
    """Save random transcoders in circuit-tracer's per-layer format: ``layer_{L}.safetensors`` with ``W_enc
    [d_transcoder, d_model]``, ``W_dec [d_transcoder, d_model]``, ``b_enc``, ``b_dec``, ``W_skip [d_model,
    d_model]`` (applied as ``x @ W_skip.T``), ``activation_function.threshold`` (JumpReLU) or ``k`` (TopK,
    with ``k_in_file``), and a ``config.yaml`` (``model_kind: transcoder_set``) naming the hooks, the
    activation, ``k`` and the files. ``feature_input_hook=None`` writes no config at all."""
    import yaml
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for layer in range(n_layers):
        g = torch.Generator().manual_seed(seed * 1000 + layer)
        r = _random_dictionary(g, d_in=d_model, d_sae=d_transcoder, d_out=d_model, threshold=True)
        tensors = {
            "W_enc": r["enc"].T.contiguous(),
            "W_dec": r["dec"],
            "b_enc": r["b_enc"],
            "b_dec": r["b_dec"],
        }
        if skip:
            tensors["W_skip"] = r["skip"]
        if activation == "jumprelu":
            tensors["activation_function.threshold"] = r["threshold"]
        if activation == "topk" and k_in_file:
            tensors["k"] = torch.tensor(int(k or 1))
        name = f"layer_{layer}.safetensors"
        save_file(tensors, str(folder / name))
        files.append(name)
    if feature_input_hook is not None:
        config: dict[str, Any] = {
            "model_kind": "transcoder_set",
            "feature_input_hook": feature_input_hook,
            "feature_output_hook": feature_output_hook,
            "transcoders": files,
        }
        if model_name is not None:
            config["model_name"] = model_name
        if activation != "jumprelu":
            config["activation"] = activation
        if activation == "topk" and not k_in_file:
            config["k"] = int(k or 1)
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def save_sae_lens_transcoders(
    folder: str | Path,
    *,
    d_in: int = 64,
    d_out: int = 64,
    d_sae: int = 96,
    n_layers: int = 4,
    activation: Literal["relu", "jumprelu"] = "jumprelu",
    skip: bool = True,
    seed: int = 0,
    hook_name: str = "blocks.{layer}.ln2.hook_out",
    hook_name_out: str = "blocks.{layer}.hook_mlp_out",
    model_name: str | None = None,
    tensors: dict[int, dict[str, torch.Tensor]] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save transcoders in sae-lens's folder format, written by hand (``layer_{L}/cfg.json`` +
    ``sae_weights.safetensors``: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``W_skip [d_out,
    d_in]`` applied as ``x @ W_skip.T``, ``threshold``), random unless ``tensors`` (``{layer: state}``, in
    that layout) are given. ``hook_name`` / ``hook_name_out`` may hold ``{layer}``; ``metadata`` adds keys
    (e.g. ``fvu``)."""
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    layers = sorted(tensors) if tensors is not None else list(range(n_layers))
    for layer in layers:
        if tensors is not None:
            state = dict(tensors[layer])
        else:
            g = torch.Generator().manual_seed(seed * 1000 + layer)
            r = _random_dictionary(g, d_in=d_in, d_sae=d_sae, d_out=d_out, threshold=activation == "jumprelu")
            state = {"W_enc": r["enc"], "W_dec": r["dec"], "b_enc": r["b_enc"], "b_dec": r["b_dec"]}
            state |= {"W_skip": r["skip"]} if skip else {}
            state |= {"threshold": r["threshold"]} if activation == "jumprelu" else {}
        has_skip = "W_skip" in state
        arch = ("jumprelu_" if "threshold" in state else "") + ("skip_" if has_skip else "") + "transcoder"
        cfg = {
            "architecture": arch,
            "d_in": int(state["W_enc"].shape[0]),
            "d_sae": int(state["W_enc"].shape[1]),
            "d_out": int(state["W_dec"].shape[1]),
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "metadata": {
                "sae_lens_version": "6.0.0",  # the 6.x layout: hooks in metadata
                "hook_name": hook_name.format(layer=layer),
                "hook_name_out": hook_name_out.format(layer=layer),
                "model_name": model_name,
                **(metadata or {}),
            },
        }
        sub = folder / f"layer_{layer}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / "cfg.json").write_text(json.dumps(cfg))
        save_file({n: t.contiguous() for n, t in state.items()}, str(sub / "sae_weights.safetensors"))
    return folder
