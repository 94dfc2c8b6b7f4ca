"""The one weights fingerprint: equal for the same weights, different after any edit or in another dtype,
and the same whether every value or a sample of each tensor is hashed, until a sampled value changes."""

import torch

from mechintro.core.fingerprint import weights_fingerprint


def test_fingerprint_tells_an_edited_model_from_a_fresh_load(tiny, tiny_dir):
    from mechintro.core.models import load_model

    fresh = load_model(tiny_dir, device="cpu")
    assert weights_fingerprint(fresh) == weights_fingerprint(tiny)
    assert weights_fingerprint(fresh) == weights_fingerprint(fresh.original_model)
    with torch.no_grad():
        params = dict(fresh.original_model.named_parameters())
        name = next(n for n, p in params.items() if p.ndim == 2 and p.shape[0] > 8)
        params[name][3] += 0.01  # one row of one matrix
    assert weights_fingerprint(fresh) != weights_fingerprint(tiny)
    half = load_model(tiny_dir, device="cpu", dtype=torch.bfloat16)
    assert weights_fingerprint(half) != weights_fingerprint(tiny)


def test_sampled_fingerprint_sees_sampled_values_and_sums():
    m = torch.nn.Linear(300, 100)
    a = weights_fingerprint(m, full=False)
    assert a != weights_fingerprint(m, full=True)
    with torch.no_grad():
        m.weight.view(-1)[1] += 1.0  # not a sampled value (every 7th), but it moves the sum
    assert weights_fingerprint(m, full=False) != a


def test_fingerprint_is_a_full_sha256_hex():
    out = weights_fingerprint(torch.nn.Linear(3, 2))
    assert len(out) == 64 and int(out, 16) >= 0
