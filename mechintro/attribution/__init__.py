"""Steering attribution, one module per concept: ``sites`` (where the dictionaries sit, and applying one),
``metric`` (what is attributed), ``strengths`` (the strength grid and its quadrature), ``config`` (the
settings), ``passes`` (the batched forward + JVP + backward, and :func:`steering_attribution`), ``result``
(:class:`SteeringAttribution`), ``hops`` (the edge weights between features), ``graph``
(:class:`AttributionGraph` and building it) and ``neuronpedia`` (its circuit-tracer JSON). The graph's figure
is in :mod:`mechintro.plots.graph`."""
