"""Row gather (the per-layer-embedding rows of generated tokens): equal to index_select bit for
bit, on odd widths, every dtype (a pure copy), int32/int64 ids, repeated and out-of-range ids.

TRITON_INTERPRET is read when @triton.jit decorates a kernel (first import of the kernel
module), so it is set here before that import, and only where there is no GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from gemmatune.kernels import row_gather  # noqa: E402
from tests.kernels.helpers import gpu  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, width, n_ids", [(50, 1, 3), (37, 1023, 5), (9, 2500, 1), (300, 64, 17)])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_gather_equals_index_select(poison_empty, dtype, rows, width, n_ids, id_dtype):
    g = torch.Generator().manual_seed(rows + width)
    table = torch.randn(rows, width, generator=g).to(dtype)
    ids = torch.randint(0, rows, (n_ids,), generator=g, dtype=torch.int64).to(id_dtype)
    ids[0] = ids[-1]  # a repeated id
    out = torch.empty(n_ids, width, dtype=dtype)
    assert row_gather.can_gather_on_device(table, torch.device("cpu"))  # the interpreter, here
    got = row_gather.gather_rows(table, ids, out)
    assert got is out and torch.equal(got, torch.index_select(table, 0, ids.long()))


def test_strided_table_rows_and_clamped_ids():
    table = torch.randn(20, 48)[:, :40]  # rows of 40 in a stride of 48
    ids = torch.tensor([0, 19, 25, -3])
    got = row_gather.gather_rows_forward(table, ids, torch.empty(4, 40))
    assert torch.equal(got, table[ids.clamp(0, 19)])  # a kernel cannot raise: ids are clamped to the table


def test_refuses_what_it_cannot_read(monkeypatch):
    table = torch.randn(8, 16)
    with pytest.raises(ValueError, match="out must be"):
        row_gather.gather_rows_forward(table, torch.tensor([1]), torch.empty(1, 15))
    monkeypatch.setenv("GEMMATUNE_KERNELS", "0")
    assert not row_gather.can_gather_on_device(table, torch.device("cpu"))
    assert torch.equal(row_gather.gather_rows(table, torch.tensor([3, 1]), torch.empty(2, 16)), table[[3, 1]])


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_reads_the_pinned_cpu_table_without_the_host(dtype):
    """The E2B-width table in pinned CPU memory, ids on the GPU; captured in a CUDA graph and
    replayed with new ids, as a decode step does."""
    table = torch.randn(4096, 8960).to(dtype).pin_memory()
    assert row_gather.can_gather_on_device(table, torch.device("cuda"))
    ids = torch.tensor([7], device="cuda")
    out = torch.empty(1, 8960, dtype=dtype, device="cuda")
    row_gather.gather_rows(table, ids, out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        row_gather.gather_rows(table, ids, out)
    for token in (3, 4095, 17):
        ids.fill_(token)
        graph.replay()
        assert torch.equal(out.cpu(), table[token:token + 1])
    assert not row_gather.can_gather_on_device(torch.randn(4, 4), torch.device("cuda"))  # pageable: no
