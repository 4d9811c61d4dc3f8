"""Attention for Gemma 4's full-attention layers (head_dim 512), where SDPA is slow.

PyTorch's flash and cuDNN attention kernels stop at head_dim 256, so SDPA runs Gemma 4's
full layers (head_dim 512) through its memory-efficient kernel, whose backward is slow at
that width (measured on an H200, benchmarks/overhead.py: about 6 ms per layer at 2048
tokens). At training lengths the score matrix is small (8 heads x 2048 x 2048 in fp32 is
128 MiB), so "math" attention, two matmuls and a softmax, is several times faster.

`attention_math` does exactly what transformers' `eager_attention_forward` does (scores in
the input dtype, softmax in fp32, probabilities cast back), as an autograd function that
saves only the probabilities (input dtype) for the backward instead of autograd's copies.
`use_math_attention` says when the scores are small enough to materialise.

Backward, P = softmax(S), O = P @ V, dO the upstream gradient:

    dV = P^T @ dO
    dP = dO @ V^T
    dS = P * (dP - rowsum(dO * O))          (rowsum(dP * P) == rowsum(dO * O))
    dQ = scale * dS @ K,   dK = scale * dS^T @ Q
"""
import torch

MATH_SCORES_BUDGET = 256 * 2**20  # bytes of fp32 scores one call may hold


def use_math_attention(query: torch.Tensor, key: torch.Tensor, min_head_dim: int = 257) -> bool:
    """Math attention where SDPA has no fast kernel and the scores fit the budget."""
    batch, heads, q_len, head_dim = query.shape
    return head_dim >= min_head_dim and batch * heads * q_len * key.shape[-2] * 4 <= MATH_SCORES_BUDGET


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _scores_and_probs(q, k, mask, scale):
    scores = torch.matmul(q, k.transpose(-1, -2)).to(_softmax_dtype(q.dtype)).mul_(scale)
    if mask is not None:
        scores = scores.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else scores.add_(mask)
    return torch.softmax(scores, dim=-1).to(q.dtype)


class MathAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        probs = _scores_and_probs(q, k, mask, scale)
        out = torch.matmul(probs, v)
        ctx.save_for_backward(q, k, v, probs, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, probs, out = ctx.saved_tensors
        d_out = d_out.contiguous()
        f32 = _softmax_dtype(q.dtype)
        delta = (d_out.to(f32) * out.to(f32)).sum(-1, keepdim=True)
        d_probs = torch.matmul(d_out, v.transpose(-1, -2))
        d_scores = (probs.to(f32) * (d_probs.to(f32) - delta)).mul_(ctx.scale).to(q.dtype)
        dq = torch.matmul(d_scores, k)
        dk = torch.matmul(d_scores.transpose(-1, -2), q)
        dv = torch.matmul(probs.transpose(-1, -2), d_out)
        return dq, dk, dv, None, None


def attention_math(query, key, value, mask, scale: float) -> torch.Tensor:
    """softmax(scale * Q K^T + mask) V; K/V may have fewer heads than Q (grouped-query).

    query (B, H, Lq, D), key/value (B, Hkv, Lk, D) with H a multiple of Hkv, mask bool
    (True = attend) or additive, broadcastable to (B, H, Lq, Lk), or None.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # (B, Hkv, L, D) -> (B, H, L, D); autograd sums the heads' gradients back
        b, hkv, length, dim = key.shape
        key = key[:, :, None].expand(b, hkv, groups, length, dim).reshape(b, hkv * groups, length, dim)
        value = value[:, :, None].expand(b, hkv, groups, length, dim).reshape(b, hkv * groups, length, dim)
    return MathAttentionFunction.apply(query, key, value, mask, scale)
