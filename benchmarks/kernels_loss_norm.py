"""Benchmark: fused linear CE, RMSNorm and GEGLU against eager PyTorch and Liger Kernel (if installed).

`run(record)` times forward + backward (median of CUDA-graph replays, benchmarks/timing.py), measures the peak
memory a call adds on top of its inputs (max_memory_allocated after reset_peak_memory_stats,
minus the baseline), and the relative error (norm-wise, the worst of the output and its
gradients) against an fp64 computation of the same inputs. For the memory-bound RMSNorm and
GEGLU it also reports achieved GB/s: the bytes a fused forward + backward must move (listed per
kernel below) divided by the time. Shapes are Gemma 4 E2B and E4B, 2048 tokens, bf16; the LM
head is frozen (as in LoRA training), so the loss backward produces d hidden only.

Called by the driver benchmarks/kernel_suite.py; CUDA only (prints a note and returns otherwise).
"""
import torch
import torch.nn.functional as F

from benchmarks.timing import median_ms
from gemmatune.kernels.fused_linear_ce import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from gemmatune.kernels.geglu import geglu, geglu_reference
from gemmatune.kernels.rms_norm import rms_norm, rms_norm_reference

SIZES = {"E2B": dict(hidden=1536, intermediate=6144), "E4B": dict(hidden=2560, intermediate=10240)}
TOKENS, VOCAB, SOFTCAP, DTYPE = 2048, 262144, 30.0, torch.bfloat16


def _liger():
    """Liger's three ops as callables with our signatures, or {} when liger_kernel is absent."""
    try:
        from liger_kernel.ops.geglu import LigerGELUMulFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # not installed, or an API that moved
        print(f"liger_kernel unavailable ({exc.__class__.__name__}: {exc}); skipping its rows")
        return {}
    ce_loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, softcap=SOFTCAP, reduction="mean")

    def liger_ce(h, w, labels):
        out = ce_loss(w, h, labels)
        return out[0] if isinstance(out, tuple) else getattr(out, "loss", out)

    def liger_rms(x, w):
        # Gemma 4: offset 0 (no 1 + w), "gemma" casting (everything in fp32, one cast at the end).
        try:
            return LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "gemma", False)  # (.., in_place)
        except TypeError:  # older Liger without in_place
            return LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "gemma")

    return {"ce": liger_ce, "rms": liger_rms, "geglu": lambda g, u: LigerGELUMulFunction.apply(g, u)}


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _measure(fn, inputs, grad_out, reference_results):
    """(median ms of forward + backward, peak extra MiB, worst relative error vs fp64, timing)."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        out = fn(*inputs)
        out.backward(grad_out if out.dim() else None)
        return out

    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    results = [out.detach()] + [t.grad for t in leaves]
    err = max(_rel_err(r, ref) for r, ref in zip(results, reference_results))
    del out, results
    ms, timing = median_ms(step, grad_to_none=leaves)
    return ms, peak_mib, err, timing


def _fp64_results(fn, inputs, grad_out):
    inputs64 = [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
                for t in inputs]
    out = fn(*inputs64)
    out.backward(grad_out.double() if out.dim() else None)
    return [out.detach()] + [t.grad for t in inputs64 if t.is_floating_point() and t.requires_grad]


def _eager_ce(h, w, labels):
    """transformers' path: bf16 logits, softcap in bf16, CE on fp32 logits, mean over labels."""
    logits = torch.tanh((h @ w.t()) / SOFTCAP) * SOFTCAP
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)


def _eager_geglu(g, u):
    return F.gelu(g, approximate="tanh") * u


def _compare(record, kernel, shape, impls, inputs, grad_out, reference_results, bytes_moved=None):
    """One record per implementation of `kernel`; gbps only for memory-bound kernels."""
    for impl, fn in impls.items():
        ms, mib, err, timing = _measure(fn, inputs, grad_out, reference_results)
        record(dict(kernel=kernel, impl=impl, shape=shape, dtype=str(DTYPE), median_ms=ms, timing=timing,
                    peak_extra_mib=mib, rel_err=err, gbps=bytes_moved / ms / 1e6 if bytes_moved else None))


def _record_norm_kernels(record, size_name, x, w, dy):
    """The RMSNorm forward and backward kernels timed alone (the op above adds autograd's
    work; "kernels": the backward and its weight-gradient sum), and a copy of the same bytes:
    at 2048 tokens the tensors fit in the H200's 50 MB L2 cache, so the same-size copy is the
    fair ceiling here, next to copy_ceiling's 256 MiB one."""
    from gemmatune.kernels.rms_norm import rms_norm_backward, rms_norm_forward

    nbytes = x.numel() * x.element_size()
    _, x2, rstd = rms_norm_forward(x.detach(), w.detach(), 1e-6)
    src = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    dst = torch.empty_like(src)
    rows = {"rms_norm_fwd_kernel": (lambda: rms_norm_forward(x.detach(), w.detach(), 1e-6), 2 * nbytes),
            "rms_norm_bwd_kernels": (lambda: rms_norm_backward(dy, x2, w.detach(), rstd, True), 3 * nbytes),
            "rms_norm_bwd_kernel_frozen_weight": (lambda: rms_norm_backward(dy, x2, w.detach(), rstd, False),
                                                  3 * nbytes),
            "copy_same_size": (lambda: dst.copy_(src), 2 * nbytes)}
    for kernel, (fn, moved) in rows.items():
        ms, timing = median_ms(fn)
        record(dict(kernel=kernel, impl="gemmatune" if "rms" in kernel else "torch",
                    shape=f"{size_name} N{x.shape[0]} H{x.shape[1]}", dtype=str(x.dtype), median_ms=ms, timing=timing,
                    peak_extra_mib=0.0, rel_err=0.0, gbps=moved / ms / 1e6))


def run(record):
    if not torch.cuda.is_available():
        print("kernels_loss_norm: no CUDA device, nothing measured")
        return
    dev = "cuda"
    liger = _liger()
    gen = torch.Generator(device=dev).manual_seed(0)
    for size_name, size in SIZES.items():
        H, I = size["hidden"], size["intermediate"]  # noqa: E741 (the paper's names)

        # --- fused linear cross-entropy (loss only; gbps None: it is matmul-bound) -------------
        h = torch.randn(TOKENS, H, device=dev, generator=gen).to(DTYPE).requires_grad_(True)
        w = (torch.randn(VOCAB, H, device=dev, generator=gen) * (4 / H**0.5)).to(DTYPE)
        labels = torch.randint(0, VOCAB, (TOKENS,), device=dev, generator=gen)
        labels[::10] = -100
        ref = _fp64_results(lambda h, w, y: fused_linear_cross_entropy_reference(h, w, y, SOFTCAP), (h, w, labels),
                            None)
        torch.cuda.empty_cache()
        impls = {"gemmatune": lambda h, w, y: fused_linear_cross_entropy(h, w, y, softcap=SOFTCAP),
                 "torch": _eager_ce}
        if "ce" in liger:
            impls["liger"] = liger["ce"]
        _compare(record, "fused_linear_ce", f"{size_name} N{TOKENS} H{H} V{VOCAB}", impls, (h, w, labels), None, ref)
        del h, w, labels, ref
        torch.cuda.empty_cache()

        # --- RMSNorm: bytes = x read twice, y written, dy read, dx written (+ w, negligible) ---
        x, wn, dy = _rms_inputs(TOKENS, H, gen)
        _compare(record, "rms_norm", f"{size_name} N{TOKENS} H{H}", _rms_impls(liger), (x, wn), dy,
                 _fp64_results(rms_norm_reference, (x, wn), dy), bytes_moved=5 * x.numel() * x.element_size())
        # LoRA freezes the norm weights: the backward computes dx only (same bytes moved)
        frozen = wn.detach()
        _compare(record, "rms_norm_frozen_weight", f"{size_name} N{TOKENS} H{H}", _rms_impls(liger), (x, frozen), dy,
                 _fp64_results(rms_norm_reference, (x, frozen), dy), bytes_moved=5 * x.numel() * x.element_size())
        _record_norm_kernels(record, size_name, x, wn, dy)
        del x, wn, dy
        _compare_geglu(record, "geglu", f"{size_name} N{TOKENS} I{I}", TOKENS, I, liger, gen)
        torch.cuda.empty_cache()

    # Issue 3's optional kernel: the per-layer-embedding gate's `gelu_tanh(gate(h)) * per_layer_input`
    # is GeGLU's math on a [tokens, 256] tensor (E2B and E4B alike). These rows say what the GeGLU
    # kernel would save per layer against transformers' eager ops; times 35 (E2B) or 42 (E4B)
    # layers, that is the most a fused PLE gate could take off a training step.
    _compare_geglu(record, "ple_gate_act_mul", f"e2b/e4b N{TOKENS} D256", TOKENS, 256, liger, gen)

    # RMSNorm with the weight gradient at 8192 tokens. At 2048 the dw path's second kernel (the sum
    # of the per-program partials) is a fixed ~2.5 us of a 12 us op; these rows show how much of
    # the shortfall is that fixed cost.
    for size_name, size in SIZES.items():
        H, long = size["hidden"], 4 * TOKENS
        x, wn, dy = _rms_inputs(long, H, gen)
        _compare(record, "rms_norm", f"{size_name} N{long} H{H}", _rms_impls(liger), (x, wn), dy,
                 _fp64_results(rms_norm_reference, (x, wn), dy), bytes_moved=5 * x.numel() * x.element_size())
        del x, wn, dy
        torch.cuda.empty_cache()


def _rms_inputs(tokens, hidden, gen):
    """x and a weight near one (both requiring grad), and an upstream gradient dy."""
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).to(DTYPE).requires_grad_(True)
    w = (1 + 0.3 * torch.randn(hidden, device="cuda", generator=gen)).to(DTYPE).requires_grad_(True)
    dy = torch.randn(tokens, hidden, device="cuda", generator=gen).to(DTYPE)
    return x, w, dy


def _rms_impls(liger):
    return {"gemmatune": rms_norm, "torch": rms_norm_reference} | ({"liger": liger["rms"]} if "rms" in liger else {})


def _compare_geglu(record, kernel, shape, tokens, width, liger, gen):
    """GEGLU forward + backward on fresh inputs; bytes = forward reads g, u, writes out; backward
    reads d out, g, u, writes dg, du."""
    g = (3 * torch.randn(tokens, width, device="cuda", generator=gen)).to(DTYPE).requires_grad_(True)
    u = torch.randn(tokens, width, device="cuda", generator=gen).to(DTYPE).requires_grad_(True)
    do = torch.randn(tokens, width, device="cuda", generator=gen).to(DTYPE)
    impls = {"gemmatune": geglu, "torch": _eager_geglu} | ({"liger": liger["geglu"]} if "geglu" in liger else {})
    _compare(record, kernel, shape, impls, (g, u), do, _fp64_results(geglu_reference, (g, u), do),
             bytes_moved=8 * g.numel() * g.element_size())


if __name__ == "__main__":
    run(print)
