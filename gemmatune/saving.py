"""Saving adapters and checkpoints without ever destroying earlier saved work.

Everything is written to a temporary folder first and moved into place when complete, so
an interrupted save (Ctrl-C, a full disk, a Colab disconnect) leaves the previous save
intact. An existing adapter folder is kept as `<name>.previous`, not overwritten.
"""
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished temporary folder into place, keeping what was there as .previous."""
    if final.exists():
        previous = final.with_name(final.name + ".previous")
        if previous.exists():
            shutil.rmtree(previous)
        final.rename(previous)
    tmp.rename(final)
    return final


def _staging_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.with_name(f".{final.name}.partial-{int(time.time() * 1000)}")


def save_adapter(model, tokenizer, path) -> Path:
    """The LoRA adapter in standard peft format (adapter_config.json + safetensors) plus the
    tokenizer, loadable with peft's PeftModel.from_pretrained(base_model, path)."""
    final = Path(path)
    tmp = _staging_dir(final)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    return _publish(tmp, final)


def save_checkpoint(model, tokenizer, optimizer, state, output_dir, keep: int = 2) -> Path:
    """Adapter + optimizer + TrainState: everything `train(resume_from=...)` needs."""
    final = Path(output_dir) / f"checkpoint-{state.step}"
    tmp = _staging_dir(final)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    state.rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    torch.save({"optimizer": optimizer.state_dict(), "state": asdict(state)}, tmp / STATE_FILE)
    _publish(tmp, final)
    _prune_checkpoints(Path(output_dir), keep)
    return final


def _prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete the oldest checkpoint-N folders beyond `keep` (gemmatune's own, nothing else)."""
    checkpoints = sorted(
        (p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / STATE_FILE).exists()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for old in checkpoints[:-keep] if keep > 0 else []:
        shutil.rmtree(old)


def load_checkpoint(path, model, optimizer):
    """Restore adapter weights, optimizer and TrainState from a save_checkpoint folder."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from gemmatune.trainer import TrainState

    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a gemmatune checkpoint (no {STATE_FILE}); "
                                f"pick a checkpoint-N folder inside your output_dir")
    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    saved = torch.load(path / STATE_FILE, weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    state = TrainState(**saved["state"])
    if state.rng:
        torch.set_rng_state(state.rng["torch"])
        random.setstate(state.rng["python"])
    return state
