"""The projector GGUF (mmproj) of a merged tiny Gemma 4 with tower adapters, read back and checked.

Always (CI), against the rules of llama.cpp's converter as read in the llama.cpp that llama-cpp-python
0.3.36 vendors (conversion/gemma.py Gemma4VisionAudioModel, conversion/base.py MmprojModel and
prepare_tensors) and the names its loader looks up (tools/mtmd/clip-impl.h, clip.cpp's GEMMA4V/GEMMA4A):
every tower tensor under its llama.cpp name, with llama.cpp's shape and type; the metadata keys and
values; the weights equal the merged folder's (so the merged tower adapters are in), with the
converter's transformations (softplus, reshapes, the patch kernel's layout).

Where llama.cpp is at hand (GEMMATUNE_LLAMA_CPP_SRC: its source tree; GEMMATUNE_LLAMA_CPP_PYTHON: a
Python with llama-cpp-python): the file equals convert_hf_to_gguf.py --mmproj's on the same folder,
metadata, tensor order, types and data; and llama.cpp's mtmd describes an image with the tiny model's
text GGUF and this projector.
"""
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import gemmatune
from gemmatune.export.mmproj import export_mmproj, image_mean_std, mel_bins
from tests.export.test_gguf import LLAMA_PYTHON, LLAMA_SRC, assert_same_gguf, field, run_converter

gguf = pytest.importorskip("gguf")
needs_llama_cpp = pytest.mark.skipif(not LLAMA_PYTHON, reason="GEMMATUNE_LLAMA_CPP_PYTHON not set")
needs_converter = pytest.mark.skipif(not LLAMA_SRC, reason="GEMMATUNE_LLAMA_CPP_SRC not set")

# checkpoint name (layer N as {n}) -> llama.cpp name, as the converter maps Gemma 4's towers
AUDIO_LAYER = {
    "feed_forward1.ffw_layer_1": "ffn_up", "feed_forward1.ffw_layer_2": "ffn_down",
    "feed_forward1.post_layer_norm": "ffn_post_norm", "feed_forward1.pre_layer_norm": "ffn_norm",
    "feed_forward2.ffw_layer_1": "ffn_up_1", "feed_forward2.ffw_layer_2": "ffn_down_1",
    "feed_forward2.post_layer_norm": "ffn_post_norm_1", "feed_forward2.pre_layer_norm": "ffn_norm_1",
    "lconv1d.conv_norm": "norm_conv", "lconv1d.depthwise_conv1d": "conv_dw", "lconv1d.linear_end": "conv_pw2",
    "lconv1d.linear_start": "conv_pw1", "lconv1d.pre_layer_norm": "conv_norm", "norm_out": "ln2",
    "norm_post_attn": "attn_post_norm", "norm_pre_attn": "attn_pre_norm", "self_attn.k_proj": "attn_k",
    "self_attn.per_dim_scale": "per_dim_scale", "self_attn.post": "attn_out", "self_attn.q_proj": "attn_q",
    "self_attn.relative_k_proj": "attn_k_rel", "self_attn.v_proj": "attn_v",
}
VISION_LAYER = {
    "input_layernorm": "ln1", "mlp.down_proj": "ffn_down", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "post_attention_layernorm": "attn_post_norm", "post_feedforward_layernorm": "ffn_post_norm",
    "pre_feedforward_layernorm": "ln2", "self_attn.k_norm": "attn_k_norm", "self_attn.k_proj": "attn_k",
    "self_attn.o_proj": "attn_out", "self_attn.q_norm": "attn_q_norm", "self_attn.q_proj": "attn_q",
    "self_attn.v_proj": "attn_v",
}
OTHERS = {
    "model.audio_tower.output_proj": "a.pre_encode.out",
    "model.audio_tower.subsample_conv_projection.input_proj_linear": "a.input_projection",
    "model.audio_tower.subsample_conv_projection.layer{n}.conv": "a.conv1d.{n}",
    "model.audio_tower.subsample_conv_projection.layer{n}.norm": "a.conv1d.{n}.norm",
    "model.embed_audio.embedding_projection": "mm.a.input_projection",
    "model.embed_vision.embedding_projection": "mm.input_projection",
    "model.vision_tower.patch_embedder.input_proj": "v.patch_embd",
    "model.vision_tower.patch_embedder.position_embedding_table": "v.position_embd",
}
SUFFIXES = (".linear.weight", ".weight", ".bias", ".input_max", ".input_min", ".output_max", ".output_min", "")


def expected_name(key: str) -> str:
    """The llama.cpp name of a checkpoint tower tensor, from the tables above."""
    suffix = next(s for s in SUFFIXES if key.endswith(s))
    stem = key[: len(key) - len(suffix)] if suffix else key
    suffix = {".linear.weight": ".weight", "": ".weight"}.get(suffix, suffix)
    for prefix, table, short in (("model.audio_tower.layers.", AUDIO_LAYER, "a"),
                                 ("model.vision_tower.encoder.layers.", VISION_LAYER, "v")):
        if stem.startswith(prefix):
            n, _, rest = stem[len(prefix):].partition(".")
            return f"{short}.blk.{n}.{table[rest]}{suffix}"
    for pattern, name in OTHERS.items():
        found = re.fullmatch(pattern.replace(".", r"\.").replace("{n}", r"(\d+)"), stem)
        if found:
            return name.replace("{n}", found.group(1) if found.groups() else "") + suffix
    raise KeyError(key)


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_dir):
    """The tiny model with LoRA on the language model and on both towers, 4-bit, merged in bf16."""
    from tests.helpers import fine_tuned

    saved = os.environ.get("GEMMATUNE_KERNELS")
    os.environ["GEMMATUNE_KERNELS"] = "0"
    try:
        model, tokenizer = fine_tuned(load_in_4bit=True, modalities=("text", "image", "audio"), towers=True)
        out = tmp_path_factory.mktemp("mmproj")
        folder = gemmatune.merge_and_save(model, out / "merged", tokenizer=tokenizer, verbose=False)
    finally:
        os.environ.pop("GEMMATUNE_KERNELS") if saved is None else os.environ.__setitem__("GEMMATUNE_KERNELS", saved)
    # what the released checkpoints carry and the converter reads (the tiny model has no processor files)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.0] * 3, "image_std": [1.0] * 3}))
    # the converter writes input_feat_size as the mel bins (128 where it is missing, the released towers'
    # width); the tiny audio tower reads 32, which llama.cpp needs to run it: say so in the config
    config = json.loads((folder / "config.json").read_text())
    config["audio_config"]["input_feat_size"] = config["audio_config"]["subsampling_conv_channels"][0]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    files = {q: export_mmproj(folder, out / f"mmproj-{q}.gguf", quantization=q) for q in ("bf16", "q8_0")}
    text = gemmatune.export_gguf(folder, out / "model-q8_0.gguf", quantization="q8_0")
    return {"dir": folder, "out": out, "files": files, "text": text, "model": model}


def checkpoint_towers(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(folder / "model.safetensors").items() if "language_model" not in k}


def ggml_shape(key: str, shape: tuple) -> list[int]:
    """llama.cpp's (reversed) shape of the converted tensor."""
    if not shape:
        return [1]
    if key.endswith("depthwise_conv1d.weight"):  # (C, 1, K) -> (C, K)
        shape = (shape[0], shape[2])
    if key.endswith("patch_embedder.input_proj.weight"):  # (D, p*p*3) -> (D, 3, p, p)
        patch = int((shape[1] // 3) ** 0.5)
        shape = (shape[0], 3, patch, patch)
    return list(reversed(shape))


def expected_type(key: str, name: str, n_dims: int, q: str) -> str:
    audio_conv = ("audio_tower" in key or "embed_audio" in key) and (".conv" in key or "_conv" in key)
    if (n_dims <= 1 or audio_conv or name.endswith("_norm.weight") or not name.endswith(".weight")
            or name in ("v.patch_embd.weight", "v.position_embd.weight")):
        return "F32"
    return "BF16" if q == "bf16" else "Q8_0"


@pytest.mark.parametrize("q", ["bf16", "q8_0"])
def test_every_tower_tensor_has_llama_cpps_name_shape_and_type(merged, q):
    towers = checkpoint_towers(merged["dir"])
    tensors = gguf.GGUFReader(str(merged["files"][q])).tensors
    assert [t.name for t in tensors] == [expected_name(k) for k in towers]  # the checkpoint's order
    for (key, value), t in zip(towers.items(), tensors):
        assert [int(n) for n in t.shape] == ggml_shape(key, tuple(value.shape)), key
        assert t.tensor_type.name == expected_type(key, t.name, len(ggml_shape(key, tuple(value.shape))), q), key
    assert any(t.name.endswith(".input_max") for t in tensors)  # the clipped linears' bounds


def test_the_metadata_is_what_llama_cpps_gemma4_projector_reads(merged):
    r = gguf.GGUFReader(str(merged["files"]["bf16"]))
    config = json.loads((merged["dir"] / "config.json").read_text())
    vision, audio, text = config["vision_config"], config["audio_config"], config["text_config"]
    want = {
        "general.architecture": "clip", "general.type": "mmproj", "general.file_type": 32,
        "clip.has_vision_encoder": True, "clip.vision.projector_type": "gemma4v",
        "clip.vision.projection_dim": text["hidden_size"], "clip.vision.image_size": 224,
        "clip.vision.patch_size": vision["patch_size"], "clip.vision.embedding_length": vision["hidden_size"],
        "clip.vision.feed_forward_length": vision["intermediate_size"],
        "clip.vision.block_count": vision["num_hidden_layers"],
        "clip.vision.attention.head_count": vision["num_attention_heads"],
        "clip.vision.attention.layer_norm_epsilon": pytest.approx(1e-6),
        "clip.vision.image_mean": [0.0] * 3, "clip.vision.image_std": [1.0] * 3,
        "clip.has_audio_encoder": True, "clip.audio.projector_type": "gemma4a",
        "clip.audio.projection_dim": text["hidden_size"], "clip.audio.embedding_length": audio["hidden_size"],
        "clip.audio.feed_forward_length": 4 * audio["hidden_size"],
        "clip.audio.block_count": audio["num_hidden_layers"],
        "clip.audio.attention.head_count": audio["num_attention_heads"],
        "clip.audio.num_mel_bins": audio["subsampling_conv_channels"][0],
        "clip.audio.attention.layer_norm_epsilon": pytest.approx(1e-6), "general.quantization_version": 2,
    }
    assert {k: field(r, k) for k in want} == want


def test_the_weights_are_the_merged_towers_with_their_adapters(merged):
    towers = checkpoint_towers(merged["dir"])
    stored = {t.name: t for t in gguf.GGUFReader(str(merged["files"]["bf16"])).tensors}
    for key, value in towers.items():
        t = stored[expected_name(key)]
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        want = value.float()
        if key.endswith("per_dim_scale"):
            want = torch.nn.functional.softplus(want)
        if key.endswith("patch_embedder.input_proj.weight"):
            patch = int((want.shape[1] // 3) ** 0.5)
            want = want.reshape(want.shape[0], patch, patch, 3).permute(0, 3, 1, 2)
        assert np.array_equal(got.reshape(-1), want.reshape(-1).numpy()), key
    # the tower LoRA was merged: the projector's q weight is the adapted one, not the original
    original = gemmatune.load_model(gemmatune.TINY_MODEL_ID, load_in_4bit=False, modalities=("text", "image"),
                                    dtype="float32", verbose=False)[0]
    q_name = "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight"
    original_q = dict(original.named_parameters())[q_name].to(torch.bfloat16).float()
    assert not torch.equal(towers[q_name].float(), original_q)


def test_a_folder_without_processor_files_gets_gemma4s_image_processor_values(tmp_path):
    assert image_mean_std(tmp_path) == ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"image_mean": [0.5] * 3,
                                                                                    "image_std": [0.5] * 3}}))
    assert image_mean_std(tmp_path) == ([0.5] * 3, [0.5] * 3)


def test_the_mel_bins_are_what_the_audio_tower_reads():
    released = {"subsampling_conv_channels": [128, 32]}  # transformers' Gemma4AudioConfig defaults
    assert mel_bins(released) == 128  # what the converter writes for the released checkpoints too
    assert mel_bins({"subsampling_conv_channels": [32, 16]}) == 32  # the tiny tower's
    assert mel_bins({**released, "input_feat_size": 64}) == 64


def test_a_checkpoint_without_a_vision_tower_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4_text", "hidden_size": 64}))
    with pytest.raises(ValueError, match="vision tower"):
        export_mmproj(tmp_path, tmp_path / "mmproj.gguf")


# ------------------------------------------------------------------ with llama.cpp (local)
@needs_converter
@pytest.mark.parametrize("q", ["bf16", "q8_0"])
def test_our_projector_is_what_llama_cpps_converter_writes(merged, tmp_path, q):
    theirs = run_converter(merged["dir"], q, tmp_path / f"converter-mmproj-{q}.gguf", "--mmproj")
    assert_same_gguf(gguf.GGUFReader(str(merged["files"][q])), theirs)


def llama_cpp_describe(merged, media: Path) -> dict:
    script = Path(__file__).with_name("llama_cpp_describe.py")
    run = subprocess.run([LLAMA_PYTHON, str(script), str(merged["text"]), str(merged["files"]["bf16"]), str(media)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@needs_llama_cpp
def test_llama_cpps_mtmd_describes_an_image_with_our_files(merged):
    report = llama_cpp_describe(merged, Path(gemmatune.load_bundled_dataset("formulas")[0]["image"]))
    assert not report["audio"] and report["media_tokens"] > 0 and report["generated_tokens"] > 0, report


@needs_llama_cpp
def test_llama_cpps_mtmd_hears_a_clip_with_our_files(merged, tmp_path):
    """Through llama.cpp's Gemma 4 audio tower; its token count is gemmatune's (25 a second)."""
    import soundfile

    from gemmatune.data.audio import audio_tokens

    samples, rate = soundfile.read(gemmatune.load_bundled_dataset("speech")[0]["audio"])
    soundfile.write(tmp_path / "clip.wav", samples, rate)  # llama.cpp reads WAV, MP3 and FLAC
    report = llama_cpp_describe(merged, tmp_path / "clip.wav")
    assert report["audio"] and report["generated_tokens"] > 0, report
    assert report["media_tokens"] == audio_tokens(len(samples)), report
