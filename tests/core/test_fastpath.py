"""The generation fast path, the shared prompt prefix and dropped finished rows change nothing but the time:
the same tokens and logits as the bridge, as unshared batches, as rows run alone; inject's delta stays exact.

Most checks run a tiny random Gemma 3 with a subword tokenizer in float64 (rows of different lengths; a
sliding window of 16 that the prompts exceed, so the window is exercised with pads in the middle of rows).
"""

from __future__ import annotations

import pytest
import torch

from mechintro.behaviour.judges import RuleJudge
from mechintro.behaviour.store import KEY_COLUMNS, TrialStore
from mechintro.behaviour.trials import run_trials, sweep
from mechintro.core.fastpath import choose_path, foreign_hooks, hf_site
from mechintro.core.hooks import capture, hooks_context, tracker
from mechintro.core.models import HookNames, load_model
from mechintro.core.prompts import forced_prefill, left_pad, trial_prompt
from mechintro.core.readout import unembedding
from mechintro.core.sampling import prefill, prompt_logits, sample, stop_ids
from mechintro.core.steering import inject

LAYER = 1
EXACT = {"rtol": 0.0, "atol": 1e-12}
"""The same batch on the two paths: the same arithmetic (float64)."""
LAYOUT = {"rtol": 0.0, "atol": 1e-6}
"""Different layouts of the same rows (shared prefix or not, other rows, dropped rows): Hugging Face's eager
attention takes the softmax in float32 even in a float64 model, and its sums run over a different number of
(masked) keys, so logits agree to float32 rounding (observed ~1e-7), not bitwise; a wrong position, mask or
window moves them by far more."""


@pytest.fixture(scope="module")
def m64(subword_dir):
    return load_model(subword_dir, device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def prompts(m64):
    """Trial prompts that share the text up to the injection start and differ after it (in length too)."""
    return [
        trial_prompt(m64, trial=1),
        trial_prompt(m64, trial=10),
        trial_prompt(m64, trial=2, prefill=forced_prefill()),
        trial_prompt(m64, trial=7),
        trial_prompt(m64, trial=3, prefill=forced_prefill()),
        trial_prompt(m64, trial=4),
    ]


@pytest.fixture(scope="module")
def vecs(m64):
    return torch.randn(6, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3


STRENGTHS = torch.tensor([8.0, -6.0, 4.0, 0.0, 10.0, 5.0], dtype=torch.float64)


def stop_boost(model, scale: float = 130.0):
    """A hook adding ``scale`` times the unembedding of a stop token after the final norm: rows then stop at
    different steps (the random model almost never stops on its own)."""
    w = unembedding(model)[:, stop_ids(model)[-1]].detach()
    return [(HookNames.final_norm_out(), lambda x, hook=None: x + scale * w.to(x.dtype))]


def generate(model, prompts, vecs, *, share, path="auto", seeds=None, boost=False, drop=None, n=12):
    """Sample ``prompts`` under per-row injections; the shared prefix, if any, computed first."""
    b = left_pad(prompts, pad_id=model.tokenizer.pad_token_id, share_prefix=share)
    seeds = seeds or list(range(len(prompts)))
    with hooks_context(model, stop_boost(model) if boost else [], rows="shared"):
        pre = prefill(model, b, path=path) if b.prefix else None
        strengths = STRENGTHS[: len(prompts)]
        with inject(model, vecs[: len(prompts)], layer=LAYER, strength=strengths, start=b.starts):
            out = sample(
                model,
                b,
                max_new_tokens=n,
                seeds=seeds,
                prefix=pre,
                path=path,
                keep_logits=True,
                drop_finished=drop,
            )
    return b, out


def assert_same_run(a, b, tolerance=EXACT):
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.logits.isnan(), b.logits.isnan())
    torch.testing.assert_close(a.logits.nan_to_num(0.0), b.logits.nan_to_num(0.0), **tolerance)


# ----------------------------------------------------------------------------------------------- sites


def test_every_replayed_site_reads_and_writes_what_the_bridge_does(m64, prompts):
    """All hook points the fast path replays, read at once on both paths: equal. An edit at every one of
    them (its own random vector): equal logits on both paths, and not the unedited ones."""
    names = [n for n in m64.hook_dict if hf_site(m64, n) is not None]
    assert len(names) >= 4 * 12  # blocks: in/out, ln1, ln1_post, ln2, ln2_post, mlp (in and out each)
    b = left_pad(prompts[:3], pad_id=m64.tokenizer.pad_token_id)
    read = {}
    for path in ("bridge", "hf"):
        with capture(m64, names) as acts:
            prompt_logits(m64, b, path=path)
        read[path] = acts
    for name in names:
        torch.testing.assert_close(read["hf"][name], read["bridge"][name], **EXACT, msg=name)
    gen = torch.Generator().manual_seed(1)
    edits = [
        (n, (lambda v: lambda x, hook=None: x + v)(torch.randn(64, generator=gen).double())) for n in names
    ]
    plain = prompt_logits(m64, b, path="hf")
    with hooks_context(m64, edits):
        edited = {path: prompt_logits(m64, b, path=path) for path in ("bridge", "hf")}
    torch.testing.assert_close(edited["hf"], edited["bridge"], **EXACT)
    assert (edited["hf"] - plain).abs().max() > 1e-3


def test_named_sites_are_the_modules_the_issue_names(m64, subword_dir, prompts):
    """resid_post = output of layers[L]; ln2.hook_out = output of pre_feedforward_layernorm; hook_mlp_out =
    output of post_feedforward_layernorm; hook_attn_out = output of post_attention_layernorm; and their values
    equal an independent plain Hugging Face forward's module outputs."""
    from conftest import hf_capture
    from transformers import Gemma3ForCausalLM

    expected = {
        HookNames.resid_post(2): ("model.layers.2", "output"),
        HookNames.resid_pre(2): ("model.layers.2", "input"),
        HookNames.transcoder_in(2): ("model.layers.2.pre_feedforward_layernorm", "output"),
        HookNames.mlp_out(2): ("model.layers.2.post_feedforward_layernorm", "output"),
        HookNames.attn_out(2): ("model.layers.2.post_attention_layernorm", "output"),
        HookNames.final_norm_out(): ("model.norm", "output"),
    }
    for name, (module, side) in expected.items():
        site = hf_site(m64, name)
        assert (site.module, site.side) == (module, side), name
    hf = Gemma3ForCausalLM.from_pretrained(subword_dir, dtype=torch.float64, attn_implementation="eager")
    tokens = prompts[0].tokens
    outputs = [m for m, side in expected.values() if side == "output"]
    _, plain = hf_capture(hf.eval(), tokens[None], outputs)
    b = left_pad([prompts[0]], pad_id=m64.tokenizer.pad_token_id)
    with capture(m64, list(expected)) as acts:
        prompt_logits(m64, b, path="hf")
    for name, (module, side) in expected.items():
        if side == "output":
            torch.testing.assert_close(acts[name], plain[module], rtol=0, atol=1e-9, msg=name)
    assert hf_site(m64, "blocks.1.attn.hook_pattern") is None


# ----------------------------------------------------------------------------------------------- paths


def test_paths_give_identical_tokens_and_logits_at_every_step(m64, prompts, vecs):
    """Fast path and bridge, each with and without the shared prefix, rows stopping at different steps."""
    runs = {
        (share, path): generate(m64, prompts, vecs, share=share, path=path, boost=True)[1]
        for share in (False, True)
        for path in ("hf", "bridge")
    }
    assert {r.path for (_, p), r in runs.items() if p == "hf"} == {"hf"}
    assert len(set(runs[False, "bridge"].lengths.tolist())) >= 3, "rows must stop at different steps"
    for share in (False, True):
        assert_same_run(runs[share, "hf"], runs[share, "bridge"])
    assert_same_run(runs[True, "hf"], runs[False, "bridge"], LAYOUT)


def test_paths_agree_under_feature_interventions_and_mlp_replacement(m64, prompts, vecs, tmp_path):
    from mechintro.core.transcoders import load_transcoders, replace_mlps
    from mechintro.mechanism.interventions import intervene
    from mechintro.testing import save_random_transcoders

    tcs = load_transcoders(m64, source=save_random_transcoders(tmp_path, seed=3))
    tcs = {layer: tc.to(torch.float64) for layer, tc in tcs.items()}
    b = left_pad(prompts[:4], pad_id=m64.tokenizer.pad_token_id)
    target = torch.tensor([[9.0, 0.0], [0.0, 9.0], [3.0, 3.0], [9.0, 9.0]])
    out = {}
    for path in ("bridge", "hf"):
        with (
            inject(m64, vecs[:4], layer=LAYER, strength=STRENGTHS[:4], start=b.starts),
            intervene(m64, tcs, ["L2 F5", "L3 F17"], target=target, positions="from_start", start=b.starts),
        ):
            out[path] = sample(m64, b, max_new_tokens=6, seeds=[1, 2, 3, 4], path=path, keep_logits=True)
        with replace_mlps(m64, {2: tcs[2]}):
            out[path, "replaced"] = sample(
                m64, b, max_new_tokens=6, seeds=[1, 2, 3, 4], path=path, keep_logits=True
            )
    assert out["hf"].path == "hf" and out["bridge"].path == "bridge"
    assert_same_run(out["hf"], out["bridge"])
    assert_same_run(out["hf", "replaced"], out["bridge", "replaced"])
    assert not torch.allclose(out["hf"].logits[:, 0], out["hf", "replaced"].logits[:, 0])


def test_bias_vectors_and_directional_ablation_run_on_the_fast_path(m64, prompts, vecs):
    """A bias vector and a directional ablation from position 0 act alike on every row ("shared"): under them
    run_trials shares the prompt prefix on the fast path and equals the bridge. A per-row ablation start
    ("tracked") survives dropped rows."""
    from mechintro.core.concepts import training_concepts
    from mechintro.core.sampling import can_drop_rows, can_share_prefix
    from mechintro.mechanism.directions import ablate_directions
    from mechintro.studies.bias import BiasVector, bias_settings, bias_vector

    gen = torch.Generator().manual_seed(5)
    bias = BiasVector(
        vectors=torch.randn(1, 64, generator=gen) * 2,
        settings=bias_settings(m64, training_concepts()[:4], layer=2, labels="injected"),
    )
    direction = torch.randn(64, generator=gen, dtype=torch.float64)
    vectors = torch.randn(2, 64, dtype=torch.float64, generator=gen) * 4
    kw = dict(layer=LAYER, strength=3.0, n_trials=3, judge=RuleJudge(), vectors=vectors, trials=[1, 10, 4])
    kw |= {"max_new_tokens": 6, "progress": False, "batch_size": 4}
    with bias_vector(m64, bias), ablate_directions(m64, direction, layers=[1, 2]):
        assert can_share_prefix(m64) and choose_path(m64)[0] == "hf"
        fast = run_trials(m64, ["Bread", "Oceans"], **kw)
        with m64.hooks(fwd_hooks=[(HookNames.resid_pre(0), lambda x, hook=None: None)]):
            bridge = run_trials(m64, ["Bread", "Oceans"], **kw)
    plain = run_trials(m64, ["Bread", "Oceans"], **kw)
    cols = ["concept", "trial", "condition", "response", "n_new_tokens"]
    assert fast[cols].equals(bridge[cols])
    assert not fast.response.equals(plain.response)

    b = left_pad(prompts, pad_id=m64.tokenizer.pad_token_id, share_prefix=True)
    out = {}
    for path in ("hf", "bridge"):
        with hooks_context(m64, stop_boost(m64), rows="shared"):
            pre = prefill(m64, b, path=path)
            with (
                ablate_directions(m64, direction, layers=[1], start=b.starts + 2),
                inject(m64, vecs, layer=LAYER, strength=STRENGTHS, start=b.starts),
            ):
                assert can_drop_rows(m64) and not can_share_prefix(m64)
                out[path] = sample(
                    m64, b, max_new_tokens=12, seeds=list(range(6)), prefix=pre, path=path, keep_logits=True
                )
    assert out["hf"].path == "hf" and len(set(out["hf"].lengths.tolist())) >= 3
    assert_same_run(out["hf"], out["bridge"])


def test_shared_prefix_equals_unshared_and_each_row_alone(m64, prompts, vecs):
    """Rows of different suffix lengths: the shared-prefix batch gives each row the tokens and logits of
    the plain left-padded batch and of the row run alone (its own seed)."""
    b, shared = generate(m64, prompts, vecs, share=True)
    assert b.prefix == prompts[0].injection_start and len(set(b.pad.tolist())) >= 3
    assert max(len(p.tokens) for p in prompts) > 2 * m64.original_model.config.sliding_window
    _, unshared = generate(m64, prompts, vecs, share=False)
    assert_same_run(shared, unshared, LAYOUT)
    for i, p in enumerate(prompts):
        one = left_pad([p], pad_id=m64.tokenizer.pad_token_id)
        with inject(m64, vecs[i], layer=LAYER, strength=float(STRENGTHS[i]), start=one.starts):
            alone = sample(m64, one, max_new_tokens=12, seeds=[i], keep_logits=True)
        assert torch.equal(alone.tokens[0], shared.tokens[i, : alone.tokens.shape[1]])
        torch.testing.assert_close(alone.logits[0], shared.logits[i, : alone.logits.shape[1]], **LAYOUT)


def test_dropping_finished_rows_equals_keeping_them(m64, prompts, vecs):
    _, dropped = generate(m64, prompts, vecs, share=True, boost=True, drop=True)
    _, kept = generate(m64, prompts, vecs, share=True, boost=True, drop=False)
    assert len(set(kept.lengths.tolist())) >= 3
    assert_same_run(dropped, kept, LAYOUT)


def test_inject_delta_is_exactly_strength_times_vector_from_the_start_on_every_path(m64, prompts, vecs):
    """resid_post just before and after the injection hook, on every call (the suffix after the shared
    prefix, then each step, with finished rows dropped): delta = strength * v at and after each row's start,
    exactly 0 before it, for the rows the call holds."""
    track = tracker(m64)
    name = HookNames.resid_post(LAYER)
    for path in ("hf", "bridge"):
        calls = []

        def rec(x, hook=None, calls=calls):
            rows = torch.arange(x.shape[0]) if track.rows is None else track.rows.clone()
            calls.append((track.offset, rows, x.detach().clone()))

        b = left_pad(prompts, pad_id=m64.tokenizer.pad_token_id, share_prefix=True)
        with hooks_context(m64, stop_boost(m64), rows="shared"):
            pre = prefill(m64, b, path=path)
            with (
                hooks_context(m64, [(name, rec)], rows="tracked"),
                inject(m64, vecs, layer=LAYER, strength=STRENGTHS, start=b.starts),
                hooks_context(m64, [(name, rec)], rows="tracked"),
            ):
                out = sample(m64, b, max_new_tokens=12, seeds=list(range(6)), prefix=pre, path=path)
        assert out.path == path and len(calls) == 2 * int(out.lengths.max())
        assert len(calls[-1][1]) < 6, "finished rows were dropped"
        for (offset, rows, before), (_, _, after) in zip(calls[::2], calls[1::2], strict=True):
            delta = after - before
            cols = torch.arange(offset, offset + delta.shape[1])
            for k, row in enumerate(rows.tolist()):
                on = cols >= int(b.starts[row])
                step = STRENGTHS[row] * vecs[row]
                assert torch.equal(delta[k, ~on], torch.zeros_like(delta[k, ~on]))
                torch.testing.assert_close(delta[k, on], step.expand(int(on.sum()), -1), rtol=0, atol=1e-12)
        assert calls[0][0] == b.prefix  # the first call is the suffix, after the shared prefix's cache


# ----------------------------------------------------------------------------------------------- choosing


def test_an_outer_user_hook_forces_the_bridge(m64, prompts, vecs):
    b = left_pad(prompts[:3], pad_id=m64.tokenizer.pad_token_id)
    seen = []

    def user_hook(x, hook=None):
        seen.append(x.shape[1])

    assert choose_path(m64) == ("hf", "only mechintro hooks on mapped sites") and foreign_hooks(m64) == 0
    with m64.hooks(fwd_hooks=[(HookNames.resid_pre(0), user_hook)]):
        assert foreign_hooks(m64) == 1 and choose_path(m64)[0] == "bridge"
        with inject(m64, vecs[:3], layer=LAYER, strength=STRENGTHS[:3], start=b.starts):
            out = sample(m64, b, max_new_tokens=5, seeds=[1, 2, 3], keep_logits=True)
            with pytest.raises(ValueError, match="not installed by mechintro"):
                sample(m64, b, max_new_tokens=5, seeds=[1, 2, 3], path="hf")
    assert out.path == "bridge" and seen == [b.tokens.shape[1], 1, 1, 1, 1]  # the user's hook saw every call
    with inject(m64, vecs[:3], layer=LAYER, strength=STRENGTHS[:3], start=b.starts):
        fast = sample(m64, b, max_new_tokens=5, seeds=[1, 2, 3], keep_logits=True)
    assert fast.path == "hf"
    assert_same_run(fast, out)


def test_run_trials_is_the_same_under_a_user_hook_and_across_batch_compositions(m64):
    """run_trials (fast path, shared prefix, dropped rows) = run_trials through the bridge (a user's no-op
    hook turns all three off), and batch_size 1 = batch_size 5, on prompts of different lengths."""
    concepts = ["Bread", "Oceans", "Dust"]
    vectors = torch.randn(3, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 4
    kw = dict(layer=LAYER, strength=3.0, n_trials=3, judge=RuleJudge(), forced=True, vectors=vectors)
    kw |= {"trials": [1, 10, 4], "max_new_tokens": 8, "progress": False}
    calls = []
    fast = run_trials(m64, concepts, batch_size=5, **kw)
    with m64.hooks(fwd_hooks=[(HookNames.resid_pre(0), lambda x, hook=None: calls.append(1))]):
        bridge = run_trials(m64, concepts, batch_size=5, **kw)
    alone = run_trials(m64, concepts, batch_size=1, **kw)
    assert calls, "the user's hook ran"
    cols = ["concept", "trial", "condition", "response", "n_new_tokens", "detected"]
    assert fast[cols].equals(bridge[cols]) and fast[cols].equals(alone[cols])
    assert fast.response.nunique() > len(fast) // 2


def test_a_killed_fast_run_resumes_to_what_the_bridge_gives(
    subword, subword_dir, tmp_path, kill_a_stalled_sweep
):
    path = tmp_path / "killed.sqlite"
    kill_a_stalled_sweep(
        subword_dir,
        path,
        concepts=["Bread", "Oceans"],
        settings="layers=[1], strengths=[8.0], n_trials=3, batch_size=3, max_new_tokens=6, trials=[1, 10, 2]",
        stall_at=2,
    )
    with TrialStore(path) as store:
        assert len(store) == 3
    kw = dict(layers=[1], strengths=[8.0], n_trials=3, judge=RuleJudge(), batch_size=3, max_new_tokens=6)
    kw |= {"trials": [1, 10, 2], "progress": False}
    resumed = sweep(subword, ["Bread", "Oceans"], store=path, **kw)
    with subword.hooks(fwd_hooks=[(HookNames.resid_pre(0), lambda x, hook=None: None)]):
        bridge = sweep(subword, ["Bread", "Oceans"], **kw)
    assert len(resumed) == 12 and not resumed.duplicated(list(KEY_COLUMNS)).any()
    cols = [*KEY_COLUMNS, "response", "n_new_tokens", "detected"]
    assert resumed[cols].equals(bridge[cols])


# ----------------------------------------------------------------------------------------------- dtypes


def test_bf16_concept_vectors_accumulate_in_float32_and_inject_adds_in_bf16(tiny_dir):
    from mechintro.core.concepts import baseline_words, concept_prompts, concept_vectors

    model = load_model(tiny_dir, device="cpu", dtype=torch.bfloat16)
    words = baseline_words()[:20]
    vecs = concept_vectors(model, ["Bread", "Oceans"], layer=LAYER, baseline=words)
    assert vecs.dtype == torch.float32
    name = HookNames.resid_post(LAYER)
    acts = {}
    for key, group in (("concepts", ["Bread", "Oceans"]), ("baseline", words)):
        batch = left_pad(concept_prompts(model, group), pad_id=model.tokenizer.pad_token_id)
        with torch.no_grad(), capture(model, [name], positions="last") as got:
            model(batch.tokens, attention_mask=batch.attention_mask)
        acts[key] = got[name][:, 0]
        assert acts[key].dtype == torch.bfloat16
    in_float32 = acts["concepts"].float() - acts["baseline"].float().mean(0)
    in_bf16 = (acts["concepts"] - acts["baseline"].mean(0)).float()
    torch.testing.assert_close(vecs, in_float32, rtol=0, atol=1e-6)
    assert not torch.allclose(vecs, in_bf16, rtol=0, atol=1e-6)

    b = left_pad(
        [trial_prompt(model, trial=1), trial_prompt(model, trial=2)], pad_id=model.tokenizer.pad_token_id
    )
    strengths = torch.tensor([4.0, -2.5])
    step = strengths.to(torch.bfloat16)[:, None] * vecs.to(torch.bfloat16)
    for path in ("hf", "bridge"):
        got = []

        def rec(x, hook=None, got=got):
            got.append(x.detach().clone())

        with (
            hooks_context(model, [(name, rec)]),
            inject(model, vecs, layer=LAYER, strength=strengths, start=b.starts),
            hooks_context(model, [(name, rec)]),
        ):
            prompt_logits(model, b, path=path)
        before, after = got
        assert after.dtype == torch.bfloat16
        for i in range(2):
            s = int(b.starts[i])
            assert torch.equal(after[i, s:], before[i, s:] + step[i]), path  # added in bf16, as is
            assert torch.equal(after[i, :s], before[i, :s])


# ----------------------------------------------------------------------------------------------- layout


def test_shared_prefix_layout_by_construction():
    a, b, c = torch.tensor([5, 6, 7, 8, 9]), torch.tensor([5, 6, 7, 1]), torch.tensor([5, 6, 2, 3, 4, 4])
    batch = left_pad([a, b, c], pad_id=0, starts=[3, 3, 3], share_prefix=True)
    assert batch.prefix == 2  # the common prefix [5, 6] ends before every start
    assert batch.tokens.tolist() == [[5, 6, 0, 7, 8, 9], [5, 6, 0, 0, 7, 1], [5, 6, 2, 3, 4, 4]]
    assert batch.pad.tolist() == [1, 2, 0] and batch.starts.tolist() == [4, 5, 3]
    assert batch.position_ids.tolist() == [[0, 1, 1, 2, 3, 4], [0, 1, 1, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    assert left_pad([a, b], pad_id=0, starts=[1, 3], share_prefix=True).prefix == 1  # capped by a start
    assert left_pad([a, a], pad_id=0, starts=[4, 4], share_prefix=True).prefix == 4  # the last token stays
    plain = left_pad([a, b, c], pad_id=0, starts=[3, 3, 3])
    assert plain.prefix == 0 and plain.tokens[1].tolist() == [0, 0, 5, 6, 7, 1]


def test_bad_input_names_the_valid_choices(m64, prompts, vecs):
    b = left_pad(prompts[:3], pad_id=m64.tokenizer.pad_token_id, share_prefix=True)
    with pytest.raises(ValueError, match=r"prefill\(model, batch\)"):
        sample(m64, b, max_new_tokens=2, seeds=[1, 2, 3])
    other = left_pad(prompts[3:], pad_id=m64.tokenizer.pad_token_id, share_prefix=True)
    changed = prompts[0].tokens.clone()
    changed[5] = changed[6]  # the same length, one other token
    starts = [other.prefix] * 2
    wrong = prefill(m64, left_pad([changed, changed], pad_id=0, starts=starts, share_prefix=True))
    assert len(wrong.tokens) == other.prefix
    with pytest.raises(ValueError, match="other tokens"):
        sample(m64, other, max_new_tokens=2, seeds=[1, 2, 3], prefix=wrong)
    with pytest.raises(ValueError, match=r"valid: \['auto', 'hf', 'bridge'\]"):
        sample(m64, left_pad(prompts[:1], pad_id=0), max_new_tokens=2, seeds=[1], path="fast")
    with pytest.raises(ValueError, match=r"rows='shared'"):
        with inject(m64, vecs[:3], layer=LAYER, strength=1.0, start=b.starts):
            prefill(m64, b)
    with pytest.raises(ValueError, match="drop_finished=True"):
        with capture(m64, [HookNames.resid_post(0)]):
            sample(m64, left_pad(prompts[:1], pad_id=0), max_new_tokens=2, seeds=[1], drop_finished=True)
    with pytest.raises(ValueError, match=r"valid: \['fixed', 'tracked', 'shared'\]"):
        hooks_context(m64, [], rows="every")
    with pytest.raises(ValueError, match=r"\[3\] rows but the batch has 2 rows"):
        with inject(m64, vecs[:3], layer=LAYER, strength=1.0, start=0):
            sample(m64, left_pad(prompts[:2], pad_id=0), max_new_tokens=1, seeds=[1, 2], path="hf")
    with pytest.raises(ValueError, match="no Hugging Face equivalent"):
        with hooks_context(
            m64, [(HookNames.resid_post(0).replace("hook_resid_post", "attn.hook_pattern"), print)]
        ):
            choose_path(m64, "hf")
