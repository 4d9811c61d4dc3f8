"""Benchmarks: qk_norm_rope (alone and as a query/key pair), dequantize_nf4 and lora_nf4_linear
against what they replace.

`run(record)` is called by benchmarks/kernel_suite.py. On CUDA it times the median of CUDA-graph replays
(benchmarks/timing.py), measures the peak memory a call allocates on top of its inputs, the max relative error
against an fp64 (or bit-exact) reference, and a physical rate: GB/s for the memory-bound kernels
(qk_norm_rope, dequantisation; compare with the `copy_ceiling` record, a plain device copy) and
TFLOP/s (extra key `tflops`; compare with the `mm_ceiling` record) for the 4-bit LoRA linear.

Shapes: Gemma 4 E2B (hidden 1536, intermediate 6144) and E4B (hidden 2560, intermediate 10240),
8 query heads of 256 (sliding layers) / 512 (full layers), 2048 tokens, bf16.
`run(record, quick=True)` uses tiny shapes and a wall-clock timer so the code can be smoke-tested
on a CPU (with TRITON_INTERPRET=1, fp32).
"""
import time

import torch
import torch.nn.functional as F

from benchmarks.timing import median_ms

TOKENS = 2048
QK_SHAPES = [  # (name, heads, head_dim, layer_type)
    ("q_sliding_8x256", 8, 256, "sliding_attention"),
    ("q_full_8x512", 8, 512, "full_attention"),
    ("e2b_k_sliding_1x256", 1, 256, "sliding_attention"),
    ("e4b_k_full_2x512", 2, 512, "full_attention"),
]
QK_PAIR_SHAPES = [  # (name, query heads, key heads, head_dim, layer_type): one layer's q and k together
    ("e2b_sliding_q8_k1", 8, 1, 256, "sliding_attention"),
    ("e4b_sliding_q8_k2", 8, 2, 256, "sliding_attention"),
    ("e4b_full_q8_k2", 8, 2, 512, "full_attention"),
]
LINEAR_SHAPES = [  # (name, out, in)
    ("e2b_q", 2048, 1536), ("e2b_q_full", 4096, 1536), ("e2b_o", 1536, 2048),
    ("e2b_gate_up", 6144, 1536), ("e2b_down", 1536, 6144),
    ("e4b_q", 2048, 2560), ("e4b_o", 2560, 2048), ("e4b_gate_up", 10240, 2560), ("e4b_down", 2560, 10240),
]
RANK, SCALE = 16, 2.0


def _median_ms(fn, cuda):
    """(median ms, timing label): CUDA-graph replays on a GPU (benchmarks/timing.py)."""
    if cuda:
        return median_ms(fn)
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1], "cpu"


def _peak_extra_mib(fn, cuda):
    """Peak memory allocated by one call above what was allocated before it (outputs included)."""
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def _rel(a, ref):
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def _ceilings(record, dev, cuda):
    n = 256 * 2**20 if cuda else 2**20
    src, dst = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
    ms, timing = _median_ms(lambda: dst.copy_(src), cuda)
    record(dict(kernel="copy_ceiling", impl="torch", shape=f"{n} bytes", dtype="uint8", median_ms=ms, timing=timing,
                peak_extra_mib=0.0, rel_err=0.0, gbps=2 * n / ms / 1e6))
    m = 4096 if cuda else 128
    a = torch.randn(m, m, device=dev, dtype=torch.bfloat16 if cuda else torch.float32)
    ms, timing = _median_ms(lambda: a @ a, cuda)
    record(dict(kernel="mm_ceiling", impl="torch", shape=f"{m}x{m}x{m}", dtype=str(a.dtype), median_ms=ms,
                timing=timing, peak_extra_mib=0.0, rel_err=0.0, gbps=None, tflops=2 * m**3 / ms / 1e9))


def _bench_qk_norm_rope(record, dev, dtype, cuda, tokens, shapes):
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import (Gemma4RMSNorm, Gemma4TextRotaryEmbedding,
                                                            apply_rotary_pos_emb)

    from gemmatune.kernels.qk_norm_rope import (qk_norm_rope, qk_norm_rope_backward, qk_norm_rope_forward,
                                                qk_norm_rope_reference)

    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception as e:  # not installed, or an API that moved
        print(f"[kernels_rope_nf4] liger skipped: {e!r}")
        LigerRMSNormFunction = None

    config = Gemma4TextConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=shapes[0][2], global_head_dim=shapes[1][2], num_hidden_layers=2,
                              intermediate_size=64, vocab_size=128,
                              layer_types=["sliding_attention", "full_attention"])
    rope = Gemma4TextRotaryEmbedding(config, device=dev)
    pos = torch.arange(tokens, device=dev)[None]
    for name, H, D, layer_type in shapes:
        cos, sin = rope(torch.zeros(1, dtype=dtype, device=dev), pos, layer_type)
        norm = Gemma4RMSNorm(D).to(device=dev, dtype=dtype)
        x = torch.randn(1, tokens, H, D, device=dev, dtype=dtype, requires_grad=True)
        g = torch.randn(1, tokens, H, D, device=dev, dtype=dtype)
        y64 = qk_norm_rope_reference(x.detach().double(), norm.weight.detach().double(), cos.double(), sin.double())
        k_small = torch.randn(1, 1, tokens, D, device=dev, dtype=dtype)  # liger rope wants a k too

        impls = {
            "gemmatune": lambda: qk_norm_rope(x, norm.weight, cos, sin, 1e-6),
            "torch": lambda: apply_rotary_pos_emb(norm(x), cos, sin, unsqueeze_dim=2),
        }
        if LigerRMSNormFunction is not None:
            def liger():
                h = LigerRMSNormFunction.apply(x, norm.weight, 1e-6, 0.0, "gemma", False)
                q, _ = liger_rotary_pos_emb(h.transpose(1, 2), k_small, cos, sin)
                return q.transpose(1, 2)
            impls["liger"] = liger
        n_bytes = (5 * x.numel() + 4 * tokens * D) * x.element_size()  # x, y, dy, x, dx; cos, sin twice
        shape = f"{tokens}x{H}x{D}"
        # with the weight's gradient, and frozen as LoRA leaves it (dx only; the same bytes)
        for kernel, frozen in (("qk_norm_rope_fwd_bwd", False), ("qk_norm_rope_fwd_bwd_frozen_weight", True)):
            norm.weight.requires_grad_(not frozen)
            wrt = (x,) if frozen else (x, norm.weight)
            for impl, fwd in impls.items():
                def step():
                    y = fwd()
                    torch.autograd.grad(y, wrt, g)
                    return y
                try:
                    # detached: a live output keeps its autograd graph, whose gradient-accumulation
                    # node then belongs to this stream and breaks the graph capture below
                    rel = _rel(fwd().detach(), y64)
                    ms, timing = _median_ms(step, cuda)
                    mib = _peak_extra_mib(step, cuda)
                except Exception as e:
                    print(f"[kernels_rope_nf4] qk_norm_rope {impl} {name} failed: {e!r}")
                    continue
                record(dict(kernel=kernel, impl=impl, shape=shape, dtype=str(dtype), median_ms=ms, timing=timing,
                            peak_extra_mib=mib, rel_err=rel, gbps=n_bytes / ms / 1e6))
        norm.weight.requires_grad_(True)
        if cuda:  # the two kernels alone, and a copy of the op's bytes: the bandwidth at this size
            w = norm.weight.detach()
            _, rstd = qk_norm_rope_forward(x.detach(), w, cos, sin, 1e-6)
            src = torch.empty(n_bytes // 2, dtype=torch.uint8, device=dev)
            dst = torch.empty_like(src)
            rows = {"qk_norm_rope_fwd_kernel": (lambda: qk_norm_rope_forward(x.detach(), w, cos, sin, 1e-6),
                                                (2 * x.numel() + 2 * tokens * D) * x.element_size()),
                    "qk_norm_rope_bwd_kernels": (lambda: qk_norm_rope_backward(g, x.detach(), w, cos, sin, rstd),
                                                 (3 * x.numel() + 2 * tokens * D) * x.element_size()),
                    "qk_norm_rope_bwd_kernel_frozen_weight": (
                        lambda: qk_norm_rope_backward(g, x.detach(), w, cos, sin, rstd, compute_dw=False),
                        (3 * x.numel() + 2 * tokens * D) * x.element_size()),
                    "copy_same_size": (lambda: dst.copy_(src), n_bytes)}
            for kernel, (fn, moved) in rows.items():
                ms, timing = _median_ms(fn, cuda)
                record(dict(kernel=kernel, impl="torch" if kernel == "copy_same_size" else "gemmatune", shape=shape,
                            dtype=str(dtype), median_ms=ms, timing=timing, peak_extra_mib=0.0, rel_err=0.0,
                            gbps=moved / ms / 1e6))


def _bench_qk_pair(record, dev, dtype, cuda, tokens, shapes):
    """A layer's query and key norm + RoPE, frozen weights (as LoRA trains): qk_norm_rope_pair
    (one launch each way for both) against two qk_norm_rope calls in a row (what the pair
    replaces, timed on the same inputs so both see the same L2 cache), two eager and two Liger
    calls."""
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import (Gemma4RMSNorm, Gemma4TextRotaryEmbedding,
                                                            apply_rotary_pos_emb)

    from gemmatune.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_pair, qk_norm_rope_reference

    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception:  # reported by _bench_qk_norm_rope
        LigerRMSNormFunction = None
    for name, Hq, Hk, D, layer_type in shapes:
        config = Gemma4TextConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=D,
                                  global_head_dim=D, num_hidden_layers=2, intermediate_size=64, vocab_size=128,
                                  layer_types=["sliding_attention", "full_attention"])
        rope = Gemma4TextRotaryEmbedding(config, device=dev)
        cos, sin = rope(torch.zeros(1, dtype=dtype, device=dev), torch.arange(tokens, device=dev)[None], layer_type)
        q_norm, k_norm = (Gemma4RMSNorm(D).to(device=dev, dtype=dtype).requires_grad_(False) for _ in range(2))
        q = torch.randn(1, tokens, Hq, D, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(1, tokens, Hk, D, device=dev, dtype=dtype, requires_grad=True)
        gq, gk = torch.randn_like(q), torch.randn_like(k)
        want = [qk_norm_rope_reference(x.detach().double(), n.weight.double(), cos.double(), sin.double())
                for x, n in ((q, q_norm), (k, k_norm))]
        pair, two_calls = "qk_norm_rope_pair_fwd_bwd_frozen_weight", "qk_norm_rope_two_calls_fwd_bwd_frozen_weight"
        impls = [  # (kernel, impl, forward of q and k)
            (pair, "gemmatune", lambda: qk_norm_rope_pair(q, q_norm.weight, k, k_norm.weight, cos, sin)),
            (two_calls, "gemmatune", lambda: (qk_norm_rope(q, q_norm.weight, cos, sin),
                                              qk_norm_rope(k, k_norm.weight, cos, sin))),
            (pair, "torch", lambda: (apply_rotary_pos_emb(q_norm(q), cos, sin, unsqueeze_dim=2),
                                     apply_rotary_pos_emb(k_norm(k), cos, sin, unsqueeze_dim=2))),
        ]
        if LigerRMSNormFunction is not None:
            def liger():  # liger's rope takes q and k together, (B, heads, S, D)
                qn = LigerRMSNormFunction.apply(q, q_norm.weight, 1e-6, 0.0, "gemma", False)
                kn = LigerRMSNormFunction.apply(k, k_norm.weight, 1e-6, 0.0, "gemma", False)
                yq, yk = liger_rotary_pos_emb(qn.transpose(1, 2), kn.transpose(1, 2), cos, sin)
                return yq.transpose(1, 2), yk.transpose(1, 2)
            impls.append((pair, "liger", liger))
        n_bytes = (5 * (q.numel() + k.numel()) + 4 * tokens * D) * q.element_size()
        for kernel, impl, fwd in impls:
            def step():
                y_q, y_k = fwd()
                torch.autograd.grad((y_q, y_k), (q, k), (gq, gk))
                return y_q
            try:
                rel = max(_rel(y.detach(), ref) for y, ref in zip(fwd(), want))
                ms, timing = _median_ms(step, cuda)
                mib = _peak_extra_mib(step, cuda)
            except Exception as e:
                print(f"[kernels_rope_nf4] {kernel} {impl} {name} failed: {e!r}")
                continue
            record(dict(kernel=kernel, impl=impl,
                        shape=f"{tokens}x(q{Hq}+k{Hk})x{D}", dtype=str(dtype), median_ms=ms, timing=timing,
                        peak_extra_mib=mib, rel_err=rel, gbps=n_bytes / ms / 1e6))


def _quantize(out_f, in_f, dtype, dev, seed):
    """A bnb Linear4bit (NF4, double quant, as QLoRA loads it) whose weights were `dtype`."""
    import bitsandbytes as bnb
    g = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4",
                              compress_statistics=True)
    w = (torch.randn(out_f, in_f, generator=g) / in_f ** 0.5).to(dtype)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
    return layer.to(dev)  # quantises on the move


def _bench_nf4(record, dev, dtype, cuda, shapes):
    import bitsandbytes.functional as bnbF

    from gemmatune.kernels.nf4 import dequantize_nf4

    for name, out_f, in_f in shapes:
        layer = _quantize(out_f, in_f, dtype, dev, out_f + in_f)
        w, qs = layer.weight.data, layer.weight.quant_state
        expected = bnbF.dequantize_4bit(w, qs)
        n = out_f * in_f
        n_bytes = n // 2 + n // qs.blocksize + n * expected.element_size()  # packed, uint8 absmax, output
        for impl, fn in (("gemmatune", lambda: dequantize_nf4(w, qs)),
                         ("bitsandbytes", lambda: bnbF.dequantize_4bit(w, qs))):
            got = fn()
            rel = 0.0 if torch.equal(got, expected) else _rel(got, expected)
            ms, timing = _median_ms(fn, cuda)
            record(dict(kernel="dequantize_nf4", impl=impl, shape=f"{name}:{out_f}x{in_f}", dtype=str(dtype),
                        median_ms=ms, timing=timing, peak_extra_mib=_peak_extra_mib(fn, cuda), rel_err=rel,
                        gbps=n_bytes / ms / 1e6))


def _bench_lora(record, dev, dtype, cuda, tokens, shapes):
    import bitsandbytes.functional as bnbF

    from gemmatune.kernels.lora_nf4_linear import LoRANF4LinearFunction, release_workspace

    for name, out_f, in_f in shapes:
        layer = _quantize(out_f, in_f, dtype, dev, out_f + in_f)
        w, qs = layer.weight, layer.weight.quant_state
        g0 = torch.Generator().manual_seed(1)
        A = (torch.randn(RANK, in_f, generator=g0) / in_f ** 0.5).to(dev, dtype).requires_grad_()
        B = (torch.randn(out_f, RANK, generator=g0) * 0.1).to(dev, dtype).requires_grad_()
        x = torch.randn(tokens, in_f, device=dev, dtype=dtype, requires_grad=True)
        g = torch.randn(tokens, out_f, device=dev, dtype=dtype)
        x64, W64 = x.detach().double(), bnbF.dequantize_4bit(w.data, qs).double()
        y64 = x64 @ W64.t() + (x64 @ A.detach().double().t()) @ B.detach().double().t() * SCALE
        del x64, W64
        flops = 4 * tokens * in_f * out_f + 6 * tokens * RANK * (in_f + out_f)
        impls = {
            "gemmatune": lambda: LoRANF4LinearFunction.apply(x, w, qs, A, B, SCALE, None),
            # bnb Linear4bit + peft's LoRA branch (dropout 0): base(x) + lora_B(lora_A(x)) * scaling
            "bitsandbytes": lambda: layer(x) + F.linear(F.linear(x, A), B) * SCALE,
        }
        for impl, fwd in impls.items():
            def step():
                y = fwd()
                torch.autograd.grad(y, (x, A, B), g)
                return y
            rel = _rel(fwd().detach(), y64)
            ms, timing = _median_ms(step, cuda)
            release_workspace()  # count the workspace in the peak, like bnb's transient W
            mib = _peak_extra_mib(step, cuda)
            record(dict(kernel="lora_nf4_linear_fwd_bwd", impl=impl, shape=f"{name}:{tokens}x{in_f}->{out_f} r{RANK}",
                        dtype=str(dtype), median_ms=ms, timing=timing, peak_extra_mib=mib, rel_err=rel, gbps=None,
                        tflops=flops / ms / 1e9))
        del y64


def run(record, quick=False):
    cuda = torch.cuda.is_available()
    if not cuda and not quick:
        print("[kernels_rope_nf4] no CUDA: skipped (run(record, quick=True) smoke-tests on CPU)")
        return
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens = TOKENS if not quick else 16
    qk_shapes = QK_SHAPES if not quick else [("tiny_sliding", 2, 64, "sliding_attention"),
                                              ("tiny_full", 2, 128, "full_attention")]
    lin_shapes = LINEAR_SHAPES if not quick else [("tiny", 192, 320)]
    torch.manual_seed(0)
    _ceilings(record, dev, cuda)
    _bench_qk_norm_rope(record, dev, dtype, cuda, tokens, qk_shapes)
    _bench_qk_pair(record, dev, dtype, cuda, tokens, QK_PAIR_SHAPES if not quick else [("tiny", 2, 1, 64,
                                                                                         "sliding_attention")])
    if not quick:  # the weight-gradient path at 8192 tokens, where its fixed second kernel matters less
        _bench_qk_norm_rope(record, dev, dtype, cuda, 4 * tokens, QK_SHAPES[:2])
    _bench_nf4(record, dev, dtype, cuda, lin_shapes)
    _bench_lora(record, dev, dtype, cuda, tokens, lin_shapes)


if __name__ == "__main__":
    import json
    import sys
    run(lambda r: print(json.dumps(r)), quick="--quick" in sys.argv)
