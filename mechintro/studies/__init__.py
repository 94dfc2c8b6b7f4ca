"""Studies built on the lower layers: the geometry of concept vectors (one module per experiment) and the bias
vector."""
