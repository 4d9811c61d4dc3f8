"""Ctrl-C, the notebook's stop button and SIGTERM stop a run once, where its state is whole.

SIGTERM is what `timeout`, `docker stop`, a scheduler's preemption and Colab's runtime reset send;
by default it ends the process at once and nothing is saved. While `train` runs, `StopSignals`
turns the first SIGINT or SIGTERM into one KeyboardInterrupt, which `train` answers by saving a
resumable checkpoint and the adapter. Two places must not be cut in half, so a signal that
arrives there is held until they end:

    critical()      the optimizer update and the step counter that goes with it (a checkpoint of
                    weights at step N+1 labelled N would resume one step off)
    saving(what)    a checkpoint or adapter being written

Every signal after the first is answered with "wait" and otherwise ignored: a second Ctrl-C while
the checkpoint is written used to abandon the save and lose the run. (SIGKILL cannot be caught;
`docker stop` sends it 10 s after SIGTERM, which a save of a LoRA adapter fits in.)

Only the main thread can install signal handlers; elsewhere (a training thread) this does nothing.
Under torchrun, gemmatune.training.distributed handles SIGTERM across ranks first; this handler
takes over while `train` runs and puts the previous one back after.
"""
import signal
import sys
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(number: int | None) -> str | None:
    """signal.SIGTERM -> "SIGTERM"; None stays None."""
    return None if number is None else signal.Signals(number).name


class StopSignals:
    """`with StopSignals() as signals:` for the length of a run; see the module docstring."""

    def __init__(self, stream=None):
        self.stream = stream
        self.received: list[int] = []  # signal numbers, in order
        self._previous = {}
        self._depth = 0  # nesting of critical() / saving()
        self._held = False  # a first signal arrived inside a critical section
        self._saving = None  # what is being written, for the "wait" message

    @property
    def first(self) -> int | None:
        """The first signal received (None: none)."""
        return self.received[0] if self.received else None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame) -> None:
        self.received.append(number)
        name, first = signal.Signals(number).name, len(self.received) == 1
        if self._saving or not first:
            doing = f"writing {self._saving}" if self._saving else "saving what was trained"
            print(f"gemmatune: {name} received while {doing}: please wait a few seconds, the save is not "
                  "abandoned", file=self.stream or sys.stderr, flush=True)
        if not first:
            return
        if self._depth:
            self._held = True  # raised when the critical section ends
            return
        raise KeyboardInterrupt(name)

    @contextmanager
    def critical(self, interrupt_after: bool = True):
        """A section that a first signal does not cut: the interrupt comes right after it (with
        interrupt_after=False, not at all: the caller is finishing the run anyway)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self._held and interrupt_after:
            self._held = False
            raise KeyboardInterrupt(signal.Signals(self.received[0]).name)

    @contextmanager
    def saving(self, what, interrupt_after: bool = True):
        """Writing `what`: every signal is told to wait; a first one interrupts after the save
        (with interrupt_after=False, never)."""
        before, self._saving = self._saving, what
        try:
            with self.critical(interrupt_after):
                yield
        finally:
            self._saving = before
