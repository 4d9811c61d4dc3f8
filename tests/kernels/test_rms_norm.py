"""rms_norm: Triton (interpreter on CPU) and reference against fp64 and transformers'
Gemma4RMSNorm; full sizes on a GPU against eager PyTorch's own error."""
import pytest
import torch
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

from gemmatune.kernels import rms_norm as mod
from gemmatune.kernels._backend import use_triton
from tests.kernels.helpers import gpu, rel_err


def make_case(shape, with_weight, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(shape, generator=g, device=device) * 3 + 0.5).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g, device=device)).to(dtype) if with_weight else None
    dy = torch.randn(shape, generator=g, device=device).to(dtype)
    return x, w, dy


def run(fn, x, w, dy, **kw):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True) if w is not None else None
    y = fn(x, w, **kw)
    y.backward(dy)
    return y.detach(), x.grad, (w.grad if w is not None else None)


def fp64(x, w, dy, eps=1e-6):
    return run(mod.rms_norm_reference, x.double(), None if w is None else w.double(), dy.double(), eps=eps)


@pytest.mark.parametrize("shape", [(1, 64), (7, 96), (333, 200), (2, 3, 5, 256)])  # last: per-head q/k
@pytest.mark.parametrize("with_weight", [True, False])
def test_matches_fp64(kernel_path, poison_empty, shape, with_weight):
    x, w, dy = make_case(shape, with_weight, seed=shape[0])
    assert use_triton(x) == (kernel_path == "triton")
    y, dx, dw = run(mod.rms_norm, x, w, dy)
    y64, dx64, dw64 = fp64(x, w, dy)
    assert y.shape == x.shape and y.dtype == x.dtype
    for t in (y, dx) + ((dw,) if with_weight else ()):
        assert torch.isfinite(t).all()
    # fp32 math over at most 256 elements a row: a few ulp, ~1e-6 norm-wise.
    assert rel_err(y, y64) < 1e-6 and rel_err(dx, dx64) < 1e-5
    if with_weight:
        assert rel_err(dw, dw64) < 1e-5  # summed over up to 333 rows in fp32


def test_frozen_weight_and_transformers_module(kernel_path):
    """Same forward as Gemma4RMSNorm (with and without scale); a frozen weight gets no gradient."""
    x, _, dy = make_case((5, 7, 96), True, seed=11)
    for with_scale in (True, False):
        norm = Gemma4RMSNorm(96, eps=1e-6, with_scale=with_scale)
        if with_scale:
            with torch.no_grad():
                norm.weight.mul_(torch.linspace(0.5, 1.5, 96))
            norm.weight.requires_grad_(False)
        weight = norm.weight if with_scale else None
        xg = x.clone().requires_grad_(True)
        y = mod.rms_norm(xg, weight, eps=norm.eps)
        y.backward(dy)
        # fp32: 1/sqrt versus torch.pow(., -0.5) and a different sum order: ~1 ulp.
        torch.testing.assert_close(y, norm(x), rtol=2e-6, atol=1e-6)
        assert torch.isfinite(xg.grad).all()
        if with_scale:
            assert norm.weight.grad is None


def test_fp16_error_within_eager_cpu(err_log):
    check_against_eager(torch.float16, (333, 200), True, "cpu", err_log)


def test_refuses_too_wide_rows():
    x = torch.randn(2, mod.MAX_HIDDEN + 1)
    with pytest.raises(ValueError):
        mod.rms_norm_forward(x, None, 1e-6)


def check_against_eager(dtype, shape, with_weight, device, err_log):
    """The kernel's error against fp64 must be within a small factor of eager PyTorch's error in
    the same dtype. Eager here is transformers' own formula (rms_norm_reference): fp32 math inside,
    inputs/outputs/gradients in the dtype, as is the kernel, so the two should nearly coincide."""
    x, w, dy = make_case(shape, with_weight, dtype=dtype, device=device, seed=len(shape))
    ref = fp64(x, w, dy)
    ker = run(mod.rms_norm, x, w, dy)
    eager = run(mod.rms_norm_reference, x, w, dy)
    for name, k, e, r in zip(("y", "grad_x", "grad_w"), ker, eager, ref):
        if r is None:
            continue
        assert torch.isfinite(k).all()
        err_k, err_t = rel_err(k, r), rel_err(e, r)
        err_log(kernel="rms_norm", quantity=name, dtype=str(dtype), shape=str(shape), weight=with_weight,
                err_kernel=err_k, err_torch=err_t)
        # 2x: both round the same fp32 values once to the dtype; the rest is fp32 summation order
        # (tree sums here, a different reduction for grad_w). 1e-6 is a floor for fp32.
        assert err_k <= 2 * err_t + 1e-6, (name, err_k, err_t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,with_weight", [
    ((4, 1024, 1536), True),      # E2B hidden
    ((4, 1024, 2560), True),      # E4B hidden
    ((2, 1024, 8, 256), True),    # per-head q/k norm, head_dim 256
    ((2, 1024, 4, 512), True),    # global layers' head_dim 512
    ((2, 1024, 2, 256), False),   # v_norm: no weight
])
@gpu
def test_gpu_error_within_eager(dtype, shape, with_weight, err_log):
    check_against_eager(dtype, shape, with_weight, "cuda", err_log)
