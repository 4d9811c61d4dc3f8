"""Pick the RMSNorm kernels' launch settings on a GPU: a grid over rows per program, warps
and (backward) programs per SM, at Gemma 4's sizes, timed as CUDA-graph replays.

    python benchmarks/tune_rms_norm.py          # forward and backward kernels
    python benchmarks/tune_rms_norm.py --sum    # the weight-gradient partial-sum kernel

A diagnostic: prints each setting's time (and for the norm kernels bandwidth, next to a
same-size copy: what the memory system gives at this size) and the best setting; the
chosen values are then written into gemmatune/kernels/rms_norm.py by hand.
"""
import itertools
import sys
from pathlib import Path

import torch
import triton

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: see train_step.py

from benchmarks.timing import median_ms  # noqa: E402
from gemmatune.kernels.rms_norm import _rms_norm_bwd_kernel, _rms_norm_fwd_kernel, _sum_partials_kernel  # noqa: E402,E501

SHAPES = [("E2B hidden", 2048, 1536), ("E4B hidden", 2048, 2560), ("q_norm 8x256", 2048 * 8, 256)]


def tune_sum(partials: int = 264) -> None:
    """The (partials x hidden) fp32 column sum + cast to bf16 against torch's sum and cast;
    264 partial rows = 2 backward programs per SM on an H200."""
    for cols in (1536, 2560):
        part = torch.randn(partials, cols, device="cuda")
        out = torch.empty(cols, device="cuda", dtype=torch.bfloat16)
        want = part.sum(0).bfloat16()
        ms, _ = median_ms(lambda: part.sum(0).to(torch.bfloat16))
        print(f"{cols} torch sum+cast {ms * 1e3:.2f} us")
        for block_c, block_p, warps in itertools.product([16, 32, 64, 128], [16, 32, 64, 128], [1, 2, 4]):
            def launch():
                _sum_partials_kernel[(triton.cdiv(cols, block_c),)](part, out, partials, cols, BLOCK_P=block_p,
                                                                    BLOCK_C=block_c, num_warps=warps)
            ms, _ = median_ms(launch)
            launch()
            ok = torch.allclose(out.float(), want.float(), rtol=1e-2, atol=1e-2)
            print(f"{cols} columns/program {block_c} rows/step {block_p} warps {warps}: {ms * 1e3:.2f} us, equal {ok}")


def main() -> None:
    if "--sum" in sys.argv:
        return tune_sum()
    dev, dtype = "cuda", torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, rows, cols in SHAPES:
        x = torch.randn(rows, cols, device=dev, dtype=dtype)
        w = torch.randn(cols, device=dev, dtype=dtype)
        dy, y, dx = torch.randn_like(x), torch.empty_like(x), torch.empty_like(x)
        rstd = torch.empty(rows, device=dev, dtype=torch.float32)
        block = triton.next_power_of_2(cols)
        src, dst = torch.empty(rows * cols * 2, device=dev, dtype=dtype), torch.empty(rows * cols * 2, device=dev,
                                                                                          dtype=dtype)
        copy_ms, _ = median_ms(lambda: dst.copy_(src))  # moves 4 rows x cols tensors' bytes, like a backward
        nbytes = x.numel() * x.element_size()
        print(f"\n{name}: {rows} x {cols}; same-size copy (4 tensors of bytes) {copy_ms * 1e3:.1f} us = "
              f"{4 * nbytes / copy_ms / 1e6:.0f} GB/s")
        best = {}
        for block_rows, warps in itertools.product([1, 2, 4, 8], [4, 8, 16]):
            if block_rows * block > 32768:
                continue
            grid = (triton.cdiv(rows, block_rows),)
            ms, _ = median_ms(lambda: _rms_norm_fwd_kernel[grid](x, cols, w, y, cols, rstd, rows, cols, 1e-6,
                                                                 HAS_WEIGHT=True, BLOCK_ROWS=block_rows, BLOCK=block,
                                                                 num_warps=warps))
            gbps = 2 * nbytes / ms / 1e6
            print(f"  fwd rows/program {block_rows:2} warps {warps:2}: {ms * 1e3:6.1f} us {gbps:6.0f} GB/s")
            best["fwd"] = min(best.get("fwd", (1e9,)), (ms, block_rows, warps))
            for per_sm in (2, 4, 8):
                programs = max(1, min(per_sm * sms, triton.cdiv(rows, block_rows)))
                partial = torch.empty(programs, cols, device=dev, dtype=torch.float32)
                ms, _ = median_ms(lambda: _rms_norm_bwd_kernel[(programs,)](
                    dy, cols, x, cols, w, rstd, dx, cols, partial, rows, cols, programs, HAS_WEIGHT=True,
                    COMPUTE_DW=True, BLOCK_ROWS=block_rows, BLOCK=block, num_warps=warps))
                print(f"  bwd rows/program {block_rows:2} warps {warps:2} programs/SM {per_sm}: "
                      f"{ms * 1e3:6.1f} us {3 * nbytes / ms / 1e6:6.0f} GB/s")
                best["bwd"] = min(best.get("bwd", (1e9,)), (ms, block_rows, warps, per_sm))
        print(f"  best fwd {best['fwd']}, best bwd {best['bwd']} (ms, rows/program, warps[, programs/SM])")


if __name__ == "__main__":
    main()
