"""Saving without ever destroying earlier saved work: staged folders, moved into place when complete.

Everything gemmatune writes (adapters, checkpoints, merged models, GGUF files) goes to a temporary
name beside its destination first and is moved into place when complete, so an interrupted save
(Ctrl-C, a full disk, a Colab disconnect) leaves the previous save intact. Something that already
exists where a save goes is never deleted: it is kept as `<name>.previous-1`, `<name>.previous-2`,
... (the lowest number is the oldest), and `publish` returns where, for the caller to say so.
"""
import os
import re
import shutil
import time
from pathlib import Path

from gemmatune.errors import TrainingSetupError


def kept_name(final: Path) -> Path:
    """The next free `<name>.previous-K` beside `final`."""
    pattern = re.compile(re.escape(final.name) + r"\.previous-(\d+)$")
    taken = [int(m.group(1)) for p in final.parent.iterdir() if (m := pattern.match(p.name))]
    return final.with_name(f"{final.name}.previous-{max(taken, default=0) + 1}")


def publish(tmp: Path, final: Path) -> Path | None:
    """Move a finished temporary folder into place; what was there is kept, and returned."""
    kept = None
    if final.exists():
        kept = kept_name(final)
        final.rename(kept)
    tmp.rename(final)
    return kept


def staging_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.with_name(f".{final.name}.partial-{os.getpid()}-{int(time.time() * 1000)}")


def remove_partials(folder) -> list[Path]:
    """Delete the half-written `.<name>.partial-*` folders in `folder` (a save that failed or was
    killed); returns them. Only for a folder no other process is saving into (train holds a lock)."""
    removed = []
    for path in Path(folder).glob(".*.partial-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def free_bytes(folder) -> int:
    """Free bytes on the filesystem that holds `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


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
