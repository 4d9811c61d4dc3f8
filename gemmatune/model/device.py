"""Which device this process uses, and whether it is the process that prints and saves.

One process per GPU under torchrun / accelerate launch (gemmatune.training.distributed says what
the processes exchange); these functions read the launcher's environment (RANK, WORLD_SIZE,
LOCAL_RANK) or the initialised process group, and answer for a single process too.
"""
import os

import torch
import torch.distributed as dist

from gemmatune.errors import TrainingSetupError


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0, the one that saves, prints and draws the dashboard (True without torchrun)."""
    return rank() == 0


def local_device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK under torchrun/accelerate (made the current device,
    so CUDA graphs and streams land on it too), plain "cuda" in a single process, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if "LOCAL_RANK" not in os.environ:
        return torch.device("cuda")
    index = int(os.environ["LOCAL_RANK"])
    if index >= torch.cuda.device_count():
        raise TrainingSetupError(f"LOCAL_RANK={index} but this machine shows {torch.cuda.device_count()} GPU(s): "
                                 "start at most one process per GPU (torchrun --nproc-per-node <number of GPUs>)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
