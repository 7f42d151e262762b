"""Evaluations beyond reconstruction, one module per eval (docs/metrics.md).

* :mod:`sae.evals.synthetic`: recovery of known features on synthetic data (SynthSAEBench's
  definitions: F1, precision, recall, MCC, uniqueness, shrinkage, explained variance).
"""
