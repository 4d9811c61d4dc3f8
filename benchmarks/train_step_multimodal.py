"""Full-size E4B image/audio QLoRA training step: gemmatune vs the stock Hugging Face stack, same call.

    python -m benchmarks.train_step_multimodal          # everything below: about 6 minutes on an H200

Builds a random-weight multimodal checkpoint (text + vision + audio towers: the released configs,
benchmarks/gemma4_configs.multimodal_config) on the GPU, then runs groups of workloads, each group in
its own subprocess (clean memory statistics; a failure or timeout in one still leaves the others).
QLoRA NF4 + double quant, LoRA r=16 on the language model's q,k,v,o,gate,up,down, 8-bit AdamW.

Workloads (one micro-batch each; random pixels, mel features and token ids):
  image280   1 image at 280 soft tokens + 512 text tokens (792 tokens)
  image1120  1 image at 1120 soft tokens + 512 text tokens (1632 tokens)
  audio30    1 clip of 30 s (750 audio tokens) + 128 text tokens (878 tokens)
  audio5x8   8 clips of 5 s (125 audio tokens each) + 128 text tokens each (8 x 253 tokens)
Groups:
  gemmatune bf16: image workloads with the vision tower only loaded, audio ones with the audio tower
  only (what the notebooks load); towers frozen, train()'s settings (CUDA graphs, "auto" checkpointing);
  hf bf16: transformers + peft + bitsandbytes, the whole Gemma4ForConditionalGeneration as the stock
  stack loads it, non-reentrant checkpointing, the default (SDPA) attention, loss from model(labels=...);
  gemmatune fp16 (a T4's dtype) on image280 and audio30: finite loss and gradients are recorded;
  capped: the notebooks' default settings (NOTEBOOK_DEFAULTS) for 20 optimizer steps in a process capped
  at 7.5 GiB with torch.cuda.set_per_process_memory_fraction (an 8 GB card less its CUDA context), bf16
  and fp16, checkpointing as train() picks it on an 8 GB card.
Prints a table and (re)writes benchmarks/results/<date>-<gpu>-train-step-multimodal.json after every
group, one record per run (with a subset of --groups or --tower-lora, their names end the file's name,
so two calls do not overwrite each other). Subsets: --groups, --workloads, --stacks, --steps; --tower-lora adds
gemmatune runs with the tower's adapters on (image280 + vision tower, audio30 + audio tower).
Works with transformers 5.17 (the H200 machine's) and 5.23.
"""
import argparse
import gc
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

# Real Gemma 4 token ids (transformers' Gemma4Config defaults).
BOS, IMAGE, BOI, EOI, AUDIO, BOA, EOA = 2, 258880, 255999, 258882, 258881, 256000, 258883
PROMPT_TOKENS = 31  # text before the image/clip (after <bos>); the rest of the text is the answer
WORKLOADS = {  # name: (mode, rows, soft tokens per image or seconds per clip, text tokens per row)
    "image280": ("image", 1, 280, 512),
    "image1120": ("image", 1, 1120, 512),
    "audio30": ("audio", 1, 30, 128),
    "audio5x8": ("audio", 8, 5, 128),
}
# The notebooks' defaults (keep in sync with notebooks/Gemma4_E4B_Vision.ipynb / _Audio.ipynb):
# BATCH_SIZE 2, GRAD_ACCUM 4, MAX_SOFT_TOKENS 280 / MAX_AUDIO_SECONDS 30, towers frozen; rows shaped
# like the default datasets (one formula image + a short LaTeX answer; one clip of up to 30 s + its
# transcript), padded to a multiple of 64 as gemmatune's collator pads.
NOTEBOOK_DEFAULTS = {
    "image": dict(batch=2, grad_accum=4, amount=280, text=128),
    "audio": dict(batch=2, grad_accum=4, amount=30, text=64),
}
CAP_GIB = 7.5


# ------------------------------------------------------------------ checkpoint and batches
def build_checkpoint(model: str, folder: Path) -> None:
    from transformers import Gemma4ForConditionalGeneration

    from benchmarks.gemma4_configs import multimodal_config
    from gemmatune.model.tiny import build_tiny_tokenizer

    if not (folder / "tokenizer_config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        build_tiny_tokenizer().save_pretrained(folder)  # any tokenizer: the benchmark feeds token ids
    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device("cuda"):
        full = Gemma4ForConditionalGeneration(multimodal_config(model)).to(torch.bfloat16)
    full.save_pretrained(folder)
    print(f"built and saved the random-weight {model} multimodal checkpoint in {time.perf_counter() - start:.0f} s",
          flush=True)
    del full
    torch.cuda.empty_cache()


def patch_grid(soft_tokens: int) -> tuple[int, int]:
    """(rows, cols) in patches of an image with exactly `soft_tokens` soft tokens (3 x 3 pooling)."""
    rows = max(r for r in range(1, int(math.isqrt(soft_tokens)) + 1) if soft_tokens % r == 0)
    return 3 * rows, 3 * (soft_tokens // rows)


def workload_batch(mode: str, rows: int, amount: float, text: int, multiple: int = 1, seed: int = 0,
                   n_mel: int = 128) -> dict:
    """A CPU batch: per row <bos>, a prompt, the image/clip's tokens, an answer that carries the
    labels; `text` tokens per row besides the medium's soft tokens, padded to `multiple`."""
    gen = torch.Generator().manual_seed(seed)
    if mode == "image":
        n_soft = int(amount)
        grid = patch_grid(n_soft)
        patches = grid[0] * grid[1]
        media = [BOI] + [IMAGE] * n_soft + [EOI]
    else:
        frames = int(amount * 100)  # 10 ms hop
        n_soft = frames // 4
        media = [BOA] + [AUDIO] * n_soft + [EOA]
    answer = text - 1 - PROMPT_TOKENS - 2
    ids, labels = [], []
    for _ in range(rows):
        prompt = torch.randint(10, 250000, (PROMPT_TOKENS,), generator=gen).tolist()
        reply = torch.randint(10, 250000, (answer,), generator=gen).tolist()
        ids.append([BOS] + prompt + media + reply)
        labels.append([-100] * (1 + PROMPT_TOKENS + len(media)) + reply)
    length = -(-len(ids[0]) // multiple) * multiple
    pad = length - len(ids[0])
    batch = {"input_ids": torch.tensor([r + [0] * pad for r in ids]),
             "attention_mask": torch.tensor([[1] * len(r) + [0] * pad for r in ids]),
             "labels": torch.tensor([r + [-100] * pad for r in labels])}
    if mode == "image":
        x, y = torch.meshgrid(torch.arange(grid[1]), torch.arange(grid[0]), indexing="xy")
        batch["pixel_values"] = torch.rand(rows, patches, 3 * 16 * 16, generator=gen)
        batch["image_position_ids"] = torch.stack([x, y], dim=-1).reshape(1, patches, 2).repeat(rows, 1, 1)
    else:
        batch["input_features"] = torch.randn(rows, frames, n_mel, generator=gen)
        batch["input_features_mask"] = torch.ones(rows, frames, dtype=torch.bool)
    return batch


# ------------------------------------------------------------------ the two stacks
def setup_gemmatune(ckpt: str, modalities, dtype, max_seq: int, train_tower: str | None = None):
    """gemmatune as the notebooks run it: (model, optimizer, seconds load_model took, when it returned)."""
    import gemmatune
    from gemmatune.training.optimizer import adamw_8bit

    start = time.perf_counter()
    model, _ = gemmatune.load_model(ckpt, max_seq_length=max_seq, dtype=dtype, modalities=modalities)
    loaded = time.perf_counter()
    switches = {f"train_{train_tower}_tower": True} if train_tower else {}
    model = gemmatune.add_lora(model, r=16, **switches)
    print(gemmatune.trainable_parameters(model), flush=True)
    model.train()
    optimizer = adamw_8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer, loaded - start, loaded


def gemmatune_step(model, optimizer, checkpointing: str):
    """One optimizer step per call on a fixed CPU batch, through train()'s MicroStep."""
    from gemmatune.model.activation_checkpointing import enable_gradient_checkpointing
    from gemmatune.training.step import MicroStep

    enable_gradient_checkpointing(model, checkpointing)
    micro_step = MicroStep(model)

    def step(batch, n_tokens):
        loss = micro_step(batch, normalizer=n_tokens)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return loss

    step.describe = micro_step.describe
    return step


def setup_hf(ckpt: str, dtype):
    """The stock stack: (model, optimizer, seconds from_pretrained took, when it returned)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, Gemma4ForConditionalGeneration

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    start = time.perf_counter()
    model = Gemma4ForConditionalGeneration.from_pretrained(ckpt, quantization_config=quant, dtype=dtype,
                                                           device_map={"": 0})
    loaded = time.perf_counter()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    # A plain name list also matches the towers' Gemma4ClippableLinear, which peft rejects: a regex
    # limited to the language model (the usual workaround).
    targets = (r".*language_model\.layers\.\d+\.(self_attn|mlp)\."
               r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer, loaded - start, loaded


def hf_step(model, optimizer):
    def step(batch, n_tokens):
        inputs = {k: v.cuda() for k, v in batch.items()}
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step.describe = lambda: f"attention {model.config.get_text_config()._attn_implementation}"
    return step


# ------------------------------------------------------------------ measuring
def grads_finite(model) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def measure(step, batch, model, steps: int, started: float) -> dict:
    """first_step_s: from `started` (load_model returning, or the workload's start) to the first
    optimizer step done; then one untimed step (gemmatune captures its graph on a shape's second
    micro-batch) and `steps` timed ones."""
    from gemmatune.training.loss import count_label_tokens

    n_tokens = count_label_tokens([batch])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    losses = [float(step(batch, n_tokens))]
    first_step_s = time.perf_counter() - started
    first_grads_finite = grads_finite(model)
    losses.append(float(step(batch, n_tokens)))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        losses.append(float(step(batch, n_tokens)))
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / max(steps, 1)
    return dict(peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                tokens_per_s=batch["attention_mask"].sum().item() / per_step, first_step_s=first_step_s,
                losses=losses, loss_finite=all(math.isfinite(x) for x in losses),
                grads_finite=first_grads_finite and grads_finite(model), notes=step.describe())


def media_fields(mode: str, rows: int, amount: float) -> dict:
    return {"soft_tokens": int(amount) * rows} if mode == "image" else {"audio_s": float(amount) * rows}


def predicted_gib(model, batch, mode: str, amount: float, checkpointing: str) -> float:
    from gemmatune.model.memory import predict_peak_gib

    rows, seq = batch["input_ids"].shape
    media = dict(images=1, max_soft_tokens=int(amount)) if mode == "image" else dict(audio_seconds=float(amount))
    return predict_peak_gib(model, seq, rows, checkpointing=checkpointing, **media)


def cleanup():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# ------------------------------------------------------------------ workers (one per group)
def run_group(args) -> None:
    """Runs one group's workloads in this process and prints one RESULT line per run."""
    from gemmatune.model.memory import choose_checkpointing

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.cap:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(CAP_GIB * GIB / total)
    names = args.workload
    modes = {WORKLOADS[n][0] for n in names} if not args.cap else {args.cap}
    max_seq = 2048
    modalities = ("text", *sorted(modes, key=["image", "audio"].index))
    if args.stack == "gemmatune":
        model, optimizer, load_s, started = setup_gemmatune(args.ckpt, modalities, dtype, max_seq, args.train_tower)
    else:
        model, optimizer, load_s, started = setup_hf(args.ckpt, dtype)
    weights_gib = torch.cuda.memory_allocated() / GIB
    if args.cap:
        return emit(capped_run(args, model, optimizer, load_s, started, weights_gib) | {"modalities": modalities})
    for name in names:
        mode, rows, amount, text = WORKLOADS[name]
        record = dict(workload=name, mode=mode, batch=rows, load_s=load_s, weights_gib=weights_gib,
                      modalities=list(modalities) if args.stack == "gemmatune" else ["text", "image", "audio"],
                      **media_fields(mode, rows, amount))
        try:
            batch = workload_batch(mode, rows, amount, text)
            record.update(tokens=int(batch["attention_mask"].sum()), seq=batch["input_ids"].shape[1])
            if args.stack == "gemmatune":
                checkpointing = choose_checkpointing(model, batch["input_ids"].shape[1], rows)  # train()'s "auto"
                step = gemmatune_step(model, optimizer, checkpointing)
                record.update(checkpointing=checkpointing,
                              predicted_gib=predicted_gib(model, batch, mode, amount, checkpointing))
            else:
                step = hf_step(model, optimizer)
                record["checkpointing"] = "on (non-reentrant)"
            record.update(measure(step, batch, model, args.steps, started),
                          first_step_after="load_model" if name == names[0] else "the previous workload")
        except Exception as error:  # noqa: BLE001 - one failure must not lose the group's other runs
            record["error"] = f"{type(error).__name__}: {str(error)[:400]}"
        emit(record)
        step = None
        cleanup()
        started = time.perf_counter()


def capped_run(args, model, optimizer, load_s, started, weights_gib) -> dict:
    """The notebook's default settings for `--capped-steps` optimizer steps under the cap."""
    from gemmatune.model.memory import choose_checkpointing

    d = NOTEBOOK_DEFAULTS[args.cap]
    batches = [workload_batch(args.cap, d["batch"], d["amount"], d["text"], multiple=64, seed=s)
               for s in range(d["grad_accum"])]
    rows, seq = batches[0]["input_ids"].shape
    checkpointing = choose_checkpointing(model, seq, rows, free_gib=CAP_GIB)  # what train() picks on 8 GB
    record = dict(workload=f"notebook-defaults-{args.cap}", mode=args.cap, batch=rows, seq=seq,
                  grad_accum=d["grad_accum"],
                  tokens=int(sum(b["attention_mask"].sum() for b in batches)), capped_gib=CAP_GIB, load_s=load_s,
                  weights_gib=weights_gib, checkpointing=checkpointing, steps_completed=0,
                  predicted_gib=predicted_gib(model, batches[0], args.cap, d["amount"], checkpointing),
                  **media_fields(args.cap, rows, d["amount"]))
    try:
        from gemmatune.model.activation_checkpointing import enable_gradient_checkpointing
        from gemmatune.training.loss import count_label_tokens
        from gemmatune.training.step import MicroStep

        enable_gradient_checkpointing(model, checkpointing)
        micro_step = MicroStep(model)
        n_tokens = count_label_tokens(batches)
        torch.cuda.reset_peak_memory_stats()
        losses, start = [], time.perf_counter()
        for i in range(args.capped_steps):
            loss = sum(micro_step(b, normalizer=n_tokens) for b in batches)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            losses.append(float(loss))
            record["steps_completed"] = i + 1
            if i == 0:
                record["first_step_s"] = time.perf_counter() - started
        torch.cuda.synchronize()
        record.update(tokens_per_s=record["tokens"] * args.capped_steps / (time.perf_counter() - start),
                      losses=losses, loss_finite=all(math.isfinite(x) for x in losses),
                      grads_finite=grads_finite(model), notes=micro_step.describe())
    except Exception as error:  # noqa: BLE001
        record["error"] = f"{type(error).__name__}: {str(error)[:400]}"
    record.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                  peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
    return record


def emit(record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)


# ------------------------------------------------------------------ the driver
def plan(args) -> list[dict]:
    """The groups to run: {stack, dtype, workloads, cap, train_tower}."""
    groups = []
    wanted = [w for w in WORKLOADS if w in args.workloads]
    images, audios = [w for w in wanted if w.startswith("image")], [w for w in wanted if w.startswith("audio")]
    if "main" in args.groups:
        if "gemmatune" in args.stacks:
            groups += [dict(stack="gemmatune", dtype="bf16", workloads=ws) for ws in (images, audios) if ws]
        if "hf" in args.stacks and wanted:
            groups.append(dict(stack="hf", dtype="bf16", workloads=wanted))
    if "fp16" in args.groups:
        fp16 = [w for w in ("image280", "audio30") if w in wanted]
        if fp16:
            groups.append(dict(stack="gemmatune", dtype="fp16", workloads=fp16))
    if "capped" in args.groups:
        groups += [dict(stack="gemmatune", dtype=d, workloads=[], cap=m) for m in args.capped_modes for d in
                   ("bf16", "fp16")]
    if args.tower_lora:
        groups += [dict(stack="gemmatune", dtype="bf16", workloads=["image280"], train_tower="vision"),
                   dict(stack="gemmatune", dtype="bf16", workloads=["audio30"], train_tower="audio")]
    return groups


def run_subprocess(group: dict, folder: Path, args) -> list[dict]:
    cmd = [sys.executable, "-m", "benchmarks.train_step_multimodal", "--worker", "--stack", group["stack"],
           "--ckpt", str(folder), "--dtype", group["dtype"], "--steps", str(args.steps),
           "--capped-steps", str(args.capped_steps), "--workload", *group["workloads"]]
    if group.get("cap"):
        cmd += ["--cap", group["cap"]]
    if group.get("train_tower"):
        cmd += ["--train-tower", group["train_tower"]]
    env = os.environ | {"GEMMATUNE_DASHBOARD": "off"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.group_timeout)
        stdout, failure = out.stdout, (out.stderr or out.stdout)[-1500:] if out.returncode else None
    except subprocess.TimeoutExpired as timeout:
        stdout = timeout.stdout.decode() if isinstance(timeout.stdout, bytes) else (timeout.stdout or "")
        failure = f"timed out after {args.group_timeout} s"
    records = [json.loads(x[7:]) for x in stdout.splitlines() if x.startswith("RESULT ")]
    expected = group["workloads"] or [f"notebook-defaults-{group['cap']}"]
    missing = [w for w in expected if w not in {r["workload"] for r in records}]
    records += [dict(workload=w, mode=WORKLOADS.get(w, ("image" if "image" in w else "audio",))[0],
                     error=failure or "no result printed") for w in missing]
    for r in records:
        r.update(stack=group["stack"], dtype=group["dtype"], tower_lora=group.get("train_tower"))
    return records



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["e4b"], choices=["e2b", "e4b"])
    parser.add_argument("--groups", nargs="+", default=["main", "fp16", "capped"], choices=["main", "fp16", "capped"])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--stacks", nargs="+", default=["gemmatune", "hf"], choices=["gemmatune", "hf"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (after two untimed ones)")
    parser.add_argument("--capped-steps", type=int, default=20)
    parser.add_argument("--capped-modes", nargs="+", default=["image", "audio"], choices=["image", "audio"],
                        help="which notebooks' defaults the capped group runs")
    parser.add_argument("--tower-lora", action="store_true", help="also runs with the tower's adapters on")
    parser.add_argument("--group-timeout", type=int, default=300, help="seconds per subprocess")
    parser.add_argument("--ckpt-root", default="/tmp/gemmatune-bench-mm")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stack", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--workload", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--cap", help=argparse.SUPPRESS)
    parser.add_argument("--train-tower", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_group(args)

    command = command_line()
    gpu = torch.cuda.get_device_name(0)
    subset = "" if set(args.groups) == {"main", "fp16", "capped"} else "-" + "-".join(args.groups)
    subset += "-tower-lora" if args.tower_lora else ""
    out_path = Path(args.out or results_file(f"train-step-multimodal{subset}"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    records, started = [], time.perf_counter()
    for model in args.models:
        folder = Path(args.ckpt_root) / model
        try:
            build_checkpoint(model, folder)
        except Exception as error:  # noqa: BLE001
            records.append(dict(model=model, error=f"checkpoint build failed: {type(error).__name__}: {error}"))
            continue
        for group in plan(args):
            for record in run_subprocess(group, folder, args):
                record = dict(model=model, **record, gpu=gpu, versions=package_versions(), command=command)
                records.append(record)
                print(format_row(record), flush=True)
            out_path.write_text(json.dumps(records, indent=1))
    print_ratios(records)
    out_path.write_text(json.dumps(records, indent=1))
    print(f"wrote {out_path} ({time.perf_counter() - started:.0f} s in all)")


def format_row(r: dict) -> str:
    head = f"{r['model']} {r['stack']:9} {r['dtype']} {r.get('workload', '?'):24}" + (
        f" +{r['tower_lora']} tower LoRA" if r.get("tower_lora") else "")
    if "error" in r and "peak_allocated_gib" not in r:
        return f"{head}: ERROR {r['error'][-300:]}"
    text = (f"{head} | {r.get('tokens', 0):5} tok | peak {r['peak_allocated_gib']:5.2f} GiB"
            f" (predicted {r['predicted_gib']:.2f})" if "predicted_gib" in r else
            f"{head} | {r.get('tokens', 0):5} tok | peak {r['peak_allocated_gib']:5.2f} GiB")
    text += (f" | {r.get('tokens_per_s', 0):7.0f} tok/s | first step {r.get('first_step_s', float('nan')):5.1f} s"
             f" | finite loss {r.get('loss_finite')} grads {r.get('grads_finite')}")
    if "capped_gib" in r:
        text += f" | {r['steps_completed']} steps under {r['capped_gib']} GiB"
    return text + (f" | ERROR {r['error'][-200:]}" if "error" in r else "")


def print_ratios(records: list[dict]) -> None:
    """gemmatune's tokens/s over the stock stack's, per workload (bf16, same call)."""
    for r in records:
        if r.get("stack") != "gemmatune" or r.get("dtype") != "bf16" or r.get("tower_lora") or "tokens_per_s" not in r:
            continue
        hf = next((h for h in records if h.get("stack") == "hf" and h.get("workload") == r.get("workload")
                   and h.get("model") == r["model"] and "tokens_per_s" in h), None)
        if hf:
            print(f"{r['model']} {r['workload']}: gemmatune {r['tokens_per_s'] / hf['tokens_per_s']:.2f}x the stock "
                  f"stack's tokens/s, {r['peak_allocated_gib']:.2f} vs {hf['peak_allocated_gib']:.2f} GiB peak")


if __name__ == "__main__":
    main()
