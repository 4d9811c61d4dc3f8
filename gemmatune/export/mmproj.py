"""llama.cpp's multimodal projector file (mmproj) of a merged Gemma 4: the vision and audio towers.

    gemmatune.export_mmproj("outputs/run1/merged", "outputs/run1/mmproj-BF16.gguf")
    llama-mtmd-cli -m model-Q8_0.gguf --mmproj mmproj-BF16.gguf --image formula.png -p "Describe it."

llama.cpp reads images and audio through a second GGUF beside the language model's. For Gemma 4 its
projector types are "gemma4v" (the vision tower: patch embedder, encoder layers, the embedder that
projects into the language model) and "gemma4a" (the conformer audio tower and its embedder), both in
tools/mtmd of the llama.cpp that llama-cpp-python 0.3.36 vendors. One file holds both, as its converter
writes it (`convert_hf_to_gguf.py --mmproj`: conversion/gemma.py `Gemma4VisionAudioModel` over
`MmprojModel` in conversion/base.py). This module writes what that converter writes, tensor for tensor:

- every tensor outside the language model, in the checkpoint's order; scalars as 1-element tensors;
- audio: `model.audio_tower.` -> `conformer.`, the clipped linears' `.linear.` dropped, the attention's
  per-dimension scales passed through softplus (as the tower applies them), the depthwise convolution's
  (C, 1, K) weight as (C, K);
- vision: `model.vision_tower.encoder.` -> `vision_model.model.`, the patch embedder's (D, p*p*3) input
  projection as a (D, 3, p, p) convolution kernel;
- names from gguf's MMPROJ name map; F32 for 1-D tensors, norms, convolutions, the position table, the
  patch embedding and the clamp bounds (input_min, ...); the other weights in the chosen type;
- the metadata keys MmprojModel and Gemma4VisionAudioModel write (sizes, image mean/std, mel bins).
One value may differ: the mel bins (see mel_bins), where the converter's default would make llama.cpp
abort on a tower that reads other than 128.

The merged folder is what merge_and_save wrote, so tower adapters (train_vision_tower /
train_audio_tower) are merged into it and reach llama.cpp. Verified in tests/export/test_mmproj.py:
names, shapes, types and metadata against the converter's rules in CI; with llama.cpp at hand, equal to
the converter's own file, and read by llama.cpp's mtmd to answer about an image and an audio clip.
"""
import json
import os
from pathlib import Path

from gemmatune.export.gguf import QUANTIZATIONS, as_float32, finish_gguf, weight_files

# general.file_type (llama.h's llama_ftype) per quantization
FILE_TYPES = {"bf16": 32, "q8_0": 7}
# Gemma4VisionAudioModel sets image_size to this ("unused, but set to avoid error")
IMAGE_SIZE = 224
# MmprojModel: with two encoders, the name map is built for this many blocks
BLOCKS_BOTH_ENCODERS = 128
CLAMP_SUFFIXES = (".weight", ".bias", ".input_max", ".input_min", ".output_max", ".output_min")
# transformers' Gemma4ImageProcessor: pixels are rescaled to [0, 1] and not normalised
GEMMA4_IMAGE_MEAN, GEMMA4_IMAGE_STD = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
BLOCK_KEYS = ("n_layers", "num_hidden_layers", "n_layer", "num_layers", "depth", "layers", "encoder_layers",
              "vt_num_hidden_layers")


def export_mmproj(merged_dir, path, quantization: str = "bf16", name: str | None = None) -> Path:
    """Write the vision and audio towers of a merge_and_save folder as llama.cpp's projector GGUF.

    Args:
        merged_dir: a folder merge_and_save wrote (tower adapters are merged into it).
        path: the .gguf file to write; a file already there is kept as `<name>.previous-K`.
        quantization: "bf16" (default: the towers are small, 0.3-0.6 GB) or "q8_0".
        name: the model name written into the file (default: the folder's name).

    Returns:
        The file's path. Pass it to llama.cpp as `--mmproj` beside export_gguf's file.

    Raises:
        ValueError: an unknown quantization, or a folder that is not a Gemma 4 with a vision tower.
    """
    import gguf
    from transformers import AutoConfig

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}: pick one of {QUANTIZATIONS}")
    merged_dir, path = Path(merged_dir), Path(path)
    config = AutoConfig.from_pretrained(merged_dir).to_dict()  # with transformers' defaults, as the converter
    if config.get("model_type") != "gemma4" or not config.get("vision_config"):
        raise ValueError(f"{merged_dir} is not a Gemma 4 checkpoint with a vision tower (model_type "
                         f"{config.get('model_type')!r}): llama.cpp's Gemma 4 projector needs one")
    vision, audio = dict(config["vision_config"], image_size=IMAGE_SIZE), config.get("audio_config") or None
    if audio:  # Gemma4VisionAudioModel's renames
        audio = dict(audio, feat_in=mel_bins(audio))
        if "hidden_size" in audio:
            audio["intermediate_size"] = audio["hidden_size"] * 4
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "clip", use_temp_file=True)
    writer.add_type("mmproj")
    writer.add_name(name or merged_dir.name)
    write_hparams(writer, config, vision, audio, image_mean_std(merged_dir), FILE_TYPES[quantization])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tensors(writer, merged_dir, audio is not None, quantization)
    return finish_gguf(writer, tmp, path)


# ------------------------------------------------------------------ metadata
def write_hparams(writer, config: dict, vision: dict, audio: dict | None, mean_std, file_type: int) -> None:
    """MmprojModel.set_gguf_parameters, then Gemma4VisionAudioModel's keys."""
    import gguf

    text = {**config, **config.get("text_config", {})}
    writer.add_file_type(file_type)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(text["hidden_size"])
    writer.add_vision_image_size(vision["image_size"])
    writer.add_vision_patch_size(vision["patch_size"])
    writer.add_vision_embedding_length(vision["hidden_size"])
    writer.add_vision_feed_forward_length(vision["intermediate_size"])
    writer.add_vision_block_count(_first(vision, BLOCK_KEYS))
    writer.add_vision_head_count(vision["num_attention_heads"])
    writer.add_vision_image_mean(mean_std[0])
    writer.add_vision_image_std(mean_std[1])
    if audio:
        writer.add_clip_has_audio_encoder(True)
        writer.add_audio_projection_dim(text["hidden_size"])
        writer.add_audio_embedding_length(audio["hidden_size"])
        writer.add_audio_feed_forward_length(audio["intermediate_size"])
        writer.add_audio_block_count(_first(audio, BLOCK_KEYS))
        writer.add_audio_head_count(audio["num_attention_heads"])
    writer.add_clip_vision_projector_type(gguf.VisionProjectorType.GEMMA4V)
    writer.add_vision_attention_layernorm_eps(vision.get("layer_norm_eps", 1e-6))
    if audio:
        writer.add_clip_audio_projector_type(gguf.VisionProjectorType.GEMMA4A)
        writer.add_audio_num_mel_bins(audio["feat_in"])
        writer.add_audio_attention_layernorm_eps(audio.get("layer_norm_eps", 1e-6))


def mel_bins(audio: dict) -> int:
    """The mel bins the audio tower reads: `input_feat_size` where the config has it, else what
    transformers' Gemma 4 audio tower assumes (its input projection takes channels[0] // 4 x channels[1]
    features after two stride-2 convolutions: channels[0] mel bins). The converter writes 128 whenever
    input_feat_size is missing; for the released checkpoints (channels [128, 32]) both give 128, and for
    other configs llama.cpp could not run the audio tower with 128 (the tiny model reads 32)."""
    return audio.get("input_feat_size", audio.get("subsampling_conv_channels", [128])[0])


def _first(config: dict, keys):
    return next(config[k] for k in keys if k in config)


def image_mean_std(folder: Path) -> tuple[list, list]:
    """The image processor's mean and std as the converter reads them (preprocessor_config.json, then
    processor_config.json's image_processor); a folder with neither (the tiny model's) gets
    Gemma4ImageProcessor's own values, where the converter would stop."""
    found = {}
    for file, section in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        if (folder / file).is_file():
            values = json.loads((folder / file).read_text(encoding="utf-8"))
            found.update({**values, **(values.get(section) or {})} if section else values)
    return found.get("image_mean", GEMMA4_IMAGE_MEAN), found.get("image_std", GEMMA4_IMAGE_STD)


# ------------------------------------------------------------------ tensors
def write_tensors(writer, merged_dir: Path, with_audio: bool, quantization: str) -> None:
    """Every tensor outside the language model under its projector name, in the checkpoint's order."""
    import gguf
    import torch
    from safetensors import safe_open

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, BLOCKS_BOTH_ENCODERS)
    for file in weight_files(merged_dir):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if "language_model." in key or (not with_audio and is_audio(key)):
                    continue
                tensor = f.get_tensor(key)
                if tensor.dtype not in (torch.float16, torch.float32):
                    tensor = tensor.to(torch.float32)
                hf_name, tensor = converter_name_and_tensor(key, tensor)
                new_name = name_map.get_name(hf_name, try_suffixes=CLAMP_SUFFIXES)
                if new_name is None:
                    raise ValueError(f"no projector name for {key!r}: not a Gemma 4 tower tensor llama.cpp knows")
                data = as_float32(tensor) if tensor.dtype != torch.float16 else tensor.numpy()
                qtype = tensor_type(key, new_name, data.ndim, quantization)
                try:
                    raw = gguf.quants.quantize(data, qtype)
                except gguf.QuantError:  # Q8_0 needs rows that are a multiple of 32: F16 then, as the converter
                    qtype = gguf.GGMLQuantizationType.F16
                    raw = gguf.quants.quantize(data, qtype)
                writer.add_tensor(new_name, raw, raw_dtype=qtype)


def is_audio(key: str) -> bool:
    return "audio_tower" in key or "embed_audio" in key


def converter_name_and_tensor(key: str, tensor):
    """Gemma4VisionAudioModel.modify_tensors: the name gguf's map knows and the tensor as llama.cpp wants it."""
    import torch

    if tensor.dim() == 0:
        tensor = tensor.unsqueeze(0)
    name = key
    if is_audio(key):
        name = name.replace("model.audio_tower.", "conformer.").replace(".linear.", ".")
        if name.endswith(("per_dim_key_scale", "per_dim_scale")):
            name += ".weight"
            tensor = torch.nn.functional.softplus(tensor)
        if "lconv1d.depthwise_conv1d" in name and name.endswith(".weight"):
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[2])
        return name, tensor
    name = name.replace("model.vision_tower.encoder.", "vision_model.model.").replace(".linear.weight", ".weight")
    if name.endswith(("layer_scalar", "position_embedding_table")):
        name += ".weight"
    if name.endswith("patch_embedder.input_proj.weight"):
        n_embd, patch_pixels = tensor.shape
        patch = int((patch_pixels // 3) ** 0.5)
        tensor = tensor.reshape(n_embd, patch, patch, 3).permute(0, 3, 1, 2).contiguous()
    return name, tensor


def tensor_type(key: str, new_name: str, n_dims: int, quantization: str):
    """The converter's type rules for this projector (Gemma4VisionAudioModel, MmprojModel, ModelBase)."""
    import gguf

    f32 = gguf.GGMLQuantizationType.F32
    if is_audio(key) and (".conv" in key or ("_conv" in key and ".weight" in key)):
        return f32
    if "position_embedding_table" in key or ".patch_embd.weight" in new_name or ".patch_merger.weight" in new_name:
        return f32
    if n_dims <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight"):
        return f32
    if new_name in ("v.position_embd.weight", "a.position_embd.weight"):
        return f32
    return gguf.GGMLQuantizationType.BF16 if quantization == "bf16" else gguf.GGMLQuantizationType.Q8_0

