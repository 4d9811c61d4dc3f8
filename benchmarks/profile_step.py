"""Where a full-size training step spends its time: variants side by side, then a profile.

    python -m benchmarks.profile_step --model e2b --seq 2048

Times gemmatune's step with pieces switched off one at a time (kernels, checkpointing
modes) in one process, then profiles the default step with torch.profiler: the top ops
by GPU time and by CPU time, and how much of the wall time the GPU is busy. A step whose
GPU is idle most of the time is bound by Python/launch overhead or host syncs, not by
the kernels. Finishes with the stock stack's timing and busy fraction for comparison.
This is a diagnostic: it prints, and writes nothing to benchmarks/results/.
"""
import argparse
import time
from pathlib import Path

import torch

from benchmarks.train_step import build_checkpoint, setup_gemmatune, setup_hf


def time_steps(step, n: int = 4, warmup: int = 2) -> float:
    """Median milliseconds per step."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        float(step())
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def profile(step, label: str, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(2):
            float(step())
        wall_ms = (time.perf_counter() - start) * 1e3 / 2
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / 2
    launches = sum(e.count for e in kernels) / 2
    print(f"\n=== {label}: wall {wall_ms:.1f} ms/step, GPU busy {gpu_ms:.1f} ms ({100 * gpu_ms / wall_ms:.0f}%), "
          f"{launches:.0f} GPU kernels/copies per step")
    print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    return wall_ms, gpu_ms


def find_syncs(step) -> None:
    """Run one step with CUDA sync debugging on; print where the host waited for the GPU."""
    import traceback
    import warnings

    seen = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-2] if "torch/" not in f.filename][-3:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
        seen[where] = seen.get(where, 0) + 1

    step()
    torch.cuda.synchronize()
    old = warnings.showwarning
    warnings.showwarning = record
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        float(step())
        torch.cuda.set_sync_debug_mode("default")
    warnings.showwarning = old
    print(f"\n=== host syncs in one step: {sum(seen.values())}")
    for where, n in sorted(seen.items(), key=lambda kv: -kv[1]):
        print(f"  {n:5} x {where}")


def swap_back(model, class_names: set[str]) -> None:
    """Undo some of gemmatune's class swaps (to time the step without one kernel)."""
    for module, original in getattr(model, "gemmatune_patches", []):
        if type(module).__name__ in class_names:
            module.__class__ = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="e2b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--ckpt-root", default="/tmp/gemmatune-bench")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--sync-check", action="store_true", help="only list the host syncs of one step")
    parser.add_argument("--graphed-only", action="store_true", help="only time and profile the default step")
    parser.add_argument("--rows", type=int, default=25, help="rows of each profile table")
    args = parser.parse_args()
    folder = Path(args.ckpt_root) / args.model
    build_checkpoint(args.model, folder)

    from gemmatune.model.activation_checkpointing import enable_gradient_checkpointing

    step, model, _, _ = setup_gemmatune(str(folder), args.seq, 1, torch.bfloat16)
    if args.sync_check:
        return find_syncs(step)
    results = {"default (graphs, kernels, offload)": time_steps(step)}
    print(step.micro_step.describe())
    profile(step, "gemmatune default", rows=args.rows)
    if args.graphed_only:
        return
    step.micro_step.disabled_because = "profiling the eager step"
    results["eager (no CUDA graphs)"] = time_steps(step)
    profile(step, "gemmatune eager")
    for mode in ("on", "off"):
        enable_gradient_checkpointing(model, mode)
        results[f"checkpointing {mode}"] = time_steps(step)
    enable_gradient_checkpointing(model, "offload")
    for name in ("KernelGemma4Attention", "KernelGemma4MLP", "KernelRMSNorm", "KernelLoRALinear4bit"):
        patched = [(module, type(module)) for module, _ in model.gemmatune_patches]
        swap_back(model, {name})
        results[f"without {name}"] = time_steps(step)
        for module, kernel_class in patched:
            module.__class__ = kernel_class
    print(f"\n{args.model} seq {args.seq}: ms per step")
    for name, ms in results.items():
        print(f"  {name:32} {ms:8.1f} ms  {args.seq / ms * 1e3:8.0f} tok/s")
    del step, model
    torch.cuda.empty_cache()
    if not args.skip_hf:
        step, model, _, _ = setup_hf(str(folder), args.seq, 1, torch.bfloat16)
        ms = time_steps(step)
        print(f"  {'stock HF stack':32} {ms:8.1f} ms  {args.seq / ms * 1e3:8.0f} tok/s")
        profile(step, "stock HF stack", rows=15)


if __name__ == "__main__":
    main()
