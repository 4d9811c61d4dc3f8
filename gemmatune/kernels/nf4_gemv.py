"""NF4 matrix-vector product for decoding: y = x @ W^T (+ bias) (+ scale * t @ B^T), W read packed.

Forward only (generation; W frozen, no gradient). x (M, K) with M <= MAX_ROWS, packed NF4 W
(N, K) in bitsandbytes' layout (see gemmatune.kernels.nf4), optional LoRA: t = x @ A^T (M, r),
computed by the caller, and B (N, r):

    y[m, n] = sum_k x[m, k] * W[n, k] + bias[n] + scale * sum_j t[m, j] * B[n, j]

Why: at batch 1 a decode step multiplies one row by every weight. gemmatune's training path
(kernels/lora_nf4_linear.py) dequantises the whole W into a bf16 workspace and then runs a GEMM:
it writes and reads 2 bytes per weight on top of the packed half byte, 9x the bytes this kernel
reads, and takes three launches with the LoRA update. Here each program reads its rows' packed
bytes once, decodes them in registers and accumulates the dot products; the LoRA update and the
bias are added in the same program. A cached bf16 copy of W would also be faster than the
workspace path, but needs 4 bytes per packed byte more memory (E2B: ~4 GB), which an 8 GB GPU
does not have.

Precision plan: W is decoded exactly as bitsandbytes dequantises (fp32 code * absmax, the nested
absmax decoded as in nf4.py, then rounded to the compute dtype, and first to the quantised dtype
when that is narrower, as `_dequantize` does), x and W are multiplied and summed in fp32, the
LoRA B weights are rounded to the compute dtype first (as peft casts them), and y is rounded
once. So y differs from the dequantise + GEMM path only in the order of the fp32 sums.

Layout: a program owns BLOCK_N output rows and walks K in chunks of BLOCK_KB packed bytes (2 *
BLOCK_KB weights); the x rows of the chunk are loaded as even and odd columns, which meet the
high and low nibbles of each byte. See launch_settings for how the tile is shaped.

Reference: `nf4_gemv_reference` (dequantise with the PyTorch reference, then F.linear + LoRA).
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import use_triton
from .nf4 import BLOCKSIZES, dequantize_nf4_reference, kernel_statistics

MAX_ROWS = 16          # up to this many x rows (decoding a batch of 16); beyond it a GEMM wins
# Launch settings on a GPU (see launch_settings; benchmarks/tune_nf4_gemv.py sweeps them): packed
# bytes per program and loop step at one row of x (divided by the rows' power of two, so the
# (rows, BLOCK_N, chunk) product stays in registers), the longest chunk of a row, and warps.
TILE_BYTES, MAX_BLOCK_KB, NUM_WARPS = 4096, 2048, 8
INTERPRETER_BLOCK_N, INTERPRETER_BLOCK_KB = 64, 512  # the interpreter (CPU) pays per program: big tiles
_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _nf4_gemv_kernel(X, A, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, BIAS, T, LB, Y,
                     M, N, K, R, stride_xm, stride_tm, stride_lb, stride_ym, lora_scale,
                     BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, W_DTYPE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m = tl.arange(0, BLOCK_M)
    m_mask = m < M
    half_k = K // 2
    row_start = n.to(tl.int64) * half_k  # first packed byte of each output row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb0 in range(0, half_k, BLOCK_KB):
        kb = kb0 + tl.arange(0, BLOCK_KB)  # packed byte within the row
        kb_mask = kb < half_k
        w_mask = n_mask[:, None] & kb_mask[None, :]
        k_byte = row_start[:, None] + kb[None, :]
        byte = tl.load(A + k_byte, mask=w_mask, other=0).to(tl.int32)
        blk = (2 * k_byte) // BLOCKSIZE
        if NESTED:
            q = tl.load(ABSMAX + blk, mask=w_mask, other=0).to(tl.int32)
            scale = tl.load(CODE2 + q) * tl.load(ABSMAX2 + blk // BLOCKSIZE2, mask=w_mask, other=0.0)
            scale = scale + tl.load(OFFSET)
        else:
            scale = tl.load(ABSMAX + blk, mask=w_mask, other=0.0)
        w_hi = (tl.load(CODE + (byte >> 4)) * scale).to(W_DTYPE).to(X.dtype.element_ty).to(tl.float32)
        w_lo = (tl.load(CODE + (byte & 15)) * scale).to(W_DTYPE).to(X.dtype.element_ty).to(tl.float32)
        x_mask = m_mask[:, None] & kb_mask[None, :]
        x_at = X + m[:, None] * stride_xm + 2 * kb[None, :]
        x_even = tl.load(x_at, mask=x_mask, other=0.0).to(tl.float32)
        x_odd = tl.load(x_at + 1, mask=x_mask, other=0.0).to(tl.float32)
        acc += tl.sum(x_even[:, None, :] * w_hi[None, :, :] + x_odd[:, None, :] * w_lo[None, :, :], axis=2)
    if HAS_LORA:
        r = tl.arange(0, BLOCK_R)
        r_mask = r < R
        t = tl.load(T + m[:, None] * stride_tm + r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                    other=0.0).to(tl.float32)
        b = tl.load(LB + n.to(tl.int64)[:, None] * stride_lb + r[None, :], mask=n_mask[:, None] & r_mask[None, :],
                    other=0.0).to(X.dtype.element_ty).to(tl.float32)
        acc += lora_scale * tl.sum(t[:, None, :] * b[None, :, :], axis=2)
    if HAS_BIAS:
        bias = tl.load(BIAS + n, mask=n_mask, other=0.0).to(X.dtype.element_ty).to(tl.float32)
        acc += bias[None, :]
    y_at = Y + m[:, None] * stride_ym + n[None, :]
    tl.store(y_at, acc.to(Y.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _rounding_dtype(quant_state, dtype: torch.dtype) -> torch.dtype:
    """The dtype W is first rounded to: the compute dtype, or the quantised dtype when narrower
    (what lora_nf4_linear._dequantize does, which follows bitsandbytes)."""
    return dtype if quant_state.dtype in (dtype, torch.float32) else quant_state.dtype


def gemv_enabled() -> bool:
    """GEMMATUNE_NF4_GEMV=0 sends decoding through the dequantise + GEMM path (for comparisons)."""
    return os.environ.get("GEMMATUNE_NF4_GEMV", "1") != "0"


def gemv_supported(x: torch.Tensor, packed: torch.Tensor, quant_state) -> bool:
    """This kernel can compute the layer for x: few rows, a 2-D NF4 weight with an even row
    length, a supported blocksize, and a device/dtype where Triton runs (use_triton)."""
    if not gemv_enabled() or quant_state is None:
        return False
    if quant_state.quant_type != "nf4" or len(quant_state.shape) != 2:
        return False
    in_features = quant_state.shape[1]
    rows = x.numel() // max(x.shape[-1], 1)
    if not (0 < rows <= MAX_ROWS and x.shape[-1] == in_features and in_features % 2 == 0
            and quant_state.blocksize in BLOCKSIZES and x.dtype in _TRITON_DTYPES
            and (not quant_state.nested or quant_state.state2.blocksize in BLOCKSIZES)):
        return False
    # an empty probe of the rounding dtype: use_triton keeps bf16 rounding off the interpreter
    probe = torch.empty(0, dtype=_rounding_dtype(quant_state, x.dtype), device=x.device)
    return use_triton(x, packed, quant_state.absmax, probe)


def launch_settings(rows: int, in_features: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_KB, num_warps). A decode step's GEMVs are latency-bound: each
    program's loop over K waits for memory once per step, so the chunk is as long as a row allows
    (MAX_BLOCK_KB bytes: E2B's down_proj rows of 6144 bytes take 3 steps) and the rows per program
    fill the rest of TILE_BYTES (short rows: several per program, still N / BLOCK_N programs)."""
    block_m = triton.next_power_of_2(rows)
    if not on_gpu:
        return block_m, INTERPRETER_BLOCK_N, INTERPRETER_BLOCK_KB, 4
    tile = max(256, TILE_BYTES // block_m)
    block_kb = min(MAX_BLOCK_KB, tile, triton.next_power_of_2(max(in_features // 2, 16)))
    return block_m, max(1, tile // block_kb), block_kb, NUM_WARPS


def nf4_gemv_forward(x2, packed, quant_state, bias=None, lora=None):
    """x2 (M, K) contiguous rows; lora = (t (M, r), B (N, r), scale) or None. Returns y (M, N)."""
    M, K = x2.shape
    N = quant_state.shape[0]
    qs = quant_state
    absmax, absmax2, code2, offset, blocksize2, code = kernel_statistics(qs, x2.device)
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if lora is not None:
        t, lora_b, scale = lora
        t, lora_b = t.contiguous(), lora_b.contiguous()
        r = t.shape[1]
    else:
        t = lora_b = x2  # unused
        scale, r = 0.0, 1
    block_m, block_n, block_kb, warps = launch_settings(M, K, x2.is_cuda)
    packed = packed.contiguous()
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    _nf4_gemv_kernel[(triton.cdiv(N, block_n),)](
        x2, packed, absmax, code, absmax2, code2, offset, bias if bias is not None else x2, t, lora_b, y,
        M, N, K, r, x2.stride(0), t.stride(0), lora_b.stride(0), y.stride(0), float(scale),
        BLOCKSIZE=qs.blocksize, BLOCKSIZE2=blocksize2, NESTED=qs.nested, HAS_BIAS=bias is not None,
        HAS_LORA=lora is not None, W_DTYPE=_TRITON_DTYPES[_rounding_dtype(qs, x2.dtype)],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KB=block_kb, BLOCK_R=max(16, triton.next_power_of_2(r)),
        num_warps=warps)
    return y


def nf4_gemv_reference(x, packed, quant_state, bias=None, lora_A=None, lora_B=None, scale=1.0):
    """Eager PyTorch: W dequantised as bitsandbytes does (rounded as the kernel rounds it), then
    F.linear, then the LoRA update with A and B cast to x's dtype (as peft does)."""
    W = dequantize_nf4_reference(packed, quant_state, dtype=_rounding_dtype(quant_state, x.dtype)).to(x.dtype)
    y = F.linear(x, W, bias.to(x.dtype) if bias is not None else None)
    if lora_A is not None:
        y = y + F.linear(F.linear(x, lora_A.to(x.dtype)), lora_B.to(x.dtype)) * scale
    return y


def nf4_gemv(x, packed, quant_state, bias=None, lora_A=None, lora_B=None, scale=1.0):
    """y = x @ dequant(W)^T + bias (+ scale * (x @ A^T) @ B^T) for a few rows of x, reading W packed.
    Falls back to the reference where the kernel does not apply (gemv_supported)."""
    if not gemv_supported(x, packed, quant_state):
        return nf4_gemv_reference(x, packed, quant_state, bias, lora_A, lora_B, scale)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    lora = None
    if lora_A is not None:
        lora = (x2 @ lora_A.to(x.dtype).t(), lora_B, scale)  # t rounded to x's dtype, as peft's lora_A(x)
    y = nf4_gemv_forward(x2, packed, quant_state, bias, lora)
    return y.view(*x.shape[:-1], y.shape[-1])
