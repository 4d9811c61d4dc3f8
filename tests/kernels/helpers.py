"""Helpers shared by the kernel tests: the GPU marker, the error measures, the error log."""
import json
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def gpu(test):
    """Marked `gpu` (deselected by default, run with -m gpu) and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")(test))


def rel_err(a, b):
    """Norm-wise relative error ||a - b|| / ||b||, in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def rel_max_err(a, ref):
    """Max-abs relative error max|a - ref| / max|ref| (ref already fp64)."""
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def log_error(record: dict) -> None:
    """Append one JSON line to $GEMMATUNE_ERR_LOG (the GPU suite's error file); no-op when unset."""
    path = os.environ.get("GEMMATUNE_ERR_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
