"""Decode speed: gemmatune's generation vs the stock Hugging Face stack, same checkpoint, same call.

    python -m benchmarks.generate --models e2b    # then --models e4b: about 4-5 minutes each on an H200 (estimated)
    python -m benchmarks.generate --models e2b --dtypes bf16 --quick
    python -m benchmarks.generate --media         # text vs image vs audio prompts, E4B: 3-4 minutes (estimated)

Builds a random-weight checkpoint from the real E2B/E4B text configs (benchmarks/gemma4_configs.py,
shared with train_step.py), then runs each (model, stack, dtype) in its own subprocess (clean
memory statistics; one failure does not stop the others):

- gemmatune: `gemmatune.load_model` (4-bit NF4, PLE table in pinned CPU memory), measured once
  before and then after `add_lora` (r=16 on q,k,v,o,gate,up,down, random nonzero B: adapters
  active, unmerged), through `gemmatune.generation.decoding.generate` (what chat() and generate_replies()
  call). Variants at batch 1 x 64 tokens: the NF4 GEMV off (GEMMATUNE_NF4_GEMV=0: dequantise +
  GEMM per layer) and CUDA graphs off. Plus the first and second `gemmatune.chat()` calls, and a
  greedy-equality check of the fast path against the same model's `model.generate` (the plain
  path: transformers' loop, dynamic cache, no graphs), with the GEMV on and off.
- hf: transformers' AutoModelForCausalLM with bitsandbytes NF4 + double quant, bf16/fp16 compute,
  SDPA, `model.generate`; once without LoRA (the issue's reference) and then with peft LoRA r=16
  on the same projections.

Prompts are random token ids (32 tokens; a batch of 8 is left-padded to different lengths); every
run generates exactly `new_tokens` (no stop tokens; `min_new_tokens` for the stock stack).

--media: one random-weight E4B multimodal checkpoint (text + vision + audio towers, built as
benchmarks/train_step_multimodal.py builds it), bf16, LoRA r=16 on both stacks, batch 1 x 64 new
tokens, three prompts of the same length (MEDIA_PROMPT_TEXT text tokens + 280 soft tokens): an image
at 280 soft tokens (random pixels), a clip of 11.2 s (280 audio tokens, random mel features) and a
text prompt of as many random tokens. The images and clips go through the prefill only, so the
decode steps (and gemmatune's CUDA graphs) are the text prompt's: media_vs_text in the table is the
media prompt's decode tokens/s over the text one's, same stack, same call.
decode_tokens_per_s = batch * (new_tokens - 1) / (time(new_tokens) - time(1 token)): the prefill and
first token are taken out, the same way for both stacks. first_call_s is the first call of that
configuration (it compiles kernels and captures the CUDA graph), reported apart from the median of
the later calls. Writes benchmarks/results/<date>-<gpu>-generate-<models>.json (one record per run) and
prints a table with gemmatune / hf ratios at equal model, dtype, batch, tokens and LoRA.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.records import command_line, package_versions, results_file
from gemmatune.model.memory import GIB

PROMPT_TOKENS = 32
MEDIA_SOFT_TOKENS = 280  # per image (the default budget) and per clip (11.2 s at 25 tokens a second)
MEDIA_PROMPT_TEXT = 64   # text tokens of a media prompt besides its soft tokens (<bos> and the run's ends included)
VOCAB = {"size": 262144}  # set from the checkpoint by the worker
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prompts(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts: row i has PROMPT_TOKENS - 3 * i tokens (all of them at batch 1)."""
    from gemmatune.generation.replies import left_padded

    gen = torch.Generator().manual_seed(seed)
    rows = [[2] + torch.randint(10, VOCAB["size"], (PROMPT_TOKENS - 1 - 3 * i,), generator=gen).tolist()
            for i in range(batch)]
    return left_padded(rows, pad_token_id=0)


def sync() -> None:
    if torch.cuda.is_available():  # (without CUDA: a dry run of this script on the tiny model)
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure(run, batch: int, new_tokens: int, repeats: int, prompt: tuple | None = None) -> dict:
    """run(input_ids, attention_mask, n, **media) generates exactly n tokens per row. repeats=0: the
    first call is the measurement (the stock stack: slow, nothing to warm up but CUDA itself).
    prompt: (input_ids, attention_mask, media tensors) instead of random text prompts."""
    ids, mask, media = prompt if prompt is not None else (*prompts(batch), {})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    first = timed(lambda: run(ids, mask, new_tokens, **media))
    one = statistics.median(timed(lambda: run(ids, mask, 1, **media)) for _ in range(3))
    full = (statistics.median(timed(lambda: run(ids, mask, new_tokens, **media)) for _ in range(repeats)) if repeats
            else first)
    decode_s = max(full - one, 1e-9)
    peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else 0.0
    return dict(batch=batch, new_tokens=new_tokens, decode_tokens_per_s=batch * (new_tokens - 1) / decode_s,
                end_to_end_tokens_per_s=batch * new_tokens / full, call_s=full, prefill_and_first_token_s=one,
                first_call_s=first, peak_allocated_gib=peak)


def add_random_lora_b(model) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)


def safe(records: list, label: dict, fn, describe=None) -> None:
    """Append fn()'s measurement under `label`, or the error: one failed run never ends the others.
    describe(): a note on how the run went (gemmatune: CUDA graphs on, or why not)."""
    try:
        records.append(label | fn() | ({"notes": describe()} if describe else {}))
    except Exception as error:  # reported in the JSON and the table
        sync()
        records.append(label | {"error": f"{type(error).__name__}: {str(error)[:400]}"})
    print(json.dumps(records[-1]), flush=True)


# ------------------------------------------------------------------------------------- gemmatune
def gemmatune_worker(ckpt: str, dtype: torch.dtype, quick: bool) -> list[dict]:
    """Load, add_lora, two chat() calls (the first one cold: kernels compile, the graph is captured),
    then the measurements with the adapters active, then the same model with them disabled."""
    import gemmatune
    import gemmatune.generation.decoding as generation_decoding

    records = []
    loaded_at = time.perf_counter()
    model, tokenizer = gemmatune.load_model(ckpt, dtype=dtype, max_seq_length=2048, verbose=True)
    model = gemmatune.add_lora(model, r=16)
    add_random_lora_b(model)
    lora = dict(stack="gemmatune", lora=True, variant="graphs+gemv", load_s=time.perf_counter() - loaded_at)

    def run(ids, mask, n, **kw):
        return generation_decoding.generate(model, ids, mask, max_new_tokens=n, stop_token_ids=[], pad_token_id=0, **kw)

    def record(label, fn):  # every gemmatune record says whether its steps were graphed
        safe(records, label, fn, describe=lambda: generation_decoding.describe(model))

    record(lora | dict(variant="chat"), lambda: chat_calls(gemmatune, model, tokenizer))
    record(lora, lambda: measure(run, 1, 64, 5))
    record(lora, lambda: measure(run, 1, 256, 3))
    if not quick:
        record(lora, lambda: measure(run, 8, 64, 3))
        record(lora | dict(variant="graphs, no gemv"),
               lambda: with_env("GEMMATUNE_NF4_GEMV", "0", model, lambda: measure(run, 1, 64, 3)))
        if dtype == torch.bfloat16:
            record(lora | dict(variant="eager (no graphs)"), lambda: measure(
                lambda ids, mask, n: run(ids, mask, n, cuda_graphs=False), 1, 64, 1))
    record(lora | dict(variant="greedy check"),
           lambda: greedy_check(model, run, full=not quick and dtype == torch.bfloat16))
    with model.disable_adapter():  # the base model alone: what the notebooks' "before" answers run
        record(lora | dict(lora=False), lambda: measure(run, 1, 64, 3))
    return records


def chat_calls(gemmatune, model, tokenizer) -> dict:
    """The first chat() after add_lora (kernels compiled, graph captured) and the second one."""
    times, replies = [], []
    for question in ("Convert 5 km to miles.", "Name three colours."):
        start = time.perf_counter()
        replies.append(gemmatune.chat(model, tokenizer, question, max_new_tokens=64, stream=False))
        times.append(time.perf_counter() - start)
    return dict(batch=1, new_tokens=64, first_call_s=times[0], second_call_s=times[1],
                reply_chars=[len(r) for r in replies])


def with_env(name: str, value: str, model, fn):
    """Run fn with an environment switch, dropping the kept graphs before and after (they were
    captured with the other setting)."""
    from gemmatune.generation.decoding import release_decoders

    old = os.environ.get(name)
    os.environ[name] = value
    release_decoders(model)
    try:
        return fn()
    finally:
        os.environ.pop(name) if old is None else os.environ.__setitem__(name, old)
        release_decoders(model)


def greedy_check(model, run, full: bool, new_tokens: int = 24) -> dict:
    """Greedy tokens of the fast path against (a) the same loop with CUDA graphs off (the same
    kernels: must be equal, or the graph replays something else than the step) and (b) the same
    model's plain `model.generate` (transformers' loop, dynamic cache, no graphs: slow, hence 24
    tokens). (b) differs from the fast path's numerics in bf16/fp16 (the fused norm + RoPE of the
    decode attention rounds differently), so on a random-weight model, whose top logits are close,
    it can part after some tokens; first_difference_at says where. The CPU tests check (b) exactly
    in fp32. full: batch 8 too, and (b) with the NF4 GEMV off in both paths."""
    result = {}
    for batch in (1, 8) if full else (1,):
        ids, mask = prompts(batch, seed=5)
        result[f"graphs_vs_eager_batch{batch}"] = agreement(run(ids, mask, new_tokens),
                                                            run(ids, mask, new_tokens, cuda_graphs=False))
    cases = [("gemv", "1", 1), ("gemv", "1", 8), ("no_gemv", "0", 1)] if full else [("gemv", "1", 1)]
    for label, env, batch in cases:
        ids, mask = prompts(batch, seed=5)
        fast = with_env("GEMMATUNE_NF4_GEMV", env, model, lambda: run(ids, mask, new_tokens))
        plain = with_env("GEMMATUNE_NF4_GEMV", env, model, lambda: hf_generate(model, ids, mask, new_tokens))
        result[f"vs_model_generate_{label}_batch{batch}"] = agreement(fast, plain)
    return dict(batch=1, new_tokens=new_tokens, checks=result)


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.cpu(), b.cpu()
    same = (a == b).all(dim=0)
    first = int((~same).nonzero()[0]) if not bool(same.all()) else None
    return dict(equal=bool(torch.equal(a, b)), first_difference_at=first, tokens=int(a.shape[1]))


# ------------------------------------------------------------------------------------------- hf
def hf_generate(model, ids, mask, n, **media):
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    dtype = model.get_input_embeddings().weight.dtype  # pixels and features in the compute dtype
    media = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in media.items()}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, use_cache=True, **media)
    return out[:, ids.shape[1]:]


def hf_worker(ckpt: str, dtype: torch.dtype, quick: bool) -> list[dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    records = []
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    loaded_at = time.perf_counter()
    device = 0 if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=quant, dtype=dtype, device_map={"": device},
                                                 attn_implementation="sdpa")
    model.eval()
    base = dict(stack="hf", lora=False, variant="generate", load_s=time.perf_counter() - loaded_at)

    def run(ids, mask, n, **media):
        with torch.no_grad():
            return hf_generate(model, ids, mask, n, **media)

    if dtype == torch.bfloat16:  # the issue's reference: the stock stack without adapters
        safe(records, base, lambda: measure(run, 1, 64, 0))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    add_random_lora_b(model)
    model.eval()
    lora = base | dict(lora=True)
    safe(records, lora, lambda: measure(run, 1, 64, 0))
    if dtype == torch.bfloat16 and not quick:
        safe(records, lora, lambda: measure(run, 1, 256, 0))
        safe(records, lora, lambda: measure(run, 8, 64, 0))
    return records


# ---------------------------------------------------------------------------------------- media
def media_prompt(kind: str, config, seed: int = 0) -> tuple:
    """(input_ids, attention_mask, media tensors) of one prompt, MEDIA_PROMPT_TEXT + MEDIA_SOFT_TOKENS
    tokens long: <bos>, text, then an image's or a clip's placeholder run (the checkpoint's own token
    ids) and text, with random pixels or mel features; kind "text": random text of the same length."""
    from benchmarks.train_step_multimodal import patch_grid

    gen = torch.Generator().manual_seed(seed)
    length = MEDIA_PROMPT_TEXT + MEDIA_SOFT_TOKENS
    text = torch.randint(20, VOCAB["size"] // 2, (length,), generator=gen).tolist()  # no media or turn ids
    media, ids = {}, [2] + text[:length - 1]
    if kind == "image":
        rows, cols = patch_grid(MEDIA_SOFT_TOKENS)
        patch = config.vision_config.patch_size
        x, y = torch.meshgrid(torch.arange(cols), torch.arange(rows), indexing="xy")
        media = dict(pixel_values=torch.rand(1, rows * cols, 3 * patch * patch, generator=gen),
                     image_position_ids=torch.stack([x, y], dim=-1).reshape(1, rows * cols, 2))
        run = [config.boi_token_id] + [config.image_token_id] * MEDIA_SOFT_TOKENS + [config.eoi_token_id]
    elif kind == "audio":
        frames, n_mel = 4 * MEDIA_SOFT_TOKENS, config.audio_config.subsampling_conv_channels[0]
        media = dict(input_features=torch.randn(1, frames, n_mel, generator=gen),
                     input_features_mask=torch.ones(1, frames, dtype=torch.bool))
        end = getattr(config, "eoa_token_index", None) or config.eoa_token_id  # named _index in transformers 5.23
        run = [config.boa_token_id] + [config.audio_token_id] * MEDIA_SOFT_TOKENS + [end]
    if media:
        head = MEDIA_PROMPT_TEXT // 2
        ids = ids[:head] + run + ids[head:head + length - head - len(run)]
        input_ids = torch.tensor([ids])
        media["mm_token_type_ids"] = 1 * (input_ids == config.image_token_id) + 3 * (input_ids == config.audio_token_id)
    return torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), media


def media_runs(records: list, run, config, stack: str, repeats: int, record=None) -> None:
    """Decode tokens/s of the text, image and audio prompts (one length), batch 1 x 64 new tokens."""
    for kind in ("text", "image", "audio"):
        prompt = media_prompt(kind, config)
        label = dict(stack=stack, lora=True, variant=f"prompt: {kind}", prompt_tokens=int(prompt[0].shape[1]))
        (record or (lambda lab, fn: safe(records, lab, fn)))(label, lambda p=prompt: measure(run, 1, 64, repeats, p))


def gemmatune_media_worker(ckpt: str, dtype: torch.dtype, quick: bool) -> list[dict]:
    import gemmatune
    import gemmatune.generation.decoding as generation_decoding

    records = []
    model, _ = gemmatune.load_model(ckpt, dtype=dtype, max_seq_length=2048, modalities=("text", "image", "audio"))
    model = gemmatune.add_lora(model, r=16)
    add_random_lora_b(model)

    def run(ids, mask, n, **media):
        return generation_decoding.generate(model, ids, mask, max_new_tokens=n, stop_token_ids=[], pad_token_id=0,
                                            **media)

    def record(label, fn):
        safe(records, label, fn, describe=lambda: generation_decoding.describe(model))

    media_runs(records, run, model.config, "gemmatune", 3 if quick else 5, record)
    return records


def hf_media_worker(ckpt: str, dtype: torch.dtype, quick: bool) -> list[dict]:
    """The stock stack on the multimodal checkpoint: Gemma4ForConditionalGeneration, bitsandbytes NF4
    + double quant, peft LoRA r=16 on the language model (a regex: a plain name list also matches the
    towers' Gemma4ClippableLinear, which peft refuses), model.generate."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, Gemma4ForConditionalGeneration

    records = []
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    device = 0 if torch.cuda.is_available() else "cpu"
    model = Gemma4ForConditionalGeneration.from_pretrained(ckpt, quantization_config=quant, dtype=dtype,
                                                           device_map={"": device})  # its default attention
    targets = (r".*language_model\.layers\.\d+\.(self_attn|mlp)\."
               r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    add_random_lora_b(model)
    model.eval()

    def run(ids, mask, n, **media):
        with torch.no_grad():
            return hf_generate(model, ids, mask, n, **media)

    media_runs(records, run, model.config, "hf", 0)
    return records


# ------------------------------------------------------------------------------------------ main
def worker(args) -> None:
    from transformers import AutoConfig

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    VOCAB["size"] = AutoConfig.from_pretrained(args.ckpt).get_text_config().vocab_size
    workers = {"gemmatune": gemmatune_worker, "hf": hf_worker}
    if args.media:
        workers = {"gemmatune": gemmatune_media_worker, "hf": hf_media_worker}
    work = workers[args.stack]
    try:
        records = work(args.ckpt, dtype, args.quick)
    except Exception as error:  # a load failure: one error record for the whole worker
        records = [dict(stack=args.stack, error=f"{type(error).__name__}: {str(error)[:400]}")]
    print("RESULT " + json.dumps(records), flush=True)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["e2b", "e4b"])
    parser.add_argument("--stacks", nargs="+", default=["hf", "gemmatune"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--quick", action="store_true", help="batch 1 x 64 tokens only")
    parser.add_argument("--media", action="store_true",
                        help="text, image and audio prompts of one length on an E4B multimodal checkpoint, bf16")
    parser.add_argument("--ckpt-root", default="/tmp/gemmatune-bench")
    parser.add_argument("--worker-timeout", type=int, default=300)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stack", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from benchmarks import train_step, train_step_multimodal

    command = command_line()
    gpu, found = torch.cuda.get_device_name(0), package_versions()
    records = []
    if args.media:  # one multimodal checkpoint, bf16 (the flags --models and --dtypes do not apply)
        args.models, args.dtypes = ["e4b"], ["bf16"]
    for model in args.models:
        # the multimodal checkpoint where train_step_multimodal.py puts it: one build serves both
        folder = Path(args.ckpt_root + "-mm" if args.media else args.ckpt_root) / model
        (train_step_multimodal if args.media else train_step).build_checkpoint(model, folder)
        for dtype in args.dtypes:
            for stack in args.stacks:
                cmd = [sys.executable, "-m", "benchmarks.generate", "--worker", "--stack", stack, "--ckpt", str(folder),
                       "--dtype", dtype]
                cmd += (["--quick"] if args.quick else []) + (["--media"] if args.media else [])
                for record in run_worker(cmd, args.worker_timeout):
                    records.append(dict(model=model, dtype=dtype, **record, gpu=gpu, versions=found, command=command))
    stem = f"generate-{'media-' if args.media else ''}{'-'.join(args.models)}"
    out_path = Path(args.out or results_file(stem))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(records, indent=1))
    (print_media_table if args.media else print_table)(records)
    print(f"wrote {out_path}")


def run_worker(cmd: list[str], timeout: int) -> list[dict]:
    env = os.environ | {"GEMMATUNE_DASHBOARD": "off"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        partial = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        done = [json.loads(line) for line in partial.splitlines() if line.startswith("{")]  # finished runs
        return done + [dict(stack=cmd[cmd.index("--stack") + 1], error=f"worker timed out after {timeout} s")]
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return [dict(stack=cmd[cmd.index("--stack") + 1], error=(out.stderr or out.stdout)[-1500:])]
    return json.loads(line[7:])


def print_table(records: list[dict]) -> None:
    hf = {(r["model"], r["dtype"], r.get("batch"), r.get("new_tokens"), r.get("lora")): r["decode_tokens_per_s"]
          for r in records if r.get("stack") == "hf" and "decode_tokens_per_s" in r}
    print(f"\n{'model':5} {'stack':9} {'dtype':5} {'lora':5} {'variant':20} {'batch':>5} {'new':>4} "
          f"{'decode tok/s':>12} {'vs hf':>7} {'first call s':>12} {'peak GiB':>8}")
    for r in records:
        head = (f"{r['model']:5} {r.get('stack', '?'):9} {r['dtype']:5} {str(r.get('lora', '')):5} "
                f"{r.get('variant', ''):20}")
        if "error" in r:
            print(f"{head} ERROR {r['error'][-300:]}")
        elif "checks" in r:
            print(f"{head} greedy equality: {json.dumps(r['checks'])}")
        elif "decode_tokens_per_s" not in r:
            print(f"{head} {r['batch']:>5} {r['new_tokens']:>4} first chat() {r['first_call_s']:.2f} s, "
                  f"second {r['second_call_s']:.2f} s")
        else:
            ref = hf.get((r["model"], r["dtype"], r["batch"], r["new_tokens"], r["lora"]))
            ratio = f"{r['decode_tokens_per_s'] / ref:6.1f}x" if ref and r["stack"] != "hf" else ""
            off = f"  [{r['notes']}]" if "graphs: off" in r.get("notes", "") else ""
            print(f"{head} {r['batch']:>5} {r['new_tokens']:>4} {r['decode_tokens_per_s']:12.1f} {ratio:>7} "
                  f"{r['first_call_s']:12.2f} {r['peak_allocated_gib']:8.2f}{off}")


def print_media_table(records: list[dict]) -> None:
    """Decode tokens/s per prompt kind and stack; media_vs_text: over the same stack's text prompt."""
    text = {r["stack"]: r["decode_tokens_per_s"] for r in records
            if r.get("variant") == "prompt: text" and "decode_tokens_per_s" in r}
    hf = {r["variant"]: r["decode_tokens_per_s"] for r in records
          if r.get("stack") == "hf" and "decode_tokens_per_s" in r}
    print(f"\n{'model':5} {'stack':9} {'prompt':15} {'tokens':>6} {'decode tok/s':>12} {'media_vs_text':>13} "
          f"{'vs hf':>7} {'prefill+1 s':>11} {'peak GiB':>8}")
    for r in records:
        head = f"{r['model']:5} {r.get('stack', '?'):9} {r.get('variant', ''):15}"
        if "error" in r:
            print(f"{head} ERROR {r['error'][-300:]}")
            continue
        rate, base, ref = r["decode_tokens_per_s"], text.get(r["stack"]), hf.get(r["variant"])
        versus_text = f"{rate / base:13.3f}" if base else ""
        versus_hf = f"{rate / ref:6.1f}x" if ref and r["stack"] != "hf" else ""
        off = f"  [{r['notes']}]" if "graphs: off" in r.get("notes", "") else ""
        print(f"{head} {r['prompt_tokens']:>6} {rate:12.1f} {versus_text:>13} {versus_hf:>7} "
              f"{r['prefill_and_first_token_s']:11.3f} {r['peak_allocated_gib']:8.2f}{off}")


if __name__ == "__main__":
    main()
