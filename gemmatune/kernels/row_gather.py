"""Row gather from a table that may live in pinned CPU memory, driven by token ids on the GPU.

    out[i, :] = table[ids[i], :]

Why: Gemma 4's per-layer-embedding table (E2B: 262144 x 8960 in bf16, 4.4 GiB) stays in CPU
memory (gemmatune.model.ple). Generating one token needs one row of it (17.5 KiB), and the token id is
the GPU's own argmax. Gathering on the CPU means the host waits for the GPU every token, which
rules out replaying decode steps as a CUDA graph. Pinned CPU memory is mapped into the GPU's
address space (CUDA unified addressing: memory from cudaHostAlloc, which torch's pin_memory
uses, can be read by kernels), so this kernel reads the row straight over PCIe: a few
microseconds, no host involvement, and capturable in a graph.

Triton's launcher translates the pinned host pointer into its device alias
(cuPointerGetAttribute); a pageable CPU tensor is refused there ("cannot be accessed from
Triton"), which `can_gather_on_device` checks before anyone relies on it.

A pure copy: no arithmetic, so every dtype is exact (the interpreter's bf16 arithmetic bug does
not apply). `gather_rows_reference` is torch.index_select.
"""
import torch
import triton
import triton.language as tl

from ._backend import interpreter_on, kernels_enabled

BLOCK = 1024  # elements of a row per program: E2B's 8960-wide rows take 9 programs


@triton.jit
def _gather_rows_kernel(TABLE, IDS, OUT, n_cols, n_rows_table, stride_table, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    index = tl.load(IDS + row).to(tl.int64)
    index = tl.minimum(tl.maximum(index, 0), n_rows_table - 1)  # never read outside the table
    mask = cols < n_cols
    values = tl.load(TABLE + index * stride_table + cols, mask=mask)
    tl.store(OUT + row.to(tl.int64) * stride_out + cols, values, mask=mask)


def gather_rows_reference(table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    rows = torch.index_select(table, 0, ids.reshape(-1).to(table.device))
    if out is None:
        return rows
    return out.copy_(rows)


def gather_rows_forward(table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Launch the kernel: table (V, D) row-contiguous, ids (N,) integer, out (N, D) of table's dtype."""
    ids = ids.reshape(-1)
    if table.dim() != 2 or table.stride(1) != 1:
        raise ValueError(f"table must be 2-D with contiguous rows, got shape {tuple(table.shape)}")
    if out.shape != (ids.numel(), table.shape[1]) or out.dtype != table.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be ({ids.numel()}, {table.shape[1]}) {table.dtype} with contiguous rows, "
                         f"got {tuple(out.shape)} {out.dtype}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be int32 or int64, got {ids.dtype}")
    if ids.numel() == 0:
        return out
    grid = (ids.numel(), triton.cdiv(table.shape[1], BLOCK))
    _gather_rows_kernel[grid](table, ids.contiguous(), out, table.shape[1], table.shape[0], table.stride(0),
                              out.stride(0), BLOCK=BLOCK, num_warps=4)
    return out


_PROBED: dict[tuple, bool] = {}


def can_gather_on_device(table: torch.Tensor, device: torch.device) -> bool:
    """The kernel can read `table` from a kernel running on `device`: the table is on that GPU,
    or pinned in CPU memory (the interpreter reads any CPU tensor, for the tests). A pinned table
    is also tried once (its first and last rows): a driver or build that does not map pinned
    memory for kernels then means "no" instead of a failed generation."""
    if not kernels_enabled():
        return False
    device = torch.device(device)
    if device.type != "cuda":
        return interpreter_on() and device.type == "cpu" and table.device.type == "cpu"
    if table.is_cuda:
        return True
    if table.device.type != "cpu" or not table.is_pinned() or table.dim() != 2 or table.shape[0] == 0:
        return False
    key = (table.data_ptr(), tuple(table.shape), table.dtype, str(device))
    if key not in _PROBED:
        _PROBED[key] = _reads_pinned_rows(table, device)
    return _PROBED[key]


def _reads_pinned_rows(table: torch.Tensor, device: torch.device) -> bool:
    try:
        ids = torch.tensor([0, table.shape[0] - 1], device=device)
        out = torch.empty((2, table.shape[1]), dtype=table.dtype, device=device)
        gather_rows_forward(table, ids, out)
        return torch.equal(out.cpu(), table[[0, -1]])
    except Exception:  # not readable from the GPU: callers gather through the host instead
        return False


def gather_rows(table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i] = table[ids[i]], on ids' device without the host: see the module docstring.
    Ids outside the table are clamped to it (a kernel cannot raise)."""
    if can_gather_on_device(table, ids.device):
        return gather_rows_forward(table, ids, out)
    return gather_rows_reference(table, ids, out)
