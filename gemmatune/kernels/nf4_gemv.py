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
when that is narrower, as `_dequantize` does; launched with fp fusion off, as nf4.py, so no
multiply-add of the decode is contracted), x and W are multiplied and summed in fp32 (explicit
fused multiply-adds), the LoRA B weights are rounded to the compute dtype first (as peft casts
them), and y is rounded once. So y differs from the dequantise + GEMM path only in the order
(and fusing) of the fp32 sums.

Layout: a program owns BLOCK_N output rows of one row of x (grid: row blocks x rows of x) and
walks K in chunks of NB x GB packed bytes, as a (BLOCK_N, NB, GB) tile. When K is a multiple of
the quantisation block (every Gemma 4 projection) GB is half a block, so each (row, block) scale
is loaded and decoded once per block, not once per byte; otherwise (odd test shapes) NB is 1 and
the scale is gathered per byte. The two weights of a byte are looked up together in a 256-entry
table of code pairs (one gather per byte instead of two), and x is loaded as contiguous (even,
odd) pairs. Products accumulate in the tile and are reduced once, after the loop: the loop has
no cross-thread reduction. See launch_settings for how the tile is shaped.

Speed: benchmarks/tune_nf4_gemv.py times it per E2B/E4B shape against a copy of the same bytes,
the dequantise + GEMM path and bitsandbytes' own GEMV (which decodes in the compute dtype and is
not bit-exact with its own dequantisation); the figures are in benchmarks/results/README.md. This
kernel is bound by the per-weight decode instructions, not by memory: its time doubles from one
row of x to two.

Reference: `nf4_gemv_reference` (dequantise with the PyTorch reference, then F.linear + LoRA).
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import use_triton
from .nf4 import BLOCKSIZES, dequantize_nf4_reference, kernel_statistics

# Rows of x sent to this kernel (chat's batch of one). The kernel takes any number (a program per
# row of x, each decoding W again), but its time grows with the rows: on an H200 at 2 rows the
# dequantise + GEMM path is already faster over E2B/E4B's projections (219 vs 281 us in all;
# benchmarks/tune_nf4_gemv.py, benchmarks/results/2026-12-01-h200-tune-nf4-gemv.txt).
MAX_ROWS = 1
# Launch settings on a GPU (see launch_settings; benchmarks/tune_nf4_gemv.py sweeps them): packed
# bytes per program and loop step, the longest chunk of a row per step, and warps. The least total
# time at one row over the sweep (158 us for the 15 projection shapes; 269 us for the kernel before).
TILE_BYTES, MAX_BLOCK_KB, NUM_WARPS = 4096, 512, 4
PROGRAMS_WANTED = 264  # two per SM of an H200: fewer rows per program when N is small
LORA_DOWN_BLOCK_K = 2048  # elements of x per loop step of lora_down
INTERPRETER_TILE_BYTES, INTERPRETER_BLOCK_KB = 8192, 512  # the interpreter (CPU) pays per program: big tiles
_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _block_scale(ABSMAX, CODE2, ABSMAX2, OFFSET, blk, mask, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
    """absmax of quantisation blocks `blk` (any shape), decoded as nf4.py does: the fp32 product
    code2 * absmax2, then + offset, not contracted into an FMA (the kernel runs with fp fusion off;
    its dot products use explicit tl.fma)."""
    if NESTED:  # one return for both branches: Triton checks every return's type
        q = tl.load(ABSMAX + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(CODE2 + q) * tl.load(ABSMAX2 + blk // BLOCKSIZE2, mask=mask, other=0.0)
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + blk, mask=mask, other=0.0).to(tl.float32)
    return scale


@triton.jit
def _lora_down_kernel(X, A, T, K, stride_xm, stride_a, stride_tm, BLOCK_K: tl.constexpr):
    """t[m, j] = sum_k x[m, k] * A[j, k] in fp32, rounded once: one program per (row of x, row of A)."""
    m, j = tl.program_id(0), tl.program_id(1)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = k < K
        x = tl.load(X + m * stride_xm + k, mask=mask, other=0.0).to(tl.float32)
        acc += x * tl.load(A + j * stride_a + k, mask=mask, other=0.0).to(tl.float32)
    tl.store(T + m * stride_tm + j, tl.sum(acc, axis=0).to(T.dtype.element_ty))


def lora_down(x2: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """t = x2 @ A^T (M, r) in x2's dtype, as peft's lora_A(x). Why a kernel: at one row cuBLAS
    takes two launches when it splits K, about twice this kernel's time, and a decode step has
    about 200 of them; here one launch of M x r small dot products."""
    a = lora_a.to(x2.dtype).contiguous()
    if not use_triton(x2, a):
        return x2 @ a.t()
    M, K = x2.shape
    t = torch.empty((M, a.shape[0]), dtype=x2.dtype, device=x2.device)
    block_k = min(LORA_DOWN_BLOCK_K if x2.is_cuda else 4096, triton.next_power_of_2(K))
    _lora_down_kernel[(M, a.shape[0])](x2, a, t, K, x2.stride(0), a.stride(0), t.stride(0), BLOCK_K=block_k,
                                        num_warps=4)
    return t


@triton.jit
def _nf4_gemv_kernel(X, A, ABSMAX, PAIRS, ABSMAX2, CODE2, OFFSET, BIAS, T, LB, Y,
                     N, K, R, stride_xm, stride_tm, stride_lb, stride_ym, lora_scale,
                     BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, W_DTYPE: tl.constexpr,
                     ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, GB: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    m = tl.program_id(1)  # the row of x
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    half_k = K // 2
    row_start = n.to(tl.int64) * half_k  # first packed byte of each output row
    j = tl.arange(0, NB)
    col = j[:, None] * GB + tl.arange(0, GB)[None, :]  # (NB, GB): byte within the chunk
    pair = tl.arange(0, 2)
    acc = tl.zeros((BLOCK_N, NB, GB), dtype=tl.float32)
    for kb0 in range(0, half_k, NB * GB):
        kb = kb0 + col
        kb_mask = kb < half_k
        w_mask = n_mask[:, None, None] & kb_mask[None, :, :]
        k_byte = row_start[:, None, None] + kb[None, :, :]
        byte = tl.load(A + k_byte, mask=w_mask, other=0).to(tl.int32)
        if ALIGNED:  # GB bytes = half a quantisation block: one scale per (row, block)
            blk = (2 * (row_start[:, None] + kb0 + j[None, :] * GB)) // BLOCKSIZE
            blk_mask = n_mask[:, None] & (kb0 + j * GB < half_k)[None, :]
            scale = _block_scale(ABSMAX, CODE2, ABSMAX2, OFFSET, blk, blk_mask, BLOCKSIZE2, NESTED)[:, :, None]
        else:
            scale = _block_scale(ABSMAX, CODE2, ABSMAX2, OFFSET, (2 * k_byte) // BLOCKSIZE, w_mask, BLOCKSIZE2,
                                 NESTED)
        codes = tl.load(PAIRS + byte)  # int64: fp32 bits of the high nibble's level << 32 | the low one's
        code_hi = (codes >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        code_lo = (codes & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
        w_hi = (code_hi * scale).to(W_DTYPE).to(X.dtype.element_ty).to(tl.float32)
        w_lo = (code_lo * scale).to(W_DTYPE).to(X.dtype.element_ty).to(tl.float32)
        x_at = X + m * stride_xm + 2 * kb[:, :, None] + pair[None, None, :]  # (NB, GB, 2): x[2k], x[2k+1]
        x_even, x_odd = tl.split(tl.load(x_at, mask=kb_mask[:, :, None], other=0.0).to(tl.float32))
        acc = tl.fma(x_even[None, :, :], w_hi, acc)  # explicit FMAs: fp fusion is off for the decode
        acc = tl.fma(x_odd[None, :, :], w_lo, acc)
    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # (BLOCK_N,)
    if HAS_LORA:
        r = tl.arange(0, BLOCK_R)
        r_mask = r < R
        t = tl.load(T + m * stride_tm + r, mask=r_mask, other=0.0).to(tl.float32)
        b = tl.load(LB + n.to(tl.int64)[:, None] * stride_lb + r[None, :], mask=n_mask[:, None] & r_mask[None, :],
                    other=0.0).to(X.dtype.element_ty).to(tl.float32)
        y += lora_scale * tl.sum(t[None, :] * b, axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + n, mask=n_mask, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + m * stride_ym + n, y.to(Y.dtype.element_ty), mask=n_mask)


def code_pairs(quant_state, code: torch.Tensor) -> torch.Tensor:
    """(256,) int64 on code's device: for every packed byte, the fp32 bit patterns of its two NF4
    levels (the high nibble's in the upper 32 bits). Made once per QuantState and device and kept
    on it, so a decode step (and its CUDA graph) only reads it."""
    cached = getattr(quant_state, "gemmatune_code_pairs", None)
    if cached is None or cached.device != code.device:
        bits = code.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        byte = torch.arange(256, device=code.device)
        cached = (bits.index_select(0, byte >> 4) << 32) | bits.index_select(0, byte & 15)
        quant_state.gemmatune_code_pairs = cached
    return cached


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


def launch_settings(in_features: int, out_features: int, blocksize: int, on_gpu: bool) -> tuple:
    """(aligned, BLOCK_N, NB, GB, num_warps) for one row of x (each row of x is its own program).

    aligned: K is a multiple of the quantisation block, so a GB = blocksize / 2 byte run shares
    one scale. The chunk (NB x GB bytes) is the longest power of two up to MAX_BLOCK_KB that
    divides a row (E2B's 768-byte rows: 3 steps of 256, no masked tail); the rows per program
    fill the rest of TILE_BYTES, fewer when the matrix is short (N / BLOCK_N programs should
    cover the GPU: PROGRAMS_WANTED). Unaligned: NB = 1 and GB is the chunk."""
    half_k = in_features // 2
    tile, max_kb = (TILE_BYTES, MAX_BLOCK_KB) if on_gpu else (INTERPRETER_TILE_BYTES, INTERPRETER_BLOCK_KB)
    group = blocksize // 2
    aligned = in_features % blocksize == 0 and group <= max_kb
    if aligned:
        chunk = group
        while chunk * 2 <= max_kb and half_k % (chunk * 2) == 0:
            chunk *= 2
        nb, gb = chunk // group, group
    else:
        chunk = min(max_kb, triton.next_power_of_2(max(half_k, 16)))
        nb, gb = 1, chunk
    block_n = max(1, tile // chunk)
    if on_gpu:
        block_n = min(block_n, max(1, triton.next_power_of_2(out_features // PROGRAMS_WANTED + 1) // 2))
    return aligned, block_n, nb, gb, NUM_WARPS if on_gpu else 4


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
    aligned, block_n, nb, gb, warps = launch_settings(K, N, qs.blocksize, x2.is_cuda)
    packed = packed.contiguous()
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    _nf4_gemv_kernel[(triton.cdiv(N, block_n), M)](
        x2, packed, absmax, code_pairs(qs, code), absmax2, code2, offset, bias if bias is not None else x2,
        t, lora_b, y, N, K, r, x2.stride(0), t.stride(0), lora_b.stride(0), y.stride(0), float(scale),
        BLOCKSIZE=qs.blocksize, BLOCKSIZE2=blocksize2, NESTED=qs.nested, HAS_BIAS=bias is not None,
        HAS_LORA=lora is not None, W_DTYPE=_TRITON_DTYPES[_rounding_dtype(qs, x2.dtype)], ALIGNED=aligned,
        BLOCK_N=block_n, NB=nb, GB=gb, BLOCK_R=max(16, triton.next_power_of_2(r)), num_warps=warps,
        enable_fp_fusion=False)
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
        lora = (lora_down(x2, lora_A), lora_B, scale)  # t rounded to x's dtype, as peft's lora_A(x)
    y = nf4_gemv_forward(x2, packed, quant_state, bias, lora)
    return y.view(*x.shape[:-1], y.shape[-1])
