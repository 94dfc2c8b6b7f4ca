"""The lowest layer: models and their hook names, prompts, concepts, injection, sampling, the fast path,
readouts,
transcoders, settings, the KV cache across transformers versions, package data, and small shared helpers.

Nothing here imports an upper layer (behaviour, mechanism, attribution, studies, organism, plots, cli)."""
