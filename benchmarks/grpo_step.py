"""One GRPO step: gemmatune.train_grpo vs TRL's GRPOTrainer + peft + bitsandbytes, same call.

    python -m benchmarks.grpo_step --quick     # E2B both stacks, E4B gemmatune: about 6 minutes (estimated)
    python -m benchmarks.grpo_step             # the stock step at the full 256 new tokens too (a few minutes more)
    python -m benchmarks.grpo_step --cpu-smoke # the code paths on the tiny model, on a CPU (no figures worth keeping)

A step: 8 prompts x 8 completions x up to 256 new tokens, sampled at temperature 1, rewarded,
advantages within each group, KL coefficient 0.04 to the base model (adapters disabled), one
8-bit AdamW update; QLoRA NF4 + double quant, bf16, LoRA r=16 on q,k,v,o,gate,up,down. The
checkpoints are random-weight E2B/E4B text models from the real configs (benchmarks/gemma4_configs.py,
as benchmarks/train_step.py builds them), so no completion stops early: every one is 256 tokens
(both stacks generate the same number of tokens). Prompts are the bundled arithmetic prompts
through the tiny tokenizer (~40 tokens each). The reward is the share of even token ids (any
reward that varies does: it only has to make the advantages non-zero).

- gemmatune: `gemmatune.train_grpo` as the notebook calls it (rollouts through gemmatune's
  decoding: one batch of 64, static cache, CUDA-graph decode steps; the training forward eager,
  padded, log-probabilities through the fused LM head). The first step compiles kernels and
  captures the decode graph; the later `--steps` are measured (median).
- trl: `trl.GRPOTrainer` with the model path, `quantization_config` (bitsandbytes NF4) and a
  peft `LoraConfig`, its default generation (`model.generate`, batch 64), non-reentrant gradient
  checkpointing, per-device batch 16 x 4 accumulation (64 completions, generated at once),
  `adamw_bnb_8bit`, beta 0.04. Generation time is what the model's `generate` takes (the
  trainer calls it through the peft model, whose `generate` is wrapped by a timer here); the step
  time is from the trainer's step-begin to step-end callbacks. `--quick` runs one stock step with
  `--trl-new-tokens 64` (recorded in the record's new_tokens): its per-token speed is what
  matters and it does not depend on the length (every token is one `generate` step).

rollout_tokens_per_s = completion tokens sampled / sampling seconds; step_s = the whole step
(sampling, rewards, reference and policy forwards, backward, optimizer); peak_allocated_gib =
torch.cuda.max_memory_allocated from just before the first step (weights included). Each
(model, stack) runs in its own subprocess. Writes benchmarks/results/<date>-<gpu>-grpo-step.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.records import command_line, package_versions, results_file
from gemmatune.model.memory import GIB

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VERSIONS = ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "datasets")


def even_token_share(prompts, completions, completion_ids, **columns):
    """The benchmark's reward: varies between completions, costs nothing."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def bench_prompts(n: int) -> list[str]:
    import gemmatune

    return [row["prompt"] for row in gemmatune.load_bundled_prompts("train")[:n]]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------- gemmatune
def gemmatune_worker(ckpt: str, args) -> dict:
    import gemmatune
    from gemmatune.generation.decoding import describe

    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    model, tokenizer = gemmatune.load_model(ckpt, dtype=dtype, max_seq_length=1024, verbose=True)
    model = gemmatune.add_lora(model, r=16)
    prompts = bench_prompts(args.prompts * (args.steps + 1))
    reset_peak()
    with tempfile.TemporaryDirectory() as out:
        result = gemmatune.train_grpo(
            model, tokenizer, prompts, [even_token_share], max_steps=args.steps + 1, prompts_per_step=args.prompts,
            group_size=args.completions, max_new_tokens=args.new_tokens, beta=0.04, learning_rate=2e-5,
            optimizer="adamw" if args.cpu_smoke else "adamw_8bit", dashboard="off", output_dir=out)
    measured = result.steps[1:]
    return dict(new_tokens=args.new_tokens, steps_measured=len(measured),
                rollout_tokens_per_s=statistics.median(s["rollout_tokens_per_s"] for s in measured),
                step_s=statistics.median(s["step_s"] for s in measured),
                rollout_s=statistics.median(s["rollout_s"] for s in measured),
                train_s=statistics.median(s["train_s"] for s in measured),
                train_tokens_per_s=statistics.median(s["train_tokens_per_s"] for s in measured),
                first_step_s=result.steps[0]["step_s"], peak_allocated_gib=peak_gib(),
                completion_length=statistics.mean(s["completion_length"] for s in measured),
                kl=[s["kl"] for s in result.steps], loss=[s["loss"] for s in result.steps],
                grad_norm=[s["grad_norm"] for s in result.steps], notes=describe(model))


# ------------------------------------------------------------------------------------------ trl
class GenerateTimer:
    """Wraps one model object's `generate` (this benchmark's instance only): seconds and tokens."""

    def __init__(self, model, stop_ids: set[int]):
        self.generate, self.stop_ids = model.generate, stop_ids
        self.calls: list[tuple[float, int]] = []  # (seconds, completion tokens up to and including a stop)

    def __call__(self, *args, **kwargs):
        sync()
        start = time.perf_counter()
        out = self.generate(*args, **kwargs)
        sync()
        seconds = time.perf_counter() - start
        prompt = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
        tokens = 0
        for row in out[:, prompt:].tolist():
            stop = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            tokens += len(row) if stop is None else stop + 1
        self.calls.append((seconds, tokens))
        return out


def trl_worker(ckpt: str, args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    new_tokens = args.trl_new_tokens or args.new_tokens
    completions = args.prompts * args.completions
    micro = min(16, completions)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=micro,
        gradient_accumulation_steps=completions // micro, num_generations=args.completions,
        max_completion_length=new_tokens, temperature=1.0, beta=0.04, learning_rate=2e-5, max_steps=args.trl_steps,
        bf16=not args.cpu_smoke, use_cpu=args.cpu_smoke, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="adamw_torch" if args.cpu_smoke else "adamw_bnb_8bit", logging_steps=1, report_to="none",
        save_strategy="no", seed=0,
        model_init_kwargs={"dtype": dtype, "attn_implementation": "sdpa",
                           "device_map": {"": "cpu" if args.cpu_smoke else 0}})
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            step_times.append(time.perf_counter() - self.start)

    prompts = bench_prompts(args.prompts * args.trl_steps)
    trainer = GRPOTrainer(
        model=ckpt, reward_funcs=[even_token_share], args=config,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tokenizer,
        quantization_config=quant, callbacks=[StepTimer()],
        peft_config=LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    stops = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<turn|>")) if i is not None}
    timer = GenerateTimer(trainer.model, stops)
    trainer.model.generate = timer  # this instance only: the trainer generates through it
    reset_peak()
    trainer.train()
    if not timer.calls:
        raise RuntimeError("the trainer did not call the timed generate: the rollout time was not measured")
    seconds, tokens = sum(s for s, _ in timer.calls), sum(t for _, t in timer.calls)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return dict(new_tokens=new_tokens, steps_measured=len(step_times), rollout_tokens_per_s=tokens / seconds,
                step_s=statistics.median(step_times), rollout_s=seconds / len(step_times),
                generate_calls=len(timer.calls), completion_length=tokens / (completions * len(step_times)),
                peak_allocated_gib=peak_gib(), loss=losses,
                kl=[r.get("kl") for r in trainer.state.log_history if "kl" in r],
                notes="quick: bounded stock run" if args.trl_new_tokens else "")


# ------------------------------------------------------------------------------------------ main
def worker(args) -> None:
    work = {"gemmatune": gemmatune_worker, "trl": trl_worker}[args.stack]
    try:
        result = work(args.ckpt, args)
    except Exception as error:  # one record per failed run: the others go on
        result = {"error": f"{type(error).__name__}: {str(error)[:600]}"}
    print("RESULT " + json.dumps(result), flush=True)


def checkpoint_for(model: str, root: Path, cpu_smoke: bool) -> Path:
    """A random-weight text-only checkpoint (Gemma4ForCausalLM, as benchmarks/train_step.py builds
    them); for --cpu-smoke one of the tiny model's text config."""
    folder = root / model
    if cpu_smoke:
        from transformers import Gemma4ForCausalLM, Gemma4TextConfig

        from gemmatune.model.tiny import build_tiny_tokenizer, tiny_text_config_kwargs

        torch.manual_seed(0)
        Gemma4ForCausalLM(Gemma4TextConfig(**tiny_text_config_kwargs())).save_pretrained(folder)
        build_tiny_tokenizer().save_pretrained(folder)
        return folder
    from benchmarks.train_step import build_checkpoint

    build_checkpoint(model, folder)
    return folder


def run_worker(cmd: list[str], timeout: int) -> dict:
    env = os.environ | {"GEMMATUNE_DASHBOARD": "off", "TOKENIZERS_PARALLELISM": "false"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout} s"}
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"error": (out.stderr or out.stdout)[-1500:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["e2b", "e4b"])
    parser.add_argument("--trl-models", nargs="*", default=["e2b"], help="models the stock stack runs on too")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--completions", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="gemmatune steps measured (after one warm-up step)")
    parser.add_argument("--trl-steps", type=int, default=1)
    parser.add_argument("--trl-new-tokens", type=int, default=0, help="the stock run's new tokens (0: --new-tokens)")
    parser.add_argument("--quick", action="store_true", help="bound the stock run: 1 step of 64 new tokens")
    parser.add_argument("--cpu-smoke", action="store_true", help="the tiny model on a CPU, tiny sizes")
    parser.add_argument("--ckpt-root", default="/tmp/gemmatune-bench")
    parser.add_argument("--worker-timeout", type=int, default=300)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stack", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.trl_steps, args.trl_new_tokens = 1, args.trl_new_tokens or 64
    if args.cpu_smoke:
        args.models, args.trl_models = ["tiny"], ["tiny"]
        args.prompts, args.completions, args.new_tokens, args.steps = 2, 2, 8, 1
        args.trl_new_tokens = args.trl_new_tokens and 4
    if args.worker:
        return worker(args)

    command, versions = command_line(), package_versions(VERSIONS)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    records = []
    for model in args.models:
        ckpt = checkpoint_for(model, Path(args.ckpt_root), args.cpu_smoke)
        for stack in ["trl", "gemmatune"] if model in args.trl_models else ["gemmatune"]:
            cmd = [sys.executable, "-m", "benchmarks.grpo_step", "--worker", "--stack", stack, "--ckpt", str(ckpt),
                   *passed_on(args)]
            result = run_worker(cmd, args.worker_timeout)
            record = dict(model=model, stack=stack, prompts=args.prompts, completions=args.completions,
                          new_tokens=args.new_tokens) | result | dict(dtype="fp32" if args.cpu_smoke else "bf16",
                                                                       gpu=gpu, versions=versions, command=command)
            records.append(record)
            print(format_row(record), flush=True)
    print_ratios(records)
    out_path = Path(args.out or results_file("grpo-step-cpu-smoke" if args.cpu_smoke else "grpo-step"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(records, indent=1))
    print(f"wrote {out_path}")


def passed_on(args) -> list[str]:
    """The settings a worker needs, as command-line flags."""
    flags = ["--prompts", str(args.prompts), "--completions", str(args.completions), "--new-tokens",
             str(args.new_tokens), "--steps", str(args.steps), "--trl-steps", str(args.trl_steps),
             "--trl-new-tokens", str(args.trl_new_tokens)]
    return flags + (["--cpu-smoke"] if args.cpu_smoke else [])


def format_row(r: dict) -> str:
    head = f"{r['model']:4} {r['stack']:9}"
    if "error" in r:
        return f"{head} ERROR {r['error'][-400:]}"
    return (f"{head} {r['prompts']}x{r['completions']} new {r['new_tokens']:4} | rollout "
            f"{r['rollout_tokens_per_s']:9,.0f} tok/s | step {r['step_s']:7.2f} s | peak "
            f"{r['peak_allocated_gib'] or 0:6.2f} GiB | {r.get('notes', '')}")


def print_ratios(records: list[dict]) -> None:
    """gemmatune / trl at equal model: rollout tokens/s and whole-step time (the step ratio only
    when both generated the same number of new tokens)."""
    ok = {(r["model"], r["stack"]): r for r in records if "error" not in r}
    for model in sorted({r["model"] for r in records}):
        ours, stock = ok.get((model, "gemmatune")), ok.get((model, "trl"))
        if not (ours and stock):
            continue
        line = f"{model}: rollout {ours['rollout_tokens_per_s'] / stock['rollout_tokens_per_s']:.1f}x trl"
        if ours["new_tokens"] == stock["new_tokens"]:
            line += f", whole step {stock['step_s'] / ours['step_s']:.1f}x faster"
        else:
            line += (f" (trl ran {stock['new_tokens']} new tokens, gemmatune {ours['new_tokens']}: whole-step times "
                     "not compared)")
        print(line)


if __name__ == "__main__":
    main()
