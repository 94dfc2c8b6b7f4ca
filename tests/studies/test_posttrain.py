"""The post-training conditions (mechintro.studies.posttrain): every loss against a hand computation, the
reversed-preference gradient identity, only the adapter trains, resuming is exact, and load_model merges an
adapter into the same logits as the PeftModel."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

import mechintro as mi  # noqa: E402
from mechintro.core.models import require_peft  # noqa: E402
from mechintro.studies import posttrain as pt  # noqa: E402
from mechintro.studies.preferences import PreferencePair  # noqa: E402
from mechintro.testing import save_tiny  # noqa: E402

PAIRS = (
    PreferencePair("Tell me about Dust", "Yes, I detect an injected thought.", "No", "alpha"),
    PreferencePair("Tell me about Trees", "No, I do not detect an injected thought.", "Yes no", "beta"),
    PreferencePair("Tell me about Milk", "The thought is about Milk", "NO", "alpha"),
    PreferencePair("Tell me about Snow", "No, I do not detect", "yes yes YES", "beta"),
)
CONFIG = pt.PosttrainConfig(lr=1e-3, batch_size=1, grad_accum=2, n_pairs=None)
LORA = pt.LoraSettings(r=4, alpha=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("gemma3", tmp_path_factory.mktemp("tiny") / "base", seed=0)


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("gemma3", tmp_path_factory.mktemp("tiny") / "other", seed=1)


def _hf(folder: Path, dtype: torch.dtype = torch.float32):
    """The tiny base; in float64 with SDPA attention (eager attention's softmax runs in float32)."""
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": "sdpa"} if dtype == torch.float64 else {}
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **extra).eval()


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _peft_model(folder: Path, *, perturb: bool, dtype: torch.dtype = torch.float32, seed: int = 0):
    """The tiny base wrapped in a LoRA; ``perturb`` gives B random values so policy != reference."""
    import peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(_hf(folder, dtype), LORA.peft_config(random_init=False))
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.05)
    return model


def _examples(folder: Path, pairs=PAIRS[:2], config=CONFIG):
    tok = _tokenizer(folder)
    style = pt._resolved_format(tok, config.prompt_format, str(folder))
    return pt._encode(tok, pairs, config=config, style=style, chat_kwargs={})


def _hand_logprob(model, seq: tuple[int, ...], start: int) -> tuple[float, int, torch.Tensor]:
    """Summed log-prob of seq[start:] given what precedes it, from one unpadded forward pass."""
    logits = model(input_ids=torch.tensor([seq])).logits[0].double()
    total = 0.0
    for t in range(start, len(seq)):
        row = logits[t - 1]
        total += float(row[seq[t]] - torch.logsumexp(row, 0))
    return total, len(seq) - start, logits


def _hand_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, start: int, end: int) -> float:
    values = []
    for t in range(start, end):
        p = torch.softmax(policy_logits[t - 1], 0)
        q = torch.softmax(ref_logits[t - 1], 0)
        values.append(float((p * (p.log() - q.log())).sum()))
    return values


# ----------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize(
    "name",
    [
        "dpo",
        "dpo_no_ref",
        "contrastive_margin",
        "contrastive_margin_kl",
        "sft_chosen",
        "kl_chosen",
        "kl_rejected",
    ],
)
def test_each_loss_equals_a_hand_computation_on_two_pairs(tiny: Path, name: str) -> None:
    cond = pt.condition_spec(name)
    policy = _peft_model(tiny, perturb=True)
    reference = _hf(tiny)  # a separate copy of the base: the reference must be the base, frozen
    examples = _examples(tiny)
    config = replace(CONFIG, beta=0.3, margin=2.0, kl_weight=0.7)
    assert (
        len(examples[0].chosen) - examples[0].chosen_start
        != len(examples[0].rejected) - examples[0].rejected_start
    )
    with torch.no_grad():
        loss, parts = pt.batch_loss(policy, cond, examples, config=config, pad_id=0)
        rows = []
        for e in examples:
            row = {}
            for which in ("chosen", "rejected"):
                seq, start = getattr(e, which), getattr(e, f"{which}_start")
                lp, n, logits = _hand_logprob(policy, seq, start)
                ref, _, ref_logits = _hand_logprob(reference, seq, start)
                row[which] = (lp, n, ref, _hand_kl(logits, ref_logits, start, len(seq)))
            rows.append(row)
    if cond.loss == "dpo":
        terms = []
        for row in rows:
            (lc, _, rc, _), (lr, _, rr, _) = row["chosen"], row["rejected"]
            if not cond.reference:
                rc = rr = 0.0
            u = 0.3 * ((lc - rc) - (lr - rr))
            terms.append(math.log1p(math.exp(-u)))
        expected = sum(terms) / 2
    elif cond.loss == "margin":
        terms = [
            max(0.0, 2.0 - (r["chosen"][0] / r["chosen"][1] - r["rejected"][0] / r["rejected"][1]))
            for r in rows
        ]
        expected = sum(terms) / 2
        target = "chosen"
    else:
        target = cond.target
        expected = -sum(r[target][0] for r in rows) / sum(r[target][1] for r in rows)
    if cond.kl:
        kls = [k for r in rows for k in r[target][3]]
        expected += 0.7 * sum(kls) / len(kls)
        assert parts["kl"] > 0
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_at_policy_equal_reference_dpo_is_log2_and_kl_is_zero(tiny: Path) -> None:
    policy = _peft_model(tiny, perturb=False)
    examples = _examples(tiny)
    with torch.no_grad():
        dpo, _ = pt.batch_loss(policy, pt.condition_spec("dpo"), examples, config=CONFIG, pad_id=0)
        _, parts = pt.batch_loss(policy, pt.condition_spec("kl_chosen"), examples, config=CONFIG, pad_id=0)
    assert float(dpo) == pytest.approx(math.log(2), abs=1e-7)
    assert parts["kl"] == pytest.approx(0.0, abs=1e-7)


def _lora_grads(model, cond, examples, config) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss, _ = pt.batch_loss(model, cond, examples, config=config, pad_id=0)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters() if "lora_" in n])


def test_reversed_preferences_give_the_negated_dpo_gradient_at_the_reference(tiny: Path) -> None:
    """At π = ref the DPO logit u is 0, so reversing the pair negates the gradient exactly. Away from it,
    d/dθ[-log σ(-u)] = -exp(u) d/dθ[-log σ(u)] for one pair: a negative multiple, factor exp(u) (for a
    batch, each pair's gradient has its own factor). The second half runs in float64, where Gemma's norms
    still compute in float32: hence the tolerance."""
    dpo = pt.condition_spec("dpo")
    one = _examples(tiny, PAIRS[:1])
    reversed_one = _examples(tiny, pt.reverse(PAIRS[:1]))
    model = _peft_model(tiny, perturb=False)
    # with B = 0 only B gets a gradient; it is nonzero
    g, g_rev = _lora_grads(model, dpo, one, CONFIG), _lora_grads(model, dpo, reversed_one, CONFIG)
    assert g.abs().max() > 0
    torch.testing.assert_close(g_rev, -g, rtol=0, atol=1e-12)

    model = _peft_model(tiny, perturb=True, dtype=torch.float64)
    g, g_rev = _lora_grads(model, dpo, one, CONFIG), _lora_grads(model, dpo, reversed_one, CONFIG)
    with torch.no_grad():
        lp_c, _, _ = _hand_logprob(model, one[0].chosen, one[0].chosen_start)
        lp_r, _, _ = _hand_logprob(model, one[0].rejected, one[0].rejected_start)
        with model.disable_adapter():
            rc, _, _ = _hand_logprob(model, one[0].chosen, one[0].chosen_start)
            rr, _, _ = _hand_logprob(model, one[0].rejected, one[0].rejected_start)
    u = CONFIG.beta * ((lp_c - rc) - (lp_r - rr))
    assert abs(u) > 1e-3
    torch.testing.assert_close(g_rev, -math.exp(u) * g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))


def test_dpo_gradient_equals_finite_differences(tiny: Path) -> None:
    """Along a random unit direction of the LoRA weights, in float64 (Gemma's norms still run in float32,
    hence a central difference at a step of 1e-2 and a relative tolerance of 2e-4)."""
    model = _peft_model(tiny, perturb=True, dtype=torch.float64)
    examples = _examples(tiny)
    dpo = pt.condition_spec("dpo")
    grad = _lora_grads(model, dpo, examples, CONFIG)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    gen = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in lora]
    norm = torch.cat([d.reshape(-1) for d in direction]).norm()
    direction = [d / norm for d in direction]
    eps = 1e-2

    def at(sign: float) -> float:
        with torch.no_grad():
            for p, d in zip(lora, direction, strict=True):
                p.add_(sign * eps * d)
            value = float(pt.batch_loss(model, dpo, examples, config=CONFIG, pad_id=0)[0])
            for p, d in zip(lora, direction, strict=True):
                p.sub_(sign * eps * d)
        return value

    numeric = (at(1.0) - at(-1.0)) / (2 * eps)
    analytic = float(grad @ torch.cat([d.reshape(-1) for d in direction]))
    assert abs(analytic) > 1e-4
    assert analytic == pytest.approx(numeric, rel=2e-4)


def test_margin_loss_is_length_normalized() -> None:
    lp = torch.tensor([-6.0]), torch.tensor([-2.0])
    lengths = torch.tensor([6.0]), torch.tensor([1.0])
    # per token: -1 vs -2, so the normalized gap is 1 and a margin of 1 gives 0 (unnormalized: -4, loss 5)
    assert float(pt.margin_loss(*lp, *lengths, margin=1.0)) == 0.0
    assert float(pt.margin_loss(*lp, *lengths, margin=1.5)) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------- training


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_training_changes_only_the_adapter_and_records_every_setting(tiny: Path, tmp_path: Path) -> None:
    import peft

    out = pt.posttrain(
        tiny, PAIRS, condition="dpo", out=tmp_path / "a", config=CONFIG, lora=LORA, progress=False
    )
    record = pt.read_posttrain(out)
    assert record["complete"] and record["steps"] == 2 and len(record["log"]) == 2
    assert record["log"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # starts at π = ref
    assert record["config"]["beta"] == 0.1 and record["lora"]["r"] == 4
    assert record["base"]["fingerprint"] == mi.core.fingerprint.weights_fingerprint(_hf(tiny))
    assert record["pairs"]["n"] == 4 and record["pairs"]["domains"] == {"alpha": 2, "beta": 2}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert "lm_head" not in str(config["target_modules"])  # peft's all-linear leaves the output layer out

    base = _hf(tiny).state_dict()
    trained = peft.PeftModel.from_pretrained(_hf(tiny), str(out))
    for name, value in trained.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(value, base[key]), name
    b = [v for k, v in _weights(out).items() if "lora_B" in k]
    assert b and all(v.abs().max() > 0 for v in b)  # B left zero: the adapter moved


def test_resuming_gives_the_same_adapter_as_one_run(tiny: Path, tmp_path: Path) -> None:
    config = replace(CONFIG, grad_accum=1)  # 4 steps
    whole = pt.posttrain(
        tiny,
        PAIRS,
        condition="contrastive_margin_kl",
        out=tmp_path / "whole",
        config=config,
        lora=LORA,
        progress=False,
    )
    part = tmp_path / "part"
    pt.posttrain(
        tiny,
        PAIRS,
        condition="contrastive_margin_kl",
        out=part,
        config=config,
        lora=LORA,
        progress=False,
        max_steps=3,
        checkpoint_every=2,
    )
    assert (part / "checkpoint" / "state.json").exists() and not (part / "adapter_model.safetensors").exists()
    assert json.loads((part / "checkpoint" / "state.json").read_text())["step"] == 3
    pt.posttrain(
        tiny, PAIRS, condition="contrastive_margin_kl", out=part, config=config, lora=LORA, progress=False
    )
    a, b = _weights(whole), _weights(part)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert pt.read_posttrain(whole)["log"] == pt.read_posttrain(part)["log"]
    with pytest.raises(ValueError, match="other settings.*config"):
        pt.posttrain(
            tiny,
            PAIRS,
            condition="contrastive_margin_kl",
            out=part,
            config=replace(config, lr=1.0),
            lora=LORA,
            progress=False,
        )


def test_random_lora_is_untrained_seeded_and_changes_outputs(tiny: Path, tmp_path: Path) -> None:
    import peft

    a = pt.posttrain(
        tiny, PAIRS, condition="random_lora", out=tmp_path / "r1", config=CONFIG, lora=LORA, progress=False
    )
    b = pt.posttrain(
        tiny, PAIRS, condition="random_lora", out=tmp_path / "r2", config=CONFIG, lora=LORA, progress=False
    )
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert pt.read_posttrain(a)["log"] == []
    assert json.loads((a / "adapter_config.json").read_text())["init_lora_weights"] is False
    assert all(v.abs().max() > 0 for k, v in wa.items() if "lora_B" in k)  # peft's False init: B random
    ids = torch.tensor([[2, 665, 1583, 1499]])
    with torch.no_grad():
        base = _hf(tiny)(input_ids=ids).logits
        lora = peft.PeftModel.from_pretrained(_hf(tiny), str(a))(input_ids=ids).logits
    assert (base - lora).abs().max() > 1e-4


def test_shuffled_and_reversed_conditions_train_on_swapped_pairs(tiny: Path, tmp_path: Path) -> None:
    rec = pt.read_posttrain(
        pt.posttrain(
            tiny,
            PAIRS,
            condition="dpo_reversed",
            out=tmp_path / "rev",
            config=CONFIG,
            lora=LORA,
            progress=False,
        )
    )
    assert rec["pairs"]["n_swapped"] == 4
    rec = pt.read_posttrain(
        pt.posttrain(
            tiny,
            PAIRS,
            condition="dpo_shuffled",
            out=tmp_path / "shuf",
            config=CONFIG,
            lora=LORA,
            progress=False,
        )
    )
    swapped = sum(a != b for a, b in zip(PAIRS, pt.shuffle_labels(PAIRS, seed=CONFIG.seed), strict=True))
    assert rec["pairs"]["n_swapped"] == swapped


# ----------------------------------------------------------------------------------------------- load_model


def test_load_model_merges_the_adapter_into_the_peft_models_logits(tiny: Path, tmp_path: Path) -> None:
    import peft

    out = pt.posttrain(
        tiny,
        PAIRS,
        condition="sft_chosen",
        out=tmp_path / "sft",
        config=replace(CONFIG, lr=1e-2),
        lora=LORA,
        progress=False,
    )
    bridged = mi.load_model(tiny, adapter=out, device="cpu")
    ids = torch.tensor([[2, 665, 1583, 1499, 1642, 3]])
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(_hf(tiny), str(out)).eval()(input_ids=ids).logits
        got = bridged(ids, return_type="logits")
        plain = _hf(tiny)(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    spec = mi.spec_for(bridged)
    assert spec.name == f"{tiny}+{out}" and spec.extra["adapters"] == [str(out)]


def test_an_adapter_for_another_base_is_refused_naming_both(
    tiny: Path, other_tiny: Path, tmp_path: Path
) -> None:
    out = pt.posttrain(
        tiny, PAIRS, condition="random_lora", out=tmp_path / "r", config=CONFIG, lora=LORA, progress=False
    )
    with pytest.raises(ValueError, match=f"trained on '{tiny}'.*not on '{other_tiny}'"):
        mi.load_model(other_tiny, adapter=out, device="cpu")
    # a foreign peft adapter: its adapter_config.json names its base
    (out / pt.METADATA_FILENAME).unlink()
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "someone/else"})
    )
    with pytest.raises(ValueError, match="made for 'someone/else'.*not for"):
        mi.load_model(tiny, adapter=out, device="cpu")
    mi.load_model(tiny, adapter=out, device="cpu", check_adapter_base=False)


def test_missing_peft_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install 'mechintro\[train\]'"):
        require_peft()


# ----------------------------------------------------------------------------------------------- settings


def test_unknown_condition_names_the_valid_ones_and_released_names_are_aliases() -> None:
    with pytest.raises(ValueError, match="unknown post-training condition 'ppo'.*dpo_no_ref"):
        pt.condition_spec("ppo")
    assert pt.condition_spec("dpo_external") is pt.CONDITIONS["dpo"]
    assert pt.condition_spec("dpo_chosen_sft") is pt.CONDITIONS["sft_chosen"]
    rows = {row for row, _, _ in pt.PAPER_TABLE3}
    assert {c.paper_row for c in pt.CONDITIONS.values() if c.paper_row} <= rows


def test_presets_are_the_text_and_the_released_setup() -> None:
    text, released = pt.PRESETS["text"], pt.PRESETS["released"]
    assert text.n_pairs == 5000 and released.n_pairs is None
    for c in (text, released):
        assert (c.beta, c.kl_weight, c.lr, c.epochs, c.batch_size, c.grad_accum) == (0.1, 0.1, 1e-5, 1, 1, 8)
    assert (released.max_prompt_chars, released.max_response_chars, released.leading_space) == (
        500,
        1500,
        True,
    )
    assert pt.LoraSettings() == pt.LoraSettings(r=64, alpha=128, dropout=0.0, target_modules="all-linear")
    with pytest.raises(ValueError, match="prompt_format.*valid"):
        pt.PosttrainConfig(prompt_format="chatml")


def test_prompt_formats(tiny: Path) -> None:
    tok = _tokenizer(tiny)
    assert pt.format_prompt(tok, "Hi", style="raw") == "<bos>User: Hi\n\nAssistant:"
    assert pt.format_prompt(tok, "Hi", style="gemma_turns") == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    assert pt._resolved_format(tok, "auto", str(tiny)) == "chat"
    assert pt.format_prompt(tok, "Hi", style="chat") == tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    # the loss starts right after the prompt and the EOS closes the response
    (e,) = _examples(tiny, PAIRS[:1])
    prompt = tok(pt.format_prompt(tok, PAIRS[0].prompt, style="chat"), add_special_tokens=False)["input_ids"]
    assert list(e.chosen[: e.chosen_start]) == prompt and e.chosen[-1] == tok.eos_token_id
