"""Experimental models of training, kept out of the top-level API until they win.

- :mod:`tangentlab.experimental.growth`: forecasts with a kernel scale s(t) measured by
  trace probes (measured not to beat the plain tangent model; benchmarks/RESULTS.md,
  "fidelity").
- :mod:`tangentlab.experimental.pilot`: a progress-indexed clock measured on a short real
  pilot run on a subset, applied to a forecast of the full job (development examples:
  benchmarks/RESULTS.md, "pilot"; held-out: "holdout-pilot").
- :mod:`tangentlab.experimental.exact_top`: the top of the network (e.g. a head conv, its
  BN and activation, pooling and the linear head) exact and the block below it linearized,
  simulated in function space with the block's kernel of z kept in a subspace, with a
  reliability check and a steps interval conditional on it (benchmarks/RESULTS.md,
  "twolayer": development tasks, then held-out image tasks once), and a sweep of many
  settings from one kernel ranked by the estimated real steps ("twolayer-sweep"). On the
  command line it is the default of ``tangentlab forecast|validate|sweep`` where the
  network splits (``--linearize auto``; ``--linearize top`` insists; README "Exact top").
"""
