"""Resumable checkpoints: the adapter, the optimizer and the TrainState, with no pickle.

A checkpoint folder (`output_dir/checkpoint-N`) holds the adapter as gemmatune.model.adapters
writes it, the optimizer's tensors as safetensors, and the rest (step, losses, the optimizer's
settings, the random generators' state) as JSON. Loading a pickle runs whatever code it contains,
and checkpoints get shared and downloaded. Everything a checkpoint holds is read and checked
before the model or the optimizer is touched, so a broken file leaves both as they were. Written
through gemmatune.files: staged, moved into place when complete, an earlier folder kept.

A checkpoint also records which run wrote it (pruning deletes only its own run's folders) and
which base model it was trained on: its name, its shapes and a few of its weights (`model_identity`).
Resuming on another model of the same shapes (an -it checkpoint's adapter on the base model) would
otherwise train on silently; it is refused, saying what differs.
"""
import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from gemmatune.errors import CheckpointError
from gemmatune.files import publish, staging_dir
from gemmatune.model.adapters import (ADAPTER_FILE, check_adapter_keys, read_adapter_weights, to_model_names,
                                      write_adapter)
from gemmatune.training.config import TrainState

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE_FILE = "trainer_state.pt"  # pickle, written before 2026-12: read with weights_only=True
CHECKPOINT_FORMAT = 1


FINGERPRINT_VALUES = 64  # values of each fingerprint weight compared on resume
FINGERPRINT_RTOL = 1e-2  # bf16 rounding of one model is ~4e-3; another model's norms differ by more
CONFIG_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size_per_layer_input")


def save_checkpoint(model, tokenizer, optimizer, state, output_dir, run_id: str | None = None) -> Path:
    """Adapter + optimizer + TrainState: everything `train(resume_from=...)` needs.

    `run_id` marks the run that wrote it, so that pruning never deletes another run's checkpoint.
    A save that fails (a full disk) removes its half-written folder; the earlier ones stay."""
    from safetensors.torch import save_file

    final = Path(output_dir) / f"checkpoint-{state.step}"
    tmp = staging_dir(final)
    try:
        write_adapter(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tensors = {}
        saved = {"format": CHECKPOINT_FORMAT, "state": {k: v for k, v in asdict(state).items() if k != "rng"},
                 "run": {"id": run_id}, "base_model": model_identity(model),
                 "optimizer": _to_json(optimizer.state_dict(), tensors, "optimizer"),
                 "rng": _to_json({"torch": torch.get_rng_state(), "python": random.getstate()}, tensors, "rng")}
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(saved), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kept = publish(tmp, final)
    if kept is not None:
        print(f"gemmatune: {final} already existed; the earlier one is kept as {kept}")
    return final


def prune_checkpoints(written: list[Path], keep: int, run_id: str | None = None) -> list[Path]:
    """Delete the oldest of the checkpoints *this run* wrote beyond `keep` (keep <= 0: keep all).
    Checkpoints of earlier runs in the same folder are never touched, nor a folder that is no
    longer this run's (its trainer_state.json names another run). Returns those left."""
    if keep <= 0 or len(written) <= keep:
        return written
    for old in written[:-keep]:
        if run_id is None or _run_id(old) == run_id:
            shutil.rmtree(old, ignore_errors=True)
    return written[-keep:]


def _run_id(folder: Path) -> str | None:
    try:
        return json.loads((folder / STATE_JSON).read_text(encoding="utf-8")).get("run", {}).get("id")
    except (OSError, ValueError, AttributeError):
        return None


def model_identity(model) -> dict:
    """What a checkpoint's base model was: the name it was loaded by, the shapes of its config,
    and the first values of two norm weights (instruction tuning changes them; dtype rounding does not)."""
    source = getattr(model, "gemmatune_source", None)
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    fields = text_config.to_dict() if hasattr(text_config, "to_dict") else {}  # no per-layer attribute errors
    shapes = {name: fields.get(name) for name in CONFIG_FIELDS}
    weights = {}
    for name, param in model.named_parameters():
        if "tower" in name or "lora_" in name:
            continue
        for key in ("layers.0.input_layernorm.weight", ".norm.weight"):  # the first layer's and the final norm
            if name.endswith(key) and key not in weights:
                weights[key.lstrip(".")] = param.detach().reshape(-1)[:FINGERPRINT_VALUES].float().cpu().tolist()
    return {"name": getattr(source, "model_id", None), "config": shapes, "weights": weights}


def check_base_model(saved: dict | None, model, path) -> str | None:
    """Refuse a checkpoint trained on another base model (CheckpointError, saying what differs);
    returns a note when only the name differs (the same weights under another path or id)."""
    if not saved:  # a checkpoint written before gemmatune recorded it
        return None
    mine = model_identity(model)
    named = f"{saved.get('name')!r}" if saved.get("name") else "another model"
    shapes = [f"{key} {saved['config'][key]} there, {mine['config'].get(key)} here"
              for key in saved.get("config", {}) if saved["config"][key] != mine["config"].get(key)]
    if shapes:
        raise CheckpointError(f"{path} was trained on {named}, whose shapes differ from this model's "
                              f"({'; '.join(shapes)}): load that model to resume, or start a new run without "
                              "resume_from")
    differing = [key for key, values in saved.get("weights", {}).items() if key in mine["weights"]
                 and not _close(values, mine["weights"][key])]
    if differing:
        raise CheckpointError(f"{path} was trained on {named}, this model is {mine['name']!r}: the same shapes but "
                              f"other weights ({', '.join(differing)} differ; an instruction-tuned checkpoint and "
                              "its base model differ like this). Load the model it was trained on to resume, or "
                              "start a new run without resume_from")
    if saved.get("name") and saved.get("name") != mine["name"]:
        return (f"{path} was trained on {saved['name']!r}, this model was loaded as {mine['name']!r}; the shapes "
                "and weights match, so training continues")
    return None


def _close(a: list, b: list) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= FINGERPRINT_RTOL * max(1.0, abs(x)) for x, y in zip(a, b))


def geometry_changes(state, batch_size: int, grad_accum: int, processes: int, rows: int) -> list[str]:
    """What differs between the run that wrote a checkpoint and this one in the rows each step takes
    (each makes the data order differ from an uninterrupted run's); 0 in `state` means not recorded."""
    changes = []
    if state.batch_size and (state.batch_size, state.grad_accum) != (batch_size, grad_accum):
        changes.append(f"batch {state.batch_size} x {state.grad_accum} accumulation there, batch {batch_size} x "
                       f"{grad_accum} here")
    if state.processes != processes:
        changes.append(f"{state.processes} process(es) there, {processes} here")
    if state.dataset_rows and state.dataset_rows != rows:
        changes.append(f"{state.dataset_rows} rows of data there, {rows} here")
    return changes


def load_checkpoint(path, model, optimizer, say=print):
    """Restore adapter weights, optimizer and TrainState from a save_checkpoint folder.

    Every file is read and checked first (and the base model: check_base_model); only then are
    the model and the optimizer changed."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    path = Path(path)
    adapter = to_model_names(model, read_adapter_weights(path), path)
    saved = _read_state(path)
    note = check_base_model(saved.get("base_model"), model, path)
    if note:
        say(f"gemmatune: note: {note}")
    check_adapter_keys(path / ADAPTER_FILE, adapter, get_peft_model_state_dict(model))
    state = TrainState(**{k: v for k, v in saved["state"].items() if k in TrainState.__dataclass_fields__})
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
