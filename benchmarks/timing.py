"""Kernel timing for the benchmarks: CUDA-graph replays, the way gemmatune's training step runs.

Why not plain do_bench: at 2048 tokens a norm or GeGLU kernel runs for 10-30 us, about the
cost of launching it from Python on the H200 machine (benchmarks/overhead.py), so eager
timing measured the launch, not the kernel. gemmatune's step is replayed as a CUDA graph
(gemmatune.training.step), where launch gaps vanish; replaying the benchmarked call in a graph
measures what training pays.

Calls that make the host wait for the GPU (`.item()`, a synchronising copy) cannot be
captured, and a capture that fails part-way can leave CUDA's random-number state unusable
for the rest of the process. So each call is first run once with PyTorch's sync debugging
set to "error": one that syncs is timed eagerly and never captured. The returned label says
which timing a number is.
"""
import torch


def waits_for_host(fn) -> bool:
    """True when fn() makes the host synchronise with the GPU."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return False
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def median_ms(fn, grad_to_none=None, rep=100) -> tuple[float, str]:
    """(median milliseconds of fn(), "cuda_graph" or "eager"); rep: milliseconds of replays."""
    import triton.testing

    if waits_for_host(fn):
        print("  (host sync inside: timing eagerly)", flush=True)
        return triton.testing.do_bench(fn, rep=rep, grad_to_none=grad_to_none, return_mode="median"), "eager"
    try:
        ms = triton.testing.do_bench_cudagraph(fn, rep=rep, grad_to_none=grad_to_none, return_mode="median")
        return ms, "cuda_graph"
    except Exception as error:  # not capturable for another reason: time it eagerly
        torch.cuda.synchronize()
        print(f"  (graph capture failed: {type(error).__name__}: {error}; timing eagerly)", flush=True)
        return triton.testing.do_bench(fn, rep=rep, grad_to_none=grad_to_none, return_mode="median"), "eager"
