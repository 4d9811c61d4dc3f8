"""NF4 dequantisation, bit-exact with bitsandbytes.functional.dequantize_4bit.

Storage (bitsandbytes 4-bit, quant_type "nf4"): a weight of n elements, flattened row-major, is
packed two per byte, element 2k in the high nibble of byte k and element 2k+1 in the low nibble.
Each run of `blocksize` elements (32..4096; 64 in QLoRA) shares one fp32 scale absmax[b]:

    W[i] = cast( code[nibble(i)] * absmax[i // blocksize] )        code: the 16 NF4 levels, fp32

With double quantisation (compress_statistics=True, QuantState.nested) absmax is itself stored
as uint8 codes of bnb's 8-bit dynamic map, in blocks of 256 (state2), around a mean offset:

    absmax[b] = code2[qabsmax[b]] * absmax2[b // 256] + offset       all fp32

Order of operations and precision exactly as bnb (CPU and CUDA): the fp32 product, then the fp32
add of the offset, then the fp32 product with the NF4 level, then one round-to-nearest-even cast
to the output dtype. Contraction of the absmax multiply-add into an FMA would change the last bit,
so the kernel is launched with fp fusion off. No gradient: quantised base weights are frozen.

Reference: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (NF4, double
quantisation); bitsandbytes functional.py (dequantize_4bit, dequantize_blockwise) and
backends/default/ops.py (_dequantize_4bit_compute).

Precision plan: all arithmetic in fp32 (as bnb), one cast on store. Memory: the kernel reads the
packed bytes and the (nested) statistics once and writes the output once; the nested absmax is
decoded in registers instead of being materialised as a separate fp32 tensor as bnb does.

Layout: a program's tile is rows of packed bytes, each row inside one quantisation block, so a
row's scale is loaded and decoded once rather than once per byte. At Gemma 4's projection
sizes (3-26 M weights) the kernel is latency-bound: the smallest projections take little more
than a copy of their bytes (benchmarks/tune_nf4.py; figures in benchmarks/results/README.md).
"""
import torch
import triton
import triton.language as tl

from ._backend import use_triton

# Launch settings on a GPU: packed bytes per program and warps, the least total time over E2B/E4B's
# projections in benchmarks/tune_nf4.py.
BYTES_PER_PROGRAM, NUM_WARPS = 512, 1
INTERPRETER_BYTES_PER_PROGRAM = 16384  # the interpreter (CPU) pays per program: big tiles
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _dequant_nf4_kernel(A, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, OUT, n_bytes, n_elems,
                        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                        ROWS: tl.constexpr, COLS: tl.constexpr):
    # A program takes ROWS x COLS packed bytes. COLS divides blocksize / 2, so a row lies in one
    # quantisation block: its scale is loaded (and, nested, decoded) once per row, not per byte.
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * ROWS * COLS + tl.arange(0, ROWS) * COLS  # first byte of each row
    k = row_start[:, None] + tl.arange(0, COLS)[None, :]  # byte index (ROWS, COLS)
    byte = tl.load(A + k, mask=k < n_bytes, other=0).to(tl.int32)
    blk = (2 * row_start) // BLOCKSIZE
    row_mask = row_start < n_bytes
    if NESTED:
        q = tl.load(ABSMAX + blk, mask=row_mask, other=0).to(tl.int32)
        scale = tl.load(CODE2 + q) * tl.load(ABSMAX2 + blk // BLOCKSIZE2, mask=row_mask, other=0.0)
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + blk, mask=row_mask, other=0.0)
    hi = tl.load(CODE + (byte >> 4)) * scale[:, None]
    lo = tl.load(CODE + (byte & 15)) * scale[:, None]
    vals = tl.interleave(hi, lo).to(OUT.dtype.element_ty)  # element 2k = high nibble, 2k+1 = low
    i = 2 * row_start[:, None] + tl.arange(0, 2 * COLS)[None, :]
    tl.store(OUT + i, vals, mask=i < n_elems)


def _as_bytes(packed):
    packed = packed.contiguous()
    return packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)


def _check(packed, quant_state, out, dtype):
    if quant_state.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4 handles quant_type 'nf4' only, got {quant_state.quant_type!r}")
    if quant_state.blocksize not in BLOCKSIZES:
        raise ValueError(f"unsupported blocksize {quant_state.blocksize}; bnb allows {BLOCKSIZES}")
    n = 1
    for d in quant_state.shape:
        n *= d
    n_bytes = packed.numel() * packed.element_size()
    if n_bytes != (n + 1) // 2:
        raise ValueError(f"packed weight has {n_bytes} bytes, shape {tuple(quant_state.shape)} needs {(n + 1) // 2}")
    if quant_state.nested and quant_state.state2.blocksize not in BLOCKSIZES:
        raise ValueError(f"unsupported nested blocksize {quant_state.state2.blocksize}")
    if out is not None:
        if out.numel() != n or not out.is_contiguous() or out.dtype not in OUT_DTYPES:
            raise ValueError(f"out must be a contiguous {OUT_DTYPES} tensor of {n} elements")
        return n, out.dtype
    dtype = dtype or quant_state.dtype
    if dtype not in OUT_DTYPES:
        raise ValueError(f"output dtype must be one of {OUT_DTYPES}, got {dtype}")
    return n, dtype


def kernel_statistics(quant_state, device):
    """The QuantState's scales as the NF4 kernels take them: (absmax, absmax2, code2, offset,
    blocksize2, code), fp32 where they compute; without double quantisation the nested
    arguments are placeholders the kernel never reads (NESTED=False)."""
    qs = quant_state
    if qs.nested:
        offset = qs.offset if torch.is_tensor(qs.offset) else torch.tensor(float(qs.offset), dtype=torch.float32)
        offset = offset.to(device=device, dtype=torch.float32).reshape(1)
        return qs.absmax, qs.state2.absmax, qs.state2.code, offset, qs.state2.blocksize, _code(qs, device)
    absmax = qs.absmax.float()
    return absmax, absmax, absmax, absmax, 256, _code(qs, device)


def _code(quant_state, device):
    return quant_state.code.to(device=device, dtype=torch.float32)


def dequantize_nf4_forward(packed, quant_state, out=None, dtype=None):
    """Launch the kernel; returns out (quant_state.shape, or out's own shape if given)."""
    n, dtype = _check(packed, quant_state, out, dtype)
    if out is None:
        out = torch.empty(tuple(quant_state.shape), dtype=dtype, device=packed.device)
    a = _as_bytes(packed)
    qs = quant_state
    absmax, absmax2, code2, offset, blocksize2, code = kernel_statistics(qs, a.device)
    if n == 0:
        return out
    tile = BYTES_PER_PROGRAM if a.is_cuda else INTERPRETER_BYTES_PER_PROGRAM
    cols = min(tile, qs.blocksize // 2)
    _dequant_nf4_kernel[(triton.cdiv(a.numel(), tile),)](
        a, absmax, code, absmax2, code2, offset, out, a.numel(), n,
        BLOCKSIZE=qs.blocksize, BLOCKSIZE2=blocksize2, NESTED=qs.nested, ROWS=tile // cols, COLS=cols,
        num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out


def dequantize_nf4_reference(packed, quant_state, out=None, dtype=None):
    """Pure PyTorch, same operations in the same order as bnb's default backend."""
    n, dtype = _check(packed, quant_state, out, dtype)
    qs = quant_state
    absmax = qs.absmax
    if qs.nested:
        s2 = qs.state2
        a2 = s2.code.to(absmax.device)[absmax.long()]
        pad = (-a2.numel()) % s2.blocksize
        a2 = torch.nn.functional.pad(a2, (0, pad)).view(-1, s2.blocksize) * s2.absmax.view(-1, 1)
        absmax = a2.reshape(-1)[: qs.absmax.numel()] + qs.offset
    a = _as_bytes(packed).reshape(-1)
    idx = torch.stack((a >> 4, a & 15), dim=-1).reshape(-1)[:n].long()
    vals = qs.code.to(a.device).float()[idx]
    pad = (-n) % qs.blocksize
    vals = torch.nn.functional.pad(vals, (0, pad)).view(-1, qs.blocksize) * absmax.float().view(-1, 1)
    result = vals.reshape(-1)[:n].to(dtype)
    if out is None:
        return result.view(tuple(qs.shape))
    return out.copy_(result.view(out.shape))


def dequantize_nf4(packed_weight, quant_state, out=None, dtype=None):
    """Dequantise a bnb NF4 weight (Params4bit.data + its QuantState) to quant_state.dtype, or to
    `dtype`, or into `out` (contiguous, any shape with the right element count)."""
    out_dtype = out.dtype if out is not None else (dtype or quant_state.dtype)
    # use_triton() keeps bf16 off the interpreter (its fp32 -> bf16 cast rounds differently from
    # PyTorch); an empty probe of the output dtype lets it judge the output too.
    probe = out if out is not None else torch.empty(0, dtype=out_dtype, device=packed_weight.device)
    if use_triton(packed_weight, quant_state.absmax, probe):
        return dequantize_nf4_forward(packed_weight, quant_state, out, dtype)
    return dequantize_nf4_reference(packed_weight, quant_state, out, dtype)
