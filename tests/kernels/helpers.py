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


# The 16 NF4 levels (Dettmers et al. 2023, QLoRA, appendix E), written out here rather than read
# from bitsandbytes, so the oracle below shares nothing with the code under test but the packed data.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def _f32(t64):
    """Round fp64 values to fp32. A product or sum of two fp32 numbers is exact in fp64 (here:
    the exponents never differ by more than fp64's 29 spare bits), so rounding it once gives
    exactly the fp32 operation's result: this is fp32 arithmetic, done independently."""
    return t64.to(torch.float32).double()


def nf4_oracle(packed, quant_state, dtype=None):
    """An NF4 weight dequantised from first principles, the oracle of the bit-exact tests.

    The format, as bitsandbytes documents it: element 2k in the high nibble of byte k, 2k+1 in
    the low one; absmax per block of `blocksize` elements; with double quantisation absmax[b] =
    code2[q[b]] * absmax2[b // blocksize2] + offset. Arithmetic in fp32 (each step rounded once,
    emulated in fp64), one cast to the output dtype. bitsandbytes' CPU dequantisation is not an
    oracle: on some CPUs it is wrong (blocksize 128 on AVX512-BF16 machines)."""
    qs = quant_state
    assert torch.equal(qs.code.cpu().float(), torch.tensor(NF4_LEVELS)), "not bitsandbytes' NF4 code table"
    n = 1
    for d in qs.shape:
        n *= d
    byte = packed.detach().cpu().reshape(-1).view(torch.uint8).long()
    nibbles = torch.stack((byte >> 4, byte & 15), dim=-1).reshape(-1)[:n]
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)[nibbles]
    if qs.nested:
        q = qs.absmax.cpu().long()
        code2 = qs.state2.code.cpu().double()
        absmax2 = qs.state2.absmax.cpu().double()
        blocks2 = torch.arange(q.numel()) // qs.state2.blocksize
        absmax = _f32(_f32(code2[q] * absmax2[blocks2]) + float(qs.offset))
    else:
        absmax = qs.absmax.cpu().double()
    values = _f32(levels * absmax[torch.arange(n) // qs.blocksize])
    return values.to(torch.float32).to(dtype or qs.dtype).view(tuple(qs.shape))
