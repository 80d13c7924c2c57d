"""Experimental models of training, kept out of the top-level API until they win.

- :mod:`tangentlab.experimental.growth`: forecasts with a kernel scale s(t) measured by
  trace probes (measured not to beat the plain tangent model; benchmarks/RESULTS.md,
  "fidelity").
"""
