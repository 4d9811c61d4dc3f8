"""GGUF of a merged Gemma 4's language model for llama.cpp and Ollama, written with the `gguf` package.

    gemmatune.export_gguf("outputs/run1/merged", "outputs/run1/model-Q8_0.gguf", quantization="q8_0")

What is written is what llama.cpp's own converter writes for `Gemma4ForConditionalGeneration`
(convert_hf_to_gguf.py: conversion/gemma.py `Gemma4Model` over `Gemma3Model` and `TextModel` in
conversion/base.py, llama.cpp as vendored by llama-cpp-python 0.3.36): architecture "gemma4", its
hyperparameter keys, tensor names from gguf's own Gemma 4 name map, a `rope_freqs` tensor for the full
layers' proportional RoPE, 1-D tensors and norms in F32, the rest in BF16 or Q8_0, the towers left out:
they go to llama.cpp's projector file, which gemmatune/export/mmproj.py writes (export_mmproj).

Tokenizer: Gemma 4's own (a SentencePiece-style BPE) is written as the converter writes it
("gemma4", gguf's LlamaHfVocab and SpecialVocab); a byte-level BPE such as the tiny model's is
written as llama.cpp's "gpt2" model with the GPT-2 pre-tokenizer, which is how it splits text.

Verified (tests/export/test_gguf.py): read back with gguf's reader, every name, shape, type and metadata value
equals llama.cpp's converter's on the tiny model, and the weights equal the merged ones (BF16 exactly,
Q8_0 within its rounding); where llama-cpp-python is installed, llama.cpp's logits on our file match
transformers' on the merged model.
"""
import json
import os
from pathlib import Path

import numpy as np
import torch

from gemmatune.files import publish

QUANTIZATIONS = ("bf16", "q8_0")
# gguf.LlamaFileType values (llama.h's llama_ftype), written as general.file_type
FILE_TYPES = {"bf16": 32, "q8_0": 7}
# Tokens the converter writes as USER_DEFINED so that chat parsers see them (conversion/gemma.py)
VISIBLE_TOKENS = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                  "<tool_response|>", '<|"|>'}
# Multimodal parts the text GGUF leaves out (TextModel.filter_tensors' rules that apply to Gemma 4)
_NOT_TEXT = ("vision_", "audio_", "vision.", "audio.")


def export_gguf(merged_dir, path, quantization: str = "q8_0", name: str | None = None) -> Path:
    """Write the language model of a merge_and_save folder as one GGUF file for llama.cpp / Ollama.

    Args:
        merged_dir: a folder merge_and_save wrote (a dense Gemma 4 E2B/E4B checkpoint).
        path: the .gguf file to write; a file already there is kept as `<name>.previous-K`.
        quantization: "q8_0" (default) or "bf16".
        name: the model name written into the file (default: the folder's name).

    Returns:
        The file's path. The towers are not in it: export_mmproj writes them (llama.cpp's --mmproj file).

    Raises:
        ValueError: an unknown quantization, or a folder that is not a dense Gemma 4.
    """
    import gguf


    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}: pick one of {QUANTIZATIONS}")
    from transformers import AutoConfig

    merged_dir, path = Path(merged_dir), Path(path)
    config = AutoConfig.from_pretrained(merged_dir).to_dict()  # with transformers' defaults, as the converter
    hparams = {**config, **config.get("text_config", {})}
    if config.get("model_type") != "gemma4" or hparams.get("num_experts"):
        raise ValueError(f"{merged_dir} is not a dense Gemma 4 (E2B/E4B) checkpoint: model_type "
                         f"{config.get('model_type')!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    # use_temp_file: each tensor goes to disk as it is added, so memory holds one tensor at a time
    # (E2B's per-layer embedding table alone is 9.4 GB in float32)
    writer = gguf.GGUFWriter(str(tmp), "gemma4", use_temp_file=True)
    writer.add_type("model")
    writer.add_name(name or merged_dir.name)
    write_hparams(writer, hparams)
    writer.add_file_type(FILE_TYPES[quantization])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tokenizer(writer, merged_dir)
    write_tensors(writer, merged_dir, hparams, quantization, _tokenizer_size(merged_dir))
    return finish_gguf(writer, tmp, path)


def finish_gguf(writer, tmp: Path, path: Path) -> Path:
    """Write the file a GGUFWriter holds (header, metadata, tensors) to `tmp` and move it into place
    at `path`, keeping a file already there as `<name>.previous-K`."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    kept = publish(tmp, path)
    if kept is not None:
        print(f"gemmatune: {path} already existed; the earlier file is kept as {kept}")
    return path


# ------------------------------------------------------------------ hyperparameters
def write_hparams(writer, hp: dict) -> None:
    """The keys Gemma4Model.set_gguf_parameters writes (with Gemma3Model's and TextModel's before it)."""
    n_layers = hp["num_hidden_layers"]
    rope = hp["rope_parameters"]
    swa = [t == "sliding_attention" for t in hp["layer_types"]]
    head_dim_full = full_layer_value(hp, "global_head_dim", "head_dim")
    writer.add_block_count(n_layers)
    writer.add_context_length(hp.get("max_position_embeddings", 131072))
    writer.add_embedding_length(hp["hidden_size"])
    writer.add_head_count(hp.get("num_attention_heads", 8))
    writer.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
    if (swa_theta := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        writer.add_rope_freq_base_swa(swa_theta)
    writer.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    writer.add_key_length(head_dim_full)
    writer.add_value_length(head_dim_full)
    if hp.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(hp["final_logit_softcapping"])
    writer.add_sliding_window(hp["sliding_window"])
    writer.add_shared_kv_layers(hp["num_kv_shared_layers"])
    writer.add_embedding_length_per_layer_input(hp.get("hidden_size_per_layer_input") or 0)
    writer.add_sliding_window_pattern(swa)
    writer.add_key_length_swa(hp["head_dim"])
    writer.add_value_length_swa(hp["head_dim"])
    first_shared = n_layers - hp["num_kv_shared_layers"]
    n_ff = hp["intermediate_size"]
    if hp.get("use_double_wide_mlp"):  # the KV-shared layers' MLP is twice as wide
        writer.add_feed_forward_length([n_ff if i < first_shared else 2 * n_ff for i in range(n_layers)])
    else:
        writer.add_feed_forward_length(n_ff)
    kv_heads_full = full_layer_value(hp, "num_global_key_value_heads", "num_key_value_heads")
    kv_heads = hp.get("num_key_value_heads", 4)
    if kv_heads_full is not None:
        writer.add_head_count_kv([kv_heads if s else kv_heads_full for s in swa])
    else:
        writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(int(head_dim_full))  # proportional RoPE: see rope_freqs
    writer.add_rope_dimension_count_swa(int(hp["head_dim"] * rope.get("partial_rotary_factor", 1.0)))


def full_layer_value(hp: dict, key: str, per_layer_key: str):
    """A full-attention layer's value: the config's `key`, or, in configs that list per-layer
    overrides (transformers 5.23's per_layer_config), the first full layer's `per_layer_key`."""
    if hp.get(key) is not None:
        return hp[key]
    for index, overrides in (hp.get("per_layer_config") or {}).items():
        if hp["layer_types"][int(index)] == "full_attention" and per_layer_key in overrides:
            return overrides[per_layer_key]
    return None


def rope_freqs(hp: dict) -> np.ndarray:
    """Full layers rotate only partial_rotary_factor of each head ("proportional" RoPE); ggml's neox
    RoPE rotates a prefix, so the unrotated pairs get a frequency factor of 1e30 (Gemma4Model's
    generate_extra_tensors)."""
    full = hp["rope_parameters"]["full_attention"]
    if full.get("rope_type") != "proportional":
        raise ValueError(f"full-attention RoPE {full.get('rope_type')!r}: llama.cpp's Gemma 4 expects 'proportional'")
    head_dim = full_layer_value(hp, "global_head_dim", "head_dim")
    half = int(head_dim / 2)
    rotated = int(head_dim * full["partial_rotary_factor"] / 2)
    return np.array([1.0] * rotated + [1e30] * (half - rotated), dtype=np.float32)


# ------------------------------------------------------------------ tensors
def write_tensors(writer, merged_dir: Path, hp: dict, quantization: str, n_vocab: int) -> None:
    """Every language-model tensor under its GGUF name, in the checkpoint's order after rope_freqs."""
    import gguf
    from safetensors import safe_open

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, hp["num_hidden_layers"])
    writer.add_tensor("rope_freqs.weight", rope_freqs(hp), raw_dtype=gguf.GGMLQuantizationType.F32)
    for file in weight_files(merged_dir):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                name = _text_name(key)
                if name is None:
                    continue
                new_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
                if new_name is None:
                    raise ValueError(f"no GGUF name for {key!r}: not a Gemma 4 text tensor llama.cpp knows")
                tensor = f.get_slice(key)
                rows = tensor.get_shape()[0] if tensor.get_shape() else 1
                if "embed_tokens.weight" in name:  # rows past the tokenizer's tokens are dropped (Gemma3Model)
                    rows = min(rows, n_vocab)
                qtype = _tensor_type(new_name, len(tensor.get_shape()), quantization)
                try:
                    raw = _encode(tensor, rows, qtype)
                except gguf.QuantError:  # Q8_0 needs rows that are a multiple of 32: F16 then, as llama.cpp
                    qtype = gguf.GGMLQuantizationType.F16
                    raw = _encode(tensor, rows, qtype)
                writer.add_tensor(new_name, raw, raw_dtype=qtype)


ROWS_PER_CHUNK = 4096


def _encode(tensor_slice, rows: int, qtype) -> np.ndarray:
    """The first `rows` rows of a safetensors tensor, as float32 then `qtype`, a chunk of rows at a
    time (each row quantises on its own, so the bytes equal those of the whole tensor at once)."""
    import gguf

    shape = tensor_slice.get_shape()
    if len(shape) <= 1:
        return gguf.quants.quantize(as_float32(tensor_slice[:]).reshape(shape or [1]), qtype)
    out = None
    for start in range(0, rows, ROWS_PER_CHUNK):
        chunk = gguf.quants.quantize(as_float32(tensor_slice[start:min(rows, start + ROWS_PER_CHUNK)]), qtype)
        if out is None:
            out = np.empty((rows, *chunk.shape[1:]), dtype=chunk.dtype)
        out[start:start + len(chunk)] = chunk
    return out


def as_float32(tensor: torch.Tensor) -> np.ndarray:
    """float16 and float32 stay as they are; anything else (bfloat16) becomes float32, as in the converter."""
    return (tensor if tensor.dtype in (torch.float16, torch.float32) else tensor.to(torch.float32)).numpy()


def _text_name(key: str) -> str | None:
    """The converter's name for a language-model tensor (None for the towers)."""
    if any(part in key for part in _NOT_TEXT):
        return None
    name = key.replace("language_model.", "")
    if name.endswith(("per_dim_scale", "layer_scalar")):
        name += ".weight"
    return name


def _tensor_type(new_name: str, n_dims: int, quantization: str):
    import gguf

    if n_dims <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType.BF16 if quantization == "bf16" else gguf.GGMLQuantizationType.Q8_0


def _tokenizer_size(folder: Path) -> int:
    """Gemma3Model's count of real tokens: the embedding rows past it are dropped."""
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    return len(tokenizer_json["model"]["vocab"]) + len(tokenizer_json["added_tokens"])


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    return [folder / "model.safetensors"]


# ------------------------------------------------------------------ tokenizer
def write_tokenizer(writer, folder: Path) -> None:
    """Token list, types (and scores), merges, special ids and chat template."""
    import gguf

    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    if _is_sentencepiece_bpe(tokenizer_json):
        _gemma4_vocab(writer, folder)
    elif _is_byte_level_bpe(tokenizer_json):
        _byte_level_vocab(writer, folder)
    else:
        raise ValueError(f"{folder / 'tokenizer.json'}: neither Gemma 4's tokenizer nor a byte-level BPE")
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)


def _is_sentencepiece_bpe(tokenizer_json: dict) -> bool:
    model = tokenizer_json["model"]
    decoder = tokenizer_json.get("decoder") or {}
    return model["type"] == "BPE" and model.get("byte_fallback", False) and decoder.get("type") == "Sequence"


def _is_byte_level_bpe(tokenizer_json: dict) -> bool:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    return tokenizer_json["model"]["type"] == "BPE" and pre.get("type") == "ByteLevel"


def _gemma4_vocab(writer, folder: Path) -> None:
    """Gemma4Model.set_vocab."""
    import gguf

    vocab = gguf.LlamaHfVocab(folder)
    tokens, scores, toktypes = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        toktypes.append(gguf.TokenType.USER_DEFINED if text.decode() in VISIBLE_TOKENS else toktype)
    writer.add_tokenizer_model("gemma4")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(toktypes)
    writer.add_add_space_prefix(False)
    writer.add_add_bos_token(True)


def _byte_level_vocab(writer, folder: Path) -> None:
    """TextModel._set_vocab_gpt2 / get_vocab_base, with the GPT-2 pre-tokenizer (the byte-level BPE's)."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    vocab_size = config.get("text_config", config).get("vocab_size", len(tokenizer.vocab))
    reverse = {i: t for t, i in tokenizer.vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, toktypes = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            looks_special = token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))
            special = decoder[i].special or looks_special
            toktypes.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            toktypes.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(toktypes)
