"""Prepared rows -> packed buffers: rows of any length back to back in fixed token buffers.

Why: padding each micro-batch to its longest row wastes the padding's compute (on chat data
with a log-normal length mix, about a third of the tokens at batch 2) and gives a new batch
shape, so a new CUDA-graph capture, for almost every length. Packed, a run has one batch shape:
`buffers` rows of `length` tokens, each holding whole rows back to back and padding only at its
end. Rows are never split: a row attends only to itself, as if it were trained alone.

What a packed micro-batch holds besides input_ids and labels (collate_packed):
    position_ids  (buffers, length) restart at 0 at every row: both RoPE kinds read them;
    document_ids  (buffers, length) the row's index in its buffer, -1 on the padding, which is
                  one more document (it attends only to itself, so nothing is 0/0);
    cu_seq_lens   (slots + 1,) int32: where each document starts in the flattened micro-batch
                  (FlashAttention's "varlen" layout), always `slots + 1` long so the shape never
                  changes: unused slots repeat the total. slots = buffers x (max_rows + 1).
The first label of every row is set to -100: alone, a row's first token is never a target (the
loss shifts labels left), packed it would be the previous row's last token's target.
Images and audio: every row's media in the buffer order, decoded once (batches.collate_media),
so the towers' soft tokens land in their own row's placeholders.

How rows are packed (plan_epoch): each epoch shuffles the rows (the same shuffle as unpacked
training), then packs each window of PACKING_WINDOW rows best-fit decreasing (longest row first,
into the buffer it fills most tightly), then shuffles that window's buffers: the long rows do not
all come first, and near-full buffers (a few % padding on chat-length mixes) come from a window
rather than the whole dataset, so the work stays linear in the dataset. The last micro-batch of an
epoch is filled up with empty buffers, so the shape stays the same.
"""
import bisect
import random

from gemmatune.data.batches import collate_media
from gemmatune.data.tokens import IGNORE_INDEX
from gemmatune.errors import TrainingSetupError

PACKING_WINDOW = 2048  # rows packed together: large enough for near-full buffers, small enough to stay fast
MIN_ROWS_PER_BUFFER = 8
TOKENS_PER_ROW_SLOT = 64  # a buffer of L tokens holds at most max(8, L // 64) rows (see rows_per_buffer)


def rows_per_buffer(length: int) -> int:
    """The most rows one buffer of `length` tokens may hold. Fixed per run because the attention's
    document table (cu_seq_lens) has a fixed number of slots; each slot costs FlashAttention's
    backward a 128-row workspace, so it is not made larger than real data needs (chat rows are
    rarely shorter than 64 tokens; shorter ones pack a little less densely)."""
    return max(MIN_ROWS_PER_BUFFER, length // TOKENS_PER_ROW_SLOT)


def row_lengths(dataset) -> list[int]:
    """Every row's token count. A dataset that can tell them without reading its rows (training's
    view of undecoded media, gemmatune.training.row_check) is asked for them: reading would decode."""
    if hasattr(dataset, "lengths"):
        return dataset.lengths()
    return [len(example["input_ids"]) for example in dataset]


def pack_length(dataset, packing, multiple: int = 64) -> int:
    """The tokens in one buffer, rounded up to `multiple`.

    packing=True: the dataset's max_seq_length (the length the run's memory was sized for:
    load_model, check_fits and predict_peak_gib take batch_size x max_seq_length), but no more than
    twice the longest row: rows much shorter than max_seq_length would otherwise make a step many
    times the tokens of a padded one (a whole small dataset in one step). Never shorter than the
    longest row. For a plain list of rows (no max_seq_length): the longest row. An int: that many
    tokens, at least the longest row.

    Raises:
        TrainingSetupError: packing is neither True nor a whole number of tokens at least as long as
            the longest row.
    """
    longest = max(row_lengths(dataset))
    if packing is True:
        limit = getattr(dataset, "max_seq_length", None) or longest
        length = max(longest, min(limit, 2 * longest))
    elif isinstance(packing, int) and not isinstance(packing, bool) and packing >= longest:
        length = packing
    else:
        raise TrainingSetupError(f"packing={packing!r}: use True (buffers sized from max_seq_length), False (pad "
                                 f"each micro-batch), or a number of tokens per buffer of at least {longest}, the "
                                 "longest row (rows are never split)")
    return -(-length // multiple) * multiple


def best_fit_decreasing(lengths: list[int], capacity: int, max_rows: int) -> list[list[int]]:
    """Bins of indices into `lengths`: longest first, each into the open bin with the least room
    that still fits it (a new bin when none does); a bin takes at most `max_rows` items. Equal
    lengths keep their order, so the result depends only on the input order.

    Raises:
        ValueError: an item longer than `capacity` (rows are never split).
    """
    if lengths and max(lengths) > capacity:
        raise ValueError(f"a row of {max(lengths)} tokens does not fit a buffer of {capacity}")
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, bin index) of the bins that can take more, sorted
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[item]
        at = bisect.bisect_left(room, (size, -1))
        if at == len(room):
            bins.append([item])
            left, index = capacity - size, len(bins) - 1
        else:
            left, index = room.pop(at)
            bins[index].append(item)
            left -= size
        if len(bins[index]) < max_rows and left > 0:
            bisect.insort(room, (left, index))
    return bins


def plan_epoch(lengths: list[int], order: list[int], capacity: int, max_rows: int, rng: random.Random,
               window: int = PACKING_WINDOW) -> list[list[int]]:
    """One epoch's buffers: row indices (in `order`'s order within a buffer), every row once."""
    buffers = []
    for start in range(0, len(order), window):
        rows = order[start:start + window]
        packed = best_fit_decreasing([lengths[i] for i in rows], capacity, max_rows)
        window_buffers = [[rows[j] for j in sorted(b)] for b in packed]
        rng.shuffle(window_buffers)
        buffers += window_buffers
    return buffers


def packed_micro_batches(dataset, buffers: int, length: int, pad_token_id: int, seed: int, rank: int = 0,
                         world: int = 1):
    """Endless packed micro-batches of `buffers` x `length` tokens; each epoch reshuffles with its
    own seed (seed + epoch). With several processes every rank walks the same buffers in global
    micro-batches of `world * buffers` and collates its own `buffers` of them (rank r takes
    buffers r*b to r*b+b-1), as gemmatune.training.trainer.micro_batches does with rows.
    `dataset` may give None for a row that cannot be used (training's check of undecodable media):
    that row is left out of its buffer."""
    lengths = row_lengths(dataset)
    max_rows = rows_per_buffer(length)
    size, epoch = buffers * world, 0
    while True:
        rng = random.Random(seed + epoch)
        order = list(range(len(dataset)))
        rng.shuffle(order)
        planned = plan_epoch(lengths, order, length, max_rows, rng)
        planned += [[] for _ in range(-len(planned) % size)]  # empty buffers: the shape stays the same
        for i in range(0, len(planned), size):
            mine = planned[i + rank * buffers:i + (rank + 1) * buffers]
            rows_of = [[row for row in (dataset[j] for j in rows) if row is not None] for rows in mine]
            yield collate_packed(rows_of, pad_token_id, length, max_rows)
        epoch += 1


def collate_packed(buffers: list[list[dict]], pad_token_id: int, length: int, max_rows: int | None = None) -> dict:
    """Rows -> one packed micro-batch (see the module docstring for the keys).

    Args:
        buffers: for each buffer, its rows (prepared examples: input_ids, labels, media...);
            an empty list is a buffer of padding only.
        pad_token_id: the id padding positions hold. length: tokens per buffer.
        max_rows: rows one buffer may hold (default rows_per_buffer(length)): fixes cu_seq_lens' size.

    Returns:
        input_ids, labels, position_ids, document_ids (buffers, length) int64; cu_seq_lens int32;
        and, when rows hold images or audio, the media tensors of batches.collate_media.

    Raises:
        ValueError: a buffer's rows exceed `length` tokens or `max_rows` rows.
    """
    import torch

    max_rows = max_rows or rows_per_buffer(length)
    n = len(buffers)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    document_ids = torch.full((n, length), -1, dtype=torch.long)
    ends = []  # where each document ends in the flattened micro-batch
    for b, rows in enumerate(buffers):
        if len(rows) > max_rows or sum(len(row["input_ids"]) for row in rows) > length:
            raise ValueError(f"buffer {b}: {len(rows)} rows of {sum(len(r['input_ids']) for r in rows)} tokens do "
                             f"not fit {max_rows} rows of {length} tokens")
        start = 0
        for d, row in enumerate(rows):
            end = start + len(row["input_ids"])
            input_ids[b, start:end] = torch.tensor(row["input_ids"], dtype=torch.long)
            labels[b, start + 1:end] = torch.tensor(row["labels"][1:], dtype=torch.long)
            position_ids[b, start:end] = torch.arange(end - start)
            document_ids[b, start:end] = d
            ends.append(b * length + end)
            start = end
        if start < length:  # the padding: one more document, positions restarting too
            position_ids[b, start:] = torch.arange(length - start)
            ends.append((b + 1) * length)
    slots = n * (max_rows + 1)
    cu_seq_lens = torch.full((slots + 1,), n * length, dtype=torch.int32)
    cu_seq_lens[0] = 0
    cu_seq_lens[1:len(ends) + 1] = torch.tensor(ends, dtype=torch.int32)
    out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "document_ids": document_ids,
           "cu_seq_lens": cu_seq_lens}
    rows = [row for buffer in buffers for row in buffer]
    if any(row.get("media") for row in rows):
        out.update(collate_media(rows, input_ids))
    return out


def token_counts(batch: dict) -> tuple[int, int]:
    """(tokens of rows, tokens computed) of one micro-batch, packed or padded: the dashboard's
    useful tokens and padding fraction."""
    computed = batch["input_ids"].numel()
    if "document_ids" in batch:
        return int((batch["document_ids"] >= 0).sum()), computed
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum()), computed
    return computed, computed
