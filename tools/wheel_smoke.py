"""The installed wheel in use, from a folder outside the checkout (run by tools/wheel_smoke.sh).

Trials on the shipped organisms (Gemma 3 and OLMo 3), a user's unit-test setup (a tiny random Gemma 3
saved with ``save_tiny_gemma3``, then ``run_trials`` on it), the organisms' transcoders, and a trial store
written into the working folder; the installed package is read-only while this runs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

import mechintro as mi
from mechintro.core import resources
from mechintro.testing import save_tiny_gemma3

torch.set_num_threads(1)
package = Path(mi.__file__).parent
assert not os.access(package, os.W_OK), f"{package} is writable: the smoke would not notice a write into it"
assert resources.package_data() == package / "data"

model = mi.load_model("organism", device="cpu")
spec = mi.spec_for(model)
concepts = mi.heldout_concepts()[:2]
rows = mi.run_trials(
    model, concepts, n_trials=2, judge=mi.RuleJudge(), max_new_tokens=8, progress=False, store="trials.sqlite"
)
assert len(rows) == 2 * 2 * 2, rows  # 2 concepts x 2 trials, injected and control
assert Path("trials.sqlite").is_file()
config = mi.TrialConfig(n_trials=2, max_new_tokens=8, progress=False)  # the same settings as a config
again = mi.run_trials(model, concepts, config, judge=mi.RuleJudge(), store="trials.sqlite")
assert again.drop(columns="created_at").equals(rows.drop(columns="created_at"))
print(f"trials on the organism: {len(rows)} rows, strength {spec.strength}, layer {spec.injection_layer}")

tcs = mi.load_transcoders(model, [0, spec.injection_layer])
acts = mi.encode_at(model, tcs, mi.trial_prompt(model, trial=1).tokens[None], positions="last")
print(f"organism transcoders: layers {sorted(tcs)}, d_sae {tcs[0].cfg.d_sae}; {sorted(acts)}")

olmo = mi.load_model("organism-olmo", device="cpu")
assert type(olmo.original_model).__name__ == "Olmo3ForCausalLM"
assert resources.organism_root("organism-olmo") == package / "data" / "olmo"
olmo_layer = mi.spec_for(olmo).injection_layer
olmo_tcs = mi.load_transcoders(olmo, [olmo_layer])
olmo_rows = mi.run_trials(olmo, concepts, n_trials=1, judge=mi.RuleJudge(), max_new_tokens=8, progress=False)
assert len(olmo_rows) == 2 * 2, olmo_rows
olmo_site = olmo_tcs[olmo_layer].cfg.metadata.hook_name
print(f"the OLMo organism: {len(olmo_rows)} rows, transcoder on {olmo_site}")

with tempfile.TemporaryDirectory() as tmp:
    tiny = mi.load_model(save_tiny_gemma3(tmp), device="cpu")
    prompt = mi.trial_prompt(tiny, trial=1)
    rows = mi.run_trials(tiny, ["Bread"], n_trials=1, judge=mi.RuleJudge(), max_new_tokens=4, progress=False)
    assert len(rows) == 2, rows
    print(f"save_tiny_gemma3 + run_trials: {len(rows)} rows, prompt of {len(prompt.tokens)} tokens")
print("wheel smoke: ok")
