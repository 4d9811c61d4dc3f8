"""Resumable checkpoints: the adapter, the optimizer and the TrainState, with no pickle.

A checkpoint folder (`output_dir/checkpoint-N`) holds the adapter as gemmatune.model.adapters
writes it, the optimizer's tensors as safetensors, and the rest (step, losses, the optimizer's
settings, the random generators' state) as JSON. Loading a pickle runs whatever code it contains,
and checkpoints get shared and downloaded. Everything a checkpoint holds is read and checked
before the model or the optimizer is touched, so a broken file leaves both as they were. Written
through gemmatune.files: staged, moved into place when complete, an earlier folder kept.
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


def save_checkpoint(model, tokenizer, optimizer, state, output_dir) -> Path:
    """Adapter + optimizer + TrainState: everything `train(resume_from=...)` needs."""
    from safetensors.torch import save_file

    final = Path(output_dir) / f"checkpoint-{state.step}"
    tmp = staging_dir(final)
    write_adapter(model, tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    tensors = {}
    saved = {"format": CHECKPOINT_FORMAT, "state": {k: v for k, v in asdict(state).items() if k != "rng"},
             "optimizer": _to_json(optimizer.state_dict(), tensors, "optimizer"),
             "rng": _to_json({"torch": torch.get_rng_state(), "python": random.getstate()}, tensors, "rng")}
    save_file(tensors, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps(saved), encoding="utf-8")
    kept = publish(tmp, final)
    if kept is not None:
        print(f"gemmatune: {final} already existed; the earlier one is kept as {kept}")
    return final


def prune_checkpoints(written: list[Path], keep: int) -> list[Path]:
    """Delete the oldest of the checkpoints *this run* wrote beyond `keep` (keep <= 0: keep all).
    Checkpoints of earlier runs in the same folder are never touched. Returns those left."""


    if keep <= 0 or len(written) <= keep:
        return written
    for old in written[:-keep]:
        shutil.rmtree(old)
    return written[-keep:]


def load_checkpoint(path, model, optimizer):
    """Restore adapter weights, optimizer and TrainState from a save_checkpoint folder.

    Every file is read and checked first; only then are the model and the optimizer changed."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict



    path = Path(path)
    adapter = to_model_names(model, read_adapter_weights(path), path)
    check_adapter_keys(path / ADAPTER_FILE, adapter, get_peft_model_state_dict(model))
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
