"""Per-layer embeddings (PLE) kept in CPU memory: a row lookup never needs the GPU.

Gemma 4's E-series models add, at every decoder layer, a 256-wide embedding of the token
(`embed_tokens_per_layer`, shape vocab x layers*256). On E2B the table holds 2.35 B params
(4.4 GiB in bf16), more than the whole quantised rest of the model, and bitsandbytes never
quantises it. A training step only needs the rows of the tokens in the batch: 2048 tokens
x 35 layers x 256 x 2 bytes = 36 MiB. `HostEmbedding` keeps the table in (pinned) CPU
memory, gathers the batch's rows on the CPU and copies them to the GPU asynchronously.

It is numerically identical to transformers' `Gemma4TextScaledWordEmbedding`: the same
rows times `embed_scale` cast to the table's dtype.
"""
import json
from pathlib import Path

import torch
from torch import nn


class HostEmbedding(nn.Module):
    """`Gemma4TextScaledWordEmbedding` whose table lives in CPU memory (not a parameter,
    so `model.to("cuda")` and `from_pretrained(device_map=...)` leave it where it is)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, embed_scale: float):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.scalar_embed_scale = embed_scale
        self.table: torch.Tensor | None = None
        self.scale = embed_scale  # rounded to the table's dtype in load_table
        # Inside a CUDA-graph capture the rows come from a pinned buffer that the caller fills
        # (gemmatune.training.step): the capture records the copy from it, not the CPU gather.
        self.staged: torch.Tensor | None = None

    def load_table(self, table: torch.Tensor) -> None:
        if tuple(table.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"per-layer embedding table has shape {tuple(table.shape)}, "
                             f"expected {(self.num_embeddings, self.embedding_dim)}")
        table = table.to("cpu").contiguous()
        if torch.cuda.is_available():
            try:  # pinned memory makes the host-to-GPU copy asynchronous
                table = table.pin_memory()
            except RuntimeError:  # not enough pinnable memory: pageable still works, a bit slower
                pass
        self.table = table
        # embed_scale rounded to the table's dtype, as transformers multiplies by it
        self.scale = float(torch.tensor(self.scalar_embed_scale, dtype=torch.float32).to(table.dtype))

    @property
    def weight(self) -> torch.Tensor:
        return self.table

    def gather(self, input_ids_cpu: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The unscaled rows of these ids, gathered on the CPU (into `out` if given)."""
        if self.table is None:
            raise RuntimeError("per-layer embedding table not loaded: use gemmatune.load_model()")
        ids = input_ids_cpu.reshape(-1)
        if out is None:
            out = torch.empty((ids.numel(), self.embedding_dim), dtype=self.table.dtype,
                              pin_memory=torch.cuda.is_available())
        return torch.index_select(self.table, 0, ids, out=out)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.staged is not None:
            rows = self.staged
        else:
            rows = self.gather(input_ids.to("cpu"))  # the GPU waits here for the ids (a few KiB)
        rows = rows.to(input_ids.device, non_blocking=True)
        return (rows * self.scale).view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        where = "not loaded" if self.table is None else f"{self.table.dtype} on cpu, pinned={self.table.is_pinned()}"
        return f"{self.num_embeddings}, {self.embedding_dim}, {where}"


def use_host_embedding(text_model: nn.Module) -> None:
    """Swap a Gemma4TextModel's PLE table for a HostEmbedding (called before weights load)."""
    old = text_model.embed_tokens_per_layer
    text_model.embed_tokens_per_layer = HostEmbedding(
        old.num_embeddings, old.embedding_dim, float(old.scalar_embed_scale))


def find_checkpoint_tensor(checkpoint: str, key_suffix: str, **hub_kwargs) -> tuple[str, Path]:
    """(full key, file) of the one tensor in a safetensors checkpoint whose key ends with `key_suffix`."""
    from transformers.utils import cached_file

    index = cached_file(checkpoint, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False,
                        **hub_kwargs)
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        names = {k: v for k, v in weight_map.items() if k.endswith(key_suffix)}
    else:
        from safetensors import safe_open

        single = cached_file(checkpoint, "model.safetensors", **hub_kwargs)
        with safe_open(single, "pt") as f:
            names = {k: Path(single).name for k in f.keys() if k.endswith(key_suffix)}
    if len(names) != 1:
        raise KeyError(f"expected one tensor ending in {key_suffix!r} in {checkpoint}, found {sorted(names)}")
    key, filename = next(iter(names.items()))
    return key, Path(cached_file(checkpoint, filename, **hub_kwargs))


def load_host_table(module: HostEmbedding, checkpoint: str, dtype: torch.dtype, **hub_kwargs) -> None:
    """Read the PLE table straight from the checkpoint file into CPU memory."""
    from safetensors import safe_open

    key, path = find_checkpoint_tensor(checkpoint, "embed_tokens_per_layer.weight", **hub_kwargs)
    with safe_open(str(path), "pt", device="cpu") as f:
        module.load_table(f.get_tensor(key).to(dtype))
