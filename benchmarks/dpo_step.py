"""DPO on E2B/E4B, pairs of 2 x 1024 tokens: gemmatune in TRL's DPOTrainer against the stock stack, same call.

    python -m benchmarks.dpo_step --quick        # E2B and E4B, 3 timed steps: about 5 min on an H100 (estimated)
    python -m benchmarks.dpo_step                # 10 timed steps
    python -m benchmarks.dpo_step --cpu-smoke    # the tiny model on the CPU, one step per stack (no GPU)

Both stacks run TRL's DPOTrainer (sigmoid DPO, beta 0.1, one pair per step: the chosen and the rejected
sequence, each 1024 tokens after TRL's truncation), 8-bit AdamW (`optim="adamw_bnb_8bit"`), TRL's defaults
otherwise (bf16, activation checkpointing), on the same random-weight checkpoint built from the real text
configs (benchmarks/gemma4_configs.py) and the same text pairs:

- gemmatune: gemmatune.load_model (NF4, per-layer embeddings in CPU memory) + add_lora(r=16), in
  `class T(FusedDPOLoss, DPOTrainer)` (gemmatune/training/hf_trainer.py): log-probabilities through the
  fused head, the reference = the same model with adapters disabled, gemmatune's checkpointing ("auto").
- stock: AutoModelForCausalLM with bitsandbytes NF4 + double quant, SDPA, LoRA r=16 on q,k,v,o,gate,up,down
  through DPOTrainer's `peft_config`, and TRL's own reference handling (adapters disabled) and fused LM head.

gemmatune's process is capped at --cap-gib (7.5 GiB: an 8 GB card less its CUDA context, through
torch.cuda.set_per_process_memory_fraction) with the checkpointing gemmatune picks for that much memory; the
stock stack is not capped (its peak is what is measured). Each (model, stack) runs in its own subprocess
(clean memory statistics). Reported: peak allocated GPU memory over the training steps, steps/s (pairs/s)
over the timed steps after `warmup` untimed ones, the weights' GiB after loading, and the losses (the first
is log 2 = 0.6931 for both: the adapters start at zero, so policy == reference). Writes
benchmarks/results/<date>-<gpu>-dpo-step.json.
"""
import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from benchmarks.records import command_line, package_versions, results_file
from gemmatune.model.memory import GIB

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = ("river stone light paper garden number window yellow quiet market bridge winter music table seven "
         "orange travel simple forest letter mountain engine coffee silver doctor planet summer animal").split()


def text_pairs(n: int, max_length: int, seed: int = 0) -> list[dict]:
    """Prompt / chosen / rejected texts long enough that TRL's truncation leaves max_length tokens each
    (the benchmark's tokenizer takes about 2 tokens a word), the prompt about 1/16 of them."""
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [{"prompt": text(max_length // 32), "chosen": text(max_length), "rejected": text(max_length)}
            for _ in range(n)]


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (the GPU synchronised at its end), and the
    peak memory from the first step on."""

    def __init__(self, cuda: bool):
        self.cuda, self.step_seconds, self.started = cuda, [], None

    def on_train_begin(self, *args, **kwargs):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, *args, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        self.started = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        self.step_seconds.append(time.perf_counter() - self.started)


def dpo_config(out: str, steps: int, max_length: int, cpu: bool):
    from trl import DPOConfig

    return DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=1, max_length=max_length,
                     beta=0.1, learning_rate=5e-5, optim="adamw_torch" if cpu else "adamw_bnb_8bit",
                     logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=cpu,
                     bf16=not cpu)


def gemmatune_trainer(ckpt: str, args, dataset, callbacks, cpu: bool, cap_gib: float):
    """gemmatune's model in DPOTrainer. With a cap, the process may allocate at most cap_gib (an 8 GB card less
    its CUDA context) and checkpointing is what gemmatune picks for that much memory, not for this GPU's."""
    from trl import DPOTrainer

    import gemmatune
    from gemmatune.model.activation_checkpointing import enable_gradient_checkpointing
    from gemmatune.model.memory import choose_checkpointing
    from gemmatune.training import FusedDPOLoss

    if cap_gib and not cpu:
        torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
    model, tokenizer = gemmatune.load_model(ckpt, max_seq_length=args.max_length, verbose=not cpu,
                                            **({"dtype": "float32"} if cpu else {}))
    weights = torch.cuda.memory_allocated() / GIB if not cpu else 0.0
    model = gemmatune.add_lora(model, r=16)
    trainer_class = type("GemmatuneDPO", (FusedDPOLoss, DPOTrainer), {})
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=callbacks)
    if cap_gib and not cpu:
        mode = choose_checkpointing(model, args.max_length, 2, free_gib=cap_gib)
        enable_gradient_checkpointing(model, mode)
        print(f"gemmatune: capped at {cap_gib} GiB: checkpointing {mode!r}")
        trainer.checkpointing_mode = mode
    return trainer, weights


def stock_trainer(ckpt: str, args, dataset, callbacks, cpu: bool, cap_gib: float):
    """TRL + peft + bitsandbytes as TRL's documentation sets them up; never capped (its peak is measured)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOTrainer

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32 if cpu else torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=quant,
                                                 dtype=torch.float32 if cpu else torch.bfloat16,
                                                 device_map={"": "cpu" if cpu else 0},
                                                 attn_implementation="eager" if cpu else "sdpa")  # tiny: audio tower
    weights = torch.cuda.memory_allocated() / GIB if not cpu else 0.0
    lora = LoraConfig(r=16, lora_alpha=16, target_modules=stock_lora_targets(model), task_type="CAUSAL_LM")
    return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(
        ckpt), peft_config=lora, callbacks=callbacks), weights


def stock_lora_targets(model):
    """q,k,v,o,gate,up,down by name on the benchmark's text-only checkpoint; on the multimodal tiny one
    (--cpu-smoke), the language model's only (the towers' Gemma4ClippableLinear would make peft refuse)."""
    if model.config.model_type == "gemma4":
        return rf".*language_model.*\.({'|'.join(LORA_TARGETS)})"
    return LORA_TARGETS


def run_stack(stack: str, ckpt: str, steps: int, warmup: int, max_length: int, cpu: bool, cap_gib: float) -> dict:
    from datasets import Dataset

    dataset = Dataset.from_list(text_pairs(warmup + steps, max_length))
    timer = StepTimer(cuda=not cpu)
    with tempfile.TemporaryDirectory() as out:
        args = dpo_config(out, warmup + steps, max_length, cpu)
        make = {"gemmatune": gemmatune_trainer, "stock": stock_trainer}[stack]
        trainer, weights = make(ckpt, args, dataset, [timer], cpu, cap_gib)
        lengths = [len(trainer.train_dataset[0][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    timed = timer.step_seconds[warmup:]
    per_step = sum(timed) / len(timed) if timed else float("nan")
    return dict(peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB if not cpu else None,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB if not cpu else None,
                weights_gib=weights, steps_per_s=1 / per_step,
                tokens_per_step=sum(min(max_length, lengths[0] + lengths[k]) for k in (1, 2)),
                first_step_s=timer.step_seconds[0], step_seconds=timer.step_seconds, losses=losses,
                loss_finite=all(math.isfinite(x) for x in losses), prompt_chosen_rejected_tokens=lengths,
                cap_gib=cap_gib if stack == "gemmatune" and not cpu else None,
                checkpointing=getattr(trainer, "checkpointing_mode", "the trainer's choice"))


def worker(args) -> None:
    try:
        result = run_stack(args.stack, args.ckpt, args.steps, args.warmup, args.max_length, args.cpu_smoke,
                           args.cap_gib)
    except torch.OutOfMemoryError as error:
        result = {"error": f"out of memory: {str(error)[:300]}"}
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["e2b", "e4b"])
    parser.add_argument("--stacks", nargs="+", default=["gemmatune", "stock"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per sequence (chosen, rejected)")
    parser.add_argument("--quick", action="store_true", help="3 timed steps after 1 warm-up step")
    parser.add_argument("--cpu-smoke", action="store_true", help="the tiny model on the CPU, 1 step: checks the code")
    parser.add_argument("--cap-gib", type=float, default=7.5,
                        help="gemmatune's process may allocate at most this much (an 8 GB card); 0: no cap")
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
        args.steps, args.warmup = 3, 1
    if args.cpu_smoke:
        args.models, args.steps, args.warmup, args.max_length = ["tiny"], 1, 0, 256

    command = command_line()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    records = []
    for model in args.models:
        folder = checkpoint(model, Path(args.ckpt_root))
        for stack in args.stacks:
            cmd = [sys.executable, "-m", "benchmarks.dpo_step", "--worker", "--stack", stack, "--ckpt", str(folder),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--max-length", str(args.max_length),
                   "--cap-gib", str(args.cap_gib)]
            cmd += ["--cpu-smoke"] if args.cpu_smoke else []
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout,
                                     env=os.environ | {"GEMMATUNE_DASHBOARD": "off"})
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                result = json.loads(line[7:]) if line else {"error": (out.stderr or out.stdout)[-1500:]}
            except subprocess.TimeoutExpired:
                result = {"error": f"worker timed out after {args.worker_timeout} s"}
            record = dict(model=model, stack=stack, pairs_per_step=1, max_length=args.max_length, **result, gpu=gpu,
                          versions=package_versions(("torch", "triton", "transformers", "peft", "bitsandbytes",
                                                     "accelerate", "trl")), command=command)
            records.append(record)
            print(format_row(record), flush=True)
    out_path = Path(args.out or results_file("dpo-step"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(records, indent=1))
    print(f"wrote {out_path}")


def checkpoint(model: str, root: Path) -> Path:
    """The random-weight E2B/E4B text checkpoint (benchmarks/train_step.py builds it), or the tiny model."""
    if model == "tiny":
        from gemmatune.model.tiny import tiny_model_dir

        return Path(tiny_model_dir())
    from benchmarks.train_step import build_checkpoint

    folder = root / model
    build_checkpoint(model, folder)
    return folder


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['model']:4} {r['stack']:9}: ERROR {r['error'][-400:]}"
    peak = f"{r['peak_allocated_gib']:6.2f} GiB" if r["peak_allocated_gib"] is not None else "   (cpu)  "
    return (f"{r['model']:4} {r['stack']:9} | peak alloc {peak} | weights {r['weights_gib']:5.2f} GiB | "
            f"{r['steps_per_s']:6.2f} steps/s | first step {r['first_step_s']:6.1f} s | "
            f"losses {[round(x, 4) for x in r['losses']]}")


if __name__ == "__main__":
    main()
