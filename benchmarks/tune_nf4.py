"""Pick the NF4 dequantisation kernel's launch settings on a GPU, at Gemma 4's projection sizes,
timed as CUDA-graph replays (benchmarks/timing.py).

    python -m benchmarks.tune_nf4

Sweeps gemmatune.kernels.nf4's BYTES_PER_PROGRAM and NUM_WARPS on every E2B/E4B projection
(NF4, blocksize 64, double quantisation, bf16 out, as QLoRA loads them) and prints each
setting's time and bandwidth per shape, next to bitsandbytes and a copy of the same bytes,
then the settings with the least total time. The chosen values are written into nf4.py by hand.
"""
import itertools

import torch

from benchmarks.kernels_rope_nf4 import LINEAR_SHAPES
from benchmarks.timing import median_ms
from gemmatune.kernels import nf4

BYTES_PER_PROGRAM = [512, 1024, 2048, 4096, 8192]
NUM_WARPS = [1, 2, 4, 8]


def _us(fn) -> float:
    return median_ms(fn, rep=30)[0] * 1e3


def main() -> None:
    import bitsandbytes.functional as bnbF

    weights = []
    for name, out_f, in_f in LINEAR_SHAPES:
        w = (torch.randn(out_f, in_f, device="cuda") / in_f**0.5).to(torch.bfloat16)
        packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        out = torch.empty_like(w)
        moved = packed.numel() + state.absmax.numel() + 2 * w.numel()  # bytes read + written
        src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy_us, bnb_us = _us(lambda: dst.copy_(src)), _us(lambda: bnbF.dequantize_4bit(packed, state, out=out))
        print(f"{name:12} {moved / 2**20:6.1f} MiB  copy {copy_us:6.1f} us  bitsandbytes {bnb_us:6.1f} us", flush=True)
        weights.append((name, packed, state, out, moved))

    saved = nf4.BYTES_PER_PROGRAM, nf4.NUM_WARPS
    totals = {}
    try:
        for tile, warps in itertools.product(BYTES_PER_PROGRAM, NUM_WARPS):
            nf4.BYTES_PER_PROGRAM, nf4.NUM_WARPS = tile, warps
            times = []
            for name, packed, state, out, moved in weights:
                fn = lambda: nf4.dequantize_nf4_forward(packed, state, out=out)  # noqa: E731
                fn()
                assert torch.equal(out, bnbF.dequantize_4bit(packed, state)), (name, tile, warps)
                times.append(_us(fn))
            totals[tile, warps] = sum(times)
            cells = "  ".join(f"{t:5.1f} ({moved / t / 1e3:4.0f})" for t, (*_, moved) in zip(times, weights))
            print(f"bytes/program {tile:5} warps {warps}: total {sum(times):6.1f} us | {cells}", flush=True)
    finally:
        nf4.BYTES_PER_PROGRAM, nf4.NUM_WARPS = saved
    print("columns: us (GB/s) per shape, in this order:", " ".join(name for name, *_ in weights))
    for (tile, warps), total in sorted(totals.items(), key=lambda kv: kv[1])[:5]:
        print(f"best: BYTES_PER_PROGRAM={tile} NUM_WARPS={warps}  total {total:.1f} us")


if __name__ == "__main__":
    main()
