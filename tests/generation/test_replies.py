"""chat, stream_reply, generate_replies and score see the prompt's images and audio exactly as
training does; a model without the tower refuses them; settings are checked; replies stream.

The first-token logits are read at the LM head (a forward hook): the prefill's output for the last
prompt position. They must differ between two images (two clips) and equal what evaluation and the
training forward compute for the same message. The kernels are off (the Triton interpreter is slow
per token); test_decoding.py covers the decode loop with them on.
"""
import contextlib
import io

import pytest
import torch

import gemmatune
from gemmatune.data.batches import collate
from gemmatune.errors import MissingTowerError
from gemmatune.generation.decoding import generate
from gemmatune.generation.evaluate import generate_answer
from gemmatune.training.loss import last_hidden_states
from tests.helpers import load_tiny, picture, tone

MEDIA = {"max_soft_tokens": 70}
QUESTION = {"type": "text", "text": "What is in it?"}


@pytest.fixture(scope="module")
def full_model(tiny_dir):
    """The tiny model with both towers, a random LM head of its own (the tied one makes a random
    model repeat one token, so replies would hardly depend on anything)."""
    model, tokenizer = load_tiny(modalities=("text", "image", "audio"), use_kernels=False)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def text_model(tiny_dir):
    return load_tiny(use_kernels=False)


def medium(kind: str, variant: int) -> dict:
    if kind == "image":
        return {"type": "image", "image": picture(seed=variant)}
    return {"type": "audio", "audio": tone(0.5, hertz=220.0 * (variant + 1)), "sampling_rate": 16000}


def message(kind: str, variant: int = 0) -> list[dict]:
    return [{"role": "user", "content": [medium(kind, variant), QUESTION]}]


@contextlib.contextmanager
def head_outputs(model):
    """The LM head's outputs, one tensor per call (the first: the prefill's last position)."""
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, out: calls.append(out.detach().clone()))
    try:
        yield calls
    finally:
        handle.remove()


def first_logits(model, run) -> torch.Tensor:
    with head_outputs(model) as calls, contextlib.redirect_stdout(io.StringIO()):
        run()
    return calls[0][:, -1]


def training_logits(model, tokenizer, messages) -> torch.Tensor:
    """The logits at the last prompt position of the training row messages + an answer, through
    the training forward (gemmatune.training.loss: towers, then the language model)."""
    row = {"messages": [*messages, {"role": "assistant", "content": "An answer."}]}
    prepared = gemmatune.prepare_dataset([row], tokenizer, max_seq_length=1024, **MEDIA)
    batch = collate(prepared.examples, pad_token_id=0)
    n = _answer_start(batch["labels"][0])
    with torch.no_grad():
        hidden = last_hidden_states(model, {k: v for k, v in batch.items() if k != "labels"})
        return model.get_output_embeddings()(hidden[:, n - 1])


def _answer_start(labels: torch.Tensor) -> int:
    return int((labels != -100).nonzero()[0, 0])


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_chat_reads_the_medium_as_evaluation_and_training_do(full_model, kind):
    model, tokenizer = full_model
    chats = [first_logits(model, lambda v=v: gemmatune.chat(model, tokenizer, message(kind, v), max_new_tokens=2,
                                                            **MEDIA)) for v in (0, 1)]
    assert (chats[0] - chats[1]).abs().max() > 1e-3  # another image or clip, another answer
    evaluation = first_logits(model, lambda: generate_answer(model, tokenizer, message(kind, 0), max_new_tokens=2,
                                                             **MEDIA))
    assert torch.equal(evaluation, chats[0])
    torch.testing.assert_close(training_logits(model, tokenizer, message(kind, 0)), chats[0], rtol=1e-4, atol=1e-4)


def test_generate_replies_batches_media_prompts_each_in_its_own_row(full_model):
    """Two images, two clips and a text prompt, left-padded in one batch: each row's first-token
    logits are those of the same prompt alone (so each row's soft tokens filled its own
    placeholders), and no two rows agree."""
    model, tokenizer = full_model
    prompts = [message("image", 0), [{"role": "user", "content": [QUESTION, medium("image", 1)]}],
               message("audio", 0), [{"from": "human", "value": [medium("audio", 1)]}], "A text prompt among them."]
    with head_outputs(model) as calls:
        replies = gemmatune.generate_replies(model, tokenizer, prompts, max_new_tokens=3, batch_size=5, **MEDIA)
    batched = calls[0][:, -1]
    assert batched.shape[0] == 5 and len(replies) == 5
    alone = [first_logits(model, lambda p=p: gemmatune.chat(model, tokenizer, p, max_new_tokens=1, **MEDIA))[0]
             for p in prompts]
    for i, logits in enumerate(alone):
        close = [j for j in range(5) if torch.allclose(batched[j], logits, rtol=1e-4, atol=1e-4)]
        assert len(close) == 1, f"prompt {i}: matches batch rows {close}"
    assert gemmatune.generate_replies(model, tokenizer, prompts, max_new_tokens=3, batch_size=1, **MEDIA) == replies


def test_chat_prompts_with_the_ids_and_pixels_training_builds(full_model):
    model, tokenizer = full_model
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [medium("image", 0), QUESTION, medium("audio", 1)]}]
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        gemmatune.chat(model, tokenizer, messages, max_new_tokens=1, stream=False, **MEDIA)
    finally:
        handle.remove()
    row = {"messages": [*messages, {"role": "assistant", "content": "An answer."}]}
    training = collate(gemmatune.prepare_dataset([row], tokenizer, max_seq_length=1024, **MEDIA).examples, 0)
    n = _answer_start(training["labels"][0])
    assert seen[0]["input_ids"].tolist() == training["input_ids"][:, :n].tolist()
    for key in ("pixel_values", "image_position_ids", "input_features", "input_features_mask"):
        assert torch.equal(seen[0][key], training[key]), key


def test_chat_takes_sharegpt_keys_and_roles(full_model):
    model, tokenizer = full_model
    openai = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [medium("image", 0), QUESTION]},
              {"role": "assistant", "content": "A picture."}, {"role": "user", "content": "Of what?"}]
    sharegpt = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": [medium("image", 0), QUESTION]},
                {"from": "gpt", "value": "A picture."}, {"from": "human", "value": "Of what?"}]
    logits = [first_logits(model, lambda m=m: gemmatune.chat(model, tokenizer, m, max_new_tokens=1, **MEDIA))
              for m in (openai, sharegpt)]
    assert torch.equal(logits[0], logits[1])
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"]),
                                             with_kwargs=True)
    try:
        gemmatune.chat(model, tokenizer, sharegpt, max_new_tokens=1, stream=False, **MEDIA)
    finally:
        handle.remove()
    shown = tokenizer.decode(seen[0][0])
    assert "<|turn>model\nA picture." in shown and "human" not in shown and "gpt" not in shown


# ------------------------------------------------------------------ a model without the tower
def media_rows(kind: str) -> list[dict]:
    return [{"messages": [*message(kind, v), {"role": "assistant", "content": "An answer."}]} for v in (0, 1)]


def refuse_train(model, tokenizer, kind, tmp_path):
    dataset = gemmatune.prepare_dataset(media_rows(kind), tokenizer, max_seq_length=1024, mel_bins=32, **MEDIA)
    gemmatune.train(gemmatune.add_lora(model, r=4), dataset, tokenizer, max_steps=2, output_dir=str(tmp_path),
                    dashboard="off")


ENTRY_POINTS = {
    "train": refuse_train,
    "chat": lambda model, tokenizer, kind, _: gemmatune.chat(model, tokenizer, message(kind), **MEDIA),
    "stream_reply": lambda model, tokenizer, kind, _: gemmatune.stream_reply(model, tokenizer, message(kind)),
    "generate_replies": lambda model, tokenizer, kind, _: gemmatune.generate_replies(
        model, tokenizer, ["A text prompt first.", message(kind)], batch_size=1, **MEDIA),
    "score": lambda model, tokenizer, kind, _: gemmatune.score(model, tokenizer, media_rows(kind), progress=False,
                                                               **MEDIA),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("kind", ["image", "audio"])
def test_a_text_only_model_refuses_images_and_audio_before_any_work(entry, kind, tmp_path):
    model, tokenizer = load_tiny(use_kernels=False)
    tower = "vision tower" if kind == "image" else "audio tower"
    with head_outputs(model) as calls, pytest.raises(MissingTowerError) as error:
        ENTRY_POINTS[entry](model, tokenizer, kind, tmp_path)
    assert tower in str(error.value) and f'modalities=("text", "{kind}")' in str(error.value)
    assert calls == []  # no token generated, no step taken
    assert not (tmp_path / "adapter").exists()


def test_a_model_with_one_tower_refuses_the_other_medium_and_says_which_to_add(tiny_dir):
    model, tokenizer = load_tiny(modalities=("text", "image"), use_kernels=False)
    with pytest.raises(MissingTowerError, match=r'audio tower.*modalities=\("text", "image", "audio"\)'):
        gemmatune.chat(model, tokenizer, message("audio"))


def test_generate_refuses_media_tensors_for_a_model_without_the_tower(text_model):
    model, _ = text_model
    ids = torch.tensor([[2, 5, 40, 50]])
    with pytest.raises(MissingTowerError, match="pixel_values|images"):
        generate(model, ids, max_new_tokens=2, pixel_values=torch.zeros(1, 9, 768),
                 image_position_ids=torch.zeros(1, 9, 2, dtype=torch.long))


# ------------------------------------------------------------------ settings and streaming
@pytest.mark.parametrize("setting, value", [("max_new_tokens", -1), ("max_new_tokens", 2.5), ("temperature", -0.1),
                                            ("temperature", float("nan")), ("top_k", -1), ("top_p", 0.0),
                                            ("top_p", 1.5), ("top_p", -0.2)])
@pytest.mark.parametrize("entry", ["chat", "stream_reply", "generate_replies", "generate"])
def test_generation_settings_are_checked_before_any_token(text_model, setting, value, entry):
    model, tokenizer = text_model
    calls = {
        "chat": lambda: gemmatune.chat(model, tokenizer, "Hi", **{setting: value}),
        "stream_reply": lambda: gemmatune.stream_reply(model, tokenizer, "Hi", **{setting: value}),
        "generate_replies": lambda: gemmatune.generate_replies(model, tokenizer, ["Hi"], **{setting: value}),
        "generate": lambda: generate(model, torch.tensor([[2, 40, 50]]), **{setting: value}),
    }
    with head_outputs(model) as outputs, pytest.raises(ValueError, match=f"^{setting}={value!r}: "):
        calls[entry]()
    assert outputs == []


def test_stream_reply_yields_the_reply_piece_by_piece(full_model):
    model, tokenizer = full_model
    for prompt in ("Say something long.", message("image", 1)):
        pieces = list(gemmatune.stream_reply(model, tokenizer, prompt, max_new_tokens=12, **MEDIA))
        reply = gemmatune.chat(model, tokenizer, prompt, max_new_tokens=12, stream=False, **MEDIA)
        assert len(pieces) > 2 and all(isinstance(p, str) and p for p in pieces)
        assert "".join(pieces).strip() == reply == gemmatune.generate_replies(model, tokenizer, [prompt],
                                                                              max_new_tokens=12, **MEDIA)[0]


def test_a_stream_closed_early_stops_generating_and_frees_the_model(full_model):
    model, tokenizer = full_model
    model.train()  # generation runs in eval mode and gives the model back in the mode it found
    with head_outputs(model) as calls:
        stream = gemmatune.stream_reply(model, tokenizer, "Say something long.", max_new_tokens=40)
        assert calls == []  # nothing runs until the first piece is asked for
        next(stream)
        with pytest.raises(RuntimeError, match="already generating"):
            gemmatune.chat(model, tokenizer, "Hi", max_new_tokens=2, stream=False)
        stream.close()
    assert 1 <= len(calls) < 10  # stopped long before 40 tokens
    assert model.training
    model.eval()
    assert isinstance(gemmatune.chat(model, tokenizer, "Hi", max_new_tokens=2, stream=False), str)


def test_chat_prints_what_it_returns(full_model):
    model, tokenizer = full_model
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        reply = gemmatune.chat(model, tokenizer, message("audio", 1), max_new_tokens=10)
    assert reply and out.getvalue().split() == reply.split()


def test_a_reader_that_fails_midway_leaves_the_model_free(full_model, monkeypatch):
    """Ctrl-C while chat prints, or a streamer that raises: the error is kept with its traceback (as
    a notebook keeps the last one, which would keep an unclosed generation alive), and the model
    still generates."""
    model, tokenizer = full_model

    class Failing:
        seen = 0

        def put(self, value):
            self.seen += 1
            if self.seen == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as kept:
        generate(model, torch.tensor([[2, 40, 50]]), max_new_tokens=20, streamer=Failing())
    printed = []

    def print_then_stop(*args, **kwargs):
        printed.append(args)
        if len(printed) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("builtins.print", print_then_stop)
    with pytest.raises(KeyboardInterrupt) as kept_too:
        gemmatune.chat(model, tokenizer, "Say something long.", max_new_tokens=20)
    monkeypatch.undo()
    assert kept.traceback and kept_too.traceback and len(printed) == 2
    assert isinstance(gemmatune.chat(model, tokenizer, "Hi", max_new_tokens=2, stream=False), str)
