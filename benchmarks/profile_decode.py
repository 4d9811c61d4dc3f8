"""Where a decode step spends its time: GPU kernels by name, launches per token, graph vs eager.

    python -m benchmarks.profile_decode --model e2b          # about a minute on an H200

Loads the random-weight checkpoint of benchmarks/train_step.py with gemmatune (4-bit), adds LoRA
r=16 with random nonzero B, and times `gemmatune.generation.decoding.generate` at batch 1 with CUDA graphs
(what chat() runs) and without; then profiles eager decode steps with torch.profiler: the GPU time
of each kernel per token, how many launches a token takes, and how much of a graphed step's time
the kernels themselves account for (the rest is the gaps between launches). Then the same with the
adapters disabled. A diagnostic: it prints, and writes nothing to benchmarks/results/.
"""
import argparse
from pathlib import Path

import torch

from benchmarks.generate import add_random_lora_b, prompts, timed
from benchmarks.train_step import build_checkpoint


def ms_per_token(run, tokens: int, repeats: int = 3) -> float:
    """Decode milliseconds per token: (time of `tokens` tokens - time of 1 token) / (tokens - 1)."""
    timed(lambda: run(tokens))
    one = min(timed(lambda: run(1)) for _ in range(repeats))
    full = min(timed(lambda: run(tokens)) for _ in range(repeats))
    return (full - one) * 1e3 / (tokens - 1)


def profile(run, tokens: int, graphed_ms: float, label: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run(tokens)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(tokens)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3 / tokens
    launches = sum(e.count for e in events) / tokens
    print(f"\n=== {label}: graphed step {graphed_ms:.2f} ms, kernels {gpu_ms:.2f} ms/token "
          f"({100 * gpu_ms / graphed_ms:.0f}% of it), {launches:.0f} launches/token "
          f"(prefill included, {tokens} tokens)")
    print(f"{'us/token':>9} {'calls/token':>11} {'us/call':>8}  kernel")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
        per_token = e.self_device_time_total / tokens
        print(f"{per_token:9.1f} {e.count / tokens:11.1f} {e.self_device_time_total / e.count:8.2f}  {e.key[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="e2b")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--ckpt-root", default="/tmp/gemmatune-bench")
    args = parser.parse_args()
    import gemmatune
    import gemmatune.generation.decoding as generation_decoding

    folder = Path(args.ckpt_root) / args.model
    build_checkpoint(args.model, folder)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model, _ = gemmatune.load_model(str(folder), dtype=dtype, max_seq_length=2048, verbose=False)
    model = gemmatune.add_lora(model, r=16)
    add_random_lora_b(model)
    ids, mask = prompts(1)

    def run(n, graphs=True):
        return generation_decoding.generate(model, ids, mask, max_new_tokens=n, stop_token_ids=[], pad_token_id=0,
                                   cuda_graphs=graphs)

    for label, context in (("LoRA on", None), ("adapters disabled", model.disable_adapter)):
        if context is not None:
            manager = context()
            manager.__enter__()
        graphed = ms_per_token(run, args.tokens)
        eager = ms_per_token(lambda n: run(n, graphs=False), args.tokens, repeats=1)
        print(f"\n{args.model} {args.dtype} {label}: graphed {graphed:.2f} ms/token ({1e3 / graphed:.1f} tok/s), "
              f"eager {eager:.2f} ms/token; {generation_decoding.describe(model)}", flush=True)
        profile(lambda n: run(n, graphs=False), args.tokens, graphed, label, args.rows)
        if context is not None:
            manager.__exit__(None, None, None)


if __name__ == "__main__":
    main()
