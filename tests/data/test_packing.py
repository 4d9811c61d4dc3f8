"""Packing rows into fixed buffers (gemmatune.data.packing): the algorithm's invariants and the
tensors of a packed micro-batch. The model side (each row attending only to itself, the loss
equal to the rows run one at a time) is tests/training/test_packed_training.py."""
import itertools
import math
import random

import pytest
import torch

from gemmatune.data.packing import (
    best_fit_decreasing,
    collate_packed,
    pack_length,
    packed_micro_batches,
    plan_epoch,
    rows_per_buffer,
    token_counts,
)
from gemmatune.errors import TrainingSetupError
from tests.helpers import random_rows


def chat_lengths(n, seed=0):
    """The issue's chat mix: log-normal, median 450 tokens, sigma 0.9, clipped to 48..2048."""
    rng = random.Random(seed)
    return [min(2048, max(48, round(math.exp(math.log(450) + 0.9 * rng.gauss(0, 1))))) for _ in range(n)]


def rows_of_lengths(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(20, 300, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [t if i % 3 else -100 for i, t in enumerate(ids)]})
    return rows


def test_best_fit_decreasing_puts_each_row_where_it_fits_tightest():
    # 5 opens bin 0 (3 left), 4 opens bin 1 (4 left); the first 3 fits bin 0 exactly (tighter than
    # bin 1's 4), the second 3 goes to bin 1; the 1 finds bin 1's last token.
    assert best_fit_decreasing([5, 4, 3, 3, 1], capacity=8, max_rows=8) == [[0, 2], [1, 3, 4]]
    assert best_fit_decreasing([2, 2, 2], capacity=8, max_rows=2) == [[0, 1], [2]]  # the row cap
    assert best_fit_decreasing([], capacity=8, max_rows=2) == []
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing([9], capacity=8, max_rows=2)


@pytest.mark.parametrize("capacity", [2048, 700])
def test_an_epoch_holds_every_row_once_within_capacity_and_nearly_full(capacity):
    lengths = [min(n, capacity) for n in chat_lengths(5000)]
    order = list(range(len(lengths)))
    random.Random(1).shuffle(order)
    buffers = plan_epoch(lengths, order, capacity, rows_per_buffer(capacity), random.Random(1), window=1000)
    assert sorted(itertools.chain(*buffers)) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity and 0 < len(b) <= rows_per_buffer(capacity) for b in buffers)
    position = {row: k for k, row in enumerate(order)}
    assert all(b == sorted(b, key=position.get) for b in buffers)  # a buffer keeps the shuffled order
    padding = 1 - sum(lengths) / (len(buffers) * capacity)
    assert padding < 0.03, padding  # padded batches of 2 rows waste about a third on this mix


def test_packed_micro_batches_keep_one_shape_and_split_between_ranks_like_rows():
    rows = rows_of_lengths([64, 60, 50, 12, 40, 17, 5, 33])  # 281 tokens: 5 buffers of 64 (best fit)
    one = list(itertools.islice(packed_micro_batches(rows, 2, 64, 0, seed=7), 9))
    assert {tuple(b["input_ids"].shape) for b in one} == {(2, 64)}
    assert len({len(b["cu_seq_lens"]) for b in one}) == 1
    again = list(itertools.islice(packed_micro_batches(rows, 2, 64, 0, seed=7), 9))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(one, again))  # deterministic: resumable
    for epoch in (one[:3], one[3:6], one[6:9]):  # every row once; the 6th buffer is an empty filler
        assert sum(token_counts(b)[0] for b in epoch) == 281
        assert (epoch[-1]["document_ids"][1] == -1).all() and (epoch[-1]["document_ids"][0] >= 0).any()
    assert not torch.equal(one[0]["input_ids"], one[3]["input_ids"])  # each epoch its own order
    two = [list(itertools.islice(packed_micro_batches(rows, 1, 64, 0, seed=7, rank=r, world=2), 9)) for r in (0, 1)]
    for k, batch in enumerate(one):  # rank r holds buffer r of what one process would train
        for r in (0, 1):
            assert torch.equal(two[r][k]["input_ids"][0], batch["input_ids"][r])


def test_collate_packed_restarts_positions_and_marks_documents():
    rows = rows_of_lengths([5, 3, 8, 2])
    rows[1]["labels"] = list(rows[1]["input_ids"])  # every token labelled, the first too
    batch = collate_packed([rows[:2], rows[2:3], [], rows[3:]], pad_token_id=0, length=8, max_rows=3)
    assert batch["input_ids"].shape == (4, 8)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], list(range(8)), list(range(8)),
                                              [0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch["document_ids"].tolist() == [[0] * 5 + [1] * 3, [0] * 8, [-1] * 8, [0, 0] + [-1] * 6]
    # a row's first token is never a target, alone or packed: here it would be row 0's last token's
    assert batch["labels"][0, 5] == -100 and batch["labels"][0, 6:].tolist() == rows[1]["labels"][1:]
    assert (batch["labels"][2] == -100).all() and (batch["input_ids"][2] == 0).all()
    assert batch["labels"][3, 2:].eq(-100).all()
    # document starts in the flattened micro-batch: a full buffer has no padding document,
    # unused slots repeat the total; 4 buffers x (3 rows + padding) slots
    assert batch["cu_seq_lens"].tolist() == [0, 5, 8, 16, 24, 26, 32] + [32] * 10
    assert batch["cu_seq_lens"].dtype == torch.int32
    assert token_counts(batch) == (18, 32)
    with pytest.raises(ValueError, match="do not fit"):
        collate_packed([rows[:3]], pad_token_id=0, length=8)


def test_cu_seq_lens_agree_with_document_ids():
    rows = random_rows(30, seed=4, min_len=2, max_len=60)
    lengths = [len(r["input_ids"]) for r in rows]
    buffers = plan_epoch(lengths, list(range(30)), 64, rows_per_buffer(64), random.Random(0))
    batch = collate_packed([[rows[i] for i in b] for b in buffers], pad_token_id=0, length=64)
    flat_docs = batch["document_ids"] + 1000 * torch.arange(len(buffers))[:, None]  # documents of all buffers
    starts = torch.cat([torch.tensor([0]), (flat_docs.flatten()[1:] != flat_docs.flatten()[:-1]).nonzero()[:, 0] + 1])
    cu = batch["cu_seq_lens"].tolist()
    total = batch["input_ids"].numel()
    assert cu[:len(starts)] == starts.tolist() and set(cu[len(starts):]) == {total}
    assert (batch["position_ids"].flatten()[starts] == 0).all()


def test_pack_length():
    rows = rows_of_lengths([5, 70])
    assert pack_length(rows, True) == 128  # a plain list: the longest row, rounded up
    assert pack_length(rows, 100, multiple=8) == 104

    def prepared(max_seq_length):
        class Prepared(list):  # what prepare_dataset returns carries its max_seq_length
            pass
        dataset = Prepared(rows)
        dataset.max_seq_length = max_seq_length
        return dataset

    assert pack_length(prepared(100), True) == 128  # the length memory was sized for
    assert pack_length(prepared(2048), True) == 192  # but at most two of the longest rows (140)
    for wrong in (64, "yes", 1.5):
        with pytest.raises(TrainingSetupError, match="at least 70, the longest row"):
            pack_length(rows, wrong)


def test_token_counts_of_padded_batches():
    from gemmatune.data.batches import collate

    batch = collate(rows_of_lengths([5, 9]), pad_token_id=0, pad_to_multiple_of=8)
    assert token_counts(batch) == (14, 32)


def test_prefetched_keeps_the_order_raises_where_the_error_was_and_stops_when_closed():
    import threading

    from gemmatune.data.prefetch import prefetched

    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield from range(3)
        raise ValueError("row 4 is broken")

    got = prefetched(failing(), depth=8)
    assert [next(got) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="row 4 is broken"):
        next(got)

    endless = prefetched(itertools.count(), depth=2)
    assert next(endless) == 0
    endless.close()  # what dropping train()'s micro-batches does
    for thread in threading.enumerate():
        if thread.name == "gemmatune-prefetch":
            thread.join(timeout=2)
    assert not any(t.name == "gemmatune-prefetch" and t.is_alive() for t in threading.enumerate())
