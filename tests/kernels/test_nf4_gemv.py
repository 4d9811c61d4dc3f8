"""NF4 GEMV for decoding: against an fp64 oracle built from the exact dequantised weight, and
against the dequantise + matmul reference, on awkward shapes (odd N, K not a multiple of the
quantisation block, every row count up to MAX_ROWS), with and without bias, LoRA and nested
statistics.

TRITON_INTERPRET is read when @triton.jit decorates a kernel (first import of the kernel
module), so it is set here before that import, and only where there is no GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bitsandbytes as bnb  # noqa: E402
import pytest  # noqa: E402

from gemmatune.kernels import nf4_gemv as mod  # noqa: E402
from gemmatune.kernels.lora_nf4_linear import lora_nf4_linear  # noqa: E402
from tests.kernels.helpers import gpu, nf4_oracle, rel_max_err  # noqa: E402


def _weight(out_f, in_f, dtype, nested, blocksize=64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    w4 = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type="nf4", compress_statistics=nested,
                           blocksize=blocksize).to(device)
    return w4, w4.quant_state


def _oracle(x, w4, qs, bias, lora_A, lora_B, scale):
    """fp64 sums of exactly what the kernel multiplies: W decoded and rounded as bitsandbytes
    does, t = x @ A^T as the caller computes it (rounded to x's dtype), B rounded to x's dtype."""
    W = nf4_oracle(w4, qs, dtype=x.dtype).double()
    y = x.double() @ W.t()
    if bias is not None:
        y = y + bias.to(x.dtype).double()
    if lora_A is not None:
        t = x @ lora_A.to(x.dtype).t()
        y = y + scale * (t.double() @ lora_B.to(x.dtype).double().t())
    return y


CASES = [  # rows, in_features (a multiple of the block or not), out_features (odd, tiny), blocksize
    (1, 64, 128, 64), (1, 100, 37, 64), (3, 320, 203, 128), (2, 96, 5, 64), (4, 128, 64, 64), (3, 192, 9, 32),
    (1, 1088, 19, 64), (2, 640, 33, 128),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("with_bias, with_lora", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("rows, in_f, out_f, blocksize", CASES)
def test_gemv_matches_the_oracle(poison_empty, monkeypatch, dtype, nested, with_bias, with_lora, rows, in_f, out_f,
                                 blocksize):
    monkeypatch.setattr(mod, "MAX_ROWS", 4)  # the kernel takes any rows; MAX_ROWS only picks it (a speed choice)
    seed = rows * 1000 + in_f + out_f
    w4, qs = _weight(out_f, in_f, dtype, nested, blocksize, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, in_f, generator=g).to(dtype)
    bias = (torch.randn(out_f, generator=g) * 0.1) if with_bias else None  # fp32, cast like bnb's
    r = 5 if rows % 2 else 8
    lora_A = (torch.randn(r, in_f, generator=g) / in_f ** 0.5) if with_lora else None  # fp32 like peft's
    lora_B = (torch.randn(out_f, r, generator=g) * 0.3) if with_lora else None
    assert mod.gemv_supported(x, w4, qs)
    got = mod.nf4_gemv(x, w4, qs, bias, lora_A, lora_B, scale=2.0)
    expected = _oracle(x, w4, qs, bias, lora_A, lora_B, 2.0)
    reference = mod.nf4_gemv_reference(x, w4, qs, bias, lora_A, lora_B, scale=2.0)
    assert got.dtype == dtype and got.shape == (rows, out_f) and torch.isfinite(got).all()
    # fp32: only the order of fp32 sums differs from the oracle (a few ulps of the largest value).
    # fp16: one rounding of y (2^-11 relative), where the reference rounds its matmul, its LoRA
    # product and the sum separately: the kernel must be no worse than the reference.
    err, ref_err = rel_max_err(got, expected), rel_max_err(reference, expected)
    if dtype == torch.float32:
        assert err < 1e-6, err
    else:
        assert err <= max(ref_err, 2 ** -11), (err, ref_err)


@pytest.mark.parametrize("rows, in_f, out_f", [(1, 1536, 37), (1, 4160, 3), (3, 256, 70), (4, 640, 5), (2, 1600, 2),
                                              (1, 1000, 600), (1, 3072, 1100)])
def test_gpu_launch_settings_in_the_interpreter(monkeypatch, rows, in_f, out_f):
    """The tiles a GPU gets (whole blocks per chunk, several chunks per row, masked tails, few
    rows per program for a short matrix), run here."""
    monkeypatch.setattr(mod, "MAX_ROWS", 4)
    gpu_settings = mod.launch_settings(in_f, out_f, 64, on_gpu=True)
    monkeypatch.setattr(mod, "launch_settings", lambda k, n, blocksize, on_gpu: gpu_settings)
    aligned, block_n, nb, gb, _ = gpu_settings
    assert block_n * nb * gb <= mod.TILE_BYTES and nb * gb <= mod.MAX_BLOCK_KB  # registers: see launch_settings
    assert aligned == (in_f % 64 == 0) and (gb == 32 if aligned else nb == 1)
    w4, qs = _weight(out_f, in_f, torch.float32, nested=True, seed=rows)
    g = torch.Generator().manual_seed(2)
    x, bias = torch.randn(rows, in_f, generator=g), torch.randn(out_f, generator=g)
    A, B = torch.randn(4, in_f, generator=g) * 0.05, torch.randn(out_f, 4, generator=g)
    got = mod.nf4_gemv(x, w4, qs, bias, A, B, 0.5)
    assert rel_max_err(got, _oracle(x, w4, qs, bias, A, B, 0.5)) < 1e-6  # fp32: only the sum order differs


def test_leading_dims_and_the_fallbacks():
    w4, qs = _weight(48, 64, torch.float32, nested=True)
    x = torch.randn(2, 3, 64)
    y = mod.nf4_gemv(x, w4, qs)
    assert y.shape == (2, 3, 48)
    torch.testing.assert_close(y, mod.nf4_gemv_reference(x, w4, qs), atol=1e-5, rtol=1e-5)  # fp32 sum order
    too_many = torch.randn(mod.MAX_ROWS + 1, 64)
    assert not mod.gemv_supported(too_many, w4, qs)  # a GEMM's job
    torch.testing.assert_close(mod.nf4_gemv(too_many, w4, qs), mod.nf4_gemv_reference(too_many, w4, qs))
    assert not mod.gemv_supported(torch.randn(1, 64, dtype=torch.bfloat16), w4, qs)  # bf16: not in the interpreter
    odd_w4, odd_qs = _weight(8, 63, torch.float32, nested=False)
    assert not mod.gemv_supported(torch.randn(1, 63), odd_w4, odd_qs)  # rows of odd length straddle bytes


def test_equals_the_training_path_up_to_the_sum_order():
    """The layer computes what gemmatune's NF4 + LoRA training function computes."""
    w4, qs = _weight(96, 128, torch.float32, nested=True, seed=4)
    g = torch.Generator().manual_seed(5)
    x, A, B = torch.randn(1, 128, generator=g), torch.randn(8, 128, generator=g) * 0.1, torch.randn(96, 8, generator=g)
    expected = lora_nf4_linear(x, w4, qs, A, B, 0.5)
    torch.testing.assert_close(mod.nf4_gemv(x, w4, qs, None, A, B, 0.5), expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- GPU tests
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("out_f, in_f", [(2048, 1536), (256, 1536), (1536, 12288), (12288, 1536), (8960, 1536)])
def test_gpu_gemv_matches_the_oracle_at_gemma_sizes(monkeypatch, dtype, rows, out_f, in_f):
    monkeypatch.setattr(mod, "MAX_ROWS", 4)  # the kernel at several rows (tune_nf4_gemv.py times them)
    w4, qs = _weight(out_f, in_f, dtype, nested=True, device="cuda", seed=rows)
    x = torch.randn(rows, in_f, device="cuda").to(dtype)
    A, B = torch.randn(16, in_f, device="cuda") / in_f ** 0.5, torch.randn(out_f, 16, device="cuda") * 0.1
    assert mod.gemv_supported(x, w4, qs)
    got = mod.nf4_gemv(x, w4, qs, None, A, B, 2.0)
    expected = _oracle(x.cpu(), w4, qs, None, A.cpu(), B.cpu(), 2.0)  # nf4_oracle reads the CUDA tensors
    reference = mod.nf4_gemv_reference(x, w4, qs, None, A, B, 2.0)  # cuBLAS, rounds more often
    err, ref_err = rel_max_err(got.cpu(), expected), rel_max_err(reference.cpu(), expected)
    assert err <= max(ref_err, 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11), (err, ref_err)



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, in_f, r", [(1, 1536, 16), (1, 100, 5), (3, 4099, 8), (2, 64, 1)])
def test_lora_down_matches_fp64(dtype, rows, in_f, r):
    """t = x @ A^T: fp32 sums rounded once (the kernel where Triton runs, the matmul elsewhere)."""
    g = torch.Generator().manual_seed(in_f + r)
    x = torch.randn(rows, in_f, generator=g).to(dtype)
    a = (torch.randn(r, in_f, generator=g) / in_f ** 0.5)  # fp32 like peft's: cast to x's dtype first
    got = mod.lora_down(x, a)
    expected = x.double() @ a.to(dtype).double().t()
    assert got.dtype == dtype and got.shape == (rows, r) and torch.isfinite(got).all()
    tolerance = 1e-6 if dtype == torch.float32 else 2 ** -10  # fp16: one rounding of t
    assert rel_max_err(got, expected) < tolerance


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f", [1536, 2560, 12288, 1000])
def test_gpu_lora_down_matches_fp64(dtype, in_f):
    x = torch.randn(1, in_f, device="cuda").to(dtype)
    a = torch.randn(16, in_f, device="cuda") / in_f ** 0.5
    got = mod.lora_down(x, a)
    expected = x.double() @ a.to(dtype).double().t()
    err, cublas_err = rel_max_err(got, expected), rel_max_err(x @ a.to(dtype).t(), expected)
    assert torch.isfinite(got).all() and err <= max(cublas_err, 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11)
