"""GEGLU for Gemma's MLP: out = gelu_tanh(gate) * up, forward and backward in Triton.

Math (k = sqrt(2 / pi), c = 0.044715, the tanh approximation of GELU that transformers calls
"gelu_pytorch_tanh" and torch calls F.gelu(approximate="tanh")):

    z    = k * (g + c * g^3)
    t    = tanh(z)
    gelu = 0.5 * g * (1 + t)
    out  = gelu * u

    d gelu / d g = 0.5 * (1 + t) + 0.5 * g * (1 - t^2) * k * (1 + 3 c g^2)
    d g = d out * u * (d gelu / d g)
    d u = d out * gelu

tanh is written from exp (libdevice tanh is unavailable in the Triton interpreter): with
e = exp(-2|z|) in (0, 1], tanh(z) = sign(z) (1 - e) / (1 + e) and 1 - tanh(z)^2 = 4e / (1 + e)^2,
which never overflows and keeps 1 - t^2 accurate where t is close to +-1.

References: Shazeer 2020 (GLU variants); Hendrycks & Gimpel 2016 (GELU, tanh approximation);
Liger Kernel's geglu (LigerGELUMulFunction); the Triton vector-add tutorial (elementwise blocks).
Layout: flattened to 2D rows; contiguous inputs are one long row, split into column blocks.

Precision plan: gate, up and d out are loaded and cast to fp32, all math is fp32, results are
cast to the input dtype on store (one rounding, where eager PyTorch in bf16 rounds after gelu
and again after the product). Nothing but the inputs is saved: the backward recomputes t.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import use_triton


@triton.jit
def _tanh_and_sech2(z):
    """(tanh(z), 1 - tanh(z)^2) from one exp, stable for any finite z.
    In the kernels below 0.7978845608028654 is sqrt(2 / pi) and 0.044715 is GELU's c."""
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(z < 0, -t, t)
    sech2 = 4.0 * e / ((1.0 + e) * (1.0 + e))
    return t, sech2


@triton.jit
def _geglu_fwd_kernel(
    g_ptr, g_row_stride, u_ptr, u_row_stride, o_ptr, n_cols, BLOCK: tl.constexpr,
):
    # Grid: (column blocks, rows). The output is contiguous: row stride n_cols.
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * g_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    t, _ = _tanh_and_sech2(0.7978845608028654 * (g + 0.044715 * g * g * g))
    out = 0.5 * g * (1.0 + t) * u
    tl.store(o_ptr + row * n_cols + cols, out.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(
    do_ptr, do_row_stride, g_ptr, g_row_stride, u_ptr, u_row_stride, dg_ptr, du_ptr, n_cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    do = tl.load(do_ptr + row * do_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * g_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    t, sech2 = _tanh_and_sech2(0.7978845608028654 * (g + 0.044715 * g * g * g))
    gelu = 0.5 * g * (1.0 + t)
    dgelu = 0.5 * (1.0 + t) + 0.5 * g * sech2 * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    # dg and du are freshly allocated and contiguous: row stride n_cols.
    tl.store(dg_ptr + row * n_cols + cols, (do * u * dgelu).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + row * n_cols + cols, (do * gelu).to(du_ptr.dtype.element_ty), mask=mask)


MAX_GRID_ROWS = 65535  # CUDA's limit on the second grid dimension


def _as_rows(*tensors: torch.Tensor):
    """Flatten to 2D (rows, I). Contiguous tensors become one long row (fewest programs);
    row-strided views (e.g. halves of a fused gate_up output) keep their rows, no copy."""
    if all(t.is_contiguous() for t in tensors):
        return [t.reshape(1, -1) for t in tensors]
    rows = [t.reshape(-1, t.shape[-1]) for t in tensors]
    if rows[0].shape[0] > MAX_GRID_ROWS or any(r.stride(-1) != 1 for r in rows):
        return [t.contiguous().reshape(1, -1) for t in tensors]
    return rows


def _launch_settings(n_cols: int, device: torch.device):
    """Elementwise: 1024 per program on a GPU; the interpreter pays per program, so 64Ki there."""
    block = min(1024 if device.type == "cuda" else 65536, triton.next_power_of_2(n_cols))
    return block, 4


def geglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"geglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    g2, u2 = _as_rows(gate, up)
    n_rows, n_cols = g2.shape
    block, num_warps = _launch_settings(n_cols, gate.device)
    out = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if out.numel() > 0:
        grid = (triton.cdiv(n_cols, block), n_rows)
        _geglu_fwd_kernel[grid](g2, g2.stride(0), u2, u2.stride(0), out, n_cols, BLOCK=block, num_warps=num_warps)
    return out.view(gate.shape)


def geglu_backward(d_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    do2, g2, u2 = _as_rows(d_out, gate, up)
    n_rows, n_cols = g2.shape
    block, num_warps = _launch_settings(n_cols, gate.device)
    d_gate = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    d_up = torch.empty((n_rows, n_cols), dtype=up.dtype, device=up.device)
    if d_gate.numel() > 0:
        grid = (triton.cdiv(n_cols, block), n_rows)
        _geglu_bwd_kernel[grid](do2, do2.stride(0), g2, g2.stride(0), u2, u2.stride(0), d_gate, d_up, n_cols,
                                BLOCK=block, num_warps=num_warps)
    return d_gate.view(gate.shape), d_up.view(up.shape)


class GEGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return geglu_forward(gate, up)

    @staticmethod
    def backward(ctx, d_out):
        gate, up = ctx.saved_tensors
        return geglu_backward(d_out, gate, up)


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up in fp32, cast once to the input dtype (what the kernel computes)."""
    return (F.gelu(gate.float(), approximate="tanh") * up.float()).to(gate.dtype)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up, elementwise, any shape (gate and up alike)."""
    if use_triton(gate, up):
        return GEGLUFunction.apply(gate, up)
    return geglu_reference(gate, up)
