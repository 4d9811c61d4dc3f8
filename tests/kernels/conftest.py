"""Shared set-up for the kernel tests.

Triton reads TRITON_INTERPRET when a function is decorated with @triton.jit, i.e. when a kernel
module is imported, so it is set here, before any test module imports gemmatune.kernels.*.
Only without CUDA: on the GPU machine the kernels compile for real.
"""
import json
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poison_empty(monkeypatch):
    """Fill every torch.empty / torch.empty_like buffer with NaN (or -7 for integers), so a kernel
    that forgets to write part of its output fails the NaN checks instead of passing by luck."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    # torch caches its set of constructor functions on first use by a `with torch.device(...)`
    # block; filled while the lambdas below are in place, the cache would miss the real
    # torch.empty for the rest of the session and such blocks would allocate on the CPU.
    torch.utils._device._device_constructors()

    def _poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_empty_like(*a, **k)))


@pytest.fixture
def err_log():
    """Append one JSON line per measured error to $GEMMATUNE_ERR_LOG (a no-op when unset)."""
    path = os.environ.get("GEMMATUNE_ERR_LOG")

    def log(**fields):
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(fields) + "\n")

    return log



@pytest.fixture(params=["triton", "reference"])
def kernel_path(request, monkeypatch):
    """Run a test through the public callable twice: Triton (the interpreter on CPU) and the
    PyTorch reference (forced with GEMMATUNE_KERNELS=0)."""
    if request.param == "reference":
        monkeypatch.setenv("GEMMATUNE_KERNELS", "0")
    return request.param
