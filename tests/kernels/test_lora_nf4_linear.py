"""QLoRA linear (NF4 base + LoRA): forward and every gradient against the eager reference.

TRITON_INTERPRET is read when @triton.jit decorates a kernel (first import of the kernel
module), so it is set here before that import, and only where there is no GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
import pytest  # noqa: E402

from gemmatune.kernels import lora_nf4_linear as mod  # noqa: E402
from gemmatune.kernels._backend import use_triton  # noqa: E402
from tests.kernels.helpers import log_error, nf4_oracle, rel_max_err  # noqa: E402


def _layer(out_f, in_f, r, dtype, nested=True, bias=False, device="cpu", seed=0, quant_dtype=None):
    """A bnb NF4 weight (Params4bit + QuantState, as Linear4bit holds it) and LoRA A, B (nonzero B)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    w4 = bnb.nn.Params4bit(w.to(quant_dtype or dtype), requires_grad=False, quant_type="nf4",
                           compress_statistics=nested).to(device)
    A = (torch.randn(r, in_f, generator=g) / in_f ** 0.5).to(device=device, dtype=dtype).requires_grad_()
    B = (torch.randn(out_f, r, generator=g) * 0.1).to(device=device, dtype=dtype).requires_grad_()
    b = (torch.randn(out_f, generator=g) * 0.1).to(device=device, dtype=dtype).requires_grad_() if bias else None
    return w4, w4.quant_state, A, B, b


def _grads(y, inputs, g):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(y, inputs, g)


# --------------------------------------------------------------------------- CPU tests
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,in_f,out_f,r,bias", [
    (1, 64, 128, 8, False),
    (7, 320, 192, 16, True),
    (333, 64, 192, 4, True),
    (5, 320, 128, 16, False),
])
def test_matches_reference(poison_empty, dtype, rows, in_f, out_f, r, bias):
    w4, qs, A, B, b = _layer(out_f, in_f, r, dtype, bias=bias, seed=rows)
    mod.release_workspace()  # the next workspace comes from the poisoned torch.empty
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows + 1)).to(dtype).requires_grad_()
    assert use_triton(x, w4)
    scale = 2.0
    y = mod.lora_nf4_linear(x, w4, qs, A, B, scale, bias=b)
    y_ref = mod.lora_nf4_linear_reference(x, w4, qs, A, B, scale, bias=b)
    assert torch.isfinite(y).all()
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    grads = _grads(y, (x, A, B, b), g)
    grads_ref = _grads(y_ref, (x, A, B, b), g)
    # The same W bit for bit and the same GEMMs; only where sums are rounded differs (the LoRA
    # term is accumulated into y inside addmm_ instead of a separate scaled tensor + add; scale is
    # applied to g@B instead of the (N, out) product). fp32: a few ulps of the largest value;
    # fp16: a couple of fp16 ulps (2^-10) relative to the largest value.
    tol = {torch.float32: 1e-5, torch.float16: 3e-3}[dtype]
    for name, got, ref in zip(("y", "dx", "dA", "dB", "dbias"), (y, *grads), (y_ref, *grads_ref)):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, ref, atol=tol * ref.abs().max().item(), rtol=tol, msg=name)


def test_leading_dims_and_frozen_lora_A():
    """(B, S, in) input; only B trainable: no dA is computed, and no dx when x needs none."""
    w4, qs, A, B, _ = _layer(128, 64, 8, torch.float32)
    A.requires_grad_(False)
    x = torch.randn(2, 3, 64)
    y = mod.lora_nf4_linear(x, w4, qs, A, B, 0.5)
    assert y.shape == (2, 3, 128)
    (dB,) = torch.autograd.grad(y.square().sum(), B)
    y_ref = mod.lora_nf4_linear_reference(x, w4, qs, A, B, 0.5)
    (dB_ref,) = torch.autograd.grad(y_ref.square().sum(), B)
    torch.testing.assert_close(dB, dB_ref, atol=1e-5 * dB_ref.abs().max().item(), rtol=1e-5)  # fp32 sum order


def test_weight_dequantised_like_bnb_matmul_4bit():
    """With B = 0 (fresh LoRA) the layer is bnb's own 4-bit linear; fp32 and bf16-quantised weight."""
    for quant_dtype in (torch.float32, torch.float16):
        w4, qs, A, B, _ = _layer(192, 320, 8, torch.float32, quant_dtype=quant_dtype)
        x = torch.randn(7, 320)
        expected = x @ nf4_oracle(w4.data, qs).to(torch.float32).t()
        got = mod.lora_nf4_linear(x, w4, qs, A, torch.zeros_like(B), 1.0)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)  # same W, same GEMM, + exact zeros


def test_backward_does_not_keep_dequantised_weight():
    w4, qs, A, B, _ = _layer(192, 320, 8, torch.float32)
    x = torch.randn(7, 320, requires_grad=True)
    y = mod.lora_nf4_linear(x, w4, qs, A, B, 1.0)
    saved = {t.data_ptr() for t in y.grad_fn.saved_tensors}
    n_w = 192 * 320
    assert not any(t.numel() == n_w and t.is_floating_point() for t in y.grad_fn.saved_tensors)
    assert w4.data_ptr() in saved  # the packed bytes are what backward re-dequantises


def test_bf16_on_cpu_takes_reference():
    w4, qs, A, B, _ = _layer(128, 64, 8, torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert not use_triton(x, w4)
    torch.testing.assert_close(mod.lora_nf4_linear(x, w4, qs, A, B, 1.0),
                               mod.lora_nf4_linear_reference(x, w4, qs, A, B, 1.0), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_nf4_linear_matches_reference_and_keeps_no_weight(poison_empty, dtype, bias):
    """nf4_linear: the 4-bit layers without LoRA (PLE projections). y and dx against dequantise +
    F.linear; the dequantised W is not kept for backward."""
    w4, qs, _, _, b = _layer(192, 320, 8, dtype, bias=bias, seed=5)
    mod.release_workspace()
    x = torch.randn(2, 7, 320, generator=torch.Generator().manual_seed(6)).to(dtype).requires_grad_()
    y = mod.nf4_linear(x, w4, qs, b)
    y_ref = mod.nf4_linear_reference(x, w4, qs, b)
    assert not any(t.is_floating_point() and t.numel() == 192 * 320 for t in y.grad_fn.saved_tensors)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    tol = {torch.float32: 1e-5, torch.float16: 3e-3}[dtype]  # same W, same GEMM; fp16: a couple of ulps
    for name, got, ref in zip(("y", "dx", "dbias"), (y, *_grads(y, (x, b), g)), (y_ref, *_grads(y_ref, (x, b), g))):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, ref, atol=tol * ref.abs().max().item(), rtol=tol, msg=name)


def test_refuses_mismatched_shapes():
    w4, qs, A, B, _ = _layer(128, 64, 8, torch.float32)
    with pytest.raises(ValueError, match="features"):
        mod.lora_nf4_linear(torch.randn(3, 65), w4, qs, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        mod.lora_nf4_linear(torch.randn(3, 64), w4, qs, A.t(), B, 1.0)


# --------------------------------------------------------------------------- GPU tests
# (name, out, in): q/o/gate/up/down projections of E2B (hidden 1536, inter 6144, 8 x 256 q heads;
# full layers 8 x 512) and E4B (hidden 2560, inter 10240).
GPU_SHAPES = [("e2b_q", 2048, 1536), ("e2b_q_full", 4096, 1536), ("e2b_o", 1536, 2048),
              ("e2b_gate_up", 6144, 1536), ("e2b_down", 1536, 6144),
              ("e4b_q", 2048, 2560), ("e4b_o", 2560, 2048), ("e4b_gate_up", 10240, 2560),
              ("e4b_down", 2560, 10240)]
# Same W bit for bit and the same cuBLAS GEMMs as the eager path; folding the LoRA term into
# addmm_ removes roundings rather than adding any. Factor 2 absorbs accumulation-order noise of
# different GEMM shapes (e.g. u@A accumulated into dx vs added after). Floor: 4 eps of the dtype.
FACTOR = 2.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name,out_f,in_f", GPU_SHAPES)
def test_gpu_error_vs_fp64(dtype, name, out_f, in_f):
    r, rows, scale = 16, 2048, 2.0
    w4, qs, A, B, _ = _layer(out_f, in_f, r, dtype, device="cuda", seed=out_f + in_f)
    W64 = bnbF.dequantize_4bit(w4.data, qs).double()  # bitsandbytes' CUDA path
    x64 = torch.randn(rows, in_f, device="cuda", dtype=torch.float64, requires_grad=True)
    A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    y64 = x64 @ W64.t() + (x64 @ A64.t()) @ B64.t() * scale
    g64 = torch.randn_like(y64)
    refs = (y64, *torch.autograd.grad(y64, (x64, A64, B64), g64))

    def run(fn):
        x = x64.detach().to(dtype).requires_grad_()
        a, b = A64.detach().to(dtype).requires_grad_(), B64.detach().to(dtype).requires_grad_()
        y = fn(x, w4, qs, a, b, scale)
        return (y, *torch.autograd.grad(y, (x, a, b), g64.to(dtype)))

    ours = run(mod.lora_nf4_linear)
    theirs = run(mod.lora_nf4_linear_reference)
    eps = torch.finfo(dtype).eps
    for tname, a, b, ref in zip(("y", "dx", "dA", "dB"), ours, theirs, refs):
        assert torch.isfinite(a).all()
        e_k, e_t = rel_max_err(a, ref), rel_max_err(b, ref)
        log_error(dict(test="lora_nf4_linear", shape=name, dtype=str(dtype), tensor=tname,
                  rel_err_kernel=e_k, rel_err_torch=e_t))
        assert e_k <= FACTOR * e_t + 4 * eps, (tname, e_k, e_t)
