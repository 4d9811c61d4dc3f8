"""What a person carries away, checked with the libraries they would use instead of gemmatune.

On the tiny multimodal checkpoint (float32, CPU): adapters saved by gemmatune load with plain
transformers + peft (AutoModelForImageTextToText, AutoModelForCausalLM, AutoPeftModelForCausalLM) with
every LoRA module found and the same logits as gemmatune's model; merged checkpoints load with plain
transformers and give the adapter-on logits for text, image and audio inputs. The plain side runs in
one subprocess that imports no gemmatune (tests/export/plain_transformers.py), for all cases at once.

Why random LoRA B: a freshly added adapter has B = 0 and changes nothing, so nothing could fail.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gemmatune
import gemmatune.model.adapter_names as model_adapter_names
from gemmatune.errors import CheckpointError
from gemmatune.model.tiny import SPECIAL_TOKENS
from tests.helpers import fine_tuned, load_tiny

TOKEN = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
ALL = ("text", "image", "audio")
# float32 with the same weights summed in another order (x@W + x@A@B vs x@(W+BA), through the towers
# and 4 layers): up to 2.5e-5 seen on logits of up to ~10. A LoRA layer merged wrongly moves them by far
# more (leaving out one layer's delta: see test_a_wrong_merge_is_far_outside_the_tolerance).
TIGHT = dict(rtol=0, atol=1e-4)


# ------------------------------------------------------------------ inputs built by hand
def text_batch() -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(20, 512, (1, 11), generator=gen)
    return {"input_ids": torch.cat([torch.tensor([[TOKEN["<bos>"]]]), ids], 1)}


def image_batch() -> dict:
    """One 6x6-patch image (patch 16, pooling 3: 4 soft tokens) padded to 45 patches."""
    gen = torch.Generator().manual_seed(2)
    grid = torch.stack(torch.meshgrid(torch.arange(6), torch.arange(6), indexing="xy"), -1).reshape(36, 2)
    positions = torch.cat([grid, torch.full((9, 2), -1)]).unsqueeze(0)
    pixels = torch.rand(1, 45, 16 * 16 * 3, generator=gen)
    pixels[:, 36:] = 0
    ids = [TOKEN["<bos>"], 40, TOKEN["<|image>"], *[TOKEN["<|image|>"]] * 4, TOKEN["<image|>"], 41, 42, 43]
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixels, "image_position_ids": positions}


def audio_batch() -> dict:
    """16 frames of 32 mel bins (the tiny audio tower's first conv width): 4 audio tokens."""
    gen = torch.Generator().manual_seed(3)
    ids = [TOKEN["<bos>"], 50, TOKEN["<|audio>"], *[TOKEN["<|audio|>"]] * 4, TOKEN["<audio|>"], 51, 52]
    return {"input_ids": torch.tensor([ids]), "input_features": torch.randn(1, 16, 32, generator=gen),
            "input_features_mask": torch.ones(1, 16, dtype=torch.bool)}


BATCHES = {"text": text_batch, "image": image_batch, "audio": audio_batch}


def logits_of(model, cases) -> dict:
    model.eval()
    with torch.no_grad():
        return {c: model(**BATCHES[c](), use_cache=False).logits.float() for c in cases}


def save_inputs(file: Path, cases) -> str:
    save_file({f"{c}.{k}": v.contiguous() for c in cases for k, v in BATCHES[c]().items()}, str(file))
    return str(file)


# ------------------------------------------------------------------ fine-tuned models


def planted_shared_kv_checkpoint(tiny_dir: Path, folder: Path) -> list[str]:
    """The tiny checkpoint plus K/V projections and k_norm for its KV-shared layers (2, 3), as the
    released E2B/E4B checkpoints carry them for every layer. Returns the planted names."""
    shutil.copytree(tiny_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    planted = {}
    for layer, source in ((2, 0), (3, 1)):  # same shapes as the layer of the same type
        for part in ("k_proj.weight", "v_proj.weight", "k_norm.weight"):
            src = tensors[f"model.language_model.layers.{source}.self_attn.{part}"]
            planted[f"model.language_model.layers.{layer}.self_attn.{part}"] = src + 1.0
    save_file({**tensors, **planted}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return sorted(planted)


# ------------------------------------------------------------------ everything, then one plain subprocess
@pytest.fixture(scope="module")
def reference_kernels():
    """The PyTorch reference path, as on a user's CPU (the Triton interpreter is slow; tests/kernels
    and test_patching check the kernels)."""
    import os

    saved = os.environ.get("GEMMATUNE_KERNELS")
    os.environ["GEMMATUNE_KERNELS"] = "0"
    yield
    if saved is None:
        os.environ.pop("GEMMATUNE_KERNELS")
    else:
        os.environ["GEMMATUNE_KERNELS"] = saved


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory, reference_kernels):
    out = tmp_path_factory.mktemp("export")
    inputs_text, inputs_all = save_inputs(out / "text.safetensors", ["text"]), save_inputs(out / "all.safetensors", ALL)
    results, jobs = {}, {}

    # text-only fine-tune, full precision: the adapter must reproduce it exactly on plain transformers
    model, tokenizer = fine_tuned(load_in_4bit=False)
    results["text_fp32"] = logits_of(model, ["text"])
    gemmatune.save_adapter(model, tokenizer, out / "adapter-text")
    for loader in ("image_text_to_text", "causal_lm", "auto_peft"):
        jobs[f"adapter_text_{loader}"] = dict(loader=loader, model=str(tiny_dir), adapter=str(out / "adapter-text"),
                                              inputs=inputs_text)
    # the same adapter trained on the 4-bit model: plain fp32 + adapter is only NF4-close to it
    results["base_fp32"] = logits_of(load_tiny(load_in_4bit=False)[0], ["text"])
    results["base_4bit"] = logits_of(load_tiny(load_in_4bit=True)[0], ["text"])
    model4, tokenizer = fine_tuned(load_in_4bit=True)
    results["text_4bit"] = logits_of(model4, ["text"])
    gemmatune.save_adapter(model4, tokenizer, out / "adapter-text-4bit")
    jobs["adapter_text_4bit"] = dict(loader="image_text_to_text", model=str(tiny_dir),
                                     adapter=str(out / "adapter-text-4bit"), inputs=inputs_text)
    gemmatune.merge_and_save(model4, out / "merged-text", dtype=torch.float32, max_shard_bytes=200_000, verbose=False)
    gemmatune.merge_and_save(model4, out / "merged-text-bf16", dtype=torch.bfloat16, verbose=False)
    jobs["merged_text"] = dict(loader="image_text_to_text", model=str(out / "merged-text"), inputs=inputs_text)

    # multimodal fine-tune with tower LoRA: full precision for the adapter, 4-bit for the merge
    model, tokenizer = fine_tuned(load_in_4bit=False, modalities=ALL, towers=True)
    results["mm_fp32"] = logits_of(model, ALL)
    gemmatune.save_adapter(model, tokenizer, out / "adapter-mm")
    jobs["adapter_mm"] = dict(loader="image_text_to_text", model=str(tiny_dir), adapter=str(out / "adapter-mm"),
                              inputs=inputs_all)
    model4, tokenizer = fine_tuned(load_in_4bit=True, modalities=ALL, towers=True)
    results["mm_4bit"] = logits_of(model4, ALL)
    gemmatune.merge_and_save(model4, out / "merged-mm", dtype=torch.float32, verbose=False)
    jobs["merged_mm"] = dict(loader="image_text_to_text", model=str(out / "merged-mm"), inputs=inputs_all)

    # a checkpoint that carries K/V for its KV-shared layers, as the released ones do
    results["planted"] = planted_shared_kv_checkpoint(tiny_dir, out / "shared-kv-checkpoint")
    model4, tokenizer = fine_tuned(load_in_4bit=True, model_id=str(out / "shared-kv-checkpoint"))
    results["shared_kv_4bit"] = logits_of(model4, ["text"])
    gemmatune.merge_and_save(model4, out / "merged-shared-kv", dtype=torch.float32, verbose=False)
    jobs["merged_shared_kv"] = dict(loader="causal_lm", model=str(out / "merged-shared-kv"), inputs=inputs_text)

    for name, job in jobs.items():
        job["out"] = str(out / f"{name}.logits.safetensors")
    (out / "jobs.json").write_text(json.dumps(jobs))
    script = Path(__file__).with_name("plain_transformers.py")
    run = subprocess.run([sys.executable, str(script), str(out / "jobs.json"), str(out / "reports.json")],
                         capture_output=True, text=True, timeout=600, cwd=out)
    assert run.returncode == 0, run.stderr[-3000:]
    reports = json.loads((out / "reports.json").read_text())
    plain = {name: load_file(job["out"]) for name, job in jobs.items()}
    return {"dir": out, "results": results, "reports": reports, "plain": plain}


def test_the_plain_side_never_imported_gemmatune(exported):
    assert exported["reports"]["gemmatune_imported"] is False


def test_saved_adapter_names_the_checkpoint_and_only_language_model_modules(exported, tiny_dir):
    config = json.loads((exported["dir"] / "adapter-text" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_dir)
    assert isinstance(config["target_modules"], str)  # a regex: peft never minimises (widens) it
    keys = load_file(exported["dir"] / "adapter-text" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    from transformers import AutoModelForImageTextToText

    full = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    import re

    matched = [n for n, _ in full.named_modules() if re.fullmatch(config["target_modules"], n)]
    assert sorted(matched) == sorted({model_adapter_names.split_adapter_key(k)[0] for k in keys})
    assert len(matched) == 24  # 4 layers x (q, o, gate, up, down) + K/V of the 2 layers that own them


@pytest.mark.parametrize("loader", ["image_text_to_text", "causal_lm", "auto_peft"])
def test_plain_peft_loads_the_text_adapter_onto_the_released_layout(exported, loader):
    report = exported["reports"][f"adapter_text_{loader}"]
    assert report["class"] == "Gemma4ForConditionalGeneration"
    assert report["lora_modules"] == 24 and report["adapter_tensors_loaded"]
    assert not [w for w in report["warnings"] if "missing" in w.lower() or "unexpected" in w.lower()], report
    torch.testing.assert_close(exported["plain"][f"adapter_text_{loader}"]["text"],
                               exported["results"]["text_fp32"]["text"], **TIGHT)


def test_the_4bit_fine_tune_is_only_nf4_close_to_plain_full_precision(exported):
    """Plain transformers loads the original float32 weights, not the NF4 ones the adapter was
    trained on: the logits then differ by what NF4 itself changes (the base model's own 4-bit vs
    float32 gap, about 3 logits on this random model), not by the tight float32 tolerance."""
    results = exported["results"]
    adapter_gap = (exported["plain"]["adapter_text_4bit"]["text"] - results["text_4bit"]["text"]).abs().mean()
    nf4_gap = (results["base_fp32"]["text"] - results["base_4bit"]["text"]).abs().mean()
    assert adapter_gap > 100 * TIGHT["atol"]
    assert 0.5 < adapter_gap / nf4_gap < 2, (adapter_gap, nf4_gap)


def test_plain_peft_loads_a_multimodal_adapter_with_tower_lora(exported):
    report = exported["reports"]["adapter_mm"]
    saved = load_file(exported["dir"] / "adapter-mm" / "adapter_model.safetensors")
    towers = {model_adapter_names.split_adapter_key(k)[0] for k in saved
              if ".vision_tower." in k or ".audio_tower." in k}
    assert towers and all(n.startswith(("model.vision_tower.", "model.audio_tower.")) for n in towers)
    assert report["lora_modules"] == 24 + len(towers) and report["adapter_tensors_loaded"]
    for case in ALL:
        torch.testing.assert_close(exported["plain"]["adapter_mm"][case], exported["results"]["mm_fp32"][case],
                                   **TIGHT)


def test_merged_text_fine_tune_is_the_whole_model_and_equals_adapter_on(exported, tiny_dir):
    merged = exported["dir"] / "merged-text"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, with an index
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        original = set(f.keys())
    assert set(index["weight_map"]) == original  # towers, embedders and the PLE table included
    assert not exported["reports"]["merged_text"]["warnings"], exported["reports"]["merged_text"]["warnings"]
    torch.testing.assert_close(exported["plain"]["merged_text"]["text"], exported["results"]["text_4bit"]["text"],
                               **TIGHT)


def test_merged_per_layer_embeddings_and_towers_are_the_checkpoints_own(exported, tiny_dir):
    original = load_file(tiny_dir / "model.safetensors")
    merged = {}
    for file in (exported["dir"] / "merged-text").glob("model-*.safetensors"):
        merged.update(load_file(file))
    untouched = [k for k in original if "vision_tower" in k or "audio_tower" in k or "embed_" in k or "norm" in k]
    assert "model.language_model.embed_tokens_per_layer.weight" in untouched
    assert all(torch.equal(merged[k], original[k]) for k in untouched)
    lora = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[lora], original[lora])


def test_merged_multimodal_fine_tune_equals_adapter_on_for_text_image_and_audio(exported):
    assert not exported["reports"]["merged_mm"]["warnings"], exported["reports"]["merged_mm"]["warnings"]
    for case in ALL:
        torch.testing.assert_close(exported["plain"]["merged_mm"][case], exported["results"]["mm_4bit"][case],
                                   **TIGHT)


def test_bf16_merge_rounds_each_weight_once(exported):
    fp32 = {}
    for file in (exported["dir"] / "merged-text").glob("model-*.safetensors"):
        fp32.update(load_file(file))
    bf16 = load_file(exported["dir"] / "merged-text-bf16" / "model.safetensors")
    assert bf16.keys() == fp32.keys() and all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert all(torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)
    config = json.loads((exported["dir"] / "merged-text-bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["model_type"] == "gemma4" and "quantization_config" not in config


def test_shared_layer_kv_weights_are_written_as_the_checkpoint_has_them(exported):
    """Decision: the merge keeps the source checkpoint's tensor set. The released checkpoints carry
    K/V for KV-shared layers (older vLLM and mlx-lm need them), so a merge of them does; the tiny one
    (saved by transformers) does not, and neither does its merge (test above: same key set)."""
    merged = load_file(exported["dir"] / "merged-shared-kv" / "model.safetensors")
    source = load_file(exported["dir"] / "shared-kv-checkpoint" / "model.safetensors")
    for name in exported["results"]["planted"]:
        assert torch.equal(merged[name], source[name]), name
    report = exported["reports"]["merged_shared_kv"]
    assert report["class"] == "Gemma4ForConditionalGeneration" and not report["warnings"], report
    torch.testing.assert_close(exported["plain"]["merged_shared_kv"]["text"],
                               exported["results"]["shared_kv_4bit"]["text"], **TIGHT)


# ------------------------------------------------------------------ gemmatune's own load_adapter
def old_layout_adapter(folder: Path):
    """An adapter saved the way gemmatune saved them before 2026-12: peft's save_pretrained on the
    text-only model (text-only names, target_modules minimised by peft to short names)."""
    model, tokenizer = fine_tuned(load_in_4bit=True, seed=9)
    model.save_pretrained(folder)
    assert isinstance(json.loads((folder / "adapter_config.json").read_text())["target_modules"], list)
    return model


@pytest.mark.parametrize("layout_name", ["old", "new"])
def test_load_adapter_reads_both_layouts_onto_the_4bit_model_with_kernels(tmp_path, layout_name, monkeypatch):
    monkeypatch.setenv("GEMMATUNE_KERNELS", "1")
    if layout_name == "old":
        trained = old_layout_adapter(tmp_path / "adapter")
        assert any(k.startswith("base_model.model.model.layers.") for k in
                   load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    else:
        trained, tokenizer = fine_tuned(load_in_4bit=True, seed=9)
        gemmatune.save_adapter(trained, tokenizer, tmp_path / "adapter")
    fresh, _ = load_tiny(load_in_4bit=True)
    reloaded = gemmatune.load_adapter(fresh, tmp_path / "adapter")
    assert sum(type(m).__name__ == "KernelLoRALinear4bit" for m in reloaded.modules()) == 24  # gemmatune's kernels
    torch.testing.assert_close(logits_of(reloaded, ["text"])["text"], logits_of(trained, ["text"])["text"], **TIGHT)


def test_load_adapter_puts_a_text_adapter_on_the_multimodal_model(exported):
    model, _ = load_tiny(load_in_4bit=False, modalities=ALL)
    reloaded = gemmatune.load_adapter(model, exported["dir"] / "adapter-text")
    torch.testing.assert_close(logits_of(reloaded, ["text"])["text"], exported["results"]["text_fp32"]["text"],
                               **TIGHT)


def test_load_adapter_refuses_tower_lora_on_a_text_only_model(exported):
    model, _ = load_tiny(load_in_4bit=False)
    with pytest.raises(CheckpointError, match="vision_tower.*modalities"):
        gemmatune.load_adapter(model, exported["dir"] / "adapter-mm")


def test_exact_names_regex_matches_those_names_only():
    import re

    names = ["model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.12.self_attn.q_proj",
             "model.vision_tower.encoder.layers.1.self_attn.q_proj.linear", "lm_head"]
    pattern = model_adapter_names.exact_names_regex(names)
    assert all(re.fullmatch(pattern, n) for n in names)
    for other in ["model.language_model.layers.1.self_attn.q_proj", "model.language_model.layers.12.self_attn.q_proj.x",
                  "model.vision_tower.encoder.layers.1.self_attn.q_proj", "model.language_model.layers.0.mlp.q_proj",
                  "q_proj", "xlm_head"]:
        assert not re.fullmatch(pattern, other), other


def test_a_wrong_merge_is_far_outside_the_tolerance(exported):
    """The tolerance above can fail: the merged model with one layer's LoRA delta taken out again."""
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(exported["dir"] / "merged-text")
    saved = load_file(exported["dir"] / "adapter-text-4bit" / "adapter_model.safetensors")
    prefix = "base_model.model.model.language_model.layers.1.mlp.down_proj"
    delta = 2.0 * saved[f"{prefix}.lora_B.weight"] @ saved[f"{prefix}.lora_A.weight"]  # scale alpha / r = 8 / 4
    with torch.no_grad():
        merged.model.language_model.layers[1].mlp.down_proj.weight -= delta
    wrong = logits_of(merged, ["text"])["text"]
    assert (wrong - exported["results"]["text_4bit"]["text"]).abs().max() > 100 * TIGHT["atol"]


def test_a_multimodal_4bit_model_keeps_its_towers_in_the_compute_dtype():
    """Only the language model is 4-bit: a text-only merge takes the towers from the checkpoint, so a
    multimodal fine-tune's towers must be those weights too (transformers 5.23 matches skip names from
    the start of a module name: "vision_tower" alone let it quantise the towers)."""
    model, _ = load_tiny(load_in_4bit=True, modalities=ALL)
    quantised = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "NF4Linear4bit")]
    assert quantised and all(n.startswith("model.language_model.") for n in quantised)


def test_a_checkpoint_with_shared_layer_kv_loads_without_a_load_report(exported):
    """The released checkpoints carry K/V for KV-shared layers; transformers ignores them, and so
    must gemmatune's loader classes (they replaced that ignore list, and every load printed a table)."""
    import logging

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        for modalities in (("text",), ALL):
            gemmatune.load_model(str(exported["dir"] / "shared-kv-checkpoint"), modalities=modalities,
                                 dtype="float32", load_in_4bit=False, verbose=False)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [m for m in messages if "UNEXPECTED" in m or "LOAD REPORT" in m], messages
