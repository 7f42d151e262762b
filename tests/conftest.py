"""Shared test set-up."""

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    # The solvers run many small batched ops; on a shared 2-core machine torch's thread pool
    # spins against other processes and slows them by more than an order of magnitude. One
    # thread keeps the suite's time predictable (speed is measured in benchmarks/, not here).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def unit_rows(D: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (atoms)."""
    return D / np.linalg.norm(D, axis=1, keepdims=True)
