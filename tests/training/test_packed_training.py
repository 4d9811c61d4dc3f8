"""Packed micro-batches train exactly what the same rows train one at a time (tiny model, CPU, fp32).

Exactness: the loss (divided by the label tokens of the whole step) and every LoRA gradient of a
packed micro-batch equal those of its rows run alone, one micro-batch each, within fp32's rounding;
for text rows (kernels on: gemmatune's attention with the rows' documents; kernels off: the
block-diagonal masks stock attention takes), image rows and audio rows. The buffers include a row
that ends exactly at the buffer's edge, rows longer than the sliding window (16 on the tiny model),
a buffer holding one row, and rows labelled from their first token. Then: each break the packing
guards against (rows seeing each other in the full or the sliding layers, a row's first token as
the previous row's target) moves the result far beyond those tolerances, so the comparison can fail.
Positions are checked where they are used: RoPE is relative, so once rows are kept apart, positions
that run on across rows change the result only by rounding (9e-6 here, below the tolerance); what
reaches both RoPE kinds must therefore be each row's own positions, and is checked directly.
With packing on, train() resumes exactly and shows useful tokens/s and the padding fraction.
"""
import itertools
import json

import pytest
import torch

import gemmatune
import gemmatune.training.dashboard as training_dashboard
from gemmatune.data.batches import collate
from gemmatune.data.packing import collate_packed
from gemmatune.model import attention as model_attention
from gemmatune.model.towers import multimodal_model
from gemmatune.training.loss import causal_lm_loss, count_label_tokens
from gemmatune.training.step import MicroStep
from tests.helpers import assert_rel_close, fine_tuned, lora_grads

LOSS_FLOOR, GRAD_FLOOR = 1e-5, 1e-4  # fp32 in another order and shape: the tolerances of tests/model/test_patching.py
BROKEN = 1e-3  # what a packing mistake moves the loss or a gradient by, at least (measured: 0.7 to 1.6)
WINDOW = 16    # the tiny model's sliding window


def text_rows(lengths, seed=0, labelled_from_start=()):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for k, n in enumerate(lengths):
        ids = torch.randint(20, 300, (n,), generator=gen).tolist()
        labels = ids if k in labelled_from_start else [-100 if i < n // 3 else t for i, t in enumerate(ids)]
        rows.append({"input_ids": ids, "labels": list(labels)})
    return rows


def text_buffers():
    """4 buffers of 64 tokens: two rows filling a buffer exactly (the second labelled from its first
    token), two rows and padding, one row alone, and an empty buffer; every row but two longer than
    the window."""
    rows = text_rows([40, 24, 50, 9, 30], labelled_from_start=(1,))
    return [rows[0:2], rows[2:4], rows[4:5], []], 64


def one_at_a_time(model, rows):
    """Loss and LoRA gradients of each row alone (its own micro-batch, no padding), summed over the
    rows and divided by their label tokens, as one optimizer step of them would be."""
    batches = [collate([row], pad_token_id=0) for row in rows]
    normalizer = count_label_tokens(batches)
    model.zero_grad(set_to_none=True)
    losses = []
    for batch in batches:
        loss = causal_lm_loss(model, on_device(batch, model), normalizer=normalizer)
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses).sum(), lora_grads(model), normalizer


def packed(model, buffers, length, pad_token_id=0, breaks=lambda batch: batch):
    batch = breaks(collate_packed(buffers, pad_token_id, length))
    normalizer = count_label_tokens([batch])
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, on_device(batch, model), normalizer=normalizer)
    loss.backward()
    return loss.detach(), lora_grads(model), normalizer


def on_device(batch, model):
    device = next(p.device for p in model.parameters() if p.requires_grad)
    return {k: v.to(device) for k, v in batch.items()}


def assert_same(got, expected):
    assert got[2] == expected[2], "the packed batch counts other label tokens"
    assert_rel_close(got[0], expected[0], LOSS_FLOOR, "loss")
    assert got[1].keys() == expected[1].keys()
    for name in expected[1]:
        assert_rel_close(got[1][name], expected[1][name], GRAD_FLOOR, name)


def largest_difference(got, expected) -> float:
    errors = [(got[0] - expected[0]).abs() / expected[0].abs()]
    errors += [(got[1][n] - g).abs().max() / g.abs().max() for n, g in expected[1].items()]
    return float(max(errors))


@pytest.fixture(scope="module")
def stock_model(tiny_dir):
    """Kernels off (stock attention, PyTorch references: fast on a CPU), for the tests that need
    many steps; the kernels' own path is test_packed_text_rows_equal_the_rows_one_at_a_time[on]."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GEMMATUNE_KERNELS", "0")
        model, _ = fine_tuned(load_in_4bit=False)
    return model.train()


@pytest.fixture
def text_model(stock_model, monkeypatch):
    monkeypatch.setenv("GEMMATUNE_KERNELS", "0")
    return stock_model


@pytest.mark.parametrize("kernels", ["on", "off"])
def test_packed_text_rows_equal_the_rows_one_at_a_time(tiny_dir, monkeypatch, kernels):
    if kernels == "off":  # stock attention layers: block-diagonal masks in transformers' form
        monkeypatch.setenv("GEMMATUNE_KERNELS", "0")
    model, _ = fine_tuned(load_in_4bit=False)
    model.train()
    buffers, length = text_buffers()
    assert max(len(r["input_ids"]) for b in buffers for r in b) > 2 * WINDOW
    rows = [row for buffer in buffers for row in buffer]
    assert_same(packed(model, buffers, length), one_at_a_time(model, rows))


def test_a_micro_batch_of_one_buffer_with_one_row(text_model):
    row = text_rows([45], seed=3)
    assert_same(packed(text_model, [row], 64), one_at_a_time(text_model, row))


def keep_first_labels(rows_by_buffer):
    def breaks(batch):
        for b, rows in enumerate(rows_by_buffer):
            start = 0
            for row in rows:
                batch["labels"][b, start] = row["labels"][0]
                start += len(row["input_ids"])
        return batch
    return breaks


def rows_see_each_other(layer_kind):
    """PackedDocuments.mask without the documents for one layer kind (full: window None)."""
    real_mask = model_attention.PackedDocuments.mask

    def mask(self, window=None, additive_dtype=None):
        if (window is None) == (layer_kind == "full"):
            self = model_attention.PackedDocuments(torch.zeros_like(self.document_ids), self.cu_seq_lens)
        return real_mask(self, window, additive_dtype)
    return mask


@pytest.mark.parametrize("mistake", ["rows see each other in the full layers",
                                     "rows see each other in the sliding layers", "first label kept"])
def test_each_packing_mistake_is_far_beyond_the_tolerance(text_model, monkeypatch, mistake):
    buffers, length = text_buffers()
    rows = [row for buffer in buffers for row in buffer]
    expected = one_at_a_time(text_model, rows)
    breaks = lambda batch: batch  # noqa: E731
    if mistake == "first label kept":
        breaks = keep_first_labels(buffers)
    else:
        monkeypatch.setattr(model_attention.PackedDocuments, "mask", rows_see_each_other(mistake.split()[-2]))
    got = packed(text_model, buffers, length, breaks=breaks)
    assert largest_difference(got, expected) > BROKEN


@pytest.mark.parametrize("kind", ["text", "image"])
def test_both_rope_kinds_get_each_rows_own_positions(text_model, tiny_tokenizer, kind):
    if kind == "text":
        model, (buffers, length) = text_model, text_buffers()
        text = model.get_base_model().model
    else:  # the language model of an image model, run on the towers' embeddings
        model, tokenizer = fine_tuned(load_in_4bit=False, modalities=("text", "image"))
        rows = media_rows("image", 2, tokenizer)
        buffers, length = [rows], 256
        text = multimodal_model(model).language_model
    batch = collate_packed(buffers, 0, length)
    seen = []
    hook = text.rotary_emb.register_forward_hook(lambda module, args, output: seen.append((args[1], args[2])))
    try:
        with torch.no_grad():
            causal_lm_loss(model, batch, normalizer=1)
    finally:
        hook.remove()
    assert {kind for _, kind in seen} == {"full_attention", "sliding_attention"}
    assert all(torch.equal(positions, batch["position_ids"]) for positions, _ in seen)
    second_row = len(buffers[0][0]["input_ids"])
    assert batch["position_ids"][0, second_row] == 0  # the second row of the first buffer starts again


# ------------------------------------------------------------------ images and audio
def media_rows(kind, n, tokenizer):
    if kind == "image":
        rows = gemmatune.load_bundled_dataset("formulas", "train")[:n]
        fmt = gemmatune.image_to_text("Write the LaTeX.")
        return gemmatune.prepare_dataset(rows, tokenizer, max_seq_length=256, formatting_func=fmt,
                                         max_soft_tokens=70).examples
    rows = gemmatune.load_bundled_dataset("speech", "train")[:n]
    fmt = gemmatune.audio_to_text("Transcribe.")
    return gemmatune.prepare_dataset(rows, tokenizer, max_seq_length=256, formatting_func=fmt).examples


def count_tower_calls(model, kind):
    inner = multimodal_model(model)
    tower = inner.vision_tower if kind == "image" else inner.audio_tower
    calls = []

    def record(module, args, kwargs, output):  # how many images or clips this call took
        inputs = args[0] if args else kwargs.get("pixel_values", kwargs.get("input_features"))
        calls.append(inputs.shape[0])

    return calls, tower.register_forward_hook(record, with_kwargs=True)


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_packed_media_rows_equal_the_rows_one_at_a_time(tiny_dir, kind):
    model, tokenizer = fine_tuned(load_in_4bit=False, modalities=("text", kind))
    model.train()
    rows = media_rows(kind, 5, tokenizer)
    lengths = [len(r["input_ids"]) for r in rows]
    length = -(-(lengths[0] + lengths[1] + lengths[2]) // 8) * 8  # three rows in the first buffer
    buffers = [rows[:3], rows[3:]]
    assert sum(lengths[3:]) <= length and max(lengths) > WINDOW
    expected = one_at_a_time(model, rows)
    calls, handle = count_tower_calls(model, kind)
    try:
        got = packed(model, buffers, length, pad_token_id=tokenizer.pad_token_id)
    finally:
        handle.remove()
    assert calls == [5]  # one tower call, each image or clip in it once
    assert_same(got, expected)


# ------------------------------------------------------------------ the step and the loop
def test_every_packed_micro_batch_of_a_run_has_one_graph_key(text_model, tiny_dir):
    from gemmatune.data.packing import packed_micro_batches

    rows = text_rows([5, 40, 64, 17, 33, 3, 60, 28, 9, 50, 12, 22, 31, 8])
    step = MicroStep(text_model)
    step.disabled_because = None  # as on a GPU: which graph would each micro-batch replay?
    keys = {step._graph_key(batch) for batch in itertools.islice(packed_micro_batches(rows, 2, 64, 0, seed=1), 6)}
    assert len(keys) == 1 and "packed" in next(iter(keys))


@pytest.fixture(scope="module")
def chats(tiny_dir, tiny_tokenizer):
    rows = gemmatune.data.rows.bundled_dataset_path().read_text(encoding="utf-8").splitlines()[:16]
    return gemmatune.prepare_dataset([json.loads(row) for row in rows], tiny_tokenizer, max_seq_length=128)


def test_train_resumes_exactly_with_packing_and_shows_useful_tokens(chats, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEMMATUNE_KERNELS", "0")  # PyTorch references, as tests/training/test_resume.py
    settings = dict(max_steps=5, save_every=2, batch_size=2, grad_accum=2, learning_rate=5e-3, warmup_steps=1,
                    packing=True, dashboard="text")

    def fresh():
        model, tokenizer = fine_tuned(load_in_4bit=False)
        return model, tokenizer

    monkeypatch.setenv("GEMMATUNE_DASHBOARD", "text")  # the tests' default is "off"
    model, tokenizer = fresh()
    full = gemmatune.train(model, chats, tokenizer, output_dir=str(tmp_path / "full"), **settings)
    out = capsys.readouterr().out
    assert "packed buffers of 128 tokens per step" in out and "useful tok/s" in out
    assert full.summary.padding_fraction is not None and 0 <= full.summary.padding_fraction < 0.5

    real_update = training_dashboard.Dashboard.update

    def stop_after_step_3(self, step, *args, **kwargs):
        real_update(self, step, *args, **kwargs)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(training_dashboard.Dashboard, "update", stop_after_step_3)
    model, tokenizer = fresh()
    stopped = gemmatune.train(model, chats, tokenizer, output_dir=str(tmp_path / "run"), **settings)
    assert stopped.status == "interrupted" and stopped.state.step == 3
    monkeypatch.setattr(training_dashboard.Dashboard, "update", real_update)
    model, tokenizer = fresh()
    resumed = gemmatune.train(model, chats, tokenizer, output_dir=str(tmp_path / "run"),
                              resume_from=str(tmp_path / "run" / "checkpoint-2"), **settings)
    assert resumed.losses == full.losses  # steps 1-2 carried over, 3-5 recomputed: equal floats
    assert resumed.state.tokens_trained == full.state.tokens_trained


# ------------------------------------------------------------------ on a GPU: FlashAttention's window, graphs
def gpu_model():
    from tests.helpers import load_tiny, randomize_lora

    model, _ = load_tiny(load_in_4bit=True, dtype="bfloat16", device="cuda")
    model = gemmatune.add_lora(model, r=8)
    randomize_lora(model, 0)
    return model.train()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_rows_equal_the_rows_one_at_a_time_on_a_gpu():
    """bf16, where the sliding layers take FlashAttention's variable-length window (sm80+)."""
    from gemmatune.model.activation_checkpointing import enable_gradient_checkpointing

    model = gpu_model()
    enable_gradient_checkpointing(model, "offload")
    buffers, length = text_buffers()
    rows = [row for buffer in buffers for row in buffer]
    got, expected = packed(model, buffers, length), one_at_a_time(model, rows)
    assert_rel_close(got[0].float().cpu(), expected[0].float().cpu(), 1e-2, "loss")
    for name, grad in expected[1].items():
        assert_rel_close(got[1][name].float().cpu(), grad.float().cpu(), 5e-2, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_graph_replays_match_the_eager_step():
    from gemmatune.data.packing import packed_micro_batches
    from gemmatune.model.activation_checkpointing import enable_gradient_checkpointing
    from tests.helpers import assert_graphed_steps_match_eager

    rows = text_rows([5, 40, 64, 17, 33, 3, 60, 28, 9, 50, 12, 22, 31, 8, 45, 26], seed=2)
    results = {}
    for graphs in (False, True):
        model = gpu_model()
        enable_gradient_checkpointing(model, "offload")
        step = MicroStep(model, cuda_graphs=graphs)
        losses, grads = [], []
        for batch in itertools.islice(packed_micro_batches(rows, 2, 64, 0, seed=3), 5):  # eager, capture, replays
            losses.append(step(batch, normalizer=count_label_tokens([batch])))
            grads.append(lora_grads(model))
            model.zero_grad(set_to_none=False)
        assert step.describe() == ("CUDA graphs: on (1 captured batch shapes)" if graphs else
                                   "CUDA graphs: off (cuda_graphs=False)")
        results[graphs] = losses, grads
    assert_graphed_steps_match_eager(results)
