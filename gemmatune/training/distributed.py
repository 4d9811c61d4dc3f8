"""Several GPUs: one process per GPU, started by `torchrun` or `accelerate launch`, DDP's algorithm.

    torchrun --nproc-per-node 2 -m gemmatune train --model google/gemma-4-E2B-it ...

Each process (rank) holds its own 4-bit model and its own CPU copy of the per-layer-embedding
table, trains its share of every step's rows, and the ranks exchange only the LoRA gradients
(tens of MB) through torch.distributed (NCCL on GPUs, gloo on CPUs). Nothing here launches
processes or moves bytes itself: torchrun/accelerate start the ranks and set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; torch.distributed does every exchange.

Why not `DistributedDataParallel(model)`: its autograd hooks do CPU-side bookkeeping during the
backward (which parameters are ready, which bucket to launch, `no_sync()` for accumulation). The
training micro-step is replayed as a CUDA graph (gemmatune/training/step.py), and a replay runs no CPU
code at all, so the hooks would fire during the capture only; the model is also never called
through DDP's forward (the loss calls the decoder directly, gemmatune/training/loss.py). What DDP
does for us is two collectives, and this module issues exactly those, outside the graph: broadcast
rank 0's trainable weights once at the start, then after
the last micro-step of every optimizer step one all-reduce of all LoRA gradients, copied into a
single flat buffer (one collective, not ~400). DDP averages the gradients because each rank's
loss is a mean over its own rows; here each rank's loss is already divided by the label-token
count of the whole global step, so the gradients are summed. Either way every rank then holds
the same gradients, takes the same optimizer step and keeps the same weights.

When a rank fails or is interrupted, the others must not wait forever for its next collective
(NCCL would spin until its timeout and then kill the process, losing the adapter). So a rank
that stops says so in the process group's key-value store (the TCPStore torchrun provides),
and every wait for a collective is a short polling loop that also reads that key: the other
ranks stop within a fraction of a second, rank 0 saves the adapter, and the stopped rank waits
for that save before it exits (torchrun kills the remaining ranks once one has exited); rank 0
in turn keeps the store (it hosts it without torchrun) until the others have read the news.
A rank that dies without a word (killed, segfault) is noticed by gloo at once (the connection
closes); with NCCL, torchrun's SIGTERM to the others is turned into an interrupt here, so rank 0
still saves. A deadline (`rank_timeout_s`) bounds every wait.
"""
import itertools
import os
import signal
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from gemmatune.errors import GemmatuneError, TrainingSetupError
from gemmatune.model.device import rank, world_size
from gemmatune.training.dashboard import GIB, gpu_memory_stats

STORE_CHECK_S = 0.2  # how often a waiting rank reads the store for a stopped rank
LEAVE_WAIT_S = 30.0  # after a stop, how long rank 0 keeps the store up for the others to read it
_RUN_IDS = itertools.count()  # one key namespace per train() call (every rank calls train() alike)


class RankStopped(GemmatuneError, RuntimeError):
    """Another rank failed, so this one stopped too; that rank's output has the traceback."""


def join(device: torch.device, timeout_s: float):
    """The ranks of this run: `OneProcess()` without torchrun, else `Ranks` on the process group
    (initialised here from torchrun's/accelerate's environment unless the caller already did)."""
    if world_size() <= 1:
        return OneProcess()
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            device = _check_own_gpu(device)
        # a longer timeout than ours: our deadline must fire first, so that rank 0 still saves
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s + 60),
                                device_id=device if backend == "nccl" else None)
    return Ranks(device, timeout_s, owned)


def _check_own_gpu(device: torch.device) -> torch.device:
    """NCCL needs one GPU per rank: the model must be on this rank's GPU, cuda:LOCAL_RANK."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    local = int(os.environ.get("LOCAL_RANK", index))
    if index != local:
        raise TrainingSetupError(f"rank {rank()}: the model is on cuda:{index}, but this process's GPU is "
                                 f"cuda:{local} (LOCAL_RANK={local}): load it with gemmatune.load_model(...) without "
                                 f"device=, which picks cuda:LOCAL_RANK, or with device='cuda:{local}'")
    return torch.device("cuda", index)


class OneProcess:
    """The null object for a single process: every exchange is the identity."""
    rank, world, is_main = 0, 1, True

    def describe(self) -> str:
        return ""

    def broadcast_from_main(self, params) -> None:
        pass

    def sum_count(self, count: int) -> int:
        return count

    def all_reduce_grads(self, params, loss_sum: torch.Tensor, local_tokens: int) -> torch.Tensor:
        return loss_sum

    def read_totals(self, totals: torch.Tensor) -> tuple[float, list | None]:
        return totals.item(), None  # the GPU finishes the step here

    def stop(self, error: BaseException) -> None:
        pass

    def main_saved(self) -> None:
        pass

    def wait_for_main_save(self) -> None:
        pass

    def close(self) -> None:
        pass


class Ranks:
    """This rank's view of the process group: the collectives train() needs, each waited for
    in a loop that notices a stopped rank (see the module docstring)."""

    def __init__(self, device: torch.device, timeout_s: float, owned: bool):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.backend = dist.get_backend()
        self.timeout_s, self.owned = timeout_s, owned
        if self.backend == "nccl" and device.type == "cuda" and device.index not in (None, torch.cuda.current_device()):
            torch.cuda.set_device(device)
        self.comm_device = device if self.backend == "nccl" else torch.device("cpu")
        # NCCL work does not block the CPU: we poll a CUDA event instead; gloo work does: we poll the work
        self.poll_s = 0.0 if self.backend == "nccl" else 0.001
        self.store = _default_store()
        self.prefix = f"gemmatune/train-{next(_RUN_IDS)}/"
        self.stopped = False
        self.connection_lost = False  # a collective failed: a rank's process has probably ended
        self._next_check = 0.0
        # each rank's (tokens, GiB) travel to the GPU from pinned memory: a copy from pageable
        # memory would make the CPU wait for the backward before it can queue the all-reduce
        self._stats = torch.zeros(2 * self.world, dtype=torch.float32, pin_memory=device.type == "cuda")
        self._previous_sigterm = _install_sigterm_handler()

    def describe(self) -> str:
        return f"{self.world} processes ({self.backend}); rank {self.rank} prints, saves and draws"

    # -- collectives ------------------------------------------------------------------
    def broadcast_from_main(self, params) -> None:
        """Every rank starts from rank 0's trainable weights (as DDP does at construction)."""
        params = list(params)
        flat = torch.cat([p.detach().reshape(-1).float() for p in params]).to(self.comm_device)
        self._wait(dist.broadcast(flat, src=0, async_op=True), "broadcasting rank 0's weights")
        self._wait_for_device(flat)
        with torch.no_grad():
            for p, part in zip(params, _split(flat, params)):
                p.copy_(part)

    def sum_count(self, count: int) -> int:
        """The sum over ranks of an integer (the step's label tokens): read on the CPU."""
        total = torch.tensor([count], dtype=torch.int64, device=self.comm_device)
        self._wait(dist.all_reduce(total, async_op=True), "summing the step's label tokens")
        self._wait_for_device(total)
        return int(total.item())

    def all_reduce_grads(self, params, loss_sum: torch.Tensor, local_tokens: int) -> torch.Tensor:
        """Sum every LoRA gradient over the ranks, in place, in one collective. The step's loss sum
        and each rank's tokens and memory ride along at the end: [loss, tokens_0, GiB_0, ...].
        Returns that tail on the device; read it with `read_totals` after the optimizer step,
        so the GPU does not wait for the CPU in between."""
        params = list(params)
        self._stats.zero_()  # the last step's copy from it is done: read_totals waited for the GPU
        self._stats[2 * self.rank] = float(local_tokens)
        self._stats[2 * self.rank + 1] = _memory_gib(loss_sum.device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        stats = self._stats.to(loss_sum.device, non_blocking=True)
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss_sum.detach().reshape(1).float(), stats])
        flat = flat.to(self.comm_device)
        self._wait(dist.all_reduce(flat, async_op=True), "summing the gradients")
        flat = flat.to(params[0].device) if params else flat
        with torch.no_grad():
            for p, grad, part in zip(params, grads, _split(flat, params)):
                if p.grad is None:
                    p.grad = grad
                p.grad.copy_(part)  # in place: a CUDA graph adds into exactly these tensors
        return flat[-(1 + 2 * self.world):]

    def read_totals(self, totals: torch.Tensor) -> tuple[float, list]:
        """(the global step's loss, [(tokens, memory GiB) of each rank]); the GPU finishes the step here."""
        self._wait_for_device(totals)
        values = totals.tolist()
        return values[0], [(int(values[1 + 2 * r]), values[2 + 2 * r]) for r in range(self.world)]

    def _wait(self, work, what: str) -> None:
        """Wait for a collective, watching for a stopped rank and the deadline. NCCL work only
        makes the GPU wait (work.wait() returns at once); the CPU waits in _wait_for_device."""
        if self.backend == "nccl":
            return work.wait()
        deadline = time.monotonic() + self.timeout_s
        while not work.is_completed():
            self._watch(deadline, what)
            time.sleep(self.poll_s)
        try:
            work.wait()
        except Exception as error:  # gloo: a rank's process is gone ("Connection closed by peer")
            self.connection_lost = True
            self._raise_if_a_rank_stopped()
            raise RankStopped(f"rank {self.rank}: {what} failed ({str(error)[:300]}); another rank probably "
                              "crashed: see its output") from error

    def _wait_for_device(self, tensor: torch.Tensor) -> None:
        """Wait, in a loop that can notice a stopped rank, until the GPU has produced `tensor`."""
        if tensor.device.type != "cuda":
            return
        done = torch.cuda.Event()
        done.record()
        deadline = time.monotonic() + self.timeout_s
        while not done.query():
            self._watch(deadline, "waiting for the GPU and the other ranks")
            time.sleep(self.poll_s)

    def _watch(self, deadline: float, what: str) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + STORE_CHECK_S
        self._raise_if_a_rank_stopped()
        if now > deadline:
            raise RankStopped(f"rank {self.rank}: no answer from the other ranks for {self.timeout_s:.0f} s while "
                              f"{what}; a rank is stuck or gone. Raise rank_timeout_s if a step or a checkpoint "
                              "save legitimately takes longer")

    # -- stopping together --------------------------------------------------------------
    def _raise_if_a_rank_stopped(self) -> None:
        message = self._store_get("stopped")
        if message is None:
            return
        kind, who, what = message.split("|", 2)
        self.stopped = True
        if kind == "interrupted":
            raise KeyboardInterrupt(f"rank {who} was interrupted")
        raise RankStopped(f"rank {who} failed ({what}); rank {self.rank} stopped too")

    def stop(self, error: BaseException) -> None:
        """Tell the other ranks that this one stops (the first rank to stop is the one named)."""
        self.stopped = True
        kind = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        self._store_call("compare_set", self.prefix + "stopped", "",
                         f"{kind}|{self.rank}|{type(error).__name__}: {str(error)[:500]}")

    def main_saved(self) -> None:
        """Rank 0, after its final save (or its attempt): the other ranks may now exit."""
        self._store_call("set", self.prefix + "saved", "1")

    def wait_for_main_save(self) -> None:
        """Not rank 0: return once rank 0 has saved the adapter, so that no launcher kills it
        mid-save because this rank exited first. Gives up at the deadline or if the store is gone."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                if self.store is None or self.store.check([self.prefix + "saved"]):
                    return
            except Exception:  # the store lived in rank 0's process, which has ended
                return
            time.sleep(0.02)

    def close(self) -> None:
        _restore_sigterm_handler(self._previous_sigterm)
        self._store_call("set", f"{self.prefix}left/{self.rank}", "1")
        if self.is_main and self.stopped and not self.connection_lost:
            self._wait_for_the_others_to_leave()
        if self.owned and dist.is_initialized():
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)  # torch >= 2.6
            if self.stopped and abort is not None:  # a collective may still be pending: do not wait for it
                abort()
            else:
                dist.destroy_process_group()

    def _wait_for_the_others_to_leave(self) -> None:
        """Without torchrun the store lives in rank 0's process: after a stop, keep it up until the
        other ranks have read why (within a step or so), so they report it rather than a lost
        connection. Bounded: a rank that died leaves no key."""
        keys = [f"{self.prefix}left/{r}" for r in range(self.world)]
        deadline = time.monotonic() + min(LEAVE_WAIT_S, self.timeout_s)
        while time.monotonic() < deadline:
            try:
                if self.store is None or self.store.check(keys):
                    return
            except Exception:
                return
            time.sleep(0.02)

    def _store_get(self, key: str) -> str | None:
        try:
            if self.store is not None and self.store.check([self.prefix + key]):
                return self.store.get(self.prefix + key).decode()
        except Exception:  # the store is gone: the collectives report the failure instead
            pass
        return None

    def _store_call(self, method: str, *args) -> None:
        try:
            if self.store is not None:
                getattr(self.store, method)(*args)
        except Exception:
            pass


def _split(flat: torch.Tensor, params) -> list[torch.Tensor]:
    """Views of `flat` shaped like each of `params`, in order."""
    parts, offset = [], 0
    for p in params:
        parts.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return parts


def _memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated on this rank's GPU, or this process's RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return gpu_memory_stats().rss_gib or 0.0


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # a process group without a store: deadlines and gloo's errors still apply
        return None


def _install_sigterm_handler():
    """torchrun sends SIGTERM to the other ranks when one exits with an error: the first SIGTERM
    becomes a KeyboardInterrupt (so train() saves), a second one during the save is ignored."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt("SIGTERM")

    return signal.signal(signal.SIGTERM, interrupt)


def _restore_sigterm_handler(previous) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
