"""When a Triton kernel can run, and the one switch that forces the PyTorch references.

Triton needs a GPU, or the interpreter (`TRITON_INTERPRET=1`) for CPU tensors in CI. Every
kernel wrapper asks `use_triton(...)` and falls back to its PyTorch reference otherwise, so
the same code runs on a laptop, in CI and on a GPU. `GEMMATUNE_KERNELS=0` forces the
references everywhere (for comparisons and bug hunts).
"""
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    HAS_TRITON = False


def kernels_enabled() -> bool:
    """False when the user switched the Triton kernels off with GEMMATUNE_KERNELS=0."""
    return os.environ.get("GEMMATUNE_KERNELS", "1") != "0"


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor can be handed to a Triton kernel on this machine."""
    if not (HAS_TRITON and kernels_enabled()):
        return False
    if all(t.is_cuda for t in tensors):
        return True
    # The interpreter runs CPU tensors, but computes bf16 wrongly: fp32/fp16 only.
    return interpreter_on() and all(t.device.type == "cpu" and t.dtype != torch.bfloat16 for t in tensors)


def warps_for_tile(tile_elements: int, elements_per_warp: int) -> int:
    """num_warps for a program holding `tile_elements` per tensor: a power of two in [1, 16]."""
    warps = max(1, min(16, tile_elements // elements_per_warp))
    return 1 << (warps.bit_length() - 1)
