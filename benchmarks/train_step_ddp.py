"""Several GPUs: the same gemmatune fine-tune on 1 GPU and on N GPUs (torchrun), in one call.

    python -m benchmarks.train_step_ddp --models e2b e4b --gpus 2 --seq 2048 --steps 10

Builds the random-weight E2B/E4B checkpoints of benchmarks/train_step.py (real text configs),
then for each model runs `gemmatune.train` itself, as users run it: once as a plain process on
one GPU, once under `torchrun --nproc-per-node N` (one rank per GPU, NCCL). QLoRA NF4 + double
quant, LoRA r=16 on q,k,v,o,gate,up,down, batch 1 per GPU of random `seq`-token rows, 8-bit
AdamW, CUDA graphs on, gradient checkpointing "auto". The first `--warmup` steps are not timed
(a batch shape's first step runs eagerly, its second captures the CUDA graph).

tokens_per_s: the trained tokens of all GPUs together over the timed steps, divided by their
wall time (TrainResult.step_seconds, measured on rank 0 after each step's loss reached the
CPU). peak_allocated_gib: per GPU, the highest torch.cuda.max_memory_allocated over the ranks
(`per_rank` lists each). Targets (issue 16): N=2 at least 1.9x the one-GPU tokens/s, with no
more memory per GPU. NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends, forced in
the ranks' environment: the device docs say why). Prints a table and writes
benchmarks/results/<date>-<gpu>-train-step-ddp.json, one record per run.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.records import command_line, package_versions, results_file
from benchmarks.train_step import build_checkpoint
from gemmatune.model.memory import GIB

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def random_rows(n_rows: int, seq: int, vocab: int = 262144) -> list[dict]:
    """`n_rows` rows of `seq` random tokens, every token trained; the same rows on every rank."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (n_rows, seq), generator=gen).tolist()
    return [{"input_ids": row, "labels": row} for row in ids]


def worker(args) -> None:
    """One rank (or the single process): train, then print this rank's numbers as one RESULT line."""
    import gemmatune
    import gemmatune.model.device as model_device
    import gemmatune.training.distributed as training_distributed

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model, tokenizer = gemmatune.load_model(args.ckpt, max_seq_length=args.seq, dtype=dtype,
                                            verbose=model_device.is_main_process())
    model = gemmatune.add_lora(model, r=16)
    steps = args.warmup + args.steps
    rows = random_rows(steps * training_distributed.world_size() * args.batch, args.seq)
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        result = gemmatune.train(model, rows, tokenizer, max_steps=steps, batch_size=args.batch, grad_accum=1,
                                 learning_rate=1e-4, warmup_steps=1, dashboard="off", output_dir=out)
    timed = result.step_seconds[args.warmup:]
    tokens_per_step = result.state.tokens_trained / result.state.step  # all rows are alike
    print("RESULT " + json.dumps(dict(
        rank=training_distributed.rank(), world=training_distributed.world_size(), status=result.status,
        tokens_per_s=tokens_per_step * len(timed) / sum(timed), step_s=statistics.median(timed),
        peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB, losses=result.losses,
        device=str(torch.cuda.current_device()))), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: str, ckpt: Path, gpus: int, args) -> dict:
    """One run on `gpus` GPUs in fresh processes; its record (or an error)."""
    worker_args = ["-m", "benchmarks.train_step_ddp", "--worker", "--ckpt", str(ckpt), "--seq", str(args.seq),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--dtype", args.dtype]
    launch = [sys.executable] if gpus == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                                  str(gpus), "--master-port", str(free_port())]
    env = os.environ | NO_MULTICAST | {"GEMMATUNE_DASHBOARD": "off"}
    out = subprocess.run(launch + worker_args, capture_output=True, text=True, env=env, timeout=args.timeout)
    ranks = sorted((json.loads(x[7:]) for x in out.stdout.splitlines() if x.startswith("RESULT ")),
                   key=lambda r: r["rank"])
    record = dict(model=model, gpus=gpus, seq=args.seq, batch_per_gpu=args.batch, dtype=args.dtype)
    if len(ranks) != gpus or any(r["status"] != "done" for r in ranks):
        return record | {"error": (out.stderr or out.stdout)[-2000:], "returncode": out.returncode}
    main = ranks[0]
    return record | dict(tokens_per_s=main["tokens_per_s"], step_s=main["step_s"],
                         peak_allocated_gib=max(r["peak_allocated_gib"] for r in ranks),
                         peak_reserved_gib=max(r["peak_reserved_gib"] for r in ranks),
                         losses=main["losses"], per_rank=ranks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["e2b", "e4b"])
    parser.add_argument("--gpus", type=int, default=2, help="GPUs of the several-GPU run (the other has 1)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1, help="rows per GPU per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (eager, then graph capture)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--timeout", type=int, default=400, help="seconds per run")
    parser.add_argument("--ckpt-root", default="/tmp/gemmatune-bench")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"--gpus {args.gpus}: this machine shows {torch.cuda.device_count()} GPU(s)")

    command = command_line()
    gpu, records = torch.cuda.get_device_name(0), []
    for model in args.models:
        ckpt = Path(args.ckpt_root) / model
        build_checkpoint(model, ckpt)
        torch.cuda.empty_cache()
        single = None
        for gpus in (1, args.gpus):
            record = run(model, ckpt, gpus, args) | dict(gpu=gpu, versions=package_versions(), command=command)
            if gpus == 1:
                single = record
            elif "error" not in record and "error" not in single:
                record["speedup"] = record["tokens_per_s"] / single["tokens_per_s"]
                record["peak_vs_one_gpu"] = record["peak_allocated_gib"] / single["peak_allocated_gib"]
            records.append(record)
            print(format_row(record), flush=True)
    out_path = Path(args.out or results_file("train-step-ddp"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(records, indent=1))
    print(f"wrote {out_path}")


def format_row(r: dict) -> str:
    head = f"{r['model']:4} {r['gpus']} GPU(s) seq {r['seq']} batch {r['batch_per_gpu']}/GPU {r['dtype']}"
    if "error" in r:
        return f"{head}: ERROR {r['error'][-600:]}"
    scaling = (f" | {r['speedup']:.2f}x one GPU (target >= 1.9x for 2), peak {r['peak_vs_one_gpu']:.3f}x"
               if "speedup" in r else "")
    return (f"{head} | {r['tokens_per_s']:8.0f} tok/s (all GPUs) | step {r['step_s'] * 1e3:6.1f} ms | "
            f"peak alloc {r['peak_allocated_gib']:5.2f} GiB per GPU{scaling}")


if __name__ == "__main__":
    main()
