"""Mutation check: plant named bugs, one per exactness claim of the README, and check the tests catch each.

Each mutant replaces one exact piece of source text (it must occur exactly once) in a temporary copy of the
repository and runs the tests that should catch it; a mutant the tests still pass on "survives" and fails this
script. It is not part of CI's time budget: run it before a release with ``make mutants`` (about 10 minutes on
2 cores), or ``python tools/mutants.py --only NAME`` for one.
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    """A planted bug: ``old`` -> ``new`` in ``path``, which ``tests`` must catch."""

    name: str
    claim: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant(
        "pair-injection-starts-at-trial-marker",
        "a trial pair's injection starts where the trial's does (the token before 'Trial N')",
        "mechintro/studies/posttrain.py",
        '    return max(token_at(enc["offset_mapping"], text.rfind(content)) - 1, 0)',
        '    return max(token_at(enc["offset_mapping"], text.rfind(content)), 0)',
        ("tests/organism/test_posttraining.py",),
    ),
    Mutant(
        "pair-injection-skips-first-position",
        "the pairs' injection edits the residual stream from its start on, as inject does",
        "mechintro/studies/posttrain.py",
        "            add[i, start:] = strength * vector",
        "            add[i, start + 1 :] = strength * vector",
        ("tests/organism/test_posttraining.py",),
    ),
    Mutant(
        "preferences-presence-always-yes",
        "a presence pair prefers Yes only when the sentences are about the concept asked",
        "mechintro/organism/preferences.py",
        '"chosen": yes if x == c else no,',
        '"chosen": yes,',
        ("tests/organism/test_posttraining.py",),
    ),
    Mutant(
        "conditions-figure-nan-paper",
        "a condition without a paper number draws no paper marker",
        "mechintro/plots/checkpoints.py",
        "    if value is None or (isinstance(value, float) and value != value) or not str(value).strip():",
        "    if value is None:",
        ("tests/organism/test_posttraining.py",),
    ),
    Mutant(
        "orthogonalize-skip-embedding",
        "the checkpoint removes r from every token embedding when block 0 is listed",
        "mechintro/mechanism/orthogonalize.py",
        "            _project_rows(hf.get_input_embeddings().weight, rd, dim=1)\n",
        "            pass\n",
        ("tests/mechanism/test_orthogonalize.py",),
    ),
    Mutant(
        "orthogonalize-skip-o-proj",
        "the checkpoint removes r from every attention output projection",
        "mechintro/mechanism/orthogonalize.py",
        '    linear("self_attn.o_proj", getattr(layer.self_attn, "o_proj", None))\n',
        "",
        ("tests/mechanism/test_orthogonalize.py",),
    ),
    Mutant(
        "orthogonalize-skip-bias",
        "a write's bias (o_proj / down_proj) loses its component along r too",
        "mechintro/mechanism/orthogonalize.py",
        "        if module.bias is not None:\n",
        "        if False:\n",
        ("tests/mechanism/test_orthogonalize.py",),
    ),
    Mutant(
        "orthogonalize-skip-experts",
        "a mixture's write (each expert's down_proj) is orthogonalized",
        "mechintro/mechanism/orthogonalize.py",
        '        out.append((f"{prefix}.mlp.experts.down_proj", down, 1))\n',
        "        pass\n",
        ("tests/mechanism/test_orthogonalize.py",),
    ),
    Mutant(
        "orthogonalize-unembedding-too",
        "a tied unembedding is untied and keeps its original values",
        "mechintro/mechanism/orthogonalize.py",
        "            _untie(hf)\n",
        "            pass\n",
        ("tests/mechanism/test_orthogonalize.py",),
    ),
    Mutant(
        "orthogonalize-in-place",
        "a plain Hugging Face source is never modified",
        "mechintro/mechanism/orthogonalize.py",
        "        return copy.deepcopy(model), None, str(",
        "        return model, None, str(",
        ("tests/mechanism/test_orthogonalize.py",),
    ),
    Mutant(
        "orthogonalize-post-norm-allowed",
        "post-norm families (Gemma, OLMo) are refused by default",
        "mechintro/mechanism/orthogonalize.py",
        '    if post_norm == "approximate":\n',
        "    if True:\n",
        ("tests/mechanism/test_orthogonalize.py",),
    ),
    Mutant(
        "orthogonalize-fractional-weight",
        "a fractional weight is refused (it stays a runtime ablation)",
        "mechintro/mechanism/orthogonalize.py",
        "    if w != 1.0:\n",
        "    if False:\n",
        ("tests/mechanism/test_orthogonalize.py",),
    ),
    Mutant(
        "posttrain-margin-unnormalized",
        "the margin-contrastive loss compares per-token log-probs (lp / len), as the released script does",
        "mechintro/studies/posttrain.py",
        "    diff = policy_chosen / len_chosen.clamp(min=1) - policy_rejected / len_rejected.clamp(min=1)",
        "    diff = policy_chosen - policy_rejected",
        ("tests/studies/test_posttrain.py",),
    ),
    Mutant(
        "posttrain-dpo-beta-one-side",
        "DPO's beta scales both the chosen and the rejected log-ratio",
        "mechintro/studies/posttrain.py",
        "    logits = beta * (policy_chosen - ref_chosen) - beta * (policy_rejected - ref_rejected)",
        "    logits = beta * (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)",
        ("tests/studies/test_posttrain.py",),
    ),
    Mutant(
        "posttrain-reference-not-frozen",
        "the DPO / KL reference is the starting model (adapter disabled), not the policy",
        "mechintro/studies/posttrain.py",
        "    with torch.no_grad(), model.disable_adapter():",
        "    with torch.no_grad():",
        ("tests/studies/test_posttrain.py",),
    ),
    Mutant(
        "posttrain-kl-on-rejected",
        "contrastive_margin_kl takes the KL on the chosen response's tokens",
        "mechintro/studies/posttrain.py",
        "        kl_batch, kl_logits = chosen, logits_c",
        "        kl_batch, kl_logits = rejected, logits_r",
        ("tests/studies/test_posttrain.py",),
    ),
    Mutant(
        "posttrain-loss-on-prompt",
        "the losses count only the response tokens (and the EOS), never the prompt",
        "mechintro/studies/posttrain.py",
        "        labels[i, start : len(seq)] = ",
        "        labels[i, : len(seq)] = ",
        ("tests/studies/test_posttrain.py",),
    ),
    Mutant(
        "posttrain-reversed-not-applied",
        "dpo_reversed trains on every pair swapped",
        "mechintro/studies/posttrain.py",
        "        trained = reverse(selected)",
        "        trained = selected",
        ("tests/studies/test_posttrain.py",),
    ),
    Mutant(
        "preferences-reverse-identity",
        "reverse() swaps chosen and rejected (the reversed-DPO gradient is the negated one at the reference)",
        "mechintro/studies/preferences.py",
        "    return tuple(pair.swapped() for pair in pairs)",
        "    return tuple(pairs)",
        ("tests/studies/test_preferences.py", "tests/studies/test_posttrain.py"),
    ),
    Mutant(
        "preferences-shuffle-unseeded",
        "the label shuffle is seeded",
        "mechintro/studies/preferences.py",
        "    rng = random.Random(seed)",
        "    rng = random.Random()",
        ("tests/studies/test_preferences.py", "tests/studies/test_posttrain.py"),
    ),
    Mutant(
        "posttrain-resume-drops-optimizer",
        "a resumed run restores the optimizer state and ends with the uninterrupted run's adapter",
        "mechintro/studies/posttrain.py",
        "    optimizer.load_state_dict(saved)",
        "    pass",
        ("tests/studies/test_posttrain.py",),
    ),
    Mutant(
        "load-model-adapter-not-merged",
        "load_model(base, adapter=...) merges the adapter: the bridge's logits equal the PeftModel's",
        "mechintro/core/models.py",
        "    return wrapped.merge_and_unload()",
        "    return wrapped.unload()",
        ("tests/studies/test_posttrain.py",),
    ),
    Mutant(
        "load-model-adapter-base-unchecked",
        "an adapter trained on another base is refused",
        "mechintro/core/models.py",
        '        if base.get("fingerprint") != actual:',
        "        if False:",
        ("tests/studies/test_posttrain.py",),
    ),
    Mutant(
        "checkpoints-vectors-first-only",
        "every checkpoint of a series gets concept vectors computed on its own weights",
        "mechintro/studies/checkpoints.py",
        "    vectors = checkpoint_vectors(model, concepts, layers=layers, chat=loaded.chat, "
        "baseline=baseline)",
        '    vectors = checkpoint_vectors.__dict__.setdefault("first", checkpoint_vectors(model, concepts, '
        "layers=layers, chat=loaded.chat, baseline=baseline))",
        ("tests/studies/test_checkpoints.py",),
    ),
    Mutant(
        "checkpoints-base-via-chat-template",
        "a base checkpoint is prompted in the released raw format, not through a chat template",
        "mechintro/studies/checkpoints.py",
        "    return CHAT_PERSONA if chat else RAW_PERSONA",
        "    return CHAT_PERSONA",
        ("tests/studies/test_checkpoints.py",),
    ),
    Mutant(
        "checkpoints-raw-concept-prompt-chat",
        "a base checkpoint's concept vectors come from BOS + raw text, not the chat template",
        "mechintro/core/concepts.py",
        "    tokens = chat_prompt_tokens if chat else raw_prompt_tokens",
        "    tokens = chat_prompt_tokens",
        ("tests/studies/test_checkpoints.py",),
    ),
    Mutant(
        "checkpoints-adapter-not-in-identity",
        "a checkpoint's adapter is part of its trials' identity in the store",
        "mechintro/studies/checkpoints.py",
        "        if cp.adapter is not None and str(cp.adapter) not in identity:",
        "        if False:",
        ("tests/studies/test_checkpoints.py",),
    ),
    Mutant(
        "checkpoints-duplicate-identity-unchecked",
        "two checkpoints of one identity are refused before their trials would share rows",
        "mechintro/studies/checkpoints.py",
        "        if identity in seen:",
        "        if False:",
        ("tests/studies/test_checkpoints.py",),
    ),
    Mutant(
        "gates-own-dictionary-per-checkpoint",
        "the gate comparison reads one dictionary (the reference's) on every checkpoint",
        "mechintro/studies/checkpoints.py",
        '            if transcoders == "own" or (shared is None and i == ref):',
        "            if True:",
        ("tests/studies/test_checkpoints.py",),
    ),
    Mutant(
        "checkpoints-fvu-against-input",
        "the dictionary's FVU compares its prediction with the MLP output the checkpoint computes",
        "mechintro/studies/checkpoints.py",
        "    return fvu(pred, y.float())",
        "    return fvu(pred, x.float())",
        ("tests/studies/test_checkpoints.py",),
    ),
    Mutant(
        "olmo-recipe-default-rope",
        "the OLMo recipe states its rotary base (500,000) rather than taking the installed transformers' "
        "default",
        "mechintro/organism/train.py",
        "        return Olmo3Config(**common, rope_parameters=dict(OLMO_ROPE), tie_word_embeddings=False)",
        "        return Olmo3Config(**common, tie_word_embeddings=False)",
        ("tests/organism/test_organism_portability.py",),
    ),
    Mutant(
        "olmo-config-nested-rope-only",
        "the shipped OLMo config.json gives its rotary base flat too, which transformers 5.9 reads",
        "mechintro/data/olmo/organism/config.json",
        '''    },
    "rope_theta": 500000.0,
    "rope_type": "default",
    "sliding_attention"''',
        '''    },
    "sliding_attention"''',
        ("tests/organism/test_organism_portability.py",),
    ),
    Mutant(
        "organism-transcoders-record-gemma-site",
        "the organism's transcoders record their own family's site (OLMo: mlp.hook_in), which loading checks",
        "mechintro/organism/transcoders.py",
        "    tcs = to_sae_lens(stacked, scales, sorted(data), names=hook_names(model))",
        "    tcs = to_sae_lens(stacked, scales, sorted(data))",
        ("tests/organism/test_organism_olmo.py",),
    ),
    Mutant(
        "transcoder-site-ignores-recorded",
        "every reader takes a transcoder's hooks from the site it records (a Gemma 3 dictionary recorded "
        "before the norm is read there)",
        "mechintro/core/transcoders.py",
        """        if meta.get("site") is not None or "source_hook_name" in meta:
            return transcoder_hooks(transcoders[layer])""",
        """        if False:
            return transcoder_hooks(transcoders[layer])""",
        ("tests/mechanism/test_dictionary_site_readers.py",),
    ),
    Mutant(
        "lazy-hooks-forgotten",
        "a lazy mapping remembers each layer's site after loading it, so the grid loads each layer once",
        "mechintro/core/transcoders.py",
        "        self._hooks[layer] = transcoder_hooks(tc)\n",
        "",
        ("tests/mechanism/test_dictionary_site_readers.py", "tests/attribution/test_attribution.py"),
    ),
    Mutant(
        "gemma4-variant-transcoder-site-allowed",
        "a Gemma 4 with per-layer embeddings or an MoE branch refuses transcoder sites by name",
        "mechintro/core/models.py",
        "    return HookNames.of_family(spec.family, problem=spec.mechanism_problem)",
        "    return HookNames.of_family(spec.family)",
        ("tests/core/test_gemma4_variants.py",),
    ),
    Mutant(
        "paper-fraction-rounded",
        "the released code's layer is int(fraction x n_layers), truncated, not rounded",
        "mechintro/core/paper_models.py",
        "max(0, min(int(n_layers * fraction), n_layers - 1))",
        "max(0, min(round(n_layers * fraction), n_layers - 1))",
        ("tests/core/test_paper_models.py",),
    ),
    Mutant(
        "relative-depth-called-calibrated",
        "a model neither the paper nor its folder calibrates says its point is only a default",
        "mechintro/core/models.py",
        "return paper_layer(n_layers), PAPER_STRENGTH, False, RELATIVE_DEPTH",
        "return paper_layer(n_layers), PAPER_STRENGTH, True, RELATIVE_DEPTH",
        ("tests/core/test_paper_models.py",),
    ),
    Mutant(
        "api-name-not-exported",
        "every name in mechintro.__all__ resolves (a merge once dropped one)",
        "mechintro/__init__.py",
        "from mechintro.mechanism.sharded import sharded_feature_grid\n",
        "",
        ("tests/test_api.py",),
    ),
    Mutant(
        "fingerprint-skips-values",
        "the weights fingerprint changes when one row of one matrix changes",
        "mechintro/core/fingerprint.py",
        "            digest.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())",
        "            pass",
        ("tests/core/test_fingerprint.py",),
    ),
    Mutant(
        "fingerprint-sample-without-sum",
        "a sampled fingerprint still sees a change between the sampled values (through each tensor's sum)",
        "mechintro/core/fingerprint.py",
        "t = torch.cat([flat[::step], flat.float().sum().reshape(1).to(t.dtype)])",
        "t = flat[::step]",
        ("tests/core/test_fingerprint.py",),
    ),
    Mutant(
        "validate-accepts-bools",
        "an integer argument is never a bool",
        "mechintro/core/validate.py",
        "    if isinstance(value, bool) or (torch.is_tensor(value) and value.dtype == torch.bool):",
        "    if False:",
        ("tests/core/test_validate.py",),
    ),
    Mutant(
        "deferred-upward-import",
        "no layer imports an upper one, not even inside a function (the layer test walks every import)",
        "mechintro/core/readout.py",
        '''    """logsumexp(logits[Yes ids]) - logsumexp(logits[No ids])."""''',
        '''    """logsumexp(logits[Yes ids]) - logsumexp(logits[No ids])."""
    from mechintro.behaviour import metrics  # noqa: F401''',
        ("tests/test_layers.py",),
    ),
    Mutant(
        "deferred-import-circle",
        "the package has no import circles, including ones hidden in function bodies",
        "mechintro/behaviour/store.py",
        """def _match(a: str, b: str) -> str:""",
        """def _circle() -> None:
    from mechintro.behaviour.leases import ClaimQueue  # noqa: F401


def _match(a: str, b: str) -> str:""",
        ("tests/test_layers.py::test_the_package_has_no_import_circles",),
    ),
    Mutant(
        "bridge-cache-shim-off",
        "through the bridge a prefill fills the KV cache on transformers >= 5.24 (cache=) as on 5.23",
        "mechintro/core/kvcache.py",
        "    if bridge_reads_cache(AttentionBridge):",
        "    if True:",
        ("tests/core/test_kvcache.py",),
    ),
    Mutant(
        "cache-argument-guessed",
        "the cache argument's name is read off the callee's signature, never guessed",
        "mechintro/core/kvcache.py",
        "    return _argument_of(type(hf_module(model)).forward)",
        "    return OLD_NAME",
        ("tests/core/test_kvcache.py",),
    ),
    Mutant(
        "store-open-not-retried",
        "two processes creating one store at once both open it (a busy WAL switch is tried again)",
        "mechintro/behaviour/store.py",
        "if _errorname(e).startswith(_BUSY) and time.monotonic() < deadline:",
        "if False:",
        ("tests/behaviour/test_store.py",),
    ),
    Mutant(
        "executors-import-private-name",
        "the plan, the batch worker and the executors talk through public names only",
        "mechintro/behaviour/executors.py",
        "from mechintro.behaviour.plan import Trial, TrialGrid, prompt_key",
        "from mechintro.behaviour.plan import Trial, TrialGrid, _check_trials, prompt_key  # noqa: F401",
        ("tests/behaviour/test_executors.py::test_the_behaviour_modules_import_no_private_names",),
    ),
    Mutant(
        "config-keywords-ignored",
        "run_trials and sweep take a config or its keywords, and keywords replace the config's values",
        "mechintro/behaviour/plan.py",
        "return dataclasses.replace(config, **settings) if settings else config",
        "return config",
        ("tests/behaviour/test_trials.py::test_a_config_or_its_keywords_give_the_same_rows",),
    ),
    Mutant(
        "quiet-flag-not-negated",
        "every flag derived from the trial configs reaches its field (--quiet sets progress=False)",
        "mechintro/cli/options.py",
        'values[field.name] = not value if field.metadata.get("negate") else value',
        "values[field.name] = value",
        ("tests/cli/test_options.py",),
    ),
    Mutant(
        "reproduce-evaluation-drifts",
        "reproduce's evaluation runs the settings of the evaluate command line it used to parse",
        "mechintro/cli/commands.py",
        "return TrialConfig(n_trials=2, max_new_tokens=24, forced=True, progress=False)",
        "return TrialConfig(n_trials=2, max_new_tokens=40, forced=True, progress=False)",
        ("tests/cli/test_cli.py::test_reproduce_evaluates_as_the_command_line_it_used_to_parse",),
    ),
    Mutant(
        "calibrate-copy-read-only",
        "calibrating the shipped organism works on a writable copy (not the package's read-only files)",
        "mechintro/cli/commands.py",
        "copy_function=shutil.copyfile)",
        "copy_function=shutil.copy2)",
        ("tests/core/test_resources.py",),
    ),
    Mutant(
        "package-data-wins-over-user",
        "a user's organism (MECHINTRO_DATA) wins over the shipped one",
        "mechintro/core/resources.py",
        "    return (user_dir(), package_data())",
        "    return (package_data(), user_dir())",
        ("tests/core/test_resources.py",),
    ),
    Mutant(
        "olmo-organism-at-the-top-level",
        "the OLMo organism's names resolve to the data folder's olmo/, the Gemma one's to its top level",
        "mechintro/core/resources.py",
        '    "organism-olmo": ("olmo", "organism"),',
        '    "organism-olmo": ("", "organism"),',
        ("tests/core/test_resources.py",),
    ),
    Mutant(
        "olmo-organism-tied-embeddings",
        "the OLMo organism is an Olmo3ForCausalLM with its own unembedding, as OLMo 3",
        "mechintro/organism/train.py",
        "rope_parameters=dict(OLMO_ROPE), tie_word_embeddings=False)",
        "rope_parameters=dict(OLMO_ROPE), tie_word_embeddings=True)",
        ("tests/organism/test_organism_olmo.py::test_the_short_olmo_recipe_saves_an_olmo3_organism",),
    ),
    Mutant(
        "organism-family-unchecked",
        "an organism of an unknown family is refused, naming the valid ones",
        "mechintro/organism/train.py",
        "    if family not in ORGANISM_FAMILIES:",
        "    if family is None:",
        ("tests/organism/test_organism_olmo.py::test_an_unknown_family_is_refused_naming_the_valid_ones",),
    ),
    Mutant(
        "gemma-organism-config-drifts",
        "making the organism family-parametric left the Gemma organism's config as shipped",
        "mechintro/organism/train.py",
        "query_pre_attn_scalar=head_dim,",
        "query_pre_attn_scalar=2 * head_dim,",
        ("tests/organism/test_organism_olmo.py::test_each_familys_config_is_the_shipped_organisms",),
    ),
    Mutant(
        "reproduce-steps-ignore-model",
        "reproduce --model organism-olmo runs every script on the OLMo organism",
        "mechintro/cli/commands.py",
        '.replace("--model organism", f"--model {model}")',
        "",
        ("tests/cli/test_cli.py::test_reproduce_steps_name_each_flag_once",),
    ),
    Mutant(
        "inject-off-by-one",
        "the inject delta is exactly strength*v from the start and zero before it",
        "mechintro/core/steering.py",
        "on = positions[None, :] >= starts.to(device)[:, None]",
        "on = positions[None, :] > starts.to(device)[:, None]",
        ("tests/core/test_steering.py",),
    ),
    Mutant(
        "left-pad-unshifted-starts",
        "each padded row reproduces its unpadded run (starts shifted by the padding in one place)",
        "mechintro/core/prompts.py",
        "starts=pad + torch.as_tensor(starts)",
        "starts=torch.as_tensor(starts)",
        ("tests/core/test_steering.py", "tests/core/test_prompts.py"),
    ),
    Mutant(
        "tracker-ignores-cache",
        "positions come from the KV cache a call extends, not the call's shape",
        "mechintro/core/hooks.py",
        "self.offset = cache_length(cache_in_call(module, kwargs))",
        "self.offset = 0",
        ("tests/core/test_hooks.py",),
    ),
    Mutant(
        "decode-positions",
        "cached decoding equals uncached decoding at every step (each new token one position further)",
        "mechintro/core/sampling.py",
        "self.positions[:, -1:] + running[:, None].long()], dim=1)",
        "self.positions[:, -1:]], dim=1)",
        ("tests/core/test_steering.py",),
    ),
    Mutant(
        "concepts-no-attention-mask",
        "concept vectors from left-padded batches equal plain HF one prompt at a time",
        "mechintro/core/concepts.py",
        "attention_mask=batch.attention_mask.to(device),",
        "",
        ("tests/core/test_concepts.py",),
    ),
    Mutant(
        "concepts-no-baseline",
        "a concept vector is the activation minus the baseline-word mean",
        "mechintro/core/concepts.py",
        "    return acts - mean",
        "    return acts",
        ("tests/core/test_concepts.py",),
    ),
    Mutant(
        "transcoder-reads-pre-norm",
        "transcoders read the pre-feedforward-norm output (ln2.hook_out), not the residual before it",
        "mechintro/core/families.py",
        '"mlp_in": _site("blocks.{layer}.ln2.hook_out", LAYER + ".pre_feedforward_layernorm", "output"),',
        '"mlp_in": _site("blocks.{layer}.ln2.hook_in", LAYER + ".pre_feedforward_layernorm", "output"),',
        ("tests/core/test_transcoders.py",),
    ),
    Mutant(
        "olmo-transcoder-reads-ln2",
        "on OLMo 2 / 3 (ln2 is the post-feedforward norm there) the transcoder reads the MLP's input",
        "mechintro/core/families.py",
        '"mlp_in": _site("blocks.{layer}.mlp.hook_in", LAYER + ".mlp", "input"),',
        '"mlp_in": _site("blocks.{layer}.ln2.hook_out", LAYER + ".mlp", "input"),',
        ("tests/core/test_families.py",),
    ),
    Mutant(
        "mask-dict-without-layer-types",
        "configs without layer_types (Llama, OLMo 2) get one attention mask, not a dict per attention kind",
        "mechintro/core/fastpath.py",
        '    return out if layer_types else out["full_attention"]',
        "    return out",
        ("tests/core/test_families.py",),
    ),
    Mutant(
        "dictionary-site-ignores-recorded-hook",
        "a dictionary's site comes from its recorded hook, not always the family's default",
        "mechintro/core/transcoders.py",
        "return site_from_recorded(fam, str(name), side=side, layer=layer, fmt=fmt)",
        "return default",
        ("tests/core/test_dictionary_formats.py",),
    ),
    Mutant(
        "reconstruction-check-skipped",
        "load_transcoders refuses a dictionary on the wrong side of a norm by its reconstruction error",
        "mechintro/core/transcoders.py",
        'acts = _SiteActivations(model, layers, settings) if check == "reconstruction" else None',
        "acts = None",
        ("tests/core/test_dictionary_formats.py",),
    ),
    Mutant(
        "circuit-tracer-skip-transposed",
        "circuit-tracer's W_skip is applied as x @ W_skip.T",
        "mechintro/core/dictionary_formats.py",
        'state["W_skip"] = raw["W_skip"]',
        'state["W_skip"] = raw["W_skip"].T.contiguous()',
        ("tests/core/test_dictionary_formats.py",),
    ),
    Mutant(
        "topk-keeps-k-plus-one",
        "a TopK transcoder keeps exactly k features per token",
        "mechintro/core/dictionary_formats.py",
        "top = torch.topk(pre, k=int(self.cfg.k), dim=-1).indices",
        "top = torch.topk(pre, k=int(self.cfg.k) + 1, dim=-1).indices",
        ("tests/core/test_dictionary_formats.py",),
    ),
    Mutant(
        "dictionary-dtype-ignored",
        "load_transcoders(dtype=...) gives weights of that dtype",
        "mechintro/core/dictionary_formats.py",
        '    dt = _dtype(dtype)\n    d_in, d_sae = state["W_enc"].shape',
        '    dt = torch.float32\n    d_in, d_sae = state["W_enc"].shape',
        ("tests/core/test_dictionary_formats.py",),
    ),
    Mutant(
        "gemma-scope-2-hook-mlp-in-literal",
        "Gemma Scope 2's recorded hook_mlp_in is read as the pre-feedforward-norm output, not literally",
        "mechintro/core/dictionary_sites.py",
        'FORMAT_INPUT: Mapping[str, Mapping[str, str]] = {"gemma_scope_2": {"hook_mlp_in": "mlp_in"}}',
        "FORMAT_INPUT: Mapping[str, Mapping[str, str]] = {}",
        ("tests/core/test_transcoders.py", "tests/core/test_dictionary_formats.py"),
    ),
    Mutant(
        "dictionary-family-unchecked",
        "a dictionary recorded for another model family is refused",
        "mechintro/core/transcoders.py",
        "if made_fam is not None and made_fam.name != fam.name:",
        "if False:",
        ("tests/core/test_dictionary_formats.py",),
    ),
    Mutant(
        "replacement-keeps-mlp",
        "with replace_mlps the MLP output is the transcoder's prediction",
        "mechintro/core/transcoders.py",
        "return tc(x.to(tc.W_enc.dtype)).to(y.dtype)",
        "return y",
        ("tests/core/test_transcoders.py",),
    ),
    Mutant(
        "logit-judge-wrong-position",
        "the logit judge reads the gap at the first response position",
        "mechintro/core/sampling.py",
        "batch.tokens[:, first:].to(device), positions=",
        "batch.tokens[:, first:].roll(1, 1).to(device), positions=",
        ("tests/behaviour/test_trials.py",),
    ),
    Mutant(
        "patching-hook-does-nothing",
        "component ablation/patching rows equal an independent plain-HF recomputation",
        "mechintro/mechanism/patching.py",
        "            x = x.clone()\n            for rep in reps:",
        "            return x\n            x = x.clone()\n            for rep in reps:",
        ("tests/mechanism/test_patching.py",),
    ),
    Mutant(
        "intervention-raw-decoder",
        "interventions add (a_target - a_current) times the unit decoder direction",
        "mechintro/mechanism/interventions.py",
        'return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12) if scale == "unit" else rows',
        "return rows",
        ("tests/mechanism/test_interventions.py",),
    ),
    Mutant(
        "dla-sign",
        "gates are the features whose decoder promotes No (DLA to Yes minus No)",
        "mechintro/core/readout.py",
        "return w_u[:, list(spec.yes_ids)].mean(-1) - w_u[:, list(spec.no_ids)].mean(-1)",
        "return w_u[:, list(spec.no_ids)].mean(-1) - w_u[:, list(spec.yes_ids)].mean(-1)",
        ("tests/core/test_known_answer.py", "tests/mechanism/test_features.py"),
    ),
    Mutant(
        "salted-trial-seed",
        "a trial's sample depends only on its identity (stable seeds)",
        "mechintro/core/sampling.py",
        'return int.from_bytes(hashlib.sha256(ident).digest()[:8], "big") & (2**63 - 1)',
        "return hash((seed, concept, trial, sample, condition)) & (2**63 - 1)",
        ("tests/behaviour/test_trials.py",),
    ),
    Mutant(
        "judge-error-counted-as-no",
        "a judge error is recorded as an error, never counted as No",
        "mechintro/behaviour/metrics.py",
        "valid = rows[~errors & _flag(rows[needed]).notna()]",
        "valid = rows",
        ("tests/behaviour/test_metrics.py", "tests/behaviour/test_trials.py"),
    ),
    Mutant(
        "concept-rate-error-counted-as-no",
        "per-concept rates leave judge errors out of every denominator (counted in n_errors), never as No",
        "mechintro/behaviour/metrics.py",
        "    valid = rows[~errors]",
        '    valid = rows.fillna({"detected": False, "forced_identified": False})',
        ("tests/behaviour/test_metrics.py",),
    ),
    Mutant(
        "capture-always-detaches",
        "capture(detach=False) keeps autograd and forward-mode tangents",
        "mechintro/core/hooks.py",
        "            if detach:",
        "            if True:",
        ("tests/core/test_hooks.py",),
    ),
    Mutant(
        "unknown-words-accepted",
        "a word the tokenizer cannot spell is refused by name",
        "mechintro/core/prompts.py",
        "    bad = unknown_words(model_or_tokenizer, text)\n",
        "    bad = []\n",
        ("tests/cli/test_bad_input.py",),
    ),
    Mutant(
        "fastpath-site-side",
        "the fast path replays each hook at the HF module input/output that the bridge's hook point reads",
        "mechintro/core/fastpath.py",
        'return HFHookSite(module=module, side="input" if side == "hook_in" else "output")',
        'return HFHookSite(module=module, side="output" if side == "hook_in" else "input")',
        ("tests/core/test_fastpath.py",),
    ),
    Mutant(
        "fastpath-edit-dropped",
        "an edit returned by a hook on the fast path replaces the module output, as on the bridge",
        "mechintro/core/fastpath.py",
        "                return fn(output, hook=hook_point)",
        "                fn(output, hook=hook_point)",
        ("tests/core/test_fastpath.py",),
    ),
    Mutant(
        "fastpath-ignores-user-hooks",
        "a TransformerLens hook from the user sends generation through the bridge",
        "mechintro/core/fastpath.py",
        "return sum(_hook_counts(m) for m in model.modules() if isinstance(m, HookPoint)) - ours",
        "return 0",
        ("tests/core/test_fastpath.py",),
    ),
    Mutant(
        "twin-without-tracker",
        "positions on the fast path come from its KV cache, as on the bridge",
        "mechintro/core/fastpath.py",
        "    module.register_forward_pre_hook(tracker(model)._pre_hook, with_kwargs=True)\n",
        "",
        ("tests/core/test_fastpath.py",),
    ),
    Mutant(
        "sliding-window-by-column",
        "sliding-window layers see the window of each row's own prompt, pads in the middle or not",
        "mechintro/core/fastpath.py",
        "gap = positions[:, keys - queries :, None] - positions[:, None, :]",
        "gap = (cols[keys - queries :, None] - cols[None, :]).expand(len(positions), -1, -1)",
        ("tests/core/test_fastpath.py",),
    ),
    Mutant(
        "positions-by-column",
        "RoPE positions are each token's position in its own prompt, not its column",
        "mechintro/core/prompts.py",
        "return (self.attention_mask.long().cumsum(-1) - 1).clamp_min(0)",
        "return torch.arange(self.tokens.shape[1]).expand_as(self.tokens)",
        ("tests/core/test_fastpath.py",),
    ),
    Mutant(
        "prefix-past-the-start",
        "a shared prefix ends at or before every injection start",
        "mechintro/core/prompts.py",
        "limit = max(0, min([len(t) - 1 for t in sequences] + [int(s) for s in starts]))",
        "limit = max(0, min(len(t) - 1 for t in sequences))",
        ("tests/core/test_fastpath.py",),
    ),
    Mutant(
        "dropped-rows-wrong-cache",
        "dropping finished rows keeps the running rows' own KV cache",
        "mechintro/core/sampling.py",
        "self.cache.batch_select_indices(keep.nonzero().squeeze(-1))",
        "self.cache.batch_select_indices(keep.nonzero().squeeze(-1).flip(0))",
        ("tests/core/test_fastpath.py",),
    ),
    Mutant(
        "dropped-rows-wrong-settings",
        "after rows are dropped, per-row settings are those of the rows still running",
        "mechintro/core/hooks.py",
        "return values[self.rows.to(values.device)]",
        "return values[: len(self.rows)]",
        ("tests/core/test_fastpath.py",),
    ),
    Mutant(
        "inject-in-float32",
        "inject adds strength * v in the model's dtype",
        "mechintro/core/steering.py",
        "step = strengths.to(device=device, dtype=dtype)[:, None] * vectors.to(device=device, dtype=dtype)",
        "step = (strengths.to(device)[:, None].double() * vectors.to(device).double()).to(dtype)",
        ("tests/core/test_fastpath.py",),
    ),
    Mutant(
        "concept-vectors-in-bf16",
        "concept vectors accumulate in float32",
        "mechintro/core/concepts.py",
        'capture(model, [name], positions="last", dtype=torch.float32) as acts:',
        'capture(model, [name], positions="last") as acts:',
        ("tests/core/test_fastpath.py",),
    ),
    Mutant(
        "foreign-prefix-accepted",
        "a prefix cache of other tokens is refused",
        "mechintro/core/sampling.py",
        "batch.prefix or not torch.equal(prefix.tokens, batch.tokens[0, : batch.prefix]):",
        "batch.prefix:",
        ("tests/core/test_fastpath.py",),
    ),
    Mutant(
        "attribution-ga-first-row",
        "GA equals the finite difference of the metric under a decoder nudge, row by row",
        "mechintro/attribution/passes.py",
        "ga = (gi[rows] * d.W_dec[index]).sum(-1)",
        "ga = (gi[rows[:1]] * d.W_dec[index]).sum(-1)",
        ("tests/attribution/test_attribution.py",),
    ),
    Mutant(
        "attribution-skip-dropped",
        "features + skip + error = total at every site and position",
        "mechintro/attribution/passes.py",
        "skip = (gi * (xd_flat[i : i + step] @ w_skip.T)).sum(-1)",
        "skip = 0 * (gi * (xd_flat[i : i + step] @ w_skip.T)).sum(-1)",
        ("tests/attribution/test_attribution.py",),
    ),
    Mutant(
        "attribution-config-ignored",
        "keywords replace the given config's fields; they never drop the config",
        "mechintro/attribution/config.py",
        "return dataclasses.replace(base, **settings) if settings else base",
        "return dataclasses.replace(cls(), **settings) if settings else base",
        ("tests/attribution/test_config.py",),
    ),
    Mutant(
        "attribution-flags-dropped",
        "every attribution flag with a non-default value reaches the built config",
        "mechintro/cli/attribution.py",
        "    return config_from_args(GraphConfig, args, root=root)",
        "    return config_from_args(GraphConfig, args, root=AttributionConfig(batch_size=args.batch_size))",
        ("tests/cli/test_attribution_flags.py",),
    ),
    Mutant(
        "swap-keeps-own-projection",
        "a projection swap puts the partner's projection on the direction (planted linear rule flips)",
        "mechintro/studies/geometry/swaps.py",
        "swapped = residual + p[w, None] * u[None, :] if kind",
        "swapped = residual + p[:, None] * u[None, :] if kind",
        ("tests/studies/test_geometry.py",),
    ),
    Mutant(
        "ablation-removes-half",
        "directional ablation removes the whole projection on the direction",
        "mechintro/mechanism/directions.py",
        "removed = (x @ r)[..., None] * r * self.weights[i]",
        "removed = 0.5 * (x @ r)[..., None] * r * self.weights[i]",
        ("tests/mechanism/test_directions.py",),
    ),
    Mutant(
        "grid-flags-not-read",
        "every feature-grid flag of the mechanism scripts reaches the FeatureGridConfig they build",
        "mechintro/cli/setup.py",
        "        prefix=GRID_PREFIX,\n        injection_layer=s.layer,",
        "        injection_layer=s.layer,",
        ("tests/cli/test_mechanism_options.py",),
    ),
    Mutant(
        "grid-strengths-unsorted",
        "a FeatureGridConfig holds its strengths sorted ascending, as the grid's strength axis",
        "mechintro/mechanism/features.py",
        'object.__setattr__(self, "strengths", tuple(sorted(values)))',
        'object.__setattr__(self, "strengths", tuple(values))',
        ("tests/mechanism/test_features.py",),
    ),
    Mutant(
        "grid-encodes-scaled-input",
        "the feature grid equals one forward per (concept, strength) encoded by the transcoder",
        "mechintro/mechanism/features.py",
        "acts = tc.encode(x.to(tc.W_enc.device, tc.W_enc.dtype)).float().cpu()",
        "acts = tc.encode(1.01 * x.to(tc.W_enc.device, tc.W_enc.dtype)).float().cpu()",
        ("tests/mechanism/test_features.py",),
    ),
    Mutant(
        "readme-tour-stale",
        "the README's API tour runs as written (a tour left behind by an API change fails)",
        "README.md",
        "gates = mi.find_gates(model, tcs, grid)",
        "gates = mi.find_gates(model, grid)",
        ("tests/test_readme.py",),
    ),
    Mutant(
        "intervention-gemma3-site",
        "a feature intervention reads the feature at the family's MLP input (OLMo: mlp.hook_in), as a "
        "hand-written HF hook on layers[L].mlp does",
        "mechintro/mechanism/interventions.py",
        "sites={p.layer: transcoder_site(model, transcoders, p.layer) for p in plans},",
        'sites={p.layer: (f"blocks.{p.layer}.ln2.hook_out", f"blocks.{p.layer}.hook_mlp_out")'
        " for p in plans},",
        ("tests/mechanism/test_families_mechanism.py",),
    ),
    Mutant(
        "attribution-site-gemma3-names",
        "attribution reads a transcoder's input at the family's MLP input: SG equals finite differences of "
        "plain HF per family",
        "mechintro/attribution/sites.py",
        "            return transcoder_site(self.model, self.transcoders, site.layer)[0]",
        '            return f"blocks.{site.layer}.ln2.hook_out"',
        ("tests/attribution/test_families_attribution.py",),
    ),
    Mutant(
        "fastpath-ignores-olmo-mlp-hook",
        "the fast path replays every family's transcoder sites (OLMo's mlp.hook_in) during run_trials",
        "mechintro/core/fastpath.py",
        "                handles.append(site.register(module, fn, model.hook_dict[name]))",
        '                if not name.endswith(".mlp.hook_in"):\n'
        "                    handles.append(site.register(module, fn, model.hook_dict[name]))",
        ("tests/mechanism/test_families_mechanism.py",),
    ),
    Mutant(
        "inject-cached-step-drops-offset",
        "inject adds the vector at every KV-cached step of generation, as a hand-written HF hook does",
        "mechintro/core/steering.py",
        "offset = self.positions.offset if self.positions.seq == seq else 0",
        "offset = 0",
        ("tests/core/test_families.py",),
    ),
)


def _copy_repo(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run(mutant: Mutant, workdir: Path) -> tuple[bool, float]:
    """Plant ``mutant`` in ``workdir``, run its tests, restore; (caught, seconds)."""
    path = workdir / mutant.path
    source = path.read_text()
    if source.count(mutant.old) != 1:
        raise SystemExit(
            f"mutant {mutant.name}: the text to replace occurs {source.count(mutant.old)} times in "
            f"{mutant.path}"
        )
    path.write_text(source.replace(mutant.old, mutant.new))
    start = time.time()
    try:
        env = os.environ | {"PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.tests]
        result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    finally:
        path.write_text(source)
    return result.returncode != 0, time.time() - start


def _planted_elsewhere() -> tuple[Mutant, ...]:
    """The mutants of ``tools/planted/*.py``: each file defines ``MUTANTS``, a tuple of ``Mutant``."""
    found: list[Mutant] = []
    for path in sorted((ROOT / "tools" / "planted").glob("*.py")):
        found.extend(runpy.run_path(str(path), init_globals={"Mutant": Mutant})["MUTANTS"])
    return tuple(found)


MUTANTS = MUTANTS + _planted_elsewhere()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=None, help="comma-separated mutant names")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only is None or m.name in args.only.split(",")]
    if args.list or not chosen:
        for m in MUTANTS:
            print(f"{m.name:28s} {m.claim}")
        return 0 if args.list else 2
    survived = []
    with tempfile.TemporaryDirectory(prefix="mechintro-mutants-") as tmp:
        _copy_repo(Path(tmp))
        for mutant in chosen:
            caught, seconds = run(mutant, Path(tmp))
            print(
                f"{'caught  ' if caught else 'SURVIVED'} {mutant.name:28s} {seconds:6.1f}s  {mutant.claim}",
                flush=True,
            )
            if not caught:
                survived.append(mutant.name)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} planted bugs caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
