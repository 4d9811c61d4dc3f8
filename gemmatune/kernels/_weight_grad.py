"""The weight gradient of a norm kernel: summed over rows by a fixed set of backward programs,
then across programs by one small kernel.

Why this shape: a norm's weight gradient is a sum over every row. One program per row tile
is the fastest backward for dx (the most memory traffic in flight), but then every program
holds a partial sum: at E2B's hidden size and 2048 tokens, 12.6 MB of fp32 partials to write
and re-read, against 19 MB for the backward itself. So when dw is wanted, the backward runs a few programs per
SM that loop over tiles
and write one fp32 partial sum each; `sum_partials` adds them in fp32 and casts once.

The partial-sum kernel is faster than torch's sum and cast (benchmarks/tune_norm_kernels.py sum).
Atomic adds of the partial sums inside the backward, with the last program casting, were tried
and were slower, and their order of addition varies from run to run; the order here is fixed, so
dw is the same on every run.

Under LoRA the norm weights are frozen: this path does not run during training.
"""
import torch
import triton
import triton.language as tl


def backward_programs(device: torch.device, n_tiles: int, compute_dw: bool, programs_per_sm: int) -> int:
    """How many programs a norm backward runs: one per tile without dw; with dw, a few per SM
    that loop over tiles. The interpreter (CPU) runs programs one after another and gets two,
    which still tests the cross-program sum."""
    programs = n_tiles
    if compute_dw:
        programs = torch.cuda.get_device_properties(device).multi_processor_count * programs_per_sm \
            if device.type == "cuda" else 2
    return max(1, min(programs, n_tiles))


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, n_partials, n_cols, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # Column sums of the (n_partials, n_cols) fp32 partial weight gradients, cast on store.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows[:, None] < n_partials) & (cols[None, :] < n_cols)
        acc += tl.sum(tl.load(partial_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0), axis=0)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < n_cols)


def sum_partials(partial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """dw = partial.sum(0) cast to like.dtype, for an (n_programs, n_cols) fp32 `partial`."""
    n_partials, n_cols = partial.shape
    out = torch.empty(n_cols, dtype=like.dtype, device=like.device)
    # narrow column strips, many programs: measured fastest for 264 x 1536..2560 partials on
    # the H200 (benchmarks/results/2026-11-28-h200-tune-rms-sum.txt)
    _sum_partials_kernel[(triton.cdiv(n_cols, 16),)](partial, out, n_partials, n_cols, BLOCK_P=128, BLOCK_C=16,
                                                    num_warps=1)
    return out
