"""Real processes for the tests that need them: the command line, signals, locks, a small filesystem.

A test process cannot receive SIGTERM or fill a disk without disturbing pytest, so these tests start
Python in a child process (`python -m gemmatune ...` or a script written by the test), watch its
output as it runs, and send it real signals.
"""
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.helpers import REPO


def child_env(**extra) -> dict:
    """The environment of a child: this worktree's gemmatune, one thread, PyTorch kernels, no hub."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1", "GEMMATUNE_KERNELS": "0",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
           "HOME": os.environ.get("HOME", "/tmp"), "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
    env.update({k: v for k, v in os.environ.items() if k.startswith("GEMMATUNE_CACHE")})
    env.update(extra)
    return env


class Child:
    """A child process whose stdout and stderr are collected as they come (`wait_for` a line)."""

    def __init__(self, args, cwd, env=None):
        self.process = subprocess.Popen(args, cwd=cwd, env=env or child_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, bufsize=1)
        self.stdout, self.stderr = [], []
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, lines) -> None:
        for line in stream:
            lines.append(line)

    @property
    def out(self) -> str:
        return "".join(self.stdout)

    @property
    def err(self) -> str:
        return "".join(self.stderr)

    def wait_for(self, text: str, timeout: float = 120, stream: str = "stdout") -> float:
        """Seconds until `text` appears in the stream; fails if the process ends or time runs out first."""
        start = time.monotonic()
        lines = self.stdout if stream == "stdout" else self.stderr
        while time.monotonic() - start < timeout:
            if text in "".join(lines):
                return time.monotonic() - start
            if self.process.poll() is not None:
                time.sleep(0.2)  # the readers may still hold the last lines
                if text in "".join(lines):
                    return time.monotonic() - start
                raise AssertionError(f"the process ended ({self.process.returncode}) before {text!r} appeared:\n"
                                     f"{self.out[-3000:]}\n{self.err[-3000:]}")
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"{text!r} did not appear within {timeout} s:\n{self.out[-3000:]}\n{self.err[-3000:]}")

    def signal(self, number) -> None:
        self.process.send_signal(number)

    def wait(self, timeout: float = 120) -> int:
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def python(*args) -> list[str]:
    return [sys.executable, *map(str, args)]


def small_filesystem_command(folder: Path, size_kib: int, command: list[str]) -> list[str] | None:
    """`command`, run with a tmpfs of `size_kib` KiB mounted on `folder` (in its own user and mount
    namespace: no root needed where the kernel allows it); None where no namespace can be made."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    probe = subprocess.run([unshare, "-Urm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {folder}"],
                           capture_output=True)
    if probe.returncode != 0:
        return None
    script = f"mount -t tmpfs -o size={size_kib}k tmpfs {folder} && exec \"$@\""
    return [unshare, "-Urm", "sh", "-c", script, "sh", *command]
