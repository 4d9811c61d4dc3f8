"""Where a run's work goes, however the run ends, and the room it needs, checked before it starts.

    check_space(...)  before the first step: the bytes of every save this run will make against the
                      free space of output_dir (refused with the numbers: a full disk found at the
                      final save used to cost the whole run)
    RunSaves          this run's periodic checkpoints (pruning only its own), and the last save: a
                      resumable checkpoint when the run was stopped or failed, then the adapter
    SaveError         a save failed anyway (the disk filled up during the run): the earlier saves
                      stay as they were, the half-written folder is removed, the weights trained so
                      far go to a folder elsewhere, and the message names both places

Every save is staged and moved into place when complete (gemmatune.files), so a failed save never
damages the one before it.
"""
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from gemmatune.errors import GemmatuneError, TrainingSetupError
from gemmatune.files import free_bytes, remove_partials, staging_dir
from gemmatune.model.adapters import save_adapter
from gemmatune.training.checkpoints import prune_checkpoints, save_checkpoint

STATE_BYTES = 2**20  # trainer_state.json and the safetensors header: losses, settings, random state
SMALL_8BIT_TENSOR = 4096  # bitsandbytes keeps smaller tensors' optimizer state in float32


class SaveError(GemmatuneError, OSError):
    """A checkpoint or the adapter could not be written; the message says where the work is."""


def is_disk_error(error: BaseException) -> bool:
    """An error of the filesystem (a full disk, a quota, a lost mount): an OSError, or safetensors'
    own error type around one ("I/O error: No space left on device (os error 28)")."""
    return isinstance(error, OSError) or (type(error).__name__ == "SafetensorError" and "I/O error" in str(error))


def save_sizes(model, tokenizer, optimizer_name: str, folder) -> dict:
    """Bytes of one save: {"adapter", "tokenizer", "optimizer", "checkpoint"}. The tokenizer is
    saved once into `folder` to measure it: a real write, which also finds a full disk now."""
    params = [p for p in model.parameters() if p.requires_grad]
    adapter = sum(p.numel() * p.element_size() for p in params)
    optimizer = 0
    for p in params:  # AdamW: two moments per weight, 8-bit above SMALL_8BIT_TENSOR (+ block scales, code book)
        n = p.numel()
        eight_bit = optimizer_name == "adamw_8bit" and n >= SMALL_8BIT_TENSOR
        optimizer += 2 * n + 8 * -(-n // 256) + 2 * 256 * 4 if eight_bit else 8 * n + 4
    tokenizer_bytes = 0
    if tokenizer is not None:
        probe = staging_dir(Path(folder) / "tokenizer-size")
        try:
            tokenizer.save_pretrained(probe)
            tokenizer_bytes = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file())
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    return {"adapter": adapter, "tokenizer": tokenizer_bytes, "optimizer": optimizer,
            "checkpoint": adapter + tokenizer_bytes + optimizer + STATE_BYTES}


def checkpoints_at_once(start_step: int, max_steps: int, save_every: int, keep: int) -> int:
    """The most checkpoints of this run on disk at one time: those kept, plus the one being written
    (a periodic one before pruning, or the one a stop or failure writes)."""
    periodic = len([s for s in range(start_step + 1, max_steps) if save_every and s % save_every == 0])
    return (min(periodic, keep) if keep > 0 else periodic) + 1


def check_space(model, tokenizer, config, start_step: int = 0) -> dict:
    """Refuse, before the first step, a run whose saves will not fit in output_dir's free space.

    Returns:
        save_sizes(...) of this run.

    Raises:
        TrainingSetupError: too little space (with the numbers and what to do), or the measuring
            write itself failed.
    """
    folder = Path(config.output_dir)
    try:
        sizes = save_sizes(model, tokenizer, config.optimizer, folder)
    except OSError as exc:
        raise TrainingSetupError(f"output_dir {str(folder)!r}: writing a test save failed ({exc.strerror or exc}; "
                                 f"{human(free_bytes(folder))} free). Free some space or pick another output_dir"
                                 ) from exc
    count = checkpoints_at_once(start_step, config.max_steps, config.save_every, config.keep_checkpoints)
    need = count * sizes["checkpoint"] + sizes["adapter"] + sizes["tokenizer"]
    free = free_bytes(folder)
    if need > free:
        raise TrainingSetupError(
            f"output_dir {str(folder)!r} has {human(free)} free, and this run's saves need {human(need)}: up to "
            f"{count} resumable checkpoint(s) of {human(sizes['checkpoint'])} at once (save_every="
            f"{config.save_every}, keep_checkpoints={config.keep_checkpoints}, and one if the run is stopped) and "
            f"the adapter ({human(sizes['adapter'] + sizes['tokenizer'])}). Free some space, pick an output_dir on "
            "another disk, or keep fewer checkpoints")
    return sizes


class RunSaves:
    """This run's checkpoints and its last save. `last_good` is the newest complete checkpoint
    (the one resumed from, until this run writes one)."""

    def __init__(self, model, tokenizer, optimizer, state, config, signals, resumed_from=None, say=print):
        self.model, self.tokenizer, self.optimizer, self.state = model, tokenizer, optimizer, state
        self.config, self.signals, self.say = config, signals, say
        self.run_id = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        self.written: list[Path] = []  # this run's checkpoints, oldest first
        self.last_good = Path(resumed_from) if resumed_from else None
        self.last_good_step = state.step if resumed_from else 0

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    def checkpoint(self) -> Path:
        """Write checkpoint-<step> (a signal meanwhile is told to wait) and prune this run's oldest."""
        with self.signals.saving(self.output_dir / f"checkpoint-{self.state.step}"):  # a stop comes after this
            path = save_checkpoint(self.model, self.tokenizer, self.optimizer, self.state, self.output_dir,
                                   self.run_id)
            self.last_good, self.last_good_step = path, self.state.step  # so the stop does not write it again
            self.written.append(path)
            self.written = prune_checkpoints(self.written, self.config.keep_checkpoints, self.run_id)
        return path

    def final(self, status: str, failure: BaseException | None = None) -> Path:
        """The last save: a checkpoint when the run was stopped or failed after steps not yet
        checkpointed, then output_dir/adapter. Returns the adapter's folder.

        Raises:
            SaveError: output_dir could not be written; the message names the last good
                checkpoint and the folder elsewhere that now holds the weights.
        """
        try:
            if failure is not None and is_disk_error(failure):  # the disk failed during training: not there again
                raise failure
            if status != "done" and self.state.step > self.last_good_step:
                self.checkpoint()
            return save_adapter(self.model, self.tokenizer, self.output_dir / "adapter")
        except Exception as error:
            if not is_disk_error(error):
                raise
            remove_partials(self.output_dir)
            raise SaveError(self._rescue(error)) from error

    def _rescue(self, error: Exception) -> str:
        """Keep the weights somewhere else; the one-line message that says where everything is."""
        step = self.state.step
        reason = f"{getattr(error, 'strerror', None) or error}; {human(free_bytes(self.output_dir))} free"
        text = f"could not save to {self.output_dir} at step {step} ({reason})"
        if self.last_good is not None and self.last_good_step == step:
            return f"{text}. Everything trained is in the checkpoint {self.last_good} (resume_from={self.last_good})"
        last = (f"the last good checkpoint is {self.last_good} (step {self.last_good_step})" if self.last_good
                else "this run saved no checkpoint there")
        rescued = self._save_elsewhere()
        if rescued is not None:
            return (f"{text}; {last}. The weights trained up to step {step} were saved to {rescued} instead "
                    f"(resume with resume_from={rescued}, or load it with load_adapter)")
        return (f"{text}; {last}. The weights trained up to step {step} could not be written anywhere: they are "
                "still in `model` in this process; free some space and call gemmatune.save_adapter(model, "
                "tokenizer, 'a/folder')")

    def _save_elsewhere(self) -> Path | None:
        for place in (Path(tempfile.gettempdir()), Path.home() / ".cache"):
            folder = place / f"gemmatune-rescue-{self.run_id}"
            try:
                return save_checkpoint(self.model, self.tokenizer, self.optimizer, self.state, folder, self.run_id)
            except Exception as error:
                shutil.rmtree(folder, ignore_errors=True)
                if not is_disk_error(error):
                    raise
        return None


def human(size: int) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} GiB"
