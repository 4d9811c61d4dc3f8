"""Pick the NF4 GEMV's launch settings on a GPU, at Gemma 4's decode shapes, timed as CUDA-graph
replays (benchmarks/timing.py, as a decode step runs).

    python -m benchmarks.tune_nf4_gemv            # about 1 minute on an H200

For every E2B/E4B projection (plus E2B's double-wide MLP, the K/V and per-layer-embedding
projections) at 1 and 2 rows of x (MAX_ROWS: where the GEMV stops paying), bf16, NF4
blocksize 64 with double quantisation: the time and bandwidth (packed weight bytes / time) of
gemmatune.kernels.nf4_gemv at its current settings, next to a copy of the same bytes,
gemmatune's dequantise + GEMM training path, and bitsandbytes' own 4-bit matmul (what the stock
stack decodes with); at one row, every (PROGRAMS_WANTED, MAX_BLOCK_KB, NUM_WARPS) setting too, each
checked against the first one's output. Prints the settings with the least total time at one
row; the chosen values are written into nf4_gemv.py by hand. Then the LoRA down-projection
(gemmatune.kernels.nf4_gemv.lora_down) against cuBLAS at one row.
"""
import itertools

import torch

from benchmarks.kernels_rope_nf4 import LINEAR_SHAPES
from benchmarks.timing import median_ms
from gemmatune.kernels import nf4_gemv
from gemmatune.kernels.lora_nf4_linear import nf4_linear

SHAPES = LINEAR_SHAPES + [("e2b_kv", 256, 1536), ("e2b_gate_up_wide", 12288, 1536), ("e2b_down_wide", 1536, 12288),
                          ("e2b_ple_gate", 256, 1536), ("e2b_ple_proj", 1536, 256), ("e4b_kv", 512, 2560)]
PROGRAMS_WANTED = [264, 1056, 4224]
MAX_BLOCK_KB = [256, 512, 1024]
NUM_WARPS = [2, 4]


def _us(fn) -> float:
    return median_ms(fn, rep=20)[0] * 1e3


def main() -> None:
    import bitsandbytes as bnb

    weights = []
    for name, out_f, in_f in SHAPES:
        w = (torch.randn(out_f, in_f, device="cuda") / in_f ** 0.5).to(torch.bfloat16)
        w4 = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True).cuda()
        weights.append((name, w4, out_f * in_f // 2))
    for rows in (1, 2):
        print(f"\n--- {rows} row(s) of x ---", flush=True)
        xs = {}
        for name, w4, nbytes in weights:
            x = torch.randn(rows, w4.quant_state.shape[1], device="cuda", dtype=torch.bfloat16)
            xs[name] = x
            src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            copy_us = _us(lambda: dst.copy_(src))
            dequant_us = _us(lambda: nf4_linear(x, w4, w4.quant_state))
            bnb_us = _us(lambda: bnb.matmul_4bit(x, w4.t(), quant_state=w4.quant_state))
            gemv_us = _us(lambda: nf4_gemv.nf4_gemv_forward(x, w4, w4.quant_state))  # the kernel at any rows
            print(f"{name:17} {nbytes / 2**20:5.1f} MiB  copy {copy_us:6.1f} us ({nbytes / copy_us / 1e3:4.0f} GB/s)"
                  f"  gemv {gemv_us:6.1f} us ({nbytes / gemv_us / 1e3:4.0f} GB/s)  dequant+GEMM {dequant_us:6.1f} us"
                  f"  bitsandbytes {bnb_us:6.1f} us", flush=True)
        if rows == 1:  # the sweep at chat's one row; more rows (evaluation) only at the chosen settings
            sweep(weights, xs)
            lora_down_times()


def lora_down_times() -> None:
    """The LoRA down-projection t = x @ A^T (r = 16) at one row: cuBLAS against lora_down."""
    for k in (1536, 2048, 2560, 6144, 10240, 12288):
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(16, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        err = (nf4_gemv.lora_down(x, a).float() - (x.float() @ a.float().t())).abs().max().item()
        print(f"lora down K={k:5}: cuBLAS {_us(lambda: x @ a.t()):5.1f} us, lora_down "
              f"{_us(lambda: nf4_gemv.lora_down(x, a)):5.1f} us (max abs error vs fp32 {err:.1e})", flush=True)


def sweep(weights, xs) -> None:
    saved = nf4_gemv.PROGRAMS_WANTED, nf4_gemv.MAX_BLOCK_KB, nf4_gemv.NUM_WARPS
    totals, expected = {}, {}
    try:
        for setting in itertools.product(PROGRAMS_WANTED, MAX_BLOCK_KB, NUM_WARPS):
            nf4_gemv.PROGRAMS_WANTED, nf4_gemv.MAX_BLOCK_KB, nf4_gemv.NUM_WARPS = setting
            times = []
            for name, w4, nbytes in weights:
                x = xs[name]
                fn = lambda: nf4_gemv.nf4_gemv_forward(x, w4, w4.quant_state)  # noqa: E731
                y = fn()
                ref = expected.setdefault(name, y)
                assert (y.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max(), (name, setting)
                times.append(_us(fn))
            totals[setting] = sum(times)
            cells = "  ".join(f"{t:5.1f} ({nbytes / t / 1e3:4.0f})" for t, (_, _, nbytes) in zip(times, weights))
            print(f"programs {setting[0]:5} chunk {setting[1]:5} warps {setting[2]}: total {sum(times):7.1f} us | "
                  f"{cells}", flush=True)
    finally:
        nf4_gemv.PROGRAMS_WANTED, nf4_gemv.MAX_BLOCK_KB, nf4_gemv.NUM_WARPS = saved
    print("columns: us (GB/s) per shape, in this order:", " ".join(name for name, *_ in weights))
    print(f"current: PROGRAMS_WANTED={saved[0]} MAX_BLOCK_KB={saved[1]} NUM_WARPS={saved[2]}: "
          f"total {totals.get(saved, 0):.1f} us")
    for (programs, chunk, warps), total in sorted(totals.items(), key=lambda kv: kv[1])[:5]:
        print(f"best: PROGRAMS_WANTED={programs} MAX_BLOCK_KB={chunk} NUM_WARPS={warps}  total {total:.1f} us")


if __name__ == "__main__":
    main()
