"""Kernel timing for the benchmarks: CUDA-graph replays, the way gemmatune's training step runs.

Why not plain do_bench: at 2048 tokens a norm or GeGLU kernel runs for 10-30 us, about the
cost of launching it from Python on the H200 machine (benchmarks/overhead.py), so eager
timing measured the launch, not the kernel. gemmatune's step is replayed as a CUDA graph
(gemmatune.graphs), where launch gaps vanish; replaying the benchmarked call in a graph
measures what training pays. Calls that cannot be captured (a host sync inside) fall back
to do_bench; the returned label says which timing a number is.
"""
import torch


def median_ms(fn, grad_to_none=None) -> tuple[float, str]:
    """(median milliseconds of fn(), "cuda_graph" or "eager")."""
    import triton.testing

    try:
        ms = triton.testing.do_bench_cudagraph(fn, rep=100, grad_to_none=grad_to_none, return_mode="median")
        return ms, "cuda_graph"
    except Exception as error:  # not capturable: time it eagerly
        torch.cuda.synchronize()
        print(f"  (graph capture failed: {type(error).__name__}; timing eagerly)", flush=True)
        return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median"), "eager"
