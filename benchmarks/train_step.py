"""Full-size E2B/E4B QLoRA training step: gemmatune vs the stock Hugging Face stack, same call.

    python -m benchmarks.train_step --models e2b e4b --seq 2048 --steps 6

Builds a random-weight checkpoint from the real E2B/E4B text configs (benchmarks/
gemma4_configs.py) on the GPU, then runs each stack in its own subprocess (clean memory
statistics): QLoRA NF4 + double quant, LoRA r=16 on q,k,v,o,gate,up,down, batch 1, random
tokens, 8-bit AdamW. Stock = transformers + peft + bitsandbytes with non-reentrant
checkpointing and SDPA, loss from model(labels=...). Prints a table and writes
benchmarks/results/<date>-<gpu>-train-step.json (one record per run).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.records import command_line, package_versions, results_file
from gemmatune.model.memory import GIB


def build_checkpoint(model: str, folder: Path) -> None:
    from transformers import Gemma4ForCausalLM

    from benchmarks.gemma4_configs import CONFIGS
    from gemmatune.model.tiny import build_tiny_tokenizer

    if not (folder / "tokenizer_config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        build_tiny_tokenizer().save_pretrained(folder)  # any tokenizer: the benchmark feeds random ids
    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    with torch.device("cuda"):
        lm = Gemma4ForCausalLM(CONFIGS[model]()).to(torch.bfloat16)
    lm.save_pretrained(folder)
    del lm
    torch.cuda.empty_cache()


def random_batch(seq: int, batch: int, vocab: int = 262144):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def setup_hf(ckpt: str, seq: int, batch: int, dtype: torch.dtype):
    """The stock stack, ready to step: (step function, model, time loaded, GiB of weights)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=quant, dtype=dtype,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    loaded = time.perf_counter()
    weights = torch.cuda.memory_allocated() / GIB
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = {k: v.cuda() for k, v in random_batch(seq, batch).items()}

    def step():
        loss = model(**data, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, model, loaded, weights


def setup_gemmatune(ckpt: str, seq: int, batch: int, dtype: torch.dtype, graphs: bool = True):
    """gemmatune, ready to step: (step function, model, time loaded, GiB of weights)."""
    import gemmatune
    from gemmatune.model.activation_checkpointing import enable_gradient_checkpointing
    from gemmatune.model.memory import choose_checkpointing
    from gemmatune.training.loss import count_label_tokens
    from gemmatune.training.optimizer import adamw_8bit
    from gemmatune.training.step import MicroStep

    model, _ = gemmatune.load_model(ckpt, max_seq_length=seq, dtype=dtype, verbose=True)
    loaded = time.perf_counter()
    weights = torch.cuda.memory_allocated() / GIB
    model = gemmatune.add_lora(model, r=16)
    mode = choose_checkpointing(model, seq, batch)  # what gemmatune.train picks ("auto")
    enable_gradient_checkpointing(model, mode)
    model.train()
    optimizer = adamw_8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cpu_batch = random_batch(seq, batch)
    n_tokens = count_label_tokens([cpu_batch])
    micro_step = MicroStep(model, cuda_graphs=graphs)  # what gemmatune.train runs

    def step():
        loss = micro_step(cpu_batch, normalizer=n_tokens)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return loss

    step.micro_step = micro_step
    step.checkpointing = mode
    return step, model, loaded, weights


def run_stack(stack: str, ckpt: str, seq: int, batch: int, steps: int, dtype: torch.dtype) -> dict:
    setup = {"hf": setup_hf, "gemmatune": setup_gemmatune}[stack]
    step, model, loaded, weights = setup(ckpt, seq, batch, dtype)
    return measure(step, steps, loaded, weights, seq * batch, model)


def measure(step, steps: int, loaded: float, weights_gib: float, tokens: int, model) -> dict:
    """first_step_s: load_model returning -> first optimizer step done. Then one more untimed
    step (gemmatune captures its CUDA graph on the second step of a shape) and `steps` timed."""
    torch.cuda.reset_peak_memory_stats()
    losses = [float(step())]
    first_step_s = time.perf_counter() - loaded
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    losses.append(float(step()))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        losses.append(float(step()))
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / steps
    return dict(peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB, weights_gib=weights_gib,
                tokens_per_s=tokens / per_step, first_step_s=first_step_s, losses=losses,
                loss_finite=all(math.isfinite(x) for x in losses), first_step_grads_finite=bool(grads_finite),
                notes=getattr(getattr(step, "micro_step", None), "describe", lambda: "")(),
                checkpointing=getattr(step, "checkpointing", "on (non-reentrant)"))


def worker(args) -> None:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        result = run_stack(args.stack, args.ckpt, args.seq, args.batch, args.steps, dtype)
    except torch.OutOfMemoryError as error:
        result = {"error": f"out of memory: {str(error)[:200]}"}
    print("RESULT " + json.dumps(result), flush=True)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["e2b", "e4b"])
    parser.add_argument("--stacks", nargs="+", default=["hf", "gemmatune"])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048])
    parser.add_argument("--gemmatune-only-seq", type=int, nargs="*", default=[],
                        help="extra sequence lengths run with gemmatune only (the 8 GiB long-context check)")
    parser.add_argument("--dtypes", nargs="+", default=["bf16"])
    parser.add_argument("--gemmatune-fp16", action="store_true", help="also run gemmatune in fp16 (a T4's dtype)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--ckpt-root", default="/tmp/gemmatune-bench")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stack", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.seq = args.seq[0]
        return worker(args)

    command = command_line()
    gpu = torch.cuda.get_device_name(0)
    records = []
    plan = [(m, s, q, d) for m in args.models for d in args.dtypes for q in args.seq for s in args.stacks]
    plan += [(m, "gemmatune", q, "bf16") for m in args.models for q in args.gemmatune_only_seq]
    plan += [(m, "gemmatune", args.seq[0], "fp16") for m in args.models if args.gemmatune_fp16]
    for model in args.models:
        folder = Path(args.ckpt_root) / model
        build_checkpoint(model, folder)
        for m, stack, seq, dtype in [p for p in plan if p[0] == model]:
            cmd = [sys.executable, "-m", "benchmarks.train_step", "--worker", "--stack", stack, "--ckpt", str(folder),
                   "--seq", str(seq), "--dtype", dtype, "--batch", str(args.batch), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"GEMMATUNE_DASHBOARD": "off"})
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            result = json.loads(line[7:]) if line else {"error": (out.stderr or out.stdout)[-1500:]}
            record = dict(model=model, stack=stack, seq=seq, batch=args.batch, dtype=dtype, **result, gpu=gpu,
                          versions=package_versions(), command=command)
            records.append(record)
            print(format_row(record), flush=True)
    out_path = Path(args.out or results_file("train-step"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(records, indent=1))
    print(f"wrote {out_path}")


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['model']:4} {r['stack']:10} seq {r['seq']:6} {r['dtype']}: ERROR {r['error'][-300:]}"
    return (f"{r['model']:4} {r['stack']:10} seq {r['seq']:6} {r['dtype']} | "
            f"peak alloc {r['peak_allocated_gib']:6.2f} GiB"
            f" | reserved {r['peak_reserved_gib']:6.2f} | weights {r['weights_gib']:5.2f} | "
            f"{r['tokens_per_s']:8.0f} tok/s | first step {r['first_step_s']:5.1f} s | finite {r['loss_finite']}")


if __name__ == "__main__":
    main()
