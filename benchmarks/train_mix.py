"""Real data at full speed: gemmatune packed, gemmatune padded and the stock stack on length mixes, one call.

    python -m benchmarks.train_mix --quick                                  # text-mix, E2B + E4B: ~7 min
    python -m benchmarks.train_mix --workloads image-mix audio-mix --quick  # E4B: ~5 min
    python -m benchmarks.train_mix --smoke                                  # CPU, tiny model: the script runs

Workloads (seeded; every record carries the seed and the dataset's row lengths):
  text-mix   E2B and E4B text models: chat rows with log-normal lengths (median 450 tokens, sigma 0.9,
             clipped to 48..2048, mean about 620), random tokens, the answer (the last 50-80%) labelled.
             Runs: gemmatune packed (train's default: batch 2 buffers of 2048 tokens x 4 accumulation),
             gemmatune padded (packing=False: batch 2 rows x 4, each micro-batch padded to its longest row
             rounded up to 64), the stock stack padded (batch 2 x 4, padded to a multiple of 8), and
             fixed-2048: gemmatune on rows of exactly 2048 tokens at batch 2 x 4 (no padding to remove).
  image-mix  E4B multimodal: formula-shaped images (aspect 2:1 to 8:1, the 280-token budget: 230-280 soft
             tokens) with answers of 10..200 tokens, max_seq_length 1024 (the vision notebook's); the
             same three runs, and gemmatune's fixed image workload (benchmarks/train_step_multimodal.py's
             image280: 1 image at 280 soft tokens + 512 text, batch 1, one micro-batch a step).
  audio-mix  E4B multimodal: clips of 1..30 s (25 tokens a second) with transcripts of 2.5 words (about
             3.3 tokens) a second, max_seq_length 1024 (the audio notebook's); fixed: audio30 (1 clip of
             30 s + 128 text).
  attention  (with text-mix) one layer's attention forward + backward at (2, 2048) on the text mix's
             documents, today's (a causal row each) against packed, at equal tokens: the full layers
             (head_dim 512, math attention) and the sliding layers (head_dim 256, window 512), E2B/E4B heads.

How: random-weight checkpoints from the real configs (benchmarks/train_step.py and
train_step_multimodal.py build them), QLoRA NF4 + double quant, LoRA r=16 on q,k,v,o,gate,up,down, 8-bit
AdamW, clipping at 1.0, bf16. gemmatune runs as train() runs: its micro-batches (gemmatune.training.
trainer.micro_batches: the same collate, packing, PLE gathers), MicroStep (CUDA graphs), "auto"
checkpointing. The stock stack is transformers + peft + bitsandbytes, non-reentrant checkpointing, SDPA,
loss from model(labels=...). One process per (model, stack): gemmatune's runs share one (packed first, so
its first_step_s counts from load_model; later runs count from their own start). Each run: `--warmup`
untimed optimizer steps (graph captures happen there: the first micro-batch of a shape runs eagerly,
the second is captured), then `--steps` timed ones, the CPU work (collating, decoding media) included.
useful_tokens_per_s: tokens of rows (prompts, answers, soft tokens; not padding) per second;
padding_fraction: padding / all tokens computed, over the timed steps; replayed_fraction: the timed
micro-batches whose shape had a captured graph already (a padded run meets new shapes for a while:
each is run eagerly once, captured the second time, at most 8 kept, so a short run is its worst case).

Records (one per run): model, stack, workload, packing, useful_tokens_per_s, padding_fraction,
graph_captures, peak_allocated_gib, first_step_s, dtype, gpu, versions, command, and more. Written to
benchmarks/results/<date>-<gpu>-train-mix[-<workloads>].json after every process; a table and the issue's
ratios (packed / fixed, packed / padded, gemmatune / stock) are printed at the end.
"""
import argparse
import gc
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.records import command_line, package_versions, results_file
from gemmatune.data.dataset import PreparedDataset

GIB = 2**30
MEDIA_IDS = {"<|image>": 255999, "<|image|>": 258880, "<image|>": 258882,  # the released ids (Gemma4Config)
             "<|audio>": 256000, "<|audio|>": 258881, "<audio|>": 258883}
BOS, TURN_END = 2, 106
SETTINGS = {  # workload: (models, max_seq_length, rows in the dataset)
    "text-mix": (("e2b", "e4b"), 2048, 2000),
    "image-mix": (("e4b",), 1024, 400),
    "audio-mix": (("e4b",), 1024, 400),
}
BATCH, GRAD_ACCUM = 2, 4  # the notebooks' defaults


# ------------------------------------------------------------------ the data (seeded)
def text_mix_lengths(n, seed, median=450, sigma=0.9, low=48, high=2048):
    rng = random.Random(seed)
    return [min(high, max(low, round(math.exp(math.log(median) + sigma * rng.gauss(0, 1))))) for _ in range(n)]


def text_rows(lengths, seed, vocab):
    """<bos> + random tokens; the last 50-80% of each row labelled (an answer after its prompt)."""
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    rows = []
    for n in lengths:
        ids = [BOS] + torch.randint(20, vocab, (n - 1,), generator=gen).tolist()
        prompt = max(1, int(n * rng.uniform(0.2, 0.5)))
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def media_rows(kind, n, seed, vocab, ids, budget=280, mel_bins=128, longest_clip=30):
    """Rows as gemmatune.prepare_dataset makes them: <bos> prompt, the medium's placeholder run, an answer
    (with <turn|>) carrying the labels; `media` holds an ImageRef (a random picture) or AudioRef (noise)."""
    import numpy as np
    from PIL import Image

    from gemmatune.data.audio import SAMPLING_RATE, AudioRef
    from gemmatune.data.images import ImageRef
    from gemmatune.data.media import media_run

    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    noise = np.random.default_rng(seed).standard_normal(30 * SAMPLING_RATE).astype(np.float32) * 0.1
    rows = []
    for i in range(n):
        if kind == "image":
            height = rng.randint(40, 80)
            width = round(height * rng.uniform(2, 8))
            pixels = np.random.default_rng(seed + i).integers(0, 256, (height, width, 3), dtype=np.uint8)
            ref = ImageRef(Image.fromarray(pixels), height, width, budget, f"row {i}")
            answer = rng.randint(10, 200)
        else:
            seconds = rng.uniform(1, longest_clip)
            samples = int(seconds * SAMPLING_RATE)
            ref = AudioRef(noise[:samples], SAMPLING_RATE, samples, mel_bins, f"row {i}")
            answer = max(2, round(seconds * 2.5 * 1.3))  # 2.5 words a second, ~1.3 tokens a word
        prompt = [BOS] + torch.randint(20, vocab, (12,), generator=gen).tolist()
        reply = torch.randint(20, vocab, (answer,), generator=gen).tolist() + [TURN_END]
        run = media_run(ref, ids)
        rows.append({"input_ids": prompt + run + reply, "labels": [-100] * (len(prompt) + len(run)) + reply,
                     "media": [ref], "media_ids": ids})
    return rows


def fixed_text_rows(n, length, seed, vocab):
    return PreparedDataset(examples=text_rows([length] * n, seed, vocab), max_seq_length=length)


# ------------------------------------------------------------------ the stacks
def load_gemmatune(ckpt, max_seq, modalities, dtype):
    import gemmatune
    from gemmatune.training.optimizer import adamw_8bit

    model, tokenizer = gemmatune.load_model(ckpt, max_seq_length=max_seq, dtype=dtype, modalities=modalities,
                                            verbose=False)
    model = gemmatune.add_lora(model, r=16)
    model.train()
    optimizer = adamw_8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer, tokenizer.pad_token_id


def load_stock(ckpt, multimodal, dtype, quantize=True):
    """transformers + peft + bitsandbytes as train_step.py / train_step_multimodal.py load them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Gemma4ForConditionalGeneration

    kwargs = dict(dtype=dtype)
    if quantize:
        kwargs.update(device_map={"": 0}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    if multimodal:  # the default attention (SDPA where the towers take it), as train_step_multimodal.py
        model = Gemma4ForConditionalGeneration.from_pretrained(ckpt, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa", **kwargs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    # The language model's projections only: a plain name list also matches the towers'
    # Gemma4ClippableLinear, which peft rejects (the usual workaround, as train_step_multimodal.py).
    targets = (r"^(?!.*(vision_tower|audio_tower)).*layers\.\d+\.(self_attn|mlp)\."
               r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if quantize:
        import bitsandbytes as bnb

        return model, bnb.optim.AdamW8bit(params, lr=1e-4)
    return model, torch.optim.AdamW(params, lr=1e-4)


# ------------------------------------------------------------------ one run
def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib():
    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None


def timed_steps(one_step, warmup, steps, started):
    """Run warmup + steps optimizer steps; one_step() returns (loss, useful tokens, computed tokens)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    losses, first_step_s = [], None
    for _ in range(warmup):
        losses.append(float(one_step()[0]))
        first_step_s = first_step_s or time.perf_counter() - started
    synchronize()
    useful = computed = 0
    start = time.perf_counter()
    for _ in range(steps):
        loss, u, c = one_step()
        useful, computed = useful + u, computed + c
        losses.append(loss)
    synchronize()
    elapsed = time.perf_counter() - start
    losses = [float(x) for x in losses]
    return dict(useful_tokens_per_s=useful / elapsed, padding_fraction=1 - useful / computed,
                tokens_computed_per_s=computed / elapsed, step_s=elapsed / steps, first_step_s=first_step_s,
                peak_allocated_gib=peak_gib(), losses=losses, loss_finite=all(math.isfinite(x) for x in losses))


def gemmatune_run(model, optimizer, pad_id, data, packing, max_seq, args, started, fixed_batch=None):
    """train()'s step on `data` (rows) with packing on or off, or on one fixed batch a step."""
    from gemmatune.data.packing import pack_length, token_counts
    from gemmatune.model.activation_checkpointing import enable_gradient_checkpointing
    from gemmatune.model.memory import choose_checkpointing
    from gemmatune.training.config import TrainConfig
    from gemmatune.training.loss import count_label_tokens
    from gemmatune.training.step import MicroStep
    from gemmatune.training.trainer import micro_batches

    if fixed_batch is not None:
        batches, accum = iter(lambda: fixed_batch, None), 1
        seq, batch = fixed_batch["input_ids"].shape[1], fixed_batch["input_ids"].shape[0]
    else:
        config = TrainConfig(batch_size=BATCH, grad_accum=GRAD_ACCUM, packing=packing)  # train()'s buffer length
        batches, accum = micro_batches(data, config, pad_id, epoch_seed=args.seed), GRAD_ACCUM
        seq, batch = (pack_length(data, True) if packing else max_seq), BATCH
    checkpointing = choose_checkpointing(model, seq, batch, packed=bool(packing))
    enable_gradient_checkpointing(model, checkpointing)
    micro_step = MicroStep(model)
    params = [p for p in model.parameters() if p.requires_grad]
    replays = []  # per micro-batch: was its shape's graph captured already (replayed) or not (eager / capture)

    def one_step():
        step_batches = [next(batches) for _ in range(accum)]
        normalizer = count_label_tokens(step_batches)
        replays.extend(micro_step._graph_key(b) in micro_step.graphs for b in step_batches)
        loss = sum(micro_step(b, normalizer=normalizer) for b in step_batches)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        counts = [token_counts(b) for b in step_batches]
        return loss, sum(u for u, _ in counts), sum(c for _, c in counts)

    result = timed_steps(one_step, args.warmup, args.steps, started)
    timed = replays[args.warmup * accum:]
    result.update(graph_captures=len(micro_step.graphs), checkpointing=checkpointing, notes=micro_step.describe(),
                  micro_batch=[batch, seq], grad_accum=accum, replayed_fraction=sum(timed) / max(len(timed), 1))
    return result  # the graphs and their memory pool go with micro_step


def stock_run(model, optimizer, pad_id, data, args, started, multimodal):
    from gemmatune.data.packing import token_counts
    from gemmatune.training.config import TrainConfig
    from gemmatune.training.trainer import micro_batches

    config = TrainConfig(batch_size=BATCH, grad_accum=GRAD_ACCUM, packing=False, pad_to_multiple_of=8)
    batches = micro_batches(data, config, pad_id, epoch_seed=args.seed)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]

    def one_step():
        total, useful, computed = 0.0, 0, 0
        for _ in range(GRAD_ACCUM):
            batch = next(batches)
            u, c = token_counts(batch)
            useful, computed = useful + u, computed + c
            inputs = {k: v.to(device) for k, v in batch.items() if k != "mm_token_type_ids"}
            loss = model(**inputs, use_cache=False).loss / GRAD_ACCUM
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total, useful, computed

    warmup = max(1, args.warmup // 2)  # no graphs to capture; its steps are slow
    steps = max(1, args.steps // 2)
    result = timed_steps(one_step, warmup, steps, started)
    result.update(graph_captures=0, checkpointing="on (non-reentrant)", notes="attention sdpa",
                  micro_batch=[BATCH, None], grad_accum=GRAD_ACCUM)
    return result


# ------------------------------------------------------------------ workers (one process per model and stack)
def workload_data(args, vocab, ids, mel_bins):
    kind = args.workload.split("-")[0]
    models, max_seq, n_rows = SETTINGS[args.workload]
    if args.smoke:  # shorter rows for the tiny model on a CPU
        max_seq, n_rows = 256 if kind == "text" else 512, 60
    if kind == "text":
        lengths = text_mix_lengths(n_rows, args.seed, **(dict(median=60, low=8, high=256) if args.smoke else {}))
        rows = text_rows(lengths, args.seed, vocab)
    else:
        rows = media_rows(kind, n_rows, args.seed, vocab, ids, budget=70 if args.smoke else 280, mel_bins=mel_bins,
                          longest_clip=10 if args.smoke else 30)
    # as prepare_dataset returns them (its max_seq_length sizes the packed buffers)
    dataset = PreparedDataset(examples=rows, max_seq_length=max_seq)
    return dataset, [len(r["input_ids"]) for r in rows], max_seq


def fixed_workload(args, max_seq, vocab):
    """gemmatune's fixed-length workload of this modality: (name, batch or rows)."""
    kind = args.workload.split("-")[0]
    if kind == "text":
        return "fixed-2048", fixed_text_rows(40, max_seq, args.seed + 1, vocab)
    from benchmarks.train_step_multimodal import WORKLOADS, workload_batch

    name = "image280" if kind == "image" else "audio30"
    mode, rows, amount, text = WORKLOADS[name]
    return name, workload_batch(mode, rows, amount, text)


def emit(record):
    print("RESULT " + json.dumps(record), flush=True)


def worker(args) -> None:
    dtype = torch.float32 if args.smoke else torch.bfloat16
    kind = args.workload.split("-")[0]
    modalities = ("text",) if kind == "text" else ("text", kind)
    started = time.perf_counter()  # load_s: what loading the model took
    if args.stack == "gemmatune":
        model, optimizer, pad_id = load_gemmatune(args.ckpt, SETTINGS[args.workload][1], modalities, dtype)
    else:
        # (the tiny checkpoint is multimodal: its towers refuse attn_implementation="sdpa")
        model, optimizer = load_stock(args.ckpt, kind != "text" or args.smoke, dtype, quantize=not args.smoke)
        pad_id = 0
    loaded = time.perf_counter()
    config = model.config
    text_config = config.get_text_config()
    ids = MEDIA_IDS
    if args.smoke:  # the tiny model's own media ids
        from transformers import AutoTokenizer

        from gemmatune.data.media import media_token_ids

        ids = media_token_ids(AutoTokenizer.from_pretrained(args.ckpt))
    audio = getattr(config, "audio_config", None)
    mel_bins = audio.subsampling_conv_channels[0] if audio is not None else 128
    vocab = min(text_config.vocab_size, 250000)  # random ids below the media and turn tokens
    data, lengths, max_seq = workload_data(args, vocab, ids, mel_bins)
    common = dict(workload=args.workload, seed=args.seed, max_seq_length=max_seq, load_s=loaded - started,
                  row_lengths=lengths)
    for i, run in enumerate(args.runs):
        # first_step_s: from the run's start; the first run of a process meets cold caches (Triton, cuBLAS)
        record = dict(common, run=run, packing=run == "packed", first_step_after=(
            "load_model" if i == 0 else "the previous run"))
        start = time.perf_counter()
        try:
            if args.stack == "hf":
                record.update(stock_run(model, optimizer, pad_id, data, args, start, kind != "text"))
            elif run == "fixed":
                name, fixed = fixed_workload(args, max_seq, vocab)
                record.update(workload=name, row_lengths=None)
                is_rows = isinstance(fixed, PreparedDataset)
                record.update(gemmatune_run(model, optimizer, pad_id, fixed if is_rows else None, False, max_seq, args,
                                            start, fixed_batch=None if is_rows else fixed))
            else:
                record.update(gemmatune_run(model, optimizer, pad_id, data, run == "packed", max_seq, args, start))
        except Exception as error:  # noqa: BLE001 - one failure must not lose the other runs
            record["error"] = f"{type(error).__name__}: {str(error)[:400]}"
        emit(record)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------ attention at equal tokens
def attention_records(models, seed) -> list[dict]:
    """Forward + backward of one full and one sliding layer's attention at (2, 2048): a causal row
    each (today's unpacked fixed-length step) against the text mix's rows packed into the same shape."""
    from benchmarks.gemma4_configs import CONFIGS
    from benchmarks.timing import median_ms
    from gemmatune.data.packing import collate_packed, plan_epoch, rows_per_buffer
    from gemmatune.model.attention import (
        PackedDocuments,
        attention_math,
        flash_varlen_works,
        packed_window_attention,
        sliding_window_attention,
    )

    lengths = text_mix_lengths(400, seed)
    rows = [{"input_ids": [20] * n, "labels": [20] * n} for n in lengths]
    buffers = plan_epoch(lengths, list(range(len(rows))), 2048, rows_per_buffer(2048), random.Random(seed))[:2]
    batch = collate_packed([[rows[i] for i in b] for b in buffers], 0, 2048)
    docs = PackedDocuments(batch["document_ids"].cuda(), batch["cu_seq_lens"].cuda())
    records = []
    for model in models:
        config = CONFIGS[model]()
        kv = config.num_key_value_heads
        for layer, dim in (("full", 512), ("sliding", 256)):
            # (batch, tokens, heads, head_dim) underneath, as the patched attention layer makes them
            q = torch.randn(2, 2048, 8, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(2, 2048, kv, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2))
            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
            if layer == "full":  # each call builds its mask, as each layer's call does in training
                today = lambda: attention_math(  # noqa: E731
                    qh, kh, vh, torch.ones(2048, 2048, dtype=torch.bool, device="cuda").tril_(), 1.0)
                packed = lambda: attention_math(  # noqa: E731
                    qh, kh, vh, PackedDocuments(docs.document_ids, docs.cu_seq_lens).mask(None), 1.0)
                how = "math attention, causal mask vs block-diagonal mask"
            else:
                today = lambda: sliding_window_attention(q, k, v, 512, 1.0)  # noqa: E731
                packed = lambda: packed_window_attention(q, k, v, docs, 512, 1.0)  # noqa: E731
                how = ("FlashAttention-2 window vs its variable-length window" if flash_varlen_works(q)
                       else "no varlen FlashAttention here: not comparable")
            timings = {}
            for name, fn in (("today", today), ("packed", packed)):
                def fwd_bwd(fn=fn):
                    out = fn()
                    out.backward(torch.ones_like(out))
                ms, how_timed = median_ms(fwd_bwd, grad_to_none=[q, k, v])
                timings[name] = ms
            records.append(dict(model=model, stack="gemmatune", workload=f"attention-{layer}", how=how,
                                tokens=2 * 2048, documents=int((batch["cu_seq_lens"].diff() > 0).sum()),
                                ms_today=timings["today"], ms_packed=timings["packed"], timed=how_timed))
            print(f"{model} {layer:7} attention fwd+bwd at 2 x 2048: today {timings['today']:.3f} ms, "
                  f"packed {timings['packed']:.3f} ms ({how})", flush=True)
    return records


# ------------------------------------------------------------------ the driver
def checkpoint(workload, model, args) -> str:
    if args.smoke:
        from gemmatune.model.tiny import tiny_model_dir

        return str(tiny_model_dir())
    if workload == "text-mix":
        from benchmarks.train_step import build_checkpoint
        folder = Path(args.ckpt_root) / model
    else:
        from benchmarks.train_step_multimodal import build_checkpoint
        folder = Path(args.ckpt_root) / f"{model}-multimodal"
    build_checkpoint(model, folder)
    return str(folder)


def run_worker(workload, model, stack, runs, ckpt, args) -> list[dict]:
    cmd = [sys.executable, "-m", "benchmarks.train_mix", "--worker", "--workload", workload, "--stack", stack,
           "--ckpt", ckpt, "--runs", *runs, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--seed", str(args.seed)] + (["--smoke"] if args.smoke else [])
    env = os.environ | {"GEMMATUNE_DASHBOARD": "off"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.worker_timeout)
        stdout, failure = out.stdout, (out.stderr or out.stdout)[-1500:] if out.returncode else None
    except subprocess.TimeoutExpired as timeout:
        stdout = timeout.stdout.decode() if isinstance(timeout.stdout, bytes) else (timeout.stdout or "")
        failure = f"timed out after {args.worker_timeout} s"
    records = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    missing = [r for r in runs if r not in {x["run"] for x in records}]
    records += [dict(workload=workload, run=r, packing=r == "packed", error=failure or "no result printed")
                for r in missing]
    return [dict(model=model, stack=stack, dtype="fp32" if args.smoke else "bf16", **r) for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["text-mix"], choices=list(SETTINGS))
    parser.add_argument("--models", nargs="+", default=None, help="default: each workload's (text: e2b e4b)")
    parser.add_argument("--stacks", nargs="+", default=["gemmatune", "hf"], choices=["gemmatune", "hf"])
    parser.add_argument("--quick", action="store_true", help="2 warm-up + 4 timed steps (the stock stack: 1 + 2)")
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny model, 1 + 1 steps: checks the script")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 12, quick 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, quick 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-attention", action="store_true", help="skip the attention comparison")
    parser.add_argument("--worker-timeout", type=int, default=420, help="seconds per process")
    parser.add_argument("--ckpt-root", default="/tmp/gemmatune-bench-mix")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--stack", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--runs", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick or args.smoke
    args.steps = args.steps or (1 if args.smoke else 4 if quick else 12)
    args.warmup = args.warmup or (1 if args.smoke else 2 if quick else 3)
    if args.worker:
        return worker(args)

    command, started = command_line(), time.perf_counter()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    stem = "train-mix" + ("" if args.workloads == ["text-mix"] else "-" + "-".join(args.workloads))
    out_path = Path(args.out or ("/tmp/train-mix-smoke.json" if args.smoke else results_file(stem)))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    records = []
    if "text-mix" in args.workloads and not (args.no_attention or args.smoke):
        models = args.models or SETTINGS["text-mix"][0]
        records += [dict(r, dtype="bf16", gpu=gpu, versions=package_versions(), command=command)
                    for r in attention_records(models, args.seed)]
        torch.cuda.empty_cache()  # the workers get the GPU
    for workload in args.workloads:
        for model in (args.models or SETTINGS[workload][0])[:1 if args.smoke else None]:
            ckpt = checkpoint(workload, model, args)
            for stack in args.stacks:
                runs = ["packed", "fixed", "padded"] if stack == "gemmatune" else ["padded"]
                if args.smoke and workload != "text-mix" and stack == "gemmatune":
                    runs = ["packed", "padded"]  # train_step_multimodal's fixed batches hold the released ids
                for record in run_worker(workload, "tiny" if args.smoke else model, stack, runs, ckpt, args):
                    record.update(gpu=gpu, versions=package_versions(), command=command)
                    records.append(record)
                    print(format_row(record), flush=True)
                out_path.write_text(json.dumps(records, indent=1))
    print_ratios(records)
    out_path.write_text(json.dumps(records, indent=1))
    print(f"wrote {out_path} ({time.perf_counter() - started:.0f} s in all)")


def format_row(r: dict) -> str:
    head = f"{r['model']} {r['stack']:9} {r['workload']:10} {r.get('run', ''):6}"
    if "error" in r:
        return f"{head}: ERROR {r['error'][-300:]}"
    replayed = f" ({r['replayed_fraction']:.0%} replayed)" if "replayed_fraction" in r else ""
    return (f"{head} | {r['useful_tokens_per_s']:8.0f} useful tok/s | padding {r['padding_fraction']:5.1%} | "
            f"{r['graph_captures']} graphs{replayed} | peak {r['peak_allocated_gib'] or 0:5.2f} GiB | first step "
            f"{r['first_step_s']:5.1f} s | {r['step_s']:.2f} s/step | finite {r['loss_finite']}")


def print_ratios(records: list[dict]) -> None:
    """The issue's targets, for each model and mix measured."""
    def find(model, workload, stack, run):
        return next((r for r in records if r.get("model") == model and r.get("workload") == workload
                     and r.get("stack") == stack and r.get("run") == run and "useful_tokens_per_s" in r), None)

    fixed_name = {"text-mix": "fixed-2048", "image-mix": "image280", "audio-mix": "audio30"}
    for model in sorted({r["model"] for r in records if "model" in r}):
        for mix, fixed_workload_name in fixed_name.items():
            packed = find(model, mix, "gemmatune", "packed")
            if packed is None:
                continue
            rate = packed["useful_tokens_per_s"]
            parts = [f"{model} {mix}: packed {rate:.0f} useful tok/s, {packed['padding_fraction']:.1%} padding, "
                     f"{packed['graph_captures']} graph(s), peak {packed['peak_allocated_gib'] or 0:.2f} GiB"]
            for label, other in (("fixed", find(model, fixed_workload_name, "gemmatune", "fixed")),
                                 ("padded", find(model, mix, "gemmatune", "padded")),
                                 ("stock", find(model, mix, "hf", "padded"))):
                if other:
                    parts.append(f"{rate / other['useful_tokens_per_s']:.2f}x {label}")
            print(" | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
