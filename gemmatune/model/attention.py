"""Attention where SDPA is slow or wasteful for Gemma 4 training.

Full-attention layers (head_dim 512): PyTorch's flash and cuDNN attention kernels stop at
head_dim 256, so SDPA runs them through its memory-efficient kernel, whose backward is slow
at that width (benchmarks/overhead.py; the figures are in benchmarks/results/README.md).
At training lengths the score matrix is small (8 heads x 2048 x 2048 in fp32 is
128 MiB), so "math" attention, two matmuls and a softmax, is several times faster.
`attention_math` computes what transformers' `eager_attention_forward` does, with the
precision of SDPA's fused kernels: scores and their gradient come out of the matmul in
fp32 (eager rounds them to bf16, many times SDPA's error at head_dim 512),
softmax in fp32, probabilities cast to the input dtype for the P @ V matmul. It is an
autograd function that saves only the probabilities for the backward.
`use_math_attention` says when the scores are small enough to materialise.

Sliding-window layers (window 512): transformers hands SDPA a seq x seq mask, so every
score is computed and most are thrown away, and the mask itself costs seq^2 bytes.
`sliding_window_attention` computes only the window: through FlashAttention-2's window
arguments where PyTorch ships it (CUDA, sm80+, fp16/bf16), otherwise block by block. The
FlashAttention path is as fast as masked SDPA at training lengths and saves the masks; the block
path is not known to be fast, so training uses it only where no mask can be built for it.

Math-attention backward, P = softmax(S), O = P @ V, dO the upstream gradient:

    dV = P^T @ dO
    dP = dO @ V^T
    dS = P * (dP - rowsum(dO * O))          (rowsum(dP * P) == rowsum(dO * O))
    dQ = scale * dS @ K,   dK = scale * dS^T @ Q
"""
import functools

import torch
import torch.nn.functional as F

MATH_SCORES_BUDGET = 256 * 2**20  # bytes of fp32 scores one call may hold


def use_math_attention(query: torch.Tensor, key: torch.Tensor, min_head_dim: int = 257) -> bool:
    """Math attention where SDPA has no fast kernel and the scores fit the budget."""
    batch, heads, q_len, head_dim = query.shape
    return head_dim >= min_head_dim and batch * heads * q_len * key.shape[-2] * 4 <= MATH_SCORES_BUDGET


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with the result in fp32 (fp64 for fp64 inputs). Scores and their gradients must
    not be rounded to bf16/fp16: Gemma 4 attends with scale 1 after q/k norms, so at head_dim
    512 scores reach the hundreds, where bf16's step is 1 or more (what SDPA's kernels avoid).
    On CUDA the matmul writes fp32 directly from half inputs (no upcast copies)."""
    f32 = _softmax_dtype(a.dtype)
    if a.dtype == f32:
        return torch.matmul(a, b)
    if a.is_cuda and _bmm_writes_fp32(a.device, a.dtype):  # same leading (batch, head) dims
        out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=f32)
        return out.view(*a.shape[:-2], a.shape[-2], b.shape[-1])
    return torch.matmul(a.to(f32), b.to(f32))


@functools.cache
def _bmm_writes_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """torch.bmm(..., out_dtype=torch.float32) exists for these half inputs (PyTorch >= 2.8 on CUDA)."""
    try:
        with torch.no_grad():
            x = torch.ones(1, 2, 2, device=device, dtype=dtype)
            return torch.bmm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def _scores_and_probs(q, k, mask, scale):
    scores = _matmul_fp32(q, k.transpose(-1, -2)).mul_(scale)
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
        d_probs = _matmul_fp32(d_out, v.transpose(-1, -2))
        d_scores = (probs.to(f32) * (d_probs.to(f32) - delta)).mul_(ctx.scale).to(q.dtype)
        dq = torch.matmul(d_scores, k)
        dk = torch.matmul(d_scores.transpose(-1, -2), q)
        dv = torch.matmul(probs.transpose(-1, -2), d_out)
        return dq, dk, dv, None, None


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv*groups, L, D); autograd sums the heads' gradients back."""
    if groups == 1:
        return t
    b, hkv, length, dim = t.shape
    return t[:, :, None].expand(b, hkv, groups, length, dim).reshape(b, hkv * groups, length, dim)


def sliding_window_attention(query, key, value, window: int, scale: float) -> torch.Tensor:
    """Causal attention where query i sees keys (i - window, i] (transformers' sliding window).

    query (B, L, H, D), key/value (B, L, Hkv, D) with H a multiple of Hkv; returns (B, L, H, D).
    Work and memory grow with seq x window instead of seq^2, and no seq x seq mask is built.
    """
    if flash_window_works(query):
        return FlashWindowAttention.apply(query, key, value, window, scale)
    out = sliding_window_blocks(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), window, scale)
    return out.transpose(1, 2)


def sliding_window_blocks(query, key, value, window: int, scale: float) -> torch.Tensor:
    """The sliding window with plain SDPA, one block of `window` queries at a time against
    the keys it can see (at most 2 * window - 1). (B, H, L, D) layout; K/V may have fewer heads."""
    groups = query.shape[1] // key.shape[1]
    key, value = _expand_kv(key, groups), _expand_kv(value, groups)
    length = query.shape[2]
    blocks = []
    for start in range(0, length, window):
        end = min(length, start + window)
        first = max(0, start - window)  # one key more than the window needs: 2 * window keys
        # keep the shapes aligned for SDPA's fused kernels; the mask excludes that key
        q_pos = torch.arange(start, end, device=query.device)[:, None]
        k_pos = torch.arange(first, end, device=query.device)[None, :]
        mask = (k_pos <= q_pos) & (k_pos > q_pos - window)
        blocks.append(F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, first:end],
                                                     value[:, :, first:end], attn_mask=mask, scale=scale))
    return torch.cat(blocks, dim=2)


def _flash_forward(query, key, value, window, scale):
    # Private ATen op (what SDPA's flash path calls), used for its window arguments: query i
    # sees keys [i - (window - 1), i]. (B, L, H, D) layout, grouped-query heads supported.
    out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
        query, key, value, None, None, query.shape[1], key.shape[1], 0.0, True, False,
        scale=scale, window_size_left=window - 1, window_size_right=0)
    return out, lse, rng_state, unused


class FlashWindowAttention(torch.autograd.Function):
    """FlashAttention-2 with a causal window: tiles outside the window are skipped."""

    @staticmethod
    def forward(ctx, query, key, value, window, scale):
        out, lse, rng_state, unused = _flash_forward(query, key, value, window, scale)
        ctx.save_for_backward(query, key, value, out, lse, rng_state, unused)
        ctx.window, ctx.scale = window, scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        query, key, value, out, lse, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            d_out.contiguous(), query, key, value, out, lse, None, None, query.shape[1], key.shape[1],
            0.0, True, rng_state, unused, scale=ctx.scale, window_size_left=ctx.window - 1, window_size_right=0)
        return dq, dk, dv, None, None


def flash_window_works(query: torch.Tensor) -> bool:
    """FlashAttention-2 with a window is usable for this (B, L, H, D) query: head_dim <= 256
    and a multiple of 8, and flash_window_available for its device and dtype."""
    head_dim = query.shape[-1]
    return head_dim <= 256 and head_dim % 8 == 0 and flash_window_available(query.device, query.dtype)


def flash_window_available(device: torch.device, dtype: torch.dtype) -> bool:
    """A CUDA sm80+ GPU, fp16/bf16, and this PyTorch build's private flash op takes window
    arguments and runs (checked once per device and dtype on a tiny input, so a changed
    private API falls back to masks instead of failing a training run)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _flash_window_probe(device, dtype)


@functools.cache
def _flash_window_probe(device: torch.device, dtype: torch.dtype) -> bool:
    # The ops are called directly, not through autograd: this may run inside a checkpointed
    # layer's forward, whose saved-tensor hooks must not see the probe's tensors.
    if torch.cuda.get_device_capability(device)[0] < 8:
        return False
    try:
        with torch.no_grad():
            q = torch.randn(1, 2, 8, 8, device=device, dtype=dtype)
            out, lse, rng_state, unused = _flash_forward(q, q, q, 2, 1.0)
            grads = torch.ops.aten._flash_attention_backward(
                torch.ones_like(out), q, q, q, out, lse, None, None, 2, 2, 0.0, True, rng_state, unused,
                scale=1.0, window_size_left=1, window_size_right=0)
        return bool(torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads))
    except (RuntimeError, TypeError, AttributeError):
        return False


def attention_math(query, key, value, mask, scale: float) -> torch.Tensor:
    """softmax(scale * Q K^T + mask) V; K/V may have fewer heads than Q (grouped-query).

    query (B, H, Lq, D), key/value (B, Hkv, Lk, D) with H a multiple of Hkv, mask bool
    (True = attend) or additive, broadcastable to (B, H, Lq, Lk), or None.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = _expand_kv(key, groups), _expand_kv(value, groups)
    return MathAttentionFunction.apply(query, key, value, mask, scale)
