"""What fine-tuning through TRL's SFTTrainer keeps of gemmatune.train: speed and memory, same call.

    python -m benchmarks.trainer_route --quick      # E2B, 2048 tokens, 6 timed steps: about 3 min (estimated)
    python -m benchmarks.trainer_route              # E2B and E4B, 10 timed steps, plus the variants below
    python -m benchmarks.trainer_route --cpu-smoke  # the tiny model on the CPU (no GPU)

The same random-weight checkpoint (benchmarks/gemma4_configs.py), batch 1 of random tokens, every token
trained, gemmatune.load_model (NF4) + add_lora(r=16), 8-bit AdamW; each run in its own subprocess:

- gemmatune: gemmatune.train's micro-step and optimizer (benchmarks/train_step.py's gemmatune stack).
- trl: `class T(FusedLoss, SFTTrainer)` with gemmatune's DataCollator (gemmatune/training/hf_trainer.py),
  TRL's defaults otherwise (bf16, checkpointing -> gemmatune's), `optim="adamw_bnb_8bit"`.
- trl-no-graphs (full run only): the same with `cuda_graphs = False`: what the CUDA graphs bring there.
- trl-stock (full run only): TRL's SFTTrainer with its own model handling (transformers + peft +
  bitsandbytes NF4, TRL's fused LM head), for reference.

Reported: peak allocated GPU memory over the steps, tokens/s over the timed steps, the first step's time.
Writes benchmarks/results/<date>-<gpu>-trainer-route.json.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.dpo_step import StepTimer, checkpoint, stock_lora_targets
from benchmarks.records import command_line, package_versions, results_file
from gemmatune.model.memory import GIB


def random_rows(n: int, seq: int, vocab: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(10, vocab, (seq,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def run_gemmatune(ckpt: str, seq: int, steps: int, warmup: int, cpu: bool) -> dict:
    from benchmarks.train_step import measure, setup_gemmatune

    step, model, loaded, weights = setup_gemmatune(ckpt, seq, 1, torch.bfloat16)
    return measure(step, steps, loaded, weights, seq, model)


def run_trl(stack: str, ckpt: str, seq: int, steps: int, warmup: int, cpu: bool) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import gemmatune
    from gemmatune.training import DataCollator, FusedLoss

    timer = StepTimer(cuda=not cpu)
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=1, report_to=[],
                           save_strategy="no", disable_tqdm=True, logging_steps=1, use_cpu=cpu, bf16=not cpu,
                           optim="adamw_torch" if cpu else "adamw_bnb_8bit", learning_rate=1e-4,
                           remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True})
        if stack == "trl-stock":
            trainer, weights = stock_sft(ckpt, config, seq, warmup + steps, timer, cpu)
        else:
            model, tokenizer = gemmatune.load_model(ckpt, max_seq_length=seq, verbose=not cpu,
                                                    **({"dtype": "float32"} if cpu else {}))
            weights = torch.cuda.memory_allocated() / GIB if not cpu else 0.0
            model = gemmatune.add_lora(model, r=16)
            rows = random_rows(warmup + steps, seq, model.config.get_text_config().vocab_size)
            trainer_class = type("T", (FusedLoss, SFTTrainer), {"cuda_graphs": stack == "trl"})
            trainer = trainer_class(model=model, args=config, processing_class=tokenizer, callbacks=[timer],
                                    train_dataset=Dataset.from_list(rows), data_collator=DataCollator(None, tokenizer))
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    timed = timer.step_seconds[warmup:]
    return dict(peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB if not cpu else None,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB if not cpu else None, weights_gib=weights,
                tokens_per_s=seq * len(timed) / sum(timed), first_step_s=timer.step_seconds[0],
                step_seconds=timer.step_seconds, losses=losses, loss_finite=all(math.isfinite(x) for x in losses),
                notes=getattr(getattr(trainer, "_micro_step", None), "describe", lambda: "")())


def stock_sft(ckpt: str, config, seq: int, n_rows: int, timer, cpu: bool):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTTrainer

    dtype = torch.float32 if cpu else torch.bfloat16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=quant, dtype=dtype,
                                                 device_map={"": "cpu" if cpu else 0},
                                                 attn_implementation="eager" if cpu else "sdpa")
    weights = torch.cuda.memory_allocated() / GIB if not cpu else 0.0
    rows = random_rows(n_rows, seq, model.config.get_text_config().vocab_size)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), callbacks=[timer],
                         processing_class=AutoTokenizer.from_pretrained(ckpt),
                         peft_config=LoraConfig(r=16, lora_alpha=16, target_modules=stock_lora_targets(model),
                                                task_type="CAUSAL_LM"))
    return trainer, weights


def worker(args) -> None:
    try:
        if args.stack == "gemmatune":
            result = run_gemmatune(args.ckpt, args.seq, args.steps, args.warmup, args.cpu_smoke)
        else:
            result = run_trl(args.stack, args.ckpt, args.seq, args.steps, args.warmup, args.cpu_smoke)
    except torch.OutOfMemoryError as error:
        result = {"error": f"out of memory: {str(error)[:300]}"}
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["e2b", "e4b"])
    parser.add_argument("--stacks", nargs="+", default=["gemmatune", "trl", "trl-no-graphs", "trl-stock"])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the second captures the graph)")
    parser.add_argument("--quick", action="store_true", help="E2B, gemmatune and trl, 6 timed steps")
    parser.add_argument("--cpu-smoke", action="store_true", help="the tiny model on the CPU, 1 step: checks the code")
    parser.add_argument("--worker-timeout", type=int, default=240)
    parser.add_argument("--ckpt-root", default="/tmp/gemmatune-bench")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stack", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.models, args.stacks, args.steps = ["e2b"], ["gemmatune", "trl"], 6
    if args.cpu_smoke:
        args.models, args.stacks, args.steps, args.warmup, args.seq = ["tiny"], ["trl", "trl-stock"], 1, 0, 128

    command = command_line()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    records = []
    for model in args.models:
        folder = checkpoint(model, Path(args.ckpt_root))
        for stack in args.stacks:
            cmd = [sys.executable, "-m", "benchmarks.trainer_route", "--worker", "--stack", stack, "--ckpt",
                   str(folder), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            cmd += ["--cpu-smoke"] if args.cpu_smoke else []
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout,
                                     env=os.environ | {"GEMMATUNE_DASHBOARD": "off"})
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                result = json.loads(line[7:]) if line else {"error": (out.stderr or out.stdout)[-1500:]}
            except subprocess.TimeoutExpired:
                result = {"error": f"worker timed out after {args.worker_timeout} s"}
            record = dict(model=model, stack=stack, seq=args.seq, batch=1, **result, gpu=gpu,
                          versions=package_versions(("torch", "triton", "transformers", "peft", "bitsandbytes",
                                                     "accelerate", "trl")), command=command)
            records.append(record)
            print(format_row(record), flush=True)
    out_path = Path(args.out or results_file("trainer-route"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(records, indent=1))
    print(f"wrote {out_path}")


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['model']:4} {r['stack']:13}: ERROR {r['error'][-400:]}"
    peak = f"{r['peak_allocated_gib']:6.2f} GiB" if r["peak_allocated_gib"] is not None else "   (cpu)  "
    return (f"{r['model']:4} {r['stack']:13} | peak alloc {peak} | {r['tokens_per_s']:8.0f} tok/s | "
            f"first step {r['first_step_s']:6.1f} s | {r.get('notes', '')}")


if __name__ == "__main__":
    main()
