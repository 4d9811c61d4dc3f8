"""Peak GPU memory of gemmatune's training step over sequence lengths (and the 8 GiB limit).

    python -m benchmarks.memory_sweep --models e2b e4b --seq 1024 2048 4096 8192 16384 32768

One process per model (random-weight checkpoint from benchmarks/gemma4_configs.py): for each
sequence length and checkpointing mode, three steps of batch 1 (eager, graph capture, replay)
after a reset of the peak statistics, next to gemmatune.model.memory.predict_peak_gib's prediction.
Writes benchmarks/results/<date>-<gpu>-memory.json; the longest length under 8 GiB is printed.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.records import command_line, package_versions, results_file
from benchmarks.train_step import GIB, build_checkpoint, random_batch


def sweep(model_name: str, folder: Path, seqs: list[int], modes: list[str], dtype) -> list[dict]:
    import gemmatune
    from gemmatune.model.activation_checkpointing import enable_gradient_checkpointing
    from gemmatune.model.memory import predict_peak_gib
    from gemmatune.training.loss import count_label_tokens
    from gemmatune.training.optimizer import adamw_8bit
    from gemmatune.training.step import MicroStep

    model, _ = gemmatune.load_model(str(folder), dtype=dtype, verbose=False)
    model = gemmatune.add_lora(model, r=16)
    model.train()
    optimizer = adamw_8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    records = []
    for mode in modes:
        enable_gradient_checkpointing(model, mode)
        micro_step = MicroStep(model)  # graphs are per checkpointing mode
        for seq in seqs:
            batch = random_batch(seq, 1)
            n = count_label_tokens([batch])
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:
                losses = []
                for _ in range(3):
                    losses.append(float(micro_step(batch, normalizer=n)))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=False)
                error = None
            except torch.OutOfMemoryError as oom:
                error = f"out of memory: {str(oom)[:120]}"
            torch.cuda.synchronize()
            record = dict(model=model_name, seq=seq, batch=1, checkpointing=mode, dtype=str(dtype).split(".")[-1],
                          peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                          peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                          predicted_gib=predict_peak_gib(model, seq=seq, batch=1, checkpointing=mode),
                          seconds_for_3_steps=time.perf_counter() - start, error=error,
                          losses_finite=error is None and all(x == x and abs(x) < 1e9 for x in losses),
                          graphs=micro_step.describe())
            records.append(record)
            rel = record["predicted_gib"] / record["peak_allocated_gib"] - 1
            print(f"{model_name} {mode:8} seq {seq:6}: peak alloc {record['peak_allocated_gib']:6.2f} GiB, "
                  f"reserved {record['peak_reserved_gib']:6.2f}, predicted {record['predicted_gib']:6.2f} "
                  f"({100 * rel:+.1f}%) {error or ''}", flush=True)
            if error:
                break
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["e2b", "e4b"])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--modes", nargs="+", default=["offload", "on"])
    parser.add_argument("--ckpt-root", default="/tmp/gemmatune-bench")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    records = []
    for model in args.models:
        folder = Path(args.ckpt_root) / model
        build_checkpoint(model, folder)
        records += sweep(model, folder, args.seq, args.modes, torch.bfloat16)
        torch.cuda.empty_cache()
    command = command_line()
    for r in records:
        r.update(gpu=torch.cuda.get_device_name(0), versions=package_versions(), command=command)
    for model in args.models:
        fits = [r["seq"] for r in records if r["model"] == model and not r["error"] and r["peak_allocated_gib"] <= 8]
        print(f"{model}: longest measured sequence within 8 GiB peak allocated: {max(fits) if fits else None}")
    out = Path(args.out or results_file("memory"))
    out.write_text(json.dumps(records, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
