"""The ``mechintro`` command."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    """Concept injection end to end on a tiny random Gemma 3 (no weights needed)."""
    import torch

    from mechintro.concepts import concept_vectors
    from mechintro.models import load_model, spec_for
    from mechintro.prompts import left_pad, trial_prompt
    from mechintro.sampling import sample
    from mechintro.steering import inject
    from mechintro.testing import save_tiny_gemma3

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_gemma3(tmp)
        model = load_model(folder, device="cpu")
        spec = spec_for(model)
        print(f"loaded a random tiny Gemma 3 from {folder} through TransformerBridge: {spec.n_layers} layers, "
              f"d_model {spec.d_model}; default injection layer {spec.injection_layer}, strength {spec.strength}")
        concepts = ["Bread", "Oceans", "Dust"]
        vecs = concept_vectors(model, concepts, layer=spec.injection_layer)
        print("concept vector norms:", {c: round(float(v.norm()), 3) for c, v in zip(concepts, vecs, strict=True)})
        prompts = [trial_prompt(model, trial=t) for t in (1, 2, 3)]
        batch = left_pad(prompts, pad_id=model.tokenizer.pad_token_id)
        print(f"trial prompt: {len(prompts[0].tokens)} tokens, injection starts at token {prompts[0].injection_start}"
              f" ({model.tokenizer.decode(prompts[0].tokens[prompts[0].injection_start + 1:][:3].tolist())!r}...)")
        with torch.no_grad():
            clean = model(batch.tokens, attention_mask=batch.attention_mask)[:, -1]
            with inject(model, vecs, layer=spec.injection_layer, strength=spec.strength, start=batch.starts):
                steered = model(batch.tokens, attention_mask=batch.attention_mask)[:, -1]
                out = sample(model, batch, max_new_tokens=8, seeds=[0, 1, 2])
        yes, no = list(spec.yes_ids), list(spec.no_ids)
        gap = lambda lg: (lg[:, yes].logsumexp(-1) - lg[:, no].logsumexp(-1))  # noqa: E731
        print("Yes-No logit gap, clean -> injected:",
              [f"{a:.3f} -> {b:.3f}" for a, b in zip(gap(clean).tolist(), gap(steered).tolist(), strict=True)])
        print("sampled (random weights, so gibberish):", out.texts(model.tokenizer))
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from mechintro.models import data_dir

    if not (data_dir() / "organism" / "config.json").exists():
        print("The model organism is not trained yet; running the tiny random Gemma 3 demo instead.")
        return _demo(args)
    return _demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechintro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="concept injection on a tiny random Gemma 3").set_defaults(func=_demo)
    sub.add_parser("reproduce", help="the main job on the embedded default model").set_defaults(func=_reproduce)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
