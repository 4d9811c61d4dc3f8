"""Saving adapters and checkpoints without ever destroying earlier saved work.

Everything is written to a temporary folder first and moved into place when complete, so
an interrupted save (Ctrl-C, a full disk, a Colab disconnect) leaves the previous save
intact. A folder that already exists where a save goes is never deleted: it is kept as
`<name>.previous-1`, `<name>.previous-2`, ... (the lowest number is the oldest), and the save
says where.

A checkpoint holds no pickle: the adapter and the optimizer's tensors are safetensors, the
rest (step, losses, the optimizer's settings, the random generators' state) is JSON. Loading a
pickle runs whatever code it contains, and checkpoints get shared and downloaded. Everything a
checkpoint holds is read and checked before the model or the optimizer is touched, so a broken
file leaves both as they were.
"""
import json
import os
import random
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch

from gemmatune import adapter_layout as layout
from gemmatune.errors import CheckpointError, TrainingSetupError

ADAPTER_FILE = "adapter_model.safetensors"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE_FILE = "trainer_state.pt"  # pickle, written before 2026-12: read with weights_only=True
CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------ folders
def _kept_name(final: Path) -> Path:
    """The next free `<name>.previous-K` beside `final`."""
    pattern = re.compile(re.escape(final.name) + r"\.previous-(\d+)$")
    taken = [int(m.group(1)) for p in final.parent.iterdir() if (m := pattern.match(p.name))]
    return final.with_name(f"{final.name}.previous-{max(taken, default=0) + 1}")


def _publish(tmp: Path, final: Path) -> Path | None:
    """Move a finished temporary folder into place; what was there is kept, and returned."""
    kept = None
    if final.exists():
        kept = _kept_name(final)
        final.rename(kept)
    tmp.rename(final)
    return kept


def _staging_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.with_name(f".{final.name}.partial-{int(time.time() * 1000)}")


def check_writable(folder) -> Path:
    """Create `folder` if needed and prove a file can be written there, before any training time
    is spent: otherwise the first save, at the end, would be the first to find out."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".gemmatune-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TrainingSetupError(f"output_dir {str(folder)!r} is not writable ({exc.strerror or exc}): pick a folder "
                                 "you can write to, e.g. output_dir='outputs/run1'") from exc
    return folder


def save_adapter(model, tokenizer, path) -> Path:
    """The LoRA adapter in standard peft format (adapter_config.json + safetensors) plus the
    tokenizer, in the released checkpoint's own names (see adapter_layout), so that
    `PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), path)` loads it, as
    does gemmatune.load_adapter. An existing folder at `path` is kept as `<path>.previous-K`."""
    final = Path(path)
    tmp = _staging_dir(final)
    write_adapter(model, tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    kept = _publish(tmp, final)
    if kept is not None:
        print(f"gemmatune: {final} already existed; the earlier save is kept as {kept}")
    return final


def write_adapter(model, folder: Path) -> None:
    """adapter_config.json + adapter_model.safetensors of the model's "default" adapter, with the
    checkpoint's module names, `target_modules` as a regex matching exactly the adapted modules,
    and `base_model_name_or_path` naming the checkpoint the model was loaded from."""
    import copy

    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import save_file

    if not isinstance(model, PeftModel):
        raise TrainingSetupError("save_adapter needs the model that gemmatune.add_lora or load_adapter returned "
                                 f"(a peft model), got {type(model).__name__}")
    tensors = {}
    for key, tensor in get_peft_model_state_dict(model).items():
        module, rest = layout.split_adapter_key(key)
        tensors[layout.adapter_key(layout.to_checkpoint_name(model, module), rest)] = \
            tensor.detach().to("cpu").contiguous()
    config = copy.deepcopy(model.peft_config["default"])
    config.target_modules = layout.exact_names_regex(layout.split_adapter_key(k)[0] for k in tensors)
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
        module, rest = layout.split_adapter_key(key)
        name = layout.to_model_name(model, layout.canonical_name(module))
        if name is None:
            towers.add(module.split(".")[1])
            continue
        renamed[layout.adapter_key(name, rest)] = tensor
    if towers:
        raise CheckpointError(f"{folder} adapts the {' and '.join(sorted(towers))} too, which this text-only model "
                              "does not have: load the base with gemmatune.load_model(..., modalities=("
                              "'text', 'image', 'audio'))")
    return renamed


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(model, tokenizer, optimizer, state, output_dir) -> Path:
    """Adapter + optimizer + TrainState: everything `train(resume_from=...)` needs."""
    from safetensors.torch import save_file

    final = Path(output_dir) / f"checkpoint-{state.step}"
    tmp = _staging_dir(final)
    write_adapter(model, tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    tensors = {}
    saved = {"format": CHECKPOINT_FORMAT, "state": {k: v for k, v in asdict(state).items() if k != "rng"},
             "optimizer": _to_json(optimizer.state_dict(), tensors, "optimizer"),
             "rng": _to_json({"torch": torch.get_rng_state(), "python": random.getstate()}, tensors, "rng")}
    save_file(tensors, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps(saved), encoding="utf-8")
    kept = _publish(tmp, final)
    if kept is not None:
        print(f"gemmatune: {final} already existed; the earlier one is kept as {kept}")
    return final


def prune_checkpoints(written: list[Path], keep: int) -> list[Path]:
    """Delete the oldest of the checkpoints *this run* wrote beyond `keep` (keep <= 0: keep all).
    Checkpoints of earlier runs in the same folder are never touched. Returns those left."""
    import shutil

    if keep <= 0 or len(written) <= keep:
        return written
    for old in written[:-keep]:
        shutil.rmtree(old)
    return written[-keep:]


def load_checkpoint(path, model, optimizer):
    """Restore adapter weights, optimizer and TrainState from a save_checkpoint folder.

    Every file is read and checked first; only then are the model and the optimizer changed."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from gemmatune.trainer import TrainState

    path = Path(path)
    adapter = to_model_names(model, read_adapter_weights(path), path)
    _check_adapter_keys(path / ADAPTER_FILE, adapter, get_peft_model_state_dict(model))
    saved = _read_state(path)
    state = TrainState(**saved["state"])
    rng = saved.get("rng") or {}
    try:
        optimizer_state = saved["optimizer"]
        _check_optimizer_state(optimizer, optimizer_state, path)
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: the optimizer state in {STATE_JSON} is incomplete ({exc!r}); "
                              "resume from an earlier checkpoint") from exc
    set_peft_model_state_dict(model, adapter)
    optimizer.load_state_dict(optimizer_state)
    if rng:
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
    return state


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
        _check_adapter_keys(file, tensors, expected)
    return tensors


def _check_adapter_keys(file: Path, tensors: dict, expected: dict) -> None:
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


def _read_state(path: Path) -> dict:
    """The checkpoint's state as plain objects and tensors; never unpickles anything."""
    from safetensors.torch import load_file

    if not (path / STATE_JSON).is_file():
        if (path / LEGACY_STATE_FILE).is_file():
            return _read_legacy_state(path / LEGACY_STATE_FILE)
        raise CheckpointError(f"{path} is not a gemmatune checkpoint (no {STATE_JSON}); pick a checkpoint-N "
                              "folder inside your output_dir")
    try:
        saved = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(path / STATE_TENSORS))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} has no {STATE_TENSORS}: the checkpoint is incomplete; resume from an "
                              "earlier one") from exc
    except Exception as exc:  # JSON or safetensors errors: a short or garbled file
        raise CheckpointError(f"{path}: {STATE_JSON} or {STATE_TENSORS} is broken (truncated or corrupt: {exc}); "
                              "resume from an earlier checkpoint") from exc
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {saved.get('format')!r}, this gemmatune reads "
                              f"{CHECKPOINT_FORMAT}")
    return _from_json(saved, tensors)


def _read_legacy_state(file: Path) -> dict:
    """trainer_state.pt of older gemmatune versions: plain tensors, numbers and containers only
    (weights_only=True), which refuses any pickled object that could run code."""
    import pickle

    try:
        saved = torch.load(file, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{file} holds pickled Python objects, which could run code when loaded, so "
                              "gemmatune refuses to read it. Only resume from checkpoints you wrote yourself; "
                              "this one may have been tampered with") from exc
    except Exception as exc:
        raise CheckpointError(f"{file} is broken (truncated or corrupt: {exc}); resume from an earlier "
                              "checkpoint") from exc
    state = dict(saved["state"])
    return {"state": {k: v for k, v in state.items() if k != "rng"}, "optimizer": saved["optimizer"],
            "rng": state.get("rng") or {}}


def _check_optimizer_state(optimizer, saved: dict, path: Path) -> None:
    groups, saved_groups = optimizer.param_groups, saved["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in saved_groups]:
        raise CheckpointError(f"{path}: the optimizer state is for {sum(len(g['params']) for g in saved_groups)} "
                              f"tensors, this model trains {sum(len(g['params']) for g in groups)}; use the same "
                              "LoRA settings as the run that wrote it")


# ------------------------------------------------------------------ JSON + safetensors encoding
def _to_json(value, tensors: dict, key: str):
    """A nested state as JSON-able objects; tensors go into `tensors` under their path."""
    if torch.is_tensor(value):
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"cannot save the keys of {key}: {list(value)[:3]}")
        return {"__dict__": [[k, _to_json(v, tensors, f"{key}/{k}")] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_to_json(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot save {key} of type {type(value).__name__}")


def _from_json(value, tensors: dict):
    if isinstance(value, list):
        return [_from_json(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_from_json(v, tensors) for v in value["__tuple__"])
        if "__dict__" in value:
            return {k: _from_json(v, tensors) for k, v in value["__dict__"]}
        return {k: _from_json(v, tensors) for k, v in value.items()}
    return value
