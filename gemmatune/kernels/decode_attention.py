"""Attention of one new token per row over a static KV cache (decoding), in two launches.

    out[b, h] = softmax(scale * q[b, h] . K[b, h // G]^T, over the keys where mask[b] is True) @ V[b, h // G]

q (B, H, 1, D), K and V (B, H_kv, L, D) with G = H / H_kv query heads per KV head (transformers'
repeat_kv), mask (B, L) boolean (True: attend). Returns (B, 1, H, D), the layout transformers'
attention functions return.

Why: at one query token the stock SDPA kernels are built for long queries: cuDNN's flash kernel
(sliding layers) and the memory-efficient one (full layers, head_dim 512) take several times
what reading 128-512 KiB of cache needs (benchmarks/profile_decode.py; figures in
benchmarks/results/README.md). Flash-decoding (Dao et al. 2023) splits the cache instead:

1. `_chunk_kernel`, one program per (row, KV head, chunk of CHUNK keys), for all G query heads
   that share the KV head (the K/V tile is read once for them): scores by tl.dot, the chunk's
   running maximum m, sum of exponentials l and unnormalised output o = p @ V, written to an
   fp32 workspace. Keys the mask excludes are not loaded (the cache beyond the current token, the
   sliding window, left padding).
2. `_combine_kernel`, one program per (row, query head): out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c.

Precision plan: scores with fp32 accumulation (fp32 inputs: IEEE products, no TF32), softmax in
fp32; the probabilities are rounded to V's dtype before p @ V (as the flash SDPA kernels do; in
fp32 nothing is rounded), fp32 accumulation and combine, one rounding of out. Reference:
`decode_attention_reference` (transformers' eager attention: repeat_kv, matmul, fp32 softmax).
"""
import torch
import triton
import triton.language as tl

from ._backend import use_triton

MAX_HEAD_DIM = 512  # Gemma 4's full-attention layers; sliding layers have 256
NUM_WARPS = 4
_DOT_PRECISION = {torch.float32: "ieee", torch.float16: "tf32", torch.bfloat16: "tf32"}  # fp16/bf16: ignored


@triton.jit
def _chunk_kernel(Q, K, V, MASK, PART_O, PART_M, PART_L, L, n_chunks, scale,
                  stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl, stride_mb,
                  G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                  CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    bh, c = tl.program_id(0), tl.program_id(1)  # (row, KV head), chunk of keys
    b, kv = bh // HKV, bh % HKV
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    keys = c * CHUNK + tl.arange(0, CHUNK)
    g_mask, d_mask = g < G, d < D
    attend = tl.load(MASK + b.to(tl.int64) * stride_mb + keys, mask=keys < L, other=0) != 0
    q = tl.load(Q + b.to(tl.int64) * stride_qb + (kv * G + g)[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    kv_mask = attend[:, None] & d_mask[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kb + kv * stride_kh + keys[:, None].to(tl.int64) * stride_kl + d[None, :],
                mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_G, CHUNK) fp32
    s = tl.where(attend[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)
    p = tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None])  # a chunk with no key: p = 0
    v = tl.load(V + b.to(tl.int64) * stride_vb + kv * stride_vh + keys[:, None].to(tl.int64) * stride_vl + d[None, :],
                mask=kv_mask, other=0.0)
    o = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # (BLOCK_G, BLOCK_D) fp32
    row = (bh * n_chunks + c) * G + g  # workspace row of each query head
    tl.store(PART_M + row, m, mask=g_mask)
    tl.store(PART_L + row, tl.sum(p, axis=1), mask=g_mask)
    tl.store(PART_O + row[:, None].to(tl.int64) * D + d[None, :], o, mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _combine_kernel(PART_O, PART_M, PART_L, OUT, n_chunks, stride_ob, stride_oh,
                    G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)  # (row, query head)
    b, h = pid // (HKV * G), pid % (HKV * G)
    c = tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    c_mask, d_mask = c < n_chunks, d < D
    row = ((b * HKV + h // G) * n_chunks + c) * G + h % G
    m = tl.load(PART_M + row, mask=c_mask, other=float("-inf"))
    top = tl.max(m, axis=0)  # finite: the token attends at least to itself
    weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
    total = tl.sum(weight * tl.load(PART_L + row, mask=c_mask, other=0.0), axis=0)
    o = tl.load(PART_O + row[:, None].to(tl.int64) * D + d[None, :], mask=c_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(weight[:, None] * o, axis=0) / total
    tl.store(OUT + b.to(tl.int64) * stride_ob + h * stride_oh + d, out.to(OUT.dtype.element_ty), mask=d_mask)


def chunk_keys(head_dim: int) -> int:
    """Keys per program: 64, or 32 above head_dim 256, so that a chunk's K and V tiles (2 x 64 KiB
    in bf16 at head_dim 512) fit in shared memory beside the dot products' staging."""
    return 64 if head_dim <= 256 else 32


def decode_attention_supported(query, key, value, mask) -> bool:
    """One query token, a boolean (B, 1, 1, L) mask, heads that divide evenly, a head_dim the
    tiles are sized for, and a device/dtype where Triton runs."""
    if query.dim() != 4 or query.shape[2] != 1 or mask is None or mask.dtype != torch.bool:
        return False
    b, heads, _, dim = query.shape
    if key.shape != value.shape or key.shape[0] != b or key.shape[-1] != dim or heads % key.shape[1]:
        return False
    if mask.shape != (b, 1, 1, key.shape[2]) or not 16 <= dim <= MAX_HEAD_DIM or query.dtype != key.dtype:
        return False
    return use_triton(query, key, value)


def decode_attention_forward(query, key, value, mask, scale: float) -> torch.Tensor:
    """Launch the two kernels; see the module docstring for the shapes."""
    b, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    chunk = chunk_keys(dim)
    n_chunks = triton.cdiv(length, chunk)
    mask2 = mask.reshape(b, length)
    part_o = torch.empty((b * kv_heads * n_chunks * group, dim), dtype=torch.float32, device=query.device)
    part_m = torch.empty(b * kv_heads * n_chunks * group, dtype=torch.float32, device=query.device)
    part_l = torch.empty_like(part_m)
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    q = query if query.stride(-1) == 1 else query.contiguous()
    _chunk_kernel[(b * kv_heads, n_chunks)](
        q, key, value, mask2, part_o, part_m, part_l, length, n_chunks, float(scale),
        q.stride(0), q.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), mask2.stride(0),
        G=group, HKV=kv_heads, D=dim, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=triton.next_power_of_2(dim), CHUNK=chunk, PRECISION=_DOT_PRECISION[query.dtype],
        num_warps=NUM_WARPS)
    out = torch.empty((b, 1, heads, dim), dtype=query.dtype, device=query.device)
    _combine_kernel[(b * heads,)](
        part_o, part_m, part_l, out, n_chunks, out.stride(0), out.stride(2),
        G=group, HKV=kv_heads, D=dim, BLOCK_C=triton.next_power_of_2(n_chunks), BLOCK_D=triton.next_power_of_2(dim),
        num_warps=NUM_WARPS)
    return out


def decode_attention_reference(query, key, value, mask, scale: float) -> torch.Tensor:
    """transformers' eager attention (repeat_kv, matmul, fp32 softmax rounded to q's dtype, matmul)."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def decode_attention(query, key, value, mask, scale: float) -> torch.Tensor:
    """(B, 1, H, D) attention output of one query token per row; the reference where the
    kernels do not apply (decode_attention_supported)."""
    if decode_attention_supported(query, key, value, mask):
        return decode_attention_forward(query, key, value, mask, scale)
    return decode_attention_reference(query, key, value, mask, scale)
