"""Every shipped organism is the same network on every transformers version in our range.

``make test-oldest`` and ``make test-newest`` run this file too: the logits pinned in
``tests/fixtures/organism_logits.json`` were recorded under the lock, so a version that reads a
checkpoint's config differently (a default rotary base, a renamed field) fails here, not silently
downstream. The recipe and the shipped ``config.json`` must also state their rotary base in a form every
version reads: flat keys (what transformers 5.9 reads) equal to the nested per-layer-type ones (5.24).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mechintro.core import resources
from mechintro.organism.train import OLMO_ROPE, OrganismConfig, hf_config, make_tokenizer

torch.set_num_threads(1)

PINNED = Path(__file__).parents[1] / "fixtures" / "organism_logits.json"
PROMPT = "Do you detect an injected thought? If so, what is the injected thought about?"
POSITIONS = 4
"""The last positions of the prompt whose logits are pinned."""
VOCAB = 32
"""The first vocabulary entries pinned at each position (plus each position's argmax over all of them)."""


def pinned_logits(checkpoint: Path) -> dict[str, list]:
    """The logits of ``checkpoint`` (plain HF, float32) that the fixture pins: the chat-formatted prompt's
    last :data:`POSITIONS` positions, first :data:`VOCAB` entries and argmax."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -POSITIONS:]
    return {"head": logits[:, :VOCAB].tolist(), "argmax": logits.argmax(-1).tolist()}


def shipped_checkpoints() -> list[str]:
    return [name for name in resources.ORGANISMS if resources.organism_checkpoint(name) is not None]


@pytest.mark.skipif(not shipped_checkpoints(), reason="no organism is shipped")
@pytest.mark.parametrize("name", list(resources.ORGANISMS))
def test_each_shipped_organism_has_its_pinned_logits(name):
    checkpoint = resources.organism_checkpoint(name)
    if checkpoint is None:
        pytest.skip(f"{name} is not shipped")
    pinned = json.loads(PINNED.read_text())[name]
    got = pinned_logits(checkpoint)
    assert got["argmax"] == pinned["argmax"]
    torch.testing.assert_close(torch.tensor(got["head"]), torch.tensor(pinned["head"]), atol=1e-4, rtol=1e-4)


def rotary_bases(rope: dict, layer_types: list[str]) -> dict[str, dict[str, set[float]]]:
    """Per reader, the rotary bases a ``rope_parameters`` dict gives: ``flat`` (the top-level keys, read by
    versions before per-layer-type rope) and ``nested`` (one per layer type, read by later ones)."""
    nested = {rope[t]["rope_theta"] for t in set(layer_types) if t in rope}
    return {"flat": {rope["rope_theta"]} if "rope_theta" in rope else set(), "nested": nested}


def test_the_olmo_recipe_states_its_rotary_base_for_every_version():
    config = json.loads(hf_config(OrganismConfig(family="olmo3"), make_tokenizer()).to_json_string())
    bases = rotary_bases(config["rope_parameters"], config["layer_types"])
    assert bases["flat"] == {OLMO_ROPE["rope_theta"]} == {500_000.0}
    assert bases["nested"] in (set(), {500_000.0})  # set() on versions that do not nest


@pytest.mark.parametrize("name", ["organism-olmo", "organism-olmo-base"])
def test_the_shipped_olmo_configs_read_the_same_on_every_version(name):
    checkpoint = resources.organism_checkpoint(name)
    if checkpoint is None:
        pytest.skip(f"{name} is not shipped")
    config = json.loads((checkpoint / "config.json").read_text())
    bases = rotary_bases(config["rope_parameters"], config["layer_types"])
    assert bases == {"flat": {500_000.0}, "nested": {500_000.0}}


def record() -> None:
    """Rewrite the fixture from the shipped organisms (run under the lock: ``python -m`` this file)."""
    out = {name: pinned_logits(resources.organism_checkpoint(name)) for name in shipped_checkpoints()}
    PINNED.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    record()
