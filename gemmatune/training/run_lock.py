"""One run per output_dir: a lock file that names its holder.

Two runs writing into one folder destroy each other's work: each keeps the other's `checkpoint-N`
aside as `.previous-1`, pruning then deletes the other's checkpoints, and the other run fails when
its own folder is gone. So `train` holds `output_dir/.gemmatune-run.lock` while it runs: JSON with
the process id, the host and the start time, created with O_EXCL (two runs cannot both create it).
A second run is refused with a message naming the holder. A lock whose process is gone (killed,
crashed, the machine restarted) is taken over with a note: a stale lock must never block work.
A lock written on another host cannot be checked from here, so it is refused with what to do.
"""
import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path

from gemmatune.errors import TrainingSetupError

LOCK_FILE = ".gemmatune-run.lock"


class RunLock:
    """`with RunLock(output_dir):` holds the folder for this process; released on exit."""

    def __init__(self, output_dir, say=print):
        self.file = Path(output_dir) / LOCK_FILE
        self.say = say
        self.held = False

    def __enter__(self) -> "RunLock":
        self.file.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed, then created again (another run may win that race)
            if self._create():
                self.held = True
                return self
            holder = _read(self.file)
            if holder is None:  # being written this instant, or unreadable: look again
                time.sleep(0.05)
                holder = _read(self.file)
            if holder is not None and not _is_stale(holder):
                raise TrainingSetupError(_refusal(self.file, holder))
            self.say(f"gemmatune: note: {self.file.parent} was locked by {_describe(holder)}, which is no longer "
                     "running; this run takes it over")
            try:
                self.file.unlink()
            except FileNotFoundError:
                pass
        raise TrainingSetupError(f"could not lock {self.file.parent}: another run keeps taking it; wait for it or "
                                 "pick another output_dir")

    def __exit__(self, *exc_info) -> None:
        if self.held and _read(self.file, {}).get("pid") == os.getpid():
            self.file.unlink(missing_ok=True)
        self.held = False

    def _create(self) -> bool:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "started_at": datetime.now().isoformat(timespec="seconds")}
        try:
            fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        return True


def _read(file: Path, default=None):
    try:
        holder = json.loads(file.read_text(encoding="utf-8"))
        return holder if isinstance(holder, dict) else default
    except (OSError, ValueError):
        return default


def _is_stale(holder: dict) -> bool:
    """True when the holder's process is gone (same host only; another host's lock is never stale)."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    if pid == os.getpid():  # this process, e.g. a notebook whose earlier train() was killed mid-way
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return _started_after(pid, holder.get("started"))


def _started_after(pid: int, started) -> bool:
    """A live process with the holder's id that started after the lock was written reuses a dead one's id."""
    try:
        import psutil

        return isinstance(started, (int, float)) and psutil.Process(pid).create_time() > started + 1
    except Exception:  # psutil missing, or the process ended just now
        return False


def _describe(holder: dict | None) -> str:
    if not holder:
        return "an earlier run"
    return f"process {holder.get('pid')} on {holder.get('host')} (started {holder.get('started_at', '?')})"


def _refusal(file: Path, holder: dict) -> str:
    here = holder.get("host") == socket.gethostname()
    return (f"another run is writing to {file.parent}: {_describe(holder)}. Two runs in one output_dir would "
            "overwrite and prune each other's checkpoints: pick another output_dir, or wait for that run to end"
            + ("" if here else f" (it runs on another machine; if it is gone, delete {file})"))
