"""Pick the launch settings of the RMSNorm and QK-norm+RoPE kernels on a GPU, at Gemma 4's
sizes, timed as CUDA-graph replays (benchmarks/timing.py).

    python -m benchmarks.tune_norm_kernels [rms] [qk]     # both when neither is named
    python -m benchmarks.tune_norm_kernels sum            # the weight-gradient partial-sum kernel

For each shape it sweeps the module constants that set a program's tile (elements per
program) and its warps (elements per warp) for the forward and the backward, and for the
backward that also sums the weight gradient, the programs per SM.
It prints each setting's time and bandwidth next to a copy of the same bytes (what the
memory system gives at this size), and the best settings. The chosen values are then written into the kernel
modules by hand.
"""
import itertools
import sys

import torch
import triton

from benchmarks.timing import median_ms
from gemmatune.kernels import qk_norm_rope as qk_mod
from gemmatune.kernels import rms_norm as rms_mod
from gemmatune.kernels._weight_grad import _sum_partials_kernel

TOKENS = 2048
RMS_SHAPES = [("E2B hidden", 1536), ("E4B hidden", 2560)]
QK_SHAPES = [("q sliding 8x256", 8, 256), ("q full 8x512", 8, 512), ("E2B k sliding 1x256", 1, 256),
             ("E4B k full 2x512", 2, 512)]
ELEMENTS_PER_WARP = [256, 512, 1024]
DW_ELEMENTS_PER_WARP = [512, 1024, 2048]
PROGRAMS_PER_SM = [1, 2, 4]


def _time(fn) -> float:
    return median_ms(fn, rep=30)[0] * 1e3  # microseconds


def _copy_us(nbytes: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return _time(lambda: dst.copy_(src))


def _sweep(module, fwd, bwd, bwd_dw, fwd_bytes, bwd_bytes, tiles):
    """Times the forward, the backward without dw (frozen weight) and with dw under each setting
    of the module's constants; prints the best of each."""
    names = ("FWD_TILE", "FWD_ELEMENTS_PER_WARP", "BWD_TILE", "BWD_ELEMENTS_PER_WARP", "DW_TILE",
             "DW_ELEMENTS_PER_WARP", "DW_PROGRAMS_PER_SM")
    saved = {name: getattr(module, name) for name in names}
    sweeps = [("fwd", fwd, fwd_bytes, ("FWD_TILE", "FWD_ELEMENTS_PER_WARP"), [tiles, ELEMENTS_PER_WARP]),
              ("bwd", bwd, bwd_bytes, ("BWD_TILE", "BWD_ELEMENTS_PER_WARP"), [tiles, ELEMENTS_PER_WARP]),
              ("bwd+dw", bwd_dw, bwd_bytes, ("DW_TILE", "DW_ELEMENTS_PER_WARP", "DW_PROGRAMS_PER_SM"),
               [tiles, DW_ELEMENTS_PER_WARP, PROGRAMS_PER_SM])]
    best = {}
    try:
        for label, fn, nbytes, constants, values in sweeps:
            for setting in itertools.product(*values):
                for name, value in zip(constants, setting):
                    setattr(module, name, value)
                us = _time(fn)
                print(f"  {label:6} {' '.join(f'{n}={v}' for n, v in zip(constants, setting))}: {us:6.1f} us "
                      f"{nbytes / us / 1e3:6.0f} GB/s")
                best[label] = min(best.get(label, (1e9,)), (round(us, 2), *setting))
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
    for label, _, _, constants, _ in sweeps:
        print(f"  best {label}: {best[label][0]} us at {dict(zip(constants, best[label][1:]))}", flush=True)


def tune_rms_norm(dtype=torch.bfloat16) -> None:
    for name, cols in RMS_SHAPES:
        x = torch.randn(TOKENS, cols, device="cuda", dtype=dtype)
        w = torch.randn(cols, device="cuda", dtype=dtype)
        dy = torch.randn_like(x)
        _, x2, rstd = rms_mod.rms_norm_forward(x, w, 1e-6)
        nbytes = x.numel() * x.element_size()
        print(f"\nrms_norm {name}: {TOKENS} x {cols}; copy of the fwd+bwd bytes: {_copy_us(5 * nbytes):.1f} us")
        _sweep(rms_mod, lambda: rms_mod.rms_norm_forward(x, w, 1e-6),
               lambda: rms_mod.rms_norm_backward(dy, x2, w, rstd, False),
               lambda: rms_mod.rms_norm_backward(dy, x2, w, rstd, True), 2 * nbytes, 3 * nbytes,
               tiles=[2048, 4096, 8192])


def tune_qk_norm_rope(dtype=torch.bfloat16) -> None:
    for name, heads, head_dim in QK_SHAPES:
        x = torch.randn(1, TOKENS, heads, head_dim, device="cuda", dtype=dtype)
        w = torch.randn(head_dim, device="cuda", dtype=dtype)
        cos, sin = torch.randn(2, 1, TOKENS, head_dim, device="cuda", dtype=dtype)
        dy = torch.randn_like(x)
        _, rstd = qk_mod.qk_norm_rope_forward(x, w, cos, sin, 1e-6)
        nbytes, cos_bytes = x.numel() * x.element_size(), 2 * cos.numel() * cos.element_size()
        print(f"\nqk_norm_rope {name}: {TOKENS} tokens; copy of the fwd+bwd bytes: "
              f"{_copy_us(5 * nbytes + 2 * cos_bytes):.1f} us")
        _sweep(qk_mod, lambda: qk_mod.qk_norm_rope_forward(x, w, cos, sin, 1e-6),
               lambda: qk_mod.qk_norm_rope_backward(dy, x, w, cos, sin, rstd, False),
               lambda: qk_mod.qk_norm_rope_backward(dy, x, w, cos, sin, rstd, True),
               2 * nbytes + cos_bytes, 3 * nbytes + cos_bytes, tiles=[512, 1024, 2048])


def tune_sum_partials(partials: int = 264) -> None:
    """The (partials x hidden) fp32 column sum + cast to bf16 against torch's sum and cast;
    264 partial rows = 2 backward programs per SM on an H200."""
    for cols in (1536, 2560):
        part = torch.randn(partials, cols, device="cuda")
        out = torch.empty(cols, device="cuda", dtype=torch.bfloat16)
        want = part.sum(0).bfloat16()
        print(f"{cols} torch sum+cast {_time(lambda: part.sum(0).to(torch.bfloat16)):.2f} us")
        for block_c, block_p, warps in itertools.product([16, 32, 64, 128], [16, 32, 64, 128], [1, 2, 4]):
            def launch():
                _sum_partials_kernel[(triton.cdiv(cols, block_c),)](part, out, partials, cols, BLOCK_P=block_p,
                                                                    BLOCK_C=block_c, num_warps=warps)
            us = _time(launch)
            launch()
            ok = torch.allclose(out.float(), want.float(), rtol=1e-2, atol=1e-2)
            print(f"{cols} {block_c} {block_p} {warps} {us:.2f} us {ok}")  # columns/program, rows/step, warps


def main() -> None:
    if "sum" in sys.argv[1:]:
        return tune_sum_partials()
    which = set(sys.argv[1:]) or {"rms", "qk"}
    if "rms" in which:
        tune_rms_norm()
    if "qk" in which:
        tune_qk_norm_rope()


if __name__ == "__main__":
    main()
