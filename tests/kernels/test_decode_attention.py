"""Decode attention (one query token over a static KV cache): against an fp64 softmax on odd
shapes (grouped query heads, a head_dim that is not a power of two, a cache length that is not a
multiple of the chunk, masked chunks, left padding, a sliding window), fp32 and fp16 in the
interpreter, bf16/fp16 at Gemma 4's sizes on the GPU.

TRITON_INTERPRET is set by tests/kernels/conftest.py before the kernel module is imported.
"""
import pytest
import torch

from gemmatune.kernels import decode_attention as mod
from tests.kernels.helpers import gpu, rel_max_err


def _inputs(batch, heads, kv_heads, length, dim, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 1, heads, dim, generator=g).to(dtype).transpose(1, 2)  # (B, H, 1, D), as the layer has it
    k = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    seen = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):  # row r: left padding r, keys up to a row-dependent current position
        now = min(length - 1, length // 2 + 7 * row)
        seen[row, row:now + 1] = True
    return q.to(device), k.to(device), v.to(device), seen[:, None, None].to(device)


def _exact(q, k, v, mask, scale):
    """fp64 softmax attention of exactly the inputs the kernel reads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = (q.double() @ k.transpose(2, 3) * scale).masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


CASES = [  # batch, heads, kv_heads, length, head_dim
    (1, 8, 1, 256, 32), (2, 4, 2, 100, 48), (3, 6, 3, 70, 16), (1, 2, 2, 300, 80), (2, 8, 2, 64, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch, heads, kv_heads, length, dim", CASES)
def test_decode_attention_matches_fp64(poison_empty, dtype, batch, heads, kv_heads, length, dim):
    q, k, v, mask = _inputs(batch, heads, kv_heads, length, dim, dtype, seed=length + dim)
    assert mod.decode_attention_supported(q, k, v, mask)
    got = mod.decode_attention(q, k, v, mask, scale=0.7)
    expected = _exact(q, k, v, mask, 0.7)
    assert got.shape == (batch, 1, heads, dim) and got.dtype == dtype and torch.isfinite(got).all()
    err = rel_max_err(got, expected)
    reference_err = rel_max_err(mod.decode_attention_reference(q, k, v, mask, 0.7), expected)
    # fp32: sum order only. fp16: the probabilities are rounded once before p @ V, as the reference
    # rounds them (after normalising): no worse than the reference, within a few fp16 ulps.
    assert err < (1e-5 if dtype == torch.float32 else max(2 * reference_err, 2 ** -9)), (err, reference_err)


def test_a_sliding_window_mask_and_the_fallbacks():
    q, k, v, _ = _inputs(2, 4, 1, 200, 32, torch.float32)
    now = torch.tensor([150, 199])
    keys = torch.arange(200)
    window = (keys[None] <= now[:, None]) & (keys[None] > now[:, None] - 40)  # a 40-key window
    mask = window[:, None, None]
    torch.testing.assert_close(mod.decode_attention(q, k, v, mask, 1.0), _exact(q, k, v, mask, 1.0).float(),
                               atol=1e-5, rtol=1e-5)
    assert not mod.decode_attention_supported(q.expand(2, 4, 3, 32), k, v, mask)  # prefill: SDPA's job
    assert not mod.decode_attention_supported(q, k, v, torch.where(mask, 0.0, -1e9))  # additive masks: eager's
    assert mod.decode_attention_supported(q[:, :3], k, v, mask)  # 3 query heads over 1 KV head: fine
    assert not mod.decode_attention_supported(q[:, :3], k.expand(2, 2, 200, 32), v.expand(2, 2, 200, 32), mask)
    assert not mod.decode_attention_supported(q[..., :8], k[..., :8], v[..., :8], mask)  # head_dim < 16: no tl.dot


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, length, dim", [(8, 1, 256, 256), (8, 1, 512, 512), (8, 2, 1280, 256),
                                                          (8, 2, 768, 512)])
def test_gpu_decode_attention_at_gemma_sizes(dtype, heads, kv_heads, length, dim):
    q, k, v, mask = _inputs(2, heads, kv_heads, length, dim, dtype, device="cuda", seed=length)
    got = mod.decode_attention(q, k, v, mask, scale=1.0)
    expected = _exact(q, k, v, mask, 1.0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(heads // kv_heads, 1),
                                                            v.repeat_interleave(heads // kv_heads, 1),
                                                            attn_mask=mask, scale=1.0).transpose(1, 2)
    err, sdpa_err = rel_max_err(got, expected), rel_max_err(sdpa, expected)
    assert torch.isfinite(got).all() and err <= max(2 * sdpa_err, 2 ** -7), (err, sdpa_err)
