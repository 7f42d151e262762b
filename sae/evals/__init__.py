"""Evaluations beyond reconstruction, one module per eval (docs/metrics.md, "Eval suites"),
run by ``sae eval RUN --suite ...`` (:mod:`sae.evals.suite`).

* :mod:`sae.evals.first_letter`: the first-letter task (words, prompts, activation probe) behind
* :mod:`sae.evals.splitting`: feature splitting by k-sparse probing, and
* :mod:`sae.evals.absorption`: feature absorption (Chanin et al. 2024; SAEBench's definitions);
* :mod:`sae.evals.sparse_probing`: k-sparse probing on offline tasks
  (:mod:`sae.evals.probing_tasks`; Gurnee et al. 2023, SAEBench);
* :mod:`sae.evals.synthetic`: recovery of known features on synthetic data (SynthSAEBench's
  definitions: F1, precision, recall, MCC, uniqueness, shrinkage, explained variance);
* :mod:`sae.evals.activations` and :mod:`sae.evals.probes`: what they share (activations at
  token positions, latents, probes).
"""
