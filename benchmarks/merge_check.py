"""Full-size merge check: merged E2B/E4B checkpoints give the adapter-on logits, loaded by plain transformers.

    python -m benchmarks.merge_check                  # E2B and E4B, text + image + audio, a few minutes

For each model: build a random-weight multimodal checkpoint from the released configs (text: benchmarks/
gemma4_configs.py; vision and audio towers: transformers' Gemma4VisionConfig / Gemma4AudioConfig defaults,
documented as google/gemma-4-e2b-it's; E4B has the same towers) in bf16, with K/V projections and k_norm
for the KV-shared layers planted as the released checkpoints carry them; load it text-only with gemmatune
in 4-bit, add LoRA r=16 with random nonzero B, run the adapter-on model, `merge_and_save` in bf16; put the
saved adapter on the multimodal 4-bit model (load_adapter) for the image and audio references; then load
the merged folder in a subprocess that never imports gemmatune (AutoModelForImageTextToText, bf16, and
float32 for the yardstick) and compare. One model at a time on disk (checkpoint + merge: 21 / 32 GB).

Yardsticks in the JSON, per input: `merge_vs_adapter` (merged vs adapter-on: the merge's error),
`bf16_noise` (bf16 runs: merged model in bf16 vs the same weights computed in float32: what bf16
arithmetic alone changes), `lora_effect` (adapter-on vs adapter off: what the adapter changes, so a
merge that lost it shows). All are mean absolute logit differences.

    python -m benchmarks.merge_check --dtype float32  # the exactness check (merged and computed in fp32)

Why two dtypes: a random-weight model of 35-42 layers amplifies rounding (its top logits are close and
its activations chaotic), so in bf16 the arithmetic noise alone (~0.5) is as large as the adapter's
effect (~0.7): a bf16 run shows the merge is within bf16's own noise but cannot tell a lost adapter
from noise. In float32 (gemmatune's 4-bit model with fp32 compute, merged in fp32, loaded in fp32) the
merge's error is rounding only, orders of magnitude below the adapter's effect.
`pass`, bf16: merge_vs_adapter <= 2 x bf16_noise + 1e-4, argmax agreement >= 0.98 and lora_effect >= 5 x
merge_vs_adapter. float32: argmax agreement >= 0.98 and lora_effect >= 100 x merge_vs_adapter.
Writes benchmarks/results/<date>-<gpu>-merge-check-<models>[-float32].json after each model.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.records import command_line, package_versions, results_file

SEQ = 128
# "tiny" (the embedded tiny model's config) runs the same steps on a CPU in about a minute: a smoke test
# of this script, not a measurement (float32 there, so its bf16 yardstick is not one).
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # the run's dtype: --dtype sets it
CHECKPOINT_DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # the released checkpoints' dtype


def full_config(model: str):
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4VisionConfig

    if model == "tiny":
        from gemmatune.model.tiny import build_tiny_config

        return build_tiny_config()
    from benchmarks.gemma4_configs import CONFIGS

    return Gemma4Config(text_config=CONFIGS[model](), vision_config=Gemma4VisionConfig(),
                        audio_config=Gemma4AudioConfig(), tie_word_embeddings=True)


def build_checkpoint(model: str, folder: Path) -> dict:
    """A random bf16 Gemma4ForConditionalGeneration of the released shape; returns what was planted."""
    from safetensors.torch import save_file
    from transformers import Gemma4ForConditionalGeneration

    from gemmatune.model.tiny import build_tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer().save_pretrained(folder)  # any tokenizer: the check feeds token ids
    torch.manual_seed(0)
    with torch.device(DEVICE):
        full = Gemma4ForConditionalGeneration(full_config(model)).to(CHECKPOINT_DTYPE)
    full.save_pretrained(folder, max_shard_size="4GB" if ON_GPU else "200KB")  # shards + index either way
    planted = plant_shared_kv(full, folder, save_file)
    config = full.config
    del full
    if ON_GPU:
        torch.cuda.empty_cache()
    return planted, config


def plant_shared_kv(full, folder: Path, save_file) -> dict:
    """K/V projections and k_norm for the KV-shared layers, as in google/gemma-4-E2B-it / E4B-it
    (transformers' save_pretrained drops them), in one extra shard listed in the index."""
    text = full.config.text_config
    first_shared = text.num_hidden_layers - text.num_kv_shared_layers
    layers = full.model.language_model.layers
    gen = torch.Generator().manual_seed(1)
    planted = {}
    for i in range(first_shared, text.num_hidden_layers):
        donor = next(j for j in range(first_shared) if text.layer_types[j] == text.layer_types[i])
        for part in ("k_proj", "v_proj", "k_norm"):
            module = getattr(layers[donor].self_attn, part)
            if module is None:
                continue
            weight = module.weight
            planted[f"model.language_model.layers.{i}.self_attn.{part}.weight"] = \
                (torch.randn(weight.shape, generator=gen) * 0.02).to(CHECKPOINT_DTYPE)
    shard = "model-shared-kv.safetensors"
    save_file(planted, str(folder / shard), metadata={"format": "pt"})
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"].update({k: shard for k in planted})
    index_file.write_text(json.dumps(index, indent=2))
    return {"tensors": len(planted), "layers": [first_shared, text.num_hidden_layers - 1]}


def inputs(config) -> dict:
    """Random text; an image of 12x12 patches (16 soft tokens); 400 audio frames (100 tokens)."""
    gen = torch.Generator().manual_seed(0)
    vocab, audio = config.text_config.vocab_size, config.audio_config
    n_mel = audio.subsampling_conv_channels[0]  # the feature width the audio tower takes
    text = torch.randint(min(300, vocab // 2), min(250000, vocab), (1, SEQ), generator=gen)
    text[0, 0] = config.text_config.bos_token_id
    side = 12  # 12x12 patches of 16 px, pooled 3x3: 16 soft tokens
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1).reshape(-1, 2)
    image = [config.boi_token_id] + [config.image_token_id] * 16 + [config.eoi_token_id]
    sound = [config.boa_token_id] + [config.audio_token_id] * 100 + [config.eoa_token_index]
    patch = config.vision_config.patch_size ** 2 * 3
    return {
        "text": {"input_ids": text},
        "image": {"input_ids": torch.cat([text[:, :8], torch.tensor([image]), text[:, 8:40]], 1),
                  "pixel_values": torch.rand(1, side * side, patch, generator=gen),
                  "image_position_ids": grid.unsqueeze(0)},
        "audio": {"input_ids": torch.cat([text[:, :8], torch.tensor([sound]), text[:, 8:40]], 1),
                  "input_features": torch.randn(1, 400, n_mel, generator=gen),
                  "input_features_mask": torch.ones(1, 400, dtype=torch.bool)},
    }


def fine_tune(folder: Path):
    """The text-only 4-bit model with LoRA r=16 and random nonzero B (a fresh B = 0 would change nothing)."""
    import gemmatune

    model, _ = gemmatune.load_model(str(folder), dtype=DTYPE, verbose=False)
    model = gemmatune.add_lora(model, r=16)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.eval()


def logits(model, batch: dict, dtype=None) -> torch.Tensor:
    dtype = dtype or DTYPE
    with torch.no_grad():
        batch = {k: (v.to(dtype) if v.is_floating_point() else v).to(DEVICE) for k, v in batch.items()}
        return model(**batch, use_cache=False).logits.float().cpu()


def reference_logits(folder: Path, work: Path, config) -> dict:
    """Adapter-on and adapter-off logits of gemmatune's 4-bit model, and the merge into work/merged.

    The text-only fine-tune is what is merged (the notebooks' path: its towers come from the checkpoint
    files). Image and audio need the towers in memory: its saved adapter goes onto the multimodal 4-bit
    model with load_adapter, so those references use exactly the merged LoRA weights."""
    from safetensors.torch import save_file

    import gemmatune

    cases, out, timings = inputs(config), {}, {}
    model = fine_tune(folder)

    def run(model, names):
        for name in names:
            out[f"{name}.on"] = logits(model, cases[name])
            with model.disable_adapter():
                out[f"{name}.off"] = logits(model, cases[name])

    run(model, ["text"])
    gemmatune.save_adapter(model, None, work / "adapter")
    start = time.perf_counter()
    gemmatune.merge_and_save(model, work / "merged", dtype=DTYPE, max_shard_bytes=4 * 2**30 if ON_GPU else 200_000)
    timings["merge_s"] = time.perf_counter() - start
    del model
    empty_cache()
    base, _ = gemmatune.load_model(str(folder), dtype=DTYPE, modalities=("text", "image", "audio"), verbose=False)
    run(gemmatune.load_adapter(base, work / "adapter").eval(), ["image", "audio"])
    del base
    empty_cache()
    save_file({k: v.contiguous() for k, v in out.items()}, str(work / "reference.safetensors"))
    flat = {f"{c}.{k}": v.contiguous() for c, batch in cases.items() for k, v in batch.items()}
    save_file(flat, str(work / "inputs.safetensors"))
    return timings


def plain_check(work: Path) -> dict:
    """In this (gemmatune-free) process: the merged folder with plain transformers, against the reference."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    flat, reference = load_file(str(work / "inputs.safetensors")), load_file(str(work / "reference.safetensors"))
    cases = {c: {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(c + ".")}
             for c in ("text", "image", "audio")}
    merged = {}
    for dtype in sorted({DTYPE, torch.float32}, key=str):  # bf16 runs: the same weights in float32 too
        model = AutoModelForImageTextToText.from_pretrained(str(work / "merged"), dtype=dtype,
                                                            device_map={"": DEVICE}).eval()
        for case, batch in cases.items():
            merged[(case, dtype)] = logits(model, batch, dtype)
        del model
        empty_cache()
    report = {"gemmatune_imported": any(m.split(".")[0] == "gemmatune" for m in sys.modules)}
    for case in cases:
        on, off = reference[f"{case}.on"], reference[f"{case}.off"]
        out, fp32 = merged[(case, DTYPE)], merged[(case, torch.float32)]
        merge_error = (out - on).abs().mean().item()
        effect = (on - off).abs().mean().item()
        agree = (out.argmax(-1) == on.argmax(-1)).float().mean().item()
        report[case] = {"merge_vs_adapter": merge_error, "merge_vs_adapter_max": (out - on).abs().max().item(),
                        "lora_effect": effect, "argmax_agreement": agree}
        if DTYPE == torch.float32:
            report[case]["pass"] = agree >= 0.98 and effect >= 100 * merge_error
        else:
            noise = (out - fp32).abs().mean().item()
            report[case] |= {"bf16_noise": noise,
                             "pass": merge_error <= 2 * noise + 1e-4 and agree >= 0.98 and effect >= 5 * merge_error}
    return report


def check_model(model: str, root: Path) -> dict:
    folder, work = root / f"{model}-checkpoint", root / f"{model}-work"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    record = {"model": model, "dtype": str(DTYPE).split(".")[1]}
    start = time.perf_counter()
    record["planted_shared_kv"], config = build_checkpoint(model, folder)
    record["build_s"] = time.perf_counter() - start
    record.update(reference_logits(folder, work, config))
    merged_keys = set(json.loads((work / "merged" / "model.safetensors.index.json").read_text())["weight_map"])
    source_keys = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    record["merged_has_every_checkpoint_tensor"] = merged_keys == source_keys
    record["merged_gib"] = sum(f.stat().st_size for f in (work / "merged").glob("*.safetensors")) / 2**30
    shutil.rmtree(folder)  # the disk holds one checkpoint + its merge at a time
    plain = ["-m", "benchmarks.merge_check", "--plain", str(work), "--dtype", str(DTYPE).split(".")[1]]
    out = subprocess.run([sys.executable, *plain],
                         capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    record["plain_transformers"] = json.loads(line[7:]) if line else {"error": (out.stderr or out.stdout)[-2000:]}
    shutil.rmtree(work)
    return record


def empty_cache() -> None:
    if ON_GPU:
        torch.cuda.empty_cache()


def versions() -> dict:
    return package_versions(("torch", "triton", "transformers", "peft", "bitsandbytes", "safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["e2b", "e4b"])
    parser.add_argument("--root", default="/tmp/gemmatune-merge-check")
    parser.add_argument("--out", default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="the compute and merge dtype (on a CPU always float32)")
    parser.add_argument("--plain", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DTYPE
    DTYPE = getattr(torch, args.dtype) if ON_GPU else torch.float32
    if args.plain:
        print("RESULT " + json.dumps(plain_check(Path(args.plain))), flush=True)
        return
    os.environ.setdefault("GEMMATUNE_DASHBOARD", "off")
    out = Path(args.out or results_file(f"merge-check-{'-'.join(args.models)}{'-float32' * (args.dtype == 'float32')}"))
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for model in args.models:
        try:
            record = check_model(model, Path(args.root))
        except Exception as error:  # keep the other model's result
            record = {"model": model, "error": f"{type(error).__name__}: {str(error)[:1500]}"}
        record |= {"gpu": torch.cuda.get_device_name(0) if ON_GPU else "cpu", "versions": versions(),
                   "command": command_line()}
        records.append(record)
        print(json.dumps(record, indent=1), flush=True)
        out.write_text(json.dumps(records, indent=1))  # after each model: a run cut short keeps what it did
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
