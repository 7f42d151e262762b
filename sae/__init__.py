"""sae: sparse autoencoders for interpretability, built on :mod:`sparsecode.core`.

The architectures, trainer and ``sae`` command line arrive with their own issue; until then this
import package is empty.
"""
