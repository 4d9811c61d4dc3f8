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

Precision plan: loads are upcast to fp32, the sum of squares, r, and all backward math are in
fp32; dw is accumulated in fp32 per program and summed in fp32 on the host. Forward roundings
to the dtype mirror transformers; the backward keeps dh in fp32 (transformers rounds it to the
dtype), so gradients are slightly more accurate than eager. fp contraction (FMA) is disabled in
the forward so fp32 RoPE rounds like eager PyTorch. Memory: forward saves x (the q/k projection
output, which eager saves too) and r (fp32, one per head row); h, n are recomputed in backward.
"""
import torch
import triton
import triton.language as tl

from ._backend import use_triton

MAX_TILE = 16384  # heads * half elements held in registers per program


@triton.jit
def _fwd_kernel(X, W, COS, SIN, Y, RSTD,
                sxb, sxs, sxh, scb, scs, S, H, D, HALF, eps,
                BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    b = t // S
    s = t % S
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    mask = (h < H)[:, None] & (j < HALF)[None, :]
    x_ptr = X + b * sxb + s * sxs + h[:, None] * sxh + j[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
    w1 = tl.load(W + j, mask=j < HALF, other=0.0).to(tl.float32)
    w2 = tl.load(W + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
    dt = Y.dtype.element_ty
    h1 = (x1 * rstd[:, None] * w1[None, :]).to(dt).to(tl.float32)
    h2 = (x2 * rstd[:, None] * w2[None, :]).to(dt).to(tl.float32)
    c_off = b * scb + s * scs + j
    c1 = tl.load(COS + c_off, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + c_off + HALF, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + c_off, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + c_off + HALF, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    # Each product and each sum rounded to the dtype, exactly as eager PyTorch does it.
    y1 = (h1 * c1).to(dt).to(tl.float32) + (-h2 * s1).to(dt).to(tl.float32)
    y2 = (h2 * c2).to(dt).to(tl.float32) + (h1 * s2).to(dt).to(tl.float32)
    y_ptr = Y + t * H * D + h[:, None] * D + j[None, :]
    tl.store(y_ptr, y1.to(dt), mask=mask)
    tl.store(y_ptr + HALF, y2.to(dt), mask=mask)
    tl.store(RSTD + t * H + h, rstd, mask=h < H)


@triton.jit
def _bwd_kernel(DY, X, W, COS, SIN, RSTD, DX, DW_PART,
                sdb, sds, sdh, sxb, sxs, sxh, scb, scs, S, H, D, HALF, n_tokens, tokens_per_program,
                COMPUTE_DW: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    mask = (h < H)[:, None] & (j < HALF)[None, :]
    w1 = tl.load(W + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(W + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    dw1 = tl.zeros((BLOCK_HALF,), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_HALF,), dtype=tl.float32)
    start = pid.to(tl.int64) * tokens_per_program
    for i in range(0, tl.minimum(tokens_per_program, n_tokens - start)):
        t = start + i
        b = t // S
        s = t % S
        c_off = b * scb + s * scs + j
        c1 = tl.load(COS + c_off, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(COS + c_off + HALF, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(SIN + c_off, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(SIN + c_off + HALF, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
        dy_ptr = DY + b * sdb + s * sds + h[:, None] * sdh + j[None, :]
        dy1 = tl.load(dy_ptr, mask=mask, other=0.0).to(tl.float32)
        dy2 = tl.load(dy_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        x_ptr = X + b * sxb + s * sxs + h[:, None] * sxh + j[None, :]
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + t * H + h, mask=h < H, other=0.0)[:, None]
        dh1 = dy1 * c1 + dy2 * s2
        dh2 = dy2 * c2 - dy1 * s1
        n1 = x1 * rstd
        n2 = x2 * rstd
        if COMPUTE_DW:
            dw1 += tl.sum(dh1 * n1, axis=0)
            dw2 += tl.sum(dh2 * n2, axis=0)
        dn1 = dh1 * w1
        dn2 = dh2 * w2
        dot = (tl.sum(dn1 * n1, axis=1) + tl.sum(dn2 * n2, axis=1))[:, None] / D
        dx_ptr = DX + t * H * D + h[:, None] * D + j[None, :]
        tl.store(dx_ptr, (rstd * (dn1 - n1 * dot)).to(DX.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + HALF, (rstd * (dn2 - n2 * dot)).to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PART + pid * D + j, dw1, mask=j < HALF)
        tl.store(DW_PART + pid * D + HALF + j, dw2, mask=j < HALF)


def _check_and_blocks(x, weight, cos, sin):
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
    block_h, block_half = triton.next_power_of_2(H), triton.next_power_of_2(D // 2)
    if block_h * block_half > MAX_TILE:
        raise ValueError(f"qk_norm_rope: {H} heads x head dim {D} exceed one tile ({MAX_TILE} elements per half)")
    num_warps = 4 if block_h * block_half <= 2048 else 8
    return B, S, H, D, block_h, block_half, num_warps


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def qk_norm_rope_forward(x, weight, cos, sin, eps):
    """Returns y (B, S, H, D) contiguous in x's dtype and rstd (B*S, H) fp32."""
    B, S, H, D, block_h, block_half, num_warps = _check_and_blocks(x, weight, cos, sin)
    x, weight = _last_dim_contiguous(x), weight.contiguous()
    cos, sin = _last_dim_contiguous(cos.expand(B, S, D)), _last_dim_contiguous(sin.expand(B, S, D))
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty((B, S, H, D), dtype=x.dtype, device=x.device)
    rstd = torch.empty((B * S, H), dtype=torch.float32, device=x.device)
    if B * S == 0:
        return y, rstd
    _fwd_kernel[(B * S,)](x, weight, cos, sin, y, rstd,
                          x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
                          S, H, D, D // 2, eps, BLOCK_H=block_h, BLOCK_HALF=block_half,
                          num_warps=num_warps, enable_fp_fusion=False)
    return y, rstd


def qk_norm_rope_backward(dy, x, weight, cos, sin, rstd, compute_dw=True):
    """Returns dx (like x, contiguous) and dw (weight's dtype, or None)."""
    B, S, H, D, block_h, block_half, num_warps = _check_and_blocks(x, weight, cos, sin)
    dy, x = _last_dim_contiguous(dy), _last_dim_contiguous(x)
    cos, sin = _last_dim_contiguous(cos.expand(B, S, D)), _last_dim_contiguous(sin.expand(B, S, D))
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    n_tokens = B * S
    dx = torch.empty((B, S, H, D), dtype=x.dtype, device=x.device)
    if n_tokens == 0:
        return dx, (torch.zeros_like(weight) if compute_dw else None)
    progs = torch.cuda.get_device_properties(x.device).multi_processor_count * 4 if x.is_cuda else 4
    tokens_per_program = triton.cdiv(n_tokens, min(progs, n_tokens))
    grid = triton.cdiv(n_tokens, tokens_per_program)
    dw_part = torch.empty((grid, D), dtype=torch.float32, device=x.device) if compute_dw else rstd
    _bwd_kernel[(grid,)](dy, x, weight, cos, sin, rstd, dx, dw_part,
                         dy.stride(0), dy.stride(1), dy.stride(2), x.stride(0), x.stride(1), x.stride(2),
                         cos.stride(0), cos.stride(1), S, H, D, D // 2, n_tokens, tokens_per_program,
                         COMPUTE_DW=compute_dw, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps)
    dw = dw_part.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dw


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
