"""Fixtures shared by the test files."""
import pytest
import torch


@pytest.fixture
def cpu_cusolver(monkeypatch):
    """cusolver_batched.eigh_batched (CUDA only) emulated on the CPU by its contract: (w, v, info) in `dtype`."""
    import cusolver_batched
    calls = []

    def eigh_batched(a, dtype=None):
        calls.append(tuple(a.shape))
        w, v = torch.linalg.eigh(a.to(dtype or a.dtype))
        return w, v, torch.zeros(a.shape[0], dtype=torch.int32)
    monkeypatch.setattr(cusolver_batched, "eigh_batched", eigh_batched)
    return calls
