"""Adapter files: save and load LoRA adapters in the released checkpoint's names.

`save_adapter` writes adapter_config.json + adapter_model.safetensors (+ the tokenizer) with the
checkpoint's own module names (gemmatune.model.adapter_names), so plain peft, transformers and
vLLM load them onto the released checkpoint; `load_adapter` reads that layout and the text-only one
older gemmatune wrote, onto a text-only or a multimodal model, and puts gemmatune's kernels back.
Every file is read and checked before the model is changed; a save goes to a temporary folder and
is moved into place when complete, and a folder already there is kept (gemmatune.files).
"""
import copy
import json
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from gemmatune.errors import CheckpointError, TrainingSetupError
from gemmatune.files import publish, staging_dir
from gemmatune.model import adapter_names
from gemmatune.model.lora import quiet_peft
from gemmatune.model.patching import patch_lora

ADAPTER_FILE = "adapter_model.safetensors"


def save_adapter(model, tokenizer, path) -> Path:
    """Save the LoRA adapter in peft's format, in the released checkpoint's own module names.

    Args:
        model: the peft model add_lora, load_adapter or train returned.
        tokenizer: saved beside the adapter (None: not saved).
        path: the folder to write. A folder already there is kept as `<path>.previous-K`.

    Returns:
        The folder (a Path). `PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(
        base), path)` loads it, as does gemmatune.load_adapter.

    Raises:
        TrainingSetupError: the model has no adapters (call add_lora first).
    """
    final = Path(path)
    tmp = staging_dir(final)
    write_adapter(model, tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    kept = publish(tmp, final)
    if kept is not None:
        print(f"gemmatune: {final} already existed; the earlier save is kept as {kept}")
    return final


def write_adapter(model, folder: Path) -> None:
    """adapter_config.json + adapter_model.safetensors of the model's "default" adapter, with the
    checkpoint's module names, `target_modules` as a regex matching exactly the adapted modules,
    and `base_model_name_or_path` naming the checkpoint the model was loaded from."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not isinstance(model, PeftModel):
        raise TrainingSetupError("save_adapter needs the model that gemmatune.add_lora or load_adapter returned "
                                 f"(a peft model), got {type(model).__name__}")
    tensors = {}
    for key, tensor in get_peft_model_state_dict(model).items():
        module, rest = adapter_names.split_adapter_key(key)
        tensors[adapter_names.adapter_key(adapter_names.to_checkpoint_name(model, module), rest)] = \
            tensor.detach().to("cpu").contiguous()
    config = copy.deepcopy(model.peft_config["default"])
    config.target_modules = adapter_names.exact_names_regex(adapter_names.split_adapter_key(k)[0] for k in tensors)
    config.inference_mode = True
    source = getattr(model, "gemmatune_source", None)
    if source is not None:
        config.base_model_name_or_path = source.path
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})


def read_adapter(folder, model) -> tuple[dict, dict]:
    """(adapter_config.json as a dict, tensors renamed to `model`'s module names) of a saved adapter
    in either layout: the checkpoint's names (this gemmatune) or the text-only ones (before 2026-12)."""
    folder = Path(folder)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no adapter_config.json: pick a folder written by gemmatune.train or "
                              "save_adapter (output_dir/adapter, or a checkpoint-N folder inside your output_dir)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{config_file} is broken (not valid JSON: {exc}); save the adapter again") from exc
    return config, to_model_names(model, read_adapter_weights(folder), folder)


def to_model_names(model, tensors: dict, folder) -> dict:
    """Adapter tensors renamed from any saved layout to this model's module names."""
    renamed, towers = {}, set()
    for key, tensor in tensors.items():
        module, rest = adapter_names.split_adapter_key(key)
        name = adapter_names.to_model_name(model, adapter_names.canonical_name(module))
        if name is None:
            towers.add(module.split(".")[1])
            continue
        renamed[adapter_names.adapter_key(name, rest)] = tensor
    if towers:
        raise CheckpointError(f"{folder} adapts the {' and '.join(sorted(towers))} too, which this text-only model "
                              "does not have: load the base with gemmatune.load_model(..., modalities=("
                              "'text', 'image', 'audio'))")
    return renamed


def read_adapter_weights(folder: Path, expected: dict | None = None) -> dict:
    """The tensors of `folder/adapter_model.safetensors`, fully read (a truncated file fails here,
    not halfway through loading), and, given the model's own adapter state dict, checked
    against its names and shapes."""
    from safetensors.torch import load_file

    file = Path(folder) / ADAPTER_FILE
    if not file.is_file():
        raise CheckpointError(f"{folder} has no {ADAPTER_FILE}: pick a folder written by gemmatune.train or "
                              "save_adapter (a checkpoint-N folder inside your output_dir, or output_dir/adapter)")
    try:
        tensors = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for a short or garbled file
        raise CheckpointError(f"{file} is broken (truncated or corrupt: {exc}); resume from an earlier "
                              "checkpoint or save again") from exc
    if expected is not None:
        check_adapter_keys(file, tensors, expected)
    return tensors


def check_adapter_keys(file: Path, tensors: dict, expected: dict) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape)]
    if missing or unexpected or wrong:
        details = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                            for what, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("other shape", sorted(wrong))) if keys)
        raise CheckpointError(f"{file} does not fit this model's adapters ({details}): it was saved from another "
                              "model or with other LoRA settings (rank, target modules); load the same model and "
                              "call add_lora with the same settings before resuming")


def load_adapter(model: nn.Module, path, trainable: bool = False) -> PeftModel:
    """Put a saved adapter on a freshly loaded base model, on the same kernels as add_lora, so the
    reloaded model computes exactly what the trained one did.

    Args:
        model: a base model from load_model (the same checkpoint and modalities it was trained with).
        path: an adapter folder (train's output_dir/adapter, a checkpoint-N, a save_adapter folder),
            in the released checkpoint's names or the text-only names older gemmatune wrote.
        trainable: keep the adapters trainable (to continue training), else inference mode.

    Returns:
        The peft model.

    Raises:
        CheckpointError: the folder is not an adapter, a file is broken, or an adapter tensor finds
            no module of this model (or a module no tensor) - the message names the base it needs.
    """
    from peft import set_peft_model_state_dict

    saved_config, tensors = read_adapter(path, model)
    config = LoraConfig.from_pretrained(str(path))
    config.target_modules = adapter_names.exact_names_regex(adapter_names.split_adapter_key(k)[0] for k in tensors)
    config.inference_mode = not trainable
    with quiet_peft():
        try:
            peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
        except ValueError as exc:  # peft: target modules not found in the model
            raise CheckpointError(f"the adapter in {path} does not fit this model ({exc}); load the base model it was "
                                  f"trained on (adapter_config.json: {saved_config.get('base_model_name_or_path')})"
                                  ) from exc
    result = set_peft_model_state_dict(peft_model, tensors)
    missing = sorted(k for k in result.missing_keys if ".lora_" in k)
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointError(f"the adapter in {path} does not fit this model (missing: {missing[:3]}, unexpected: "
                              f"{unexpected[:3]}): load the base model and LoRA settings it was trained with")
    if getattr(model, "gemmatune_use_kernels", False):
        patch_lora(peft_model)
    return peft_model
