"""Experimental models of training, kept out of the top-level API until they win.

- :mod:`tangentlab.experimental.growth`: forecasts with a kernel scale s(t) measured by
  trace probes (measured not to beat the plain tangent model; benchmarks/RESULTS.md,
  "fidelity").
- :mod:`tangentlab.experimental.pilot`: a progress-indexed clock measured on a short real
  pilot run on a subset, applied to a forecast of the full job (development examples:
  benchmarks/RESULTS.md, "pilot"; held-out: "holdout-pilot").
"""
