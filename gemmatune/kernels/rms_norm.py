"""Gemma 4 RMSNorm, forward and backward, as Triton kernels with a PyTorch reference.

Math, per row x of length H (w is optional: Gemma 4's v_norm has no weight):

    r    = (mean(x^2) + eps) ** -0.5          rstd, saved per row for the backward
    xhat = x * r
    y    = xhat * w                           (y = xhat without a weight)

    dxhat = dy * w                            (dy without a weight)
    dx    = r * (dxhat - xhat * mean(dxhat * xhat))
    dw    = sum over rows of dy * xhat

How it differs from its nearest relatives: Gemma 4's weight starts at one and multiplies
directly; Gemma 2/3 scale by (1 + w). Like Gemma 2/3 (and unlike Llama), the whole product,
weight included, is computed in fp32 and cast to x.dtype once at the end: exactly
`transformers.models.gemma4.modeling_gemma4.Gemma4RMSNorm`.

References: Zhang & Sennrich 2019 (RMSNorm); the Triton layer-norm tutorial (whole rows per
program in the forward; per-program partial weight gradients reduced afterwards); Liger Kernel's
rms_norm (the "gemma" casting mode, offset 0 here).

Precision plan: x, w and dy are loaded and cast to fp32; every sum, the rstd and the product
are fp32; y and dx are cast to x.dtype on store. rstd is stored in fp32 (4 bytes a row) and
xhat is recomputed in the backward instead of being saved. dw is accumulated in fp32 per
program over its rows, written as fp32 partial sums (programs x H) and summed in fp32 by a
second small kernel that casts to w.dtype on store (`_weight_grad`).
"""
import torch
import triton
import triton.language as tl

from ._backend import use_triton, warps_for_tile
from ._weight_grad import backward_programs, sum_partials

MAX_HIDDEN = 16384  # one row lives in registers; beyond this the reference is the right tool
# Launch settings on a GPU (elements per program and per warp), picked with
# benchmarks/tune_norm_kernels.py on an H200. Without a weight gradient (frozen weight, as
# under LoRA) the backward runs one program per tile, like the forward. With one, it runs a
# fixed number of programs per SM that loop over tiles, each writing one partial dw sum.
FWD_TILE, FWD_ELEMENTS_PER_WARP = 4096, 1024
BWD_TILE, BWD_ELEMENTS_PER_WARP = 2048, 1024
DW_TILE, DW_ELEMENTS_PER_WARP, DW_PROGRAMS_PER_SM = 8192, 2048, 2


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, x_row_stride, w_ptr, y_ptr, y_row_stride, rstd_ptr, n_rows, n_cols, eps,
    HAS_WEIGHT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # One tile of BLOCK_ROWS full rows per program.
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, dy_row_stride, x_ptr, x_row_stride, w_ptr, rstd_ptr, dx_ptr, dx_row_stride,
    dw_partial_ptr, n_rows, n_cols, n_programs,
    HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # Grid-stride loop over tiles of BLOCK_ROWS rows (one tile per program without dw); dw is
    # summed per program, in fp32.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    dw_acc = tl.zeros([BLOCK_ROWS, BLOCK], dtype=tl.float32)
    # num_stages=1: no software pipelining of this loop; 2 measured no faster (tune_norm_kernels.py)
    for tile in tl.range(pid, tl.cdiv(n_rows, BLOCK_ROWS), n_programs, num_stages=1):
        rows = (tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        mask = (rows[:, None] < n_rows) & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)
        xhat = x * rstd[:, None]
        if HAS_WEIGHT:
            dxhat = dy * w
            if COMPUTE_DW:
                dw_acc += dy * xhat
        else:
            dxhat = dy
        dot = tl.sum(dxhat * xhat, axis=1) / n_cols
        dx = (dxhat - xhat * dot[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows[:, None] * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


def _launch_settings(n_cols: int, device: torch.device, tile: int, elements_per_warp: int):
    """(BLOCK_ROWS, BLOCK, num_warps). On a GPU a program holds about `tile` elements (several rows
    for head_dim 256/512); the interpreter pays per program, so it gets big tiles."""
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {n_cols} > {MAX_HIDDEN} is not supported by the Triton kernel")
    block = triton.next_power_of_2(n_cols)
    block_rows = max(1, (tile if device.type == "cuda" else 65536) // block)
    return block_rows, block, warps_for_tile(block_rows * block, elements_per_warp)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float):
    """Returns (y with x's shape, x as 2D rows, rstd fp32 per row)."""
    x2 = _as_rows(x)
    n_rows, n_cols = x2.shape
    if weight is not None and weight.shape != (n_cols,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {n_cols}")
    block_rows, block, num_warps = _launch_settings(n_cols, x.device, FWD_TILE, FWD_ELEMENTS_PER_WARP)
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    w = weight.contiguous() if weight is not None else x2  # dummy pointer when there is no weight
    if n_rows > 0:
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
            x2, x2.stride(0), w, y, y.stride(0), rstd, n_rows, n_cols, eps,
            HAS_WEIGHT=weight is not None, BLOCK_ROWS=block_rows, BLOCK=block, num_warps=num_warps,
        )
    return y.view(x.shape), x2, rstd


def rms_norm_backward(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                      compute_dw: bool):
    """Returns (dx as 2D rows in x.dtype, dw in weight.dtype or None)."""
    dy2 = _as_rows(dy)
    n_rows, n_cols = x2.shape
    compute_dw = compute_dw and weight is not None
    if n_rows == 0:
        return torch.empty_like(x2), (torch.zeros_like(weight) if compute_dw else None)
    tile, per_warp = (DW_TILE, DW_ELEMENTS_PER_WARP) if compute_dw else (BWD_TILE, BWD_ELEMENTS_PER_WARP)
    block_rows, block, num_warps = _launch_settings(n_cols, x2.device, tile, per_warp)
    n_programs = backward_programs(x2.device, triton.cdiv(n_rows, block_rows), compute_dw, DW_PROGRAMS_PER_SM)
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    dw_partial = torch.empty((n_programs, n_cols) if compute_dw else (1,), dtype=torch.float32, device=x2.device)
    w = weight.contiguous() if weight is not None else x2
    _rms_norm_bwd_kernel[(n_programs,)](
        dy2, dy2.stride(0), x2, x2.stride(0), w, rstd, dx, dx.stride(0), dw_partial, n_rows, n_cols, n_programs,
        HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw, BLOCK_ROWS=block_rows, BLOCK=block,
        num_warps=num_warps,
    )
    return dx, (sum_partials(dw_partial, weight) if compute_dw else None)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, x2, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x2, weight, rstd, compute_dw=ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """Gemma4RMSNorm.forward, line for line: fp32 math, one cast to x.dtype at the end."""
    xf = x.float()
    normed = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        normed = normed * weight.float()
    return normed.type_as(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """Gemma 4 RMSNorm over the last dimension of `x` (any leading shape); `weight=None` for v_norm."""
    tensors = (x,) if weight is None else (x, weight)
    if use_triton(*tensors):
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
