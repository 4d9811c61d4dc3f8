"""gemmatune.model.attention against SDPA: math attention (Gemma 4's head_dim-512 full layers) and
sliding-window attention (the window computed without a seq x seq mask).

CPU: fp64 forward and backward equal SDPA's on odd shapes, grouped-query heads, bool /
additive / no masks, windows shorter and longer than the sequence. GPU (`pytest -m gpu`):
in bf16/fp16 the error against an fp64 reference is no worse than SDPA's own error in that
dtype plus a small margin; the sliding test also requires the FlashAttention-2 window path.
"""
import pytest
import torch
import torch.nn.functional as F

from gemmatune.model.attention import (MATH_SCORES_BUDGET, attention_math, flash_window_works, sliding_window_attention,
                                       sliding_window_blocks, use_math_attention)
from tests.kernels.helpers import log_error


def sdpa_reference(q, k, v, mask, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def random_inputs(batch, heads, kv_heads, length, dim, dtype, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    make = lambda h: torch.randn(batch, h, length, dim, generator=gen, device=device, dtype=dtype).requires_grad_(True)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def causal(length, device="cpu"):
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


@pytest.mark.parametrize("batch,heads,kv_heads,length,dim", [(1, 8, 1, 33, 24), (2, 8, 2, 7, 16), (1, 4, 4, 1, 8),
                                                             (3, 2, 1, 65, 40)])
@pytest.mark.parametrize("mask_kind", ["causal", "additive", "none"])
def test_matches_sdpa_in_fp64(batch, heads, kv_heads, length, dim, mask_kind):
    q, k, v = random_inputs(batch, heads, kv_heads, length, dim, torch.float64)
    mask = {"causal": causal(length), "none": None,
            "additive": torch.randn(batch, 1, length, length, dtype=torch.float64)}[mask_kind]
    out = attention_math(q, k, v, mask, 0.7)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = sdpa_reference(q, k, v, mask, 0.7)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"d{name}")


def test_math_attention_only_where_it_helps():
    q = torch.empty(1, 8, 2048, 512, device="meta")
    assert use_math_attention(q, q)                        # Gemma 4 full layer at 2048 tokens
    assert not use_math_attention(q[..., :256], q[..., :256])  # sliding layers: SDPA's fast kernels
    long = torch.empty(1, 8, 16384, 512, device="meta")
    assert 8 * 16384 * 16384 * 4 > MATH_SCORES_BUDGET and not use_math_attention(long, long)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_no_worse_than_sdpa(dtype):
    q, k, v = random_inputs(1, 8, 2, 2048, 512, dtype, device="cuda", seed=1)
    mask = causal(2048, "cuda")
    grad = torch.randn(1, 8, 2048, 512, device="cuda", dtype=dtype)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = sdpa_reference(q64, k64, v64, mask, 1.0)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad.double())

    def rel_errors(fn):
        out = fn(q, k, v, mask, 1.0)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        return [float((a.double() - b).norm() / b.norm()) for a, b in zip((out, *grads), (ref, *ref_grads))]

    ours, theirs = rel_errors(attention_math), rel_errors(sdpa_reference)
    for name, mine, sdpa in zip(["out", "dq", "dk", "dv"], ours, theirs):
        assert mine == mine and mine <= 1.5 * sdpa + 2e-3, f"{name}: math {mine:.2e} vs sdpa {sdpa:.2e}"


def sliding_mask(length, window, device="cpu"):
    """transformers' sliding window: query i sees keys (i - window, i]."""
    pos = torch.arange(length, device=device)
    return (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)


def sliding(q, k, v, window, scale):
    """sliding_window_attention in the (B, H, L, D) layout the other functions here use."""
    out = sliding_window_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window, scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("batch,heads,kv_heads,length,dim,window", [(1, 8, 1, 33, 16, 5), (2, 4, 2, 40, 8, 16),
                                                                    (1, 2, 2, 7, 8, 16), (1, 2, 1, 17, 8, 1)])
def test_sliding_window_matches_the_full_mask_in_fp64(batch, heads, kv_heads, length, dim, window):
    q, k, v = random_inputs(batch, heads, kv_heads, length, dim, torch.float64, seed=3)
    out = sliding(q, k, v, window, 0.5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = sdpa_reference(q, k, v, sliding_mask(length, window), 0.5)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"d{name}")


def test_no_flash_window_off_the_gpu():
    q = torch.empty(1, 8, 2, 8, dtype=torch.bfloat16)
    assert not flash_window_works(q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [2048, 1333])
def test_sliding_window_half_precision_error_no_worse_than_sdpa(dtype, length):
    """Gemma 4's sliding layers (8 heads, 2 K/V heads, head_dim 256, window 512): the flash
    window path (required on an sm80+ GPU) and the block path against an fp64 reference."""
    window = 512
    q, k, v = random_inputs(1, 8, 2, length, 256, dtype, device="cuda", seed=2)
    assert flash_window_works(q.transpose(1, 2)), "FlashAttention-2 window path unavailable on this GPU"
    mask = sliding_mask(length, window, "cuda")
    grad = torch.randn(1, 8, length, 256, device="cuda", dtype=dtype)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = sdpa_reference(q64, k64, v64, mask, 1 / 16)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad.double())

    def rel_errors(fn):
        out = fn()
        grads = torch.autograd.grad(out, (q, k, v), grad)
        return [float((a.double() - b).norm() / b.norm()) for a, b in zip((out, *grads), (ref, *ref_grads))]

    theirs = rel_errors(lambda: sdpa_reference(q, k, v, mask, 1 / 16))
    for label, fn in [("flash", lambda: sliding(q, k, v, window, 1 / 16)),
                      ("blocks", lambda: sliding_window_blocks(q, k, v, window, 1 / 16))]:
        ours = rel_errors(fn)
        for name, mine, sdpa in zip(["out", "dq", "dk", "dv"], ours, theirs):
            log_error({"kernel": f"sliding_window_attention ({label})", "quantity": name, "dtype": str(dtype),
                       "shape": f"B1 L{length} H8 Hkv2 D256 W{window}", "err_kernel": mine, "err_torch": sdpa})
            assert mine == mine and mine <= 1.5 * sdpa + 2e-3, f"{label} {name}: {mine:.2e} vs sdpa {sdpa:.2e}"
