"""Mixed precision: the bit-allocation solvers and the measurements they read (relevance, layer noise).

Import the submodules: ``solvers`` (pure allocation under a budget), ``from_relevance`` (relevance
scores → plan), ``noise_measurement`` (each layer's measured logit noise per width → plan).
"""
