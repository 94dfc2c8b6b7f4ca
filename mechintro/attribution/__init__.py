"""Steering attribution: the sites it reads, the metric it differentiates, the batched passes, the result, the
attribution graph and its Neuronpedia export."""
