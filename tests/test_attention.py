"""gemmatune.attention: math attention (Gemma 4's head_dim-512 full layers) against SDPA.

CPU: fp64 forward and backward equal SDPA's on odd shapes, grouped-query heads, bool /
additive / no masks. GPU (`pytest -m gpu`): in bf16 the error against an fp64 reference
is no worse than SDPA's own bf16 error plus a small margin.
"""
import pytest
import torch
import torch.nn.functional as F

from gemmatune.attention import MATH_SCORES_BUDGET, attention_math, use_math_attention


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
