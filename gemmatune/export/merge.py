"""Merge the LoRA adapter into a standard 16-bit checkpoint of the whole Gemma 4 model.

What is written: the checkpoint the model was loaded from, tensor for tensor, in `dtype`, where
- each LoRA-adapted weight is `base + scale * B @ A`, summed in float32 and rounded once;
- `base` of a 4-bit layer is its exact NF4 dequantisation (gemmatune.kernels.nf4, bit-exact with
  bitsandbytes on every device; bitsandbytes' own CPU dequantisation is wrong on some CPUs), so the
  merged model computes what the fine-tuned model computed, not what the original weights would;
- every other tensor (the towers and embedders a text-only fine-tune never loaded, the per-layer
  embedding table that gemmatune keeps in CPU memory, norms, embeddings) is the checkpoint's own.

So the merged folder has exactly the tensor names and shapes of the checkpoint it came from. That
decides the K/V weights of KV-shared layers, which those layers never use: the released E2B/E4B
checkpoints carry them (for all 35/42 layers) and so does the merge; transformers' save_pretrained
drops them, and older vLLM and mlx-lm releases refused checkpoints without them. A checkpoint without
them (one saved by transformers, like the tiny model) gives a merge without them.

Output: config.json (the checkpoint's, with the new dtype), the checkpoint's tokenizer, processor and
generation files, and safetensors shards with model.safetensors.index.json, as transformers writes
them; plain transformers loads it without gemmatune (tests/export/test_merge.py). Written to a temporary
folder and moved into place; an existing folder is kept as `<name>.previous-K` (gemmatune.files).
"""
import json
import shutil
from pathlib import Path

import torch

from gemmatune.errors import CheckpointError
from gemmatune.files import publish, staging_dir
from gemmatune.kernels.nf4 import dequantize_nf4
from gemmatune.model import adapter_names as layout

# Non-weight files of a Gemma 4 checkpoint that a plain `from_pretrained` of the merge may need.
EXTRA_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
               "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
DEFAULT_SHARD_BYTES = 4 * 2**30


def merge_and_save(model, path, tokenizer=None, dtype=torch.bfloat16, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                   verbose: bool = True) -> Path:
    """Write the fine-tuned model, adapter merged, as a transformers checkpoint of the whole model.

    Args:
        model: what add_lora, load_adapter or train returned (4-bit or not, text-only or multimodal).
        path: the folder to write; a folder already there is kept as `<path>.previous-K`.
        tokenizer: saved into the folder too (the checkpoint's own tokenizer files are copied anyway).
        dtype: torch.bfloat16 (default), torch.float16 or torch.float32 (or their names).
        max_shard_bytes: the largest safetensors shard.
        verbose: print what was merged and where.

    Returns:
        The folder. `AutoModelForImageTextToText.from_pretrained(path)` loads it without gemmatune;
        it has exactly the source checkpoint's tensor names (towers included).

    Raises:
        CheckpointError: the model was not loaded by gemmatune.load_model, or holds several,
            DoRA or fan_in_fan_out adapters.
        ValueError: an unsupported dtype.
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype}: pick torch.bfloat16, torch.float16 or torch.float32")
    source = _source(model)
    files = checkpoint_tensor_files(source)
    replaced = replaced_weights(model)
    missing = sorted(set(replaced) - set(files))
    if missing:
        raise CheckpointError(f"the model's weights {missing[:3]} are not in its checkpoint {source.path}: "
                              "merge_and_save needs the model as gemmatune.load_model loaded it")
    final = Path(path)
    tmp = staging_dir(final)
    tmp.mkdir()
    shards = plan_shards(files, dtype, max_shard_bytes)
    write_shards(tmp, shards, files, replaced, dtype)
    _write_config(tmp, source, dtype)
    _copy_extra_files(tmp, source)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    kept = publish(tmp, final)
    if verbose:
        merged = sum(1 for r in replaced.values() if r.lora is not None)
        print(f"gemmatune: merged {merged} LoRA layers into {len(files)} tensors ({DTYPES[dtype]}) in {final}"
              + (f"; the earlier folder is kept as {kept}" if kept else ""))
    return final


# ------------------------------------------------------------------ what the model changed
class Replacement:
    """A checkpoint weight the fine-tuned model computes differently: its 4-bit base and/or its LoRA."""

    def __init__(self, base_layer, lora=None):
        self.base_layer = base_layer
        self.lora = lora  # (A, B, scale) or None

    def weight(self, checkpoint_tensor) -> torch.Tensor:
        """base + scale * B @ A in float32 (on the layer's device)."""
        base = self.base_layer
        if _is_4bit(base):
            weight = dequantize_nf4(base.weight.data, base.weight.quant_state, dtype=torch.float32)
        else:
            weight = checkpoint_tensor().to(device=base.weight.device, dtype=torch.float32)
        if self.lora is not None:
            lora_a, lora_b, scale = self.lora
            lora_a, lora_b = (t.detach().to(device=weight.device, dtype=torch.float32) for t in (lora_a, lora_b))
            weight = weight + scale * (lora_b @ lora_a)
        return weight


def replaced_weights(model) -> dict[str, Replacement]:
    """checkpoint tensor name -> Replacement, for every LoRA layer and every 4-bit layer of the model."""
    from peft.tuners.lora import LoraLayer

    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    replaced = {}
    for name, module in base_model.named_modules():
        if isinstance(module, LoraLayer):
            replaced[_weight_name(model, name)] = Replacement(module.get_base_layer(), _lora_of(name, module))
        elif _is_4bit(module) and not name.endswith(".base_layer"):
            replaced[_weight_name(model, name)] = Replacement(module)
    return replaced


def _lora_of(name: str, layer) -> tuple:
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(adapters) != 1:
        raise CheckpointError(f"{name} has the adapters {adapters}: merge_and_save merges exactly one")
    adapter = adapters[0]
    if layer.use_dora.get(adapter, False) or getattr(layer, "fan_in_fan_out", False):
        raise CheckpointError(f"{name}: DoRA and fan_in_fan_out adapters are not supported by merge_and_save")
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, float(layer.scaling[adapter])


def _weight_name(model, module_name: str) -> str:
    return layout.to_checkpoint_name(model, module_name) + ".weight"


def _is_4bit(module) -> bool:
    return type(module).__name__ in ("Linear4bit", "NF4Linear4bit") and hasattr(module.weight, "quant_state")


# ------------------------------------------------------------------ the checkpoint's files
def _source(model):
    source = getattr(model, "gemmatune_source", None)
    if source is None:
        raise CheckpointError("merge_and_save needs a model loaded with gemmatune.load_model (it reads the "
                              "checkpoint's files for every tensor the fine-tune left alone)")
    return source


def checkpoint_tensor_files(source) -> dict[str, Path]:
    """Every tensor name of the source checkpoint -> the safetensors file that holds it (in file order)."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    kwargs = source.hub_kwargs
    index = cached_file(source.path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False,
                        **kwargs)
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        filenames = list(dict.fromkeys(weight_map.values()))
    else:
        filenames = ["model.safetensors"]
    files = {}
    for filename in filenames:
        file = Path(cached_file(source.path, filename, **kwargs))
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                files[key] = file
    return files


def plan_shards(files: dict[str, Path], dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    from safetensors import safe_open

    shards, current, size = [], [], 0
    for file in dict.fromkeys(files.values()):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                tensor_slice = f.get_slice(key)
                n_bytes = _numel(tensor_slice.get_shape()) * _out_dtype(tensor_slice.get_dtype(), dtype).itemsize
                if current and size + n_bytes > max_shard_bytes:
                    shards.append(current)
                    current, size = [], 0
                current.append(key)
                size += n_bytes
    if current:
        shards.append(current)
    return shards


def write_shards(folder: Path, shards: list[list[str]], files: dict[str, Path], replaced: dict, dtype) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for shard_name, keys in zip(names, shards):
        tensors = {}
        for file in dict.fromkeys(files[key] for key in keys):
            with safe_open(str(file), "pt") as f:
                for key in (k for k in keys if files[k] == file):
                    out_dtype = _out_dtype(f.get_slice(key).get_dtype(), dtype)
                    if key in replaced:
                        tensor = replaced[key].weight(lambda key=key: f.get_tensor(key))
                    else:
                        tensor = f.get_tensor(key)
                    tensors[key] = tensor.to(device="cpu", dtype=out_dtype).contiguous()
        for key in keys:  # the checkpoint's order within the shard
            weight_map[key] = shard_name
            total += tensors[key].numel() * tensors[key].element_size()
        save_file({key: tensors[key] for key in keys}, str(folder / shard_name), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _out_dtype(safetensors_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """Floating-point tensors take the merge's dtype; anything else keeps its own."""
    own = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}[safetensors_dtype]
    return dtype if own.is_floating_point else own


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_config(folder: Path, source, dtype) -> None:
    from transformers.utils import cached_file

    config = json.loads(Path(cached_file(source.path, "config.json", **source.hub_kwargs)).read_text())
    config.pop("quantization_config", None)
    config["dtype"] = DTYPES[dtype]
    if "torch_dtype" in config:
        config["torch_dtype"] = DTYPES[dtype]
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _copy_extra_files(folder: Path, source) -> None:
    from transformers.utils import cached_file

    for name in EXTRA_FILES:
        file = cached_file(source.path, name, _raise_exceptions_for_missing_entries=False, **source.hub_kwargs)
        if file is not None:
            shutil.copyfile(file, folder / name)
