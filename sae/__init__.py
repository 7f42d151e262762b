"""sae: sparse autoencoders for interpretability, built on :mod:`sparsecode.core`.

The architectures, trainer and CLI arrive with their own issue; this package is a placeholder
namespace so the distribution ships both import packages from the start.
"""
