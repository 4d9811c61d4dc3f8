"""Fused per-head RMSNorm + rotary embedding (Gemma 4's q_norm/k_norm followed by RoPE).

Forward, for one head row x of length D (D even, half = D/2), weight w, and the cos/sin rows
of its token (shared by all heads):

    r = (mean(x^2) + eps)^-1/2                          fp32
    h = cast(x * r * w)                                  rounded to the input dtype (as transformers)
    y = h * cos + rotate_half(h) * sin,   rotate_half(h) = [-h2, h1]
      y1 = h1*c1 - h2*s1,   y2 = h2*c2 + h1*s2           each product and the sum rounded to the dtype

How this differs from its nearest relatives: Gemma 4's RMSNorm scales by `w` (weights start at
one), not Gemma 2/3's `1 + w`, and the norm is taken per head (last axis), not per token.
transformers casts the normed head back to the input dtype BEFORE RoPE and does RoPE in that
dtype; the kernel reproduces both roundings, so forward agrees bit for bit up to the one-ulp
differences that the order of the sum in mean(x^2) can cause.

Backward, with dy the upstream gradient (the cast to the dtype is treated as the identity):

    dh1 = dy1*c1 + dy2*s2,   dh2 = dy2*c2 - dy1*s1       (transpose of the rotation)
    n   = x * r,   dn = dh * w
    dw  = sum over all rows of dh * n
    dx  = r * (dn - n * mean(dn * n))

Both Gemma 4 layer kinds go through the same code: sliding layers use default RoPE (theta 1e4,
head_dim 256); full layers use "proportional" partial RoPE (factor 0.25, theta 1e6, head_dim
512), where transformers pads inv_freq with zeros, so cos = 1 and sin = 0 on 3/4 of the dims.
The kernel takes cos/sin as transformers computes them (B or 1, S, D) and stays model-agnostic.

References: Zhang & Sennrich 2019 (RMSNorm); Su et al. 2021 (RoFormer); transformers
models/gemma4/modeling_gemma4.py (Gemma4RMSNorm, apply_rotary_pos_emb); Liger Kernel's
rms_norm and rope ops (one program per token, all heads in one tile; partial dw per program).

Layout: a program takes a tile of BLOCK_T tokens x BLOCK_H heads x half the head dim: all
heads of a few tokens when they fit (cos/sin then loaded once per token for all its heads,
and small K projections of 1-2 heads still give a program enough elements), a group of heads
of one token when a token's heads alone exceed the tile (head dim 512). The backward runs one
program per tile, or, when dw is wanted, a fixed number of programs that loop over tiles, each
writing its fp32 part of dw; `_weight_grad` sums them.

qk_norm_rope_pair runs a layer's query and key in one launch each way (the first programs take
the query's tiles, the rest the key's). Gemma 4's keys have 1-2 heads: alone, E2B's 1x256 key
is too little work to amortise its two launches, and the pair is faster than two calls for both
E2B's and E4B's shapes (benchmarks/kernel_suite.py; figures in benchmarks/results/README.md).

Precision plan: loads are upcast to fp32, the sum of squares, r, and all backward math are in
fp32; dw is accumulated in fp32 per program and summed in fp32 across programs. Forward
roundings to the dtype mirror transformers; the backward keeps dh in fp32 (transformers rounds
it to the dtype), so gradients are slightly more accurate than eager. fp contraction (FMA) is
disabled in the forward so fp32 RoPE rounds like eager PyTorch. Memory: forward saves x (the
q/k projection output, which eager saves too) and r (fp32, one per head row); h, n are
recomputed in backward.
"""
import torch
import triton
import triton.language as tl

from ._backend import use_triton, warps_for_tile
from ._weight_grad import backward_programs, sum_partials

MAX_TILE = 16384  # a tile's elements on the interpreter (CPU), and the largest half head dim
# Launch settings on a GPU: tokens x heads x half head dim per program and elements per warp,
# picked with benchmarks/tune_norm_kernels.py on an H200. Without a weight gradient (frozen
# weight, as under LoRA) the backward runs one program per tile, like the forward; with one,
# a fixed number of programs per SM loop over tiles, each writing one partial dw sum.
FWD_TILE, FWD_ELEMENTS_PER_WARP = 512, 1024
BWD_TILE, BWD_ELEMENTS_PER_WARP = 1024, 1024
DW_TILE, DW_ELEMENTS_PER_WARP, DW_PROGRAMS_PER_SM = 1024, 1024, 4


@triton.jit
def _token_offsets(t, S, stride_b, stride_s):
    """Element offset of token t = b * S + s in a tensor with batch/sequence strides."""
    return (t // S) * stride_b + (t % S) * stride_s


@triton.jit
def _fwd_tile(tile, X, W, COS, SIN, Y, RSTD, sxb, sxs, sxh, scb, scs, n_tokens, S, H, D, HALF, eps,
              BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Forward of one tile: BLOCK_T tokens x BLOCK_H heads (tiles run over heads first)."""
    head_tiles = tl.cdiv(H, BLOCK_H)
    t = (tile // head_tiles).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = (tile % head_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    row_mask = (t < n_tokens)[:, None] & (h < H)[None, :]                      # (T, H)
    mask = row_mask[:, :, None] & (j < HALF)[None, None, :]                     # (T, H, HALF)
    x_ptr = X + (_token_offsets(t, S, sxb, sxs)[:, None] + h[None, :] * sxh)[:, :, None] + j[None, None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2)) / D + eps)  # (T, H)
    w1 = tl.load(W + j, mask=j < HALF, other=0.0).to(tl.float32)[None, None, :]
    w2 = tl.load(W + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)[None, None, :]
    dt = Y.dtype.element_ty
    h1 = (x1 * rstd[:, :, None] * w1).to(dt).to(tl.float32)
    h2 = (x2 * rstd[:, :, None] * w2).to(dt).to(tl.float32)
    c_ptr = _token_offsets(t, S, scb, scs)[:, None] + j[None, :]                # (T, HALF), shared by heads
    c_mask = (t < n_tokens)[:, None] & (j < HALF)[None, :]
    c1 = tl.load(COS + c_ptr, mask=c_mask, other=0.0).to(tl.float32)[:, None, :]
    c2 = tl.load(COS + c_ptr + HALF, mask=c_mask, other=0.0).to(tl.float32)[:, None, :]
    s1 = tl.load(SIN + c_ptr, mask=c_mask, other=0.0).to(tl.float32)[:, None, :]
    s2 = tl.load(SIN + c_ptr + HALF, mask=c_mask, other=0.0).to(tl.float32)[:, None, :]
    # Each product and each sum rounded to the dtype, exactly as eager PyTorch does it.
    y1 = (h1 * c1).to(dt).to(tl.float32) + (-h2 * s1).to(dt).to(tl.float32)
    y2 = (h2 * c2).to(dt).to(tl.float32) + (h1 * s2).to(dt).to(tl.float32)
    rows = t[:, None] * H + h[None, :]                                           # (T, H), y is contiguous
    y_ptr = Y + rows[:, :, None] * D + j[None, None, :]
    tl.store(y_ptr, y1.to(dt), mask=mask)
    tl.store(y_ptr + HALF, y2.to(dt), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _bwd_tile(tile, DY, X, W, COS, SIN, RSTD, DX, sdb, sds, sdh, sxb, sxs, sxh, scb, scs, n_tokens, S, H, D, HALF,
              dw1, dw2, COMPUTE_DW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
              BLOCK_HALF: tl.constexpr):
    """Backward of one tile: writes dx; returns the dw accumulators with this tile added."""
    head_tiles = tl.cdiv(H, BLOCK_H)
    t = ((tile // head_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    h = (tile % head_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    row_mask = (t < n_tokens)[:, None] & (h < H)[None, :]
    mask = row_mask[:, :, None] & (j < HALF)[None, None, :]
    c_ptr = _token_offsets(t, S, scb, scs)[:, None] + j[None, :]
    c_mask = (t < n_tokens)[:, None] & (j < HALF)[None, :]
    c1 = tl.load(COS + c_ptr, mask=c_mask, other=0.0).to(tl.float32)[:, None, :]
    c2 = tl.load(COS + c_ptr + HALF, mask=c_mask, other=0.0).to(tl.float32)[:, None, :]
    s1 = tl.load(SIN + c_ptr, mask=c_mask, other=0.0).to(tl.float32)[:, None, :]
    s2 = tl.load(SIN + c_ptr + HALF, mask=c_mask, other=0.0).to(tl.float32)[:, None, :]
    dy_ptr = DY + (_token_offsets(t, S, sdb, sds)[:, None] + h[None, :] * sdh)[:, :, None] + j[None, None, :]
    dy1 = tl.load(dy_ptr, mask=mask, other=0.0).to(tl.float32)
    dy2 = tl.load(dy_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    x_ptr = X + (_token_offsets(t, S, sxb, sxs)[:, None] + h[None, :] * sxh)[:, :, None] + j[None, None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    rows = t[:, None] * H + h[None, :]
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, :, None]
    w1 = tl.load(W + j, mask=j < HALF, other=0.0).to(tl.float32)[None, None, :]
    w2 = tl.load(W + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)[None, None, :]
    dh1 = dy1 * c1 + dy2 * s2
    dh2 = dy2 * c2 - dy1 * s1
    n1 = x1 * rstd
    n2 = x2 * rstd
    if COMPUTE_DW:
        dw1 += dh1 * n1
        dw2 += dh2 * n2
    dn1 = dh1 * w1
    dn2 = dh2 * w2
    dot = (tl.sum(dn1 * n1, axis=2) + tl.sum(dn2 * n2, axis=2))[:, :, None] / D
    dx_ptr = DX + rows[:, :, None] * D + j[None, None, :]
    tl.store(dx_ptr, (rstd * (dn1 - n1 * dot)).to(DX.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + HALF, (rstd * (dn2 - n2 * dot)).to(DX.dtype.element_ty), mask=mask)
    return dw1, dw2


@triton.jit
def _fwd_kernel(X, W, COS, SIN, Y, RSTD,
                sxb, sxs, sxh, scb, scs, n_tokens, S, H, D, HALF, eps,
                BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    _fwd_tile(tl.program_id(0), X, W, COS, SIN, Y, RSTD, sxb, sxs, sxh, scb, scs, n_tokens, S, H, D, HALF, eps,
              BLOCK_T, BLOCK_H, BLOCK_HALF)


@triton.jit
def _bwd_kernel(DY, X, W, COS, SIN, RSTD, DX, DW_PART,
                sdb, sds, sdh, sxb, sxs, sxh, scb, scs, n_tokens, S, H, D, HALF, n_programs,
                COMPUTE_DW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_HALF: tl.constexpr):
    pid = tl.program_id(0)
    j = tl.arange(0, BLOCK_HALF)
    dw1 = tl.zeros((BLOCK_T, BLOCK_H, BLOCK_HALF), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_T, BLOCK_H, BLOCK_HALF), dtype=tl.float32)
    n_tiles = tl.cdiv(n_tokens, BLOCK_T) * tl.cdiv(H, BLOCK_H)
    # num_stages=1: no software pipelining of this loop; 2 measured no faster (tune_norm_kernels.py)
    for tile in tl.range(pid, n_tiles, n_programs, num_stages=1):
        dw1, dw2 = _bwd_tile(tile, DY, X, W, COS, SIN, RSTD, DX, sdb, sds, sdh, sxb, sxs, sxh, scb, scs,
                             n_tokens, S, H, D, HALF, dw1, dw2, COMPUTE_DW, BLOCK_T, BLOCK_H, BLOCK_HALF)
    if COMPUTE_DW:
        tl.store(DW_PART + pid * D + j, tl.sum(tl.sum(dw1, axis=1), axis=0), mask=j < HALF)
        tl.store(DW_PART + pid * D + HALF + j, tl.sum(tl.sum(dw2, axis=1), axis=0), mask=j < HALF)


@triton.jit
def _fwd_pair_kernel(XQ, WQ, YQ, RSTDQ, sqb, sqs, sqh, HQ, eps_q,
                     XK, WK, YK, RSTDK, skb, sks, skh, HK, eps_k,
                     COS, SIN, scb, scs, n_tokens, S, D, HALF, q_tiles,
                     Q_BLOCK_T: tl.constexpr, Q_BLOCK_H: tl.constexpr, K_BLOCK_T: tl.constexpr,
                     K_BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # The first q_tiles programs take the query's tiles, the rest the key's: one launch for both.
    pid = tl.program_id(0)
    if pid < q_tiles:
        _fwd_tile(pid, XQ, WQ, COS, SIN, YQ, RSTDQ, sqb, sqs, sqh, scb, scs, n_tokens, S, HQ, D, HALF, eps_q,
                  Q_BLOCK_T, Q_BLOCK_H, BLOCK_HALF)
    else:
        _fwd_tile(pid - q_tiles, XK, WK, COS, SIN, YK, RSTDK, skb, sks, skh, scb, scs, n_tokens, S, HK, D, HALF,
                  eps_k, K_BLOCK_T, K_BLOCK_H, BLOCK_HALF)


@triton.jit
def _bwd_pair_kernel(DYQ, XQ, WQ, RSTDQ, DXQ, sdqb, sdqs, sdqh, sqb, sqs, sqh, HQ,
                     DYK, XK, WK, RSTDK, DXK, sdkb, sdks, sdkh, skb, sks, skh, HK,
                     COS, SIN, scb, scs, n_tokens, S, D, HALF, q_tiles,
                     Q_BLOCK_T: tl.constexpr, Q_BLOCK_H: tl.constexpr, K_BLOCK_T: tl.constexpr,
                     K_BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # Frozen weights only (no dw): one tile per program, the query's first.
    pid = tl.program_id(0)
    # (the two branches' unused dw accumulators need different names: their shapes differ)
    if pid < q_tiles:
        no_dw_q = tl.zeros((Q_BLOCK_T, Q_BLOCK_H, BLOCK_HALF), dtype=tl.float32)
        _bwd_tile(pid, DYQ, XQ, WQ, COS, SIN, RSTDQ, DXQ, sdqb, sdqs, sdqh, sqb, sqs, sqh, scb, scs,
                  n_tokens, S, HQ, D, HALF, no_dw_q, no_dw_q, False, Q_BLOCK_T, Q_BLOCK_H, BLOCK_HALF)
    else:
        no_dw_k = tl.zeros((K_BLOCK_T, K_BLOCK_H, BLOCK_HALF), dtype=tl.float32)
        _bwd_tile(pid - q_tiles, DYK, XK, WK, COS, SIN, RSTDK, DXK, sdkb, sdks, sdkh, skb, sks, skh, scb, scs,
                  n_tokens, S, HK, D, HALF, no_dw_k, no_dw_k, False, K_BLOCK_T, K_BLOCK_H, BLOCK_HALF)


def _check_and_blocks(x, weight, cos, sin, tile, elements_per_warp):
    if x.dim() != 4:
        raise ValueError(f"qk_norm_rope wants x of shape (B, S, heads, D), got {tuple(x.shape)}")
    B, S, H, D = x.shape
    if D % 2:
        raise ValueError(f"qk_norm_rope needs an even head dim for rotate_half, got {D}")
    if weight.shape != (D,):
        raise ValueError(f"weight must have shape ({D},), got {tuple(weight.shape)}")
    if any(t.dim() != 3 or t.shape[1:] != (S, D) or t.shape[0] not in (1, B) for t in (cos, sin)):
        raise ValueError(f"cos/sin must have shape ({B} or 1, {S}, {D}), got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise ValueError(f"cos/sin dtype {cos.dtype} must match x dtype {x.dtype} (transformers casts them)")
    block_half = triton.next_power_of_2(D // 2)
    if block_half > MAX_TILE:
        raise ValueError(f"qk_norm_rope: head dim {D} exceeds one tile ({MAX_TILE} elements per half)")
    tile = tile if x.is_cuda else MAX_TILE  # the interpreter pays per program: big tiles
    block_h = min(triton.next_power_of_2(H), max(1, tile // block_half))  # a tile: all heads, or a group of them
    block_t = max(1, tile // (block_h * block_half))
    num_warps = warps_for_tile(block_t * block_h * block_half, elements_per_warp)
    return B, S, H, D, block_t, block_h, block_half, num_warps


def _n_tiles(n_tokens, H, block_t, block_h):
    return triton.cdiv(n_tokens, block_t) * triton.cdiv(H, block_h)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _cos_sin(cos, sin, B, S, D):
    cos, sin = _last_dim_contiguous(cos.expand(B, S, D)), _last_dim_contiguous(sin.expand(B, S, D))
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def qk_norm_rope_forward(x, weight, cos, sin, eps):
    """Returns y (B, S, H, D) contiguous in x's dtype and rstd (B*S, H) fp32."""
    B, S, H, D, block_t, block_h, block_half, num_warps = _check_and_blocks(x, weight, cos, sin, FWD_TILE,
                                                                            FWD_ELEMENTS_PER_WARP)
    x, weight = _last_dim_contiguous(x), weight.contiguous()
    cos, sin = _cos_sin(cos, sin, B, S, D)
    y = torch.empty((B, S, H, D), dtype=x.dtype, device=x.device)
    rstd = torch.empty((B * S, H), dtype=torch.float32, device=x.device)
    if B * S == 0:
        return y, rstd
    _fwd_kernel[(_n_tiles(B * S, H, block_t, block_h),)](x, weight, cos, sin, y, rstd,
                                                 x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
                                                 B * S, S, H, D, D // 2, eps,
                                                 BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half,
                                                 num_warps=num_warps, enable_fp_fusion=False)
    return y, rstd


def qk_norm_rope_backward(dy, x, weight, cos, sin, rstd, compute_dw=True):
    """Returns dx (like x, contiguous) and dw (weight's dtype, or None)."""
    tile, per_warp = (DW_TILE, DW_ELEMENTS_PER_WARP) if compute_dw else (BWD_TILE, BWD_ELEMENTS_PER_WARP)
    B, S, H, D, block_t, block_h, block_half, num_warps = _check_and_blocks(x, weight, cos, sin, tile, per_warp)
    dy, x = _last_dim_contiguous(dy), _last_dim_contiguous(x)
    cos, sin = _cos_sin(cos, sin, B, S, D)
    n_tokens = B * S
    dx = torch.empty((B, S, H, D), dtype=x.dtype, device=x.device)
    if n_tokens == 0:
        return dx, (torch.zeros_like(weight) if compute_dw else None)
    programs = backward_programs(x.device, _n_tiles(n_tokens, H, block_t, block_h), compute_dw, DW_PROGRAMS_PER_SM)
    dw_part = torch.empty((programs, D), dtype=torch.float32, device=x.device) if compute_dw else rstd
    _bwd_kernel[(programs,)](dy, x, weight, cos, sin, rstd, dx, dw_part,
                             dy.stride(0), dy.stride(1), dy.stride(2), x.stride(0), x.stride(1), x.stride(2),
                             cos.stride(0), cos.stride(1), n_tokens, S, H, D, D // 2, programs,
                             COMPUTE_DW=compute_dw, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half,
                             num_warps=num_warps)
    return dx, (sum_partials(dw_part, weight) if compute_dw else None)


class QKNormRoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps):
        y, rstd = qk_norm_rope_forward(x, weight, cos, sin, eps)
        ctx.save_for_backward(x, weight, cos, sin, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, cos, sin, rstd = ctx.saved_tensors
        dx, dw = qk_norm_rope_backward(dy, x, weight, cos, sin, rstd, compute_dw=ctx.needs_input_grad[1])
        return dx, dw, None, None, None


def _check_pair(q, k):
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or q.dtype != k.dtype:
        raise ValueError("qk_norm_rope_pair wants q and k of shape (B, S, heads, D) with the same B, S, D and dtype, "
                         f"got {tuple(q.shape)} {q.dtype} and {tuple(k.shape)} {k.dtype}")


def qk_norm_rope_pair_forward(q, q_weight, q_eps, k, k_weight, k_eps, cos, sin):
    """The query's and the key's norm + RoPE in one launch. Returns (y_q, rstd_q, y_k, rstd_k)."""
    _check_pair(q, k)
    B, S, Hq, D, qt, qh, half, q_warps = _check_and_blocks(q, q_weight, cos, sin, FWD_TILE, FWD_ELEMENTS_PER_WARP)
    _, _, Hk, _, kt, kh, _, k_warps = _check_and_blocks(k, k_weight, cos, sin, FWD_TILE, FWD_ELEMENTS_PER_WARP)
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos, sin = _cos_sin(cos, sin, B, S, D)
    y_q = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
    y_k = torch.empty((B, S, Hk, D), dtype=k.dtype, device=k.device)
    rstd_q = torch.empty((B * S, Hq), dtype=torch.float32, device=q.device)
    rstd_k = torch.empty((B * S, Hk), dtype=torch.float32, device=k.device)
    if B * S == 0:
        return y_q, rstd_q, y_k, rstd_k
    q_tiles = _n_tiles(B * S, Hq, qt, qh)
    _fwd_pair_kernel[(q_tiles + _n_tiles(B * S, Hk, kt, kh),)](
        q, q_weight.contiguous(), y_q, rstd_q, q.stride(0), q.stride(1), q.stride(2), Hq, q_eps,
        k, k_weight.contiguous(), y_k, rstd_k, k.stride(0), k.stride(1), k.stride(2), Hk, k_eps,
        cos, sin, cos.stride(0), cos.stride(1), B * S, S, D, D // 2, q_tiles,
        Q_BLOCK_T=qt, Q_BLOCK_H=qh, K_BLOCK_T=kt, K_BLOCK_H=kh, BLOCK_HALF=half,
        num_warps=max(q_warps, k_warps), enable_fp_fusion=False)
    return y_q, rstd_q, y_k, rstd_k


def qk_norm_rope_pair_backward(dy_q, q, q_weight, rstd_q, dy_k, k, k_weight, rstd_k, cos, sin):
    """dx of the query and of the key in one launch, for frozen weights (no dw)."""
    _check_pair(q, k)
    B, S, Hq, D, qt, qh, half, q_warps = _check_and_blocks(q, q_weight, cos, sin, BWD_TILE, BWD_ELEMENTS_PER_WARP)
    _, _, Hk, _, kt, kh, _, k_warps = _check_and_blocks(k, k_weight, cos, sin, BWD_TILE, BWD_ELEMENTS_PER_WARP)
    dy_q, q, dy_k, k = (_last_dim_contiguous(t) for t in (dy_q, q, dy_k, k))
    cos, sin = _cos_sin(cos, sin, B, S, D)
    dq = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, S, Hk, D), dtype=k.dtype, device=k.device)
    if B * S == 0:
        return dq, dk
    q_tiles = _n_tiles(B * S, Hq, qt, qh)
    _bwd_pair_kernel[(q_tiles + _n_tiles(B * S, Hk, kt, kh),)](
        dy_q, q, q_weight, rstd_q, dq, dy_q.stride(0), dy_q.stride(1), dy_q.stride(2),
        q.stride(0), q.stride(1), q.stride(2), Hq,
        dy_k, k, k_weight, rstd_k, dk, dy_k.stride(0), dy_k.stride(1), dy_k.stride(2),
        k.stride(0), k.stride(1), k.stride(2), Hk,
        cos, sin, cos.stride(0), cos.stride(1), B * S, S, D, D // 2, q_tiles,
        Q_BLOCK_T=qt, Q_BLOCK_H=qh, K_BLOCK_T=kt, K_BLOCK_H=kh, BLOCK_HALF=half, num_warps=max(q_warps, k_warps))
    return dq, dk


class QKNormRoPEPairFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, q_weight, q_eps, k, k_weight, k_eps, cos, sin):
        y_q, rstd_q, y_k, rstd_k = qk_norm_rope_pair_forward(q, q_weight, q_eps, k, k_weight, k_eps, cos, sin)
        ctx.save_for_backward(q, q_weight, rstd_q, k, k_weight, rstd_k, cos, sin)
        return y_q, y_k

    @staticmethod
    def backward(ctx, dy_q, dy_k):
        q, q_weight, rstd_q, k, k_weight, rstd_k, cos, sin = ctx.saved_tensors
        q_dw, k_dw = ctx.needs_input_grad[1], ctx.needs_input_grad[4]
        if q_dw or k_dw:  # a norm weight trains: each through its own backward, which sums dw
            dq, dw_q = qk_norm_rope_backward(dy_q, q, q_weight, cos, sin, rstd_q, compute_dw=q_dw)
            dk, dw_k = qk_norm_rope_backward(dy_k, k, k_weight, cos, sin, rstd_k, compute_dw=k_dw)
        else:
            (dq, dk), dw_q, dw_k = qk_norm_rope_pair_backward(dy_q, q, q_weight, rstd_q, dy_k, k, k_weight, rstd_k,
                                                              cos, sin), None, None
        return dq, dw_q, None, dk, dw_k, None, None, None


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def qk_norm_rope_reference(x, weight, cos, sin, eps=1e-6):
    """Eager PyTorch, op for op as transformers' Gemma4RMSNorm + apply_rotary_pos_emb(unsqueeze_dim=2)."""
    xf = x.float()
    normed = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    h = (normed * weight.float()).type_as(x)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return (h * cos) + (rotate_half(h) * sin)


def qk_norm_rope(x, weight, cos, sin, eps=1e-6):
    """Per-head RMSNorm (Gemma 4: scale by w) then RoPE. x (B, S, heads, D), cos/sin (B or 1, S, D)."""
    if use_triton(x, weight, cos, sin):
        return QKNormRoPEFunction.apply(x, weight, cos, sin, eps)
    return qk_norm_rope_reference(x, weight, cos, sin, eps)


def qk_norm_rope_pair(q, q_weight, k, k_weight, cos, sin, q_eps=1e-6, k_eps=1e-6):
    """qk_norm_rope of a query and a key (same tokens and head dim, any head counts), one launch
    for both each way: Gemma 4's keys have 1-2 heads, too little work for launches of their own."""
    if use_triton(q, q_weight, k, k_weight, cos, sin):
        return QKNormRoPEPairFunction.apply(q, q_weight, q_eps, k, k_weight, k_eps, cos, sin)
    return qk_norm_rope_reference(q, q_weight, cos, sin, q_eps), qk_norm_rope_reference(k, k_weight, cos, sin, k_eps)
