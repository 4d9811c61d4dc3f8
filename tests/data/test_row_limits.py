"""A row of any size costs bounded work, without changing the tokens of rows that fit; a huge image in
memory is shrunk once; a medium that only decoding shows to be broken is caught by prepare_dataset."""
import io
import json

import numpy as np
import pytest
from PIL import Image

import gemmatune.data.dataset as data_dataset
import gemmatune.data.images as data_images
from gemmatune.data.messages import row_to_conversation
from gemmatune.data.rows import bundled_dataset_path
from gemmatune.data.tokens import tokenize_conversation


class CountingTokenizer:
    """The tokenizer, recording the longest text it was asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def _row(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _uncut(tokenizer, row, max_seq_length):
    messages, tools = row_to_conversation(row, "row", None)
    return tokenize_conversation(tokenizer, messages, max_seq_length, tools=tools)


def test_a_huge_row_costs_a_few_times_max_seq_length_of_tokeniser_work(tiny_tokenizer):
    """10 MB of text took 1.8 GB in the tokenizer, 3 GB aborted it; now the text is cut first."""
    counting = CountingTokenizer(tiny_tokenizer)
    huge = _row("Tell a long story.", "the quick brown fox jumps over the lazy dog " * 25_000)  # 1.1 MB
    prepared = data_dataset.prepare_dataset([huge], counting, max_seq_length=256)
    budget = data_dataset.FIRST_CUT_CHARS_PER_TOKEN * (256 + data_dataset.CUT_MARGIN_TOKENS)
    assert counting.longest <= 4 * budget  # at most one retry for this text; 1.1 MB without the cut
    assert prepared.rows_truncated == 1 and len(prepared[0]["input_ids"]) == 256
    assert prepared[0]["input_ids"] == _uncut(tiny_tokenizer, huge, 256)["input_ids"]  # the same kept tokens


@pytest.mark.parametrize("max_seq_length", [16, 48, 128, 512])
def test_rows_keep_exactly_their_tokens(tiny_tokenizer, max_seq_length):
    rows = [json.loads(line) for line in bundled_dataset_path().read_text(encoding="utf-8").splitlines()[:120]]
    prepared = data_dataset.prepare_dataset(rows, tiny_tokenizer, max_seq_length=max_seq_length)
    kept = iter(prepared.examples)
    for row in rows:
        tokens = _uncut(tiny_tokenizer, row, max_seq_length)
        if any(label != -100 for label in tokens["labels"]):
            assert next(kept)["input_ids"] == tokens["input_ids"]


def test_a_row_that_fits_is_never_cut_even_with_many_characters_per_token(tiny_tokenizer):
    words = [tiny_tokenizer.convert_tokens_to_string([t]) for t in tiny_tokenizer.get_vocab() if t.startswith("Ġ")]
    word = max((w for w in words if w[1:].isalpha()), key=len)  # " backwards": one token of 10 characters
    row = _row("Repeat.", word * 700)
    tokens = _uncut(tiny_tokenizer, row, 10_000)
    max_seq_length = tokens["length"]  # the row just fits
    first_cut = data_dataset.FIRST_CUT_CHARS_PER_TOKEN * (max_seq_length + data_dataset.CUT_MARGIN_TOKENS)
    assert len(word) * 700 > first_cut, "the first cut must fall inside this row for the test to mean anything"
    prepared = data_dataset.prepare_dataset([row], tiny_tokenizer, max_seq_length=max_seq_length)
    assert prepared.rows_truncated == 0 and prepared[0]["input_ids"] == tokens["input_ids"]


def test_the_cut_falls_on_whitespace_and_drops_everything_after_it():
    messages = [{"role": "user", "content": "one two three four"}, {"role": "assistant", "content": "five six"}]
    cut = data_dataset.cut_conversation(messages, 10)
    assert cut == [{"role": "user", "content": "one two"}]
    assert data_dataset.cut_conversation(messages, 1000) is None


def test_a_huge_image_in_memory_is_shrunk_once_at_prepare_time():
    """A 20000 x 20000 image was decoded and resized again on every step (RSS 0.9 -> 5.1 GiB)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((2400, 2400), Image.NEAREST)
    ref = data_images.inspect_image(image, 70, "row 1: image 1")
    target_h, target_w = data_images.image_target_size(2400, 2400, 70)
    assert (ref.height, ref.width) == (2400, 2400) and ref.source.size == (2 * target_w, 2 * target_h)
    shrunk, _ = data_images.image_patches(data_images.load_image(ref), 70, (ref.height, ref.width))
    full, _ = data_images.image_patches(data_images.to_rgb(image), 70)
    assert np.abs(shrunk - full).mean() < 0.02  # what the model sees barely changes


def test_a_truncated_png_is_caught_when_bad_rows_are_skipped(tiny_tokenizer, tmp_path):
    """As the notebooks call it: a cut-off file used to pass and stop training at its batch."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    (tmp_path / "good.png").write_bytes(data)
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])  # the header is intact
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": name}]},
                          {"role": "assistant", "content": "noise"}]} for name in ("good.png", "cut.png")]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = data_dataset.prepare_dataset(tmp_path / "rows.jsonl", tiny_tokenizer, max_soft_tokens=70,
                                            skip_bad_rows=True)
    assert prepared.rows == 1 and prepared.rows_skipped == {"corrupt image": 1} and prepared.media_verified
    assert "line 2: image 1: the image cannot be decoded" in prepared.report()
