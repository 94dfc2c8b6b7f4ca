"""Studies built on the lower layers: the geometry of concept vectors (one module per experiment), the bias
vector, and the post-training conditions (preference pairs and LoRA training)."""
