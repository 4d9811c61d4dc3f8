"""Prompts become model inputs through the function that builds training rows: the same ids up to
where the answer starts, the same pixels and features, every schema prepare_dataset reads, and
left-padded batches whose images and clips stay in their own rows."""
import pytest
import torch

import gemmatune.data.batches as data_batches
import gemmatune.data.dataset as data_dataset
import gemmatune.data.media as data_media
from gemmatune.data.tokens import IGNORE_INDEX
from gemmatune.errors import DatasetFormatError
from tests.helpers import picture, tone

MEDIA = {"max_soft_tokens": 70, "mel_bins": 32}  # the tiny audio tower takes 32 mel bins
ANSWER = "A formula, spoken."


def image(seed=0, **size):
    return {"type": "image", "image": picture(seed, **size)}


def audio(seconds=0.5, hertz=330.0):
    return {"type": "audio", "audio": tone(seconds, hertz), "sampling_rate": 16000}


def text(value):
    return {"type": "text", "text": value}


CONVERSATIONS = {
    "image": [{"role": "user", "content": [image(), text("What is this?")]}],
    "audio": [{"role": "user", "content": [audio(), text("Transcribe it.")]}],
    "image and audio": [{"role": "user", "content": [text("Compare "), image(1), text(" with "), audio(0.3)]}],
    "text, several turns": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
}


def training_batch(tokenizer, messages):
    """The training row of `messages` + ANSWER, prepared and collated as train() gets it."""
    row = {"messages": [*messages, {"role": "assistant", "content": ANSWER}]}
    prepared = data_dataset.prepare_dataset([row], tokenizer, max_seq_length=4096, **MEDIA)
    return data_batches.collate(prepared.examples, pad_token_id=0)


@pytest.mark.parametrize("kind", list(CONVERSATIONS))
def test_a_prompt_is_the_training_row_up_to_where_the_answer_starts(tiny_tokenizer, kind):
    messages = CONVERSATIONS[kind]
    prompt = data_batches.prompt_batch(tiny_tokenizer, [messages], **MEDIA)
    row = training_batch(tiny_tokenizer, messages)
    n = prompt["input_ids"].shape[1]
    assert torch.equal(row["input_ids"][:, :n], prompt["input_ids"])
    assert row["labels"][0, n - 1] == IGNORE_INDEX and row["labels"][0, n] != IGNORE_INDEX  # the answer starts at n
    media_keys = {"pixel_values", "image_position_ids", "input_features", "input_features_mask"} & set(row)
    expected = {"input_ids", "attention_mask"} | media_keys | ({"mm_token_type_ids"} if media_keys else set())
    assert set(prompt) == expected
    for key in media_keys:  # the same pixels and features as training decodes
        assert torch.equal(prompt[key], row[key]), key
    if media_keys:
        assert torch.equal(prompt["mm_token_type_ids"], row["mm_token_type_ids"][:, :n])


def test_sharegpt_keys_and_roles_give_the_openai_prompt(tiny_tokenizer):
    openai = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": [image(), text("What is this?")]},
              {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Sure?"}]
    sharegpt = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": [image(), text("What is this?")]},
                {"from": "gpt", "value": "A cat."}, {"from": "human", "value": "Sure?"}]
    a, b = (data_batches.prompt_batch(tiny_tokenizer, [m], **MEDIA) for m in (openai, sharegpt))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    shown = tiny_tokenizer.decode(b["input_ids"][0])
    assert "<|turn>model\nA cat." in shown and "human" not in shown and "gpt" not in shown


def test_every_prompt_form_gives_the_same_inputs(tiny_tokenizer):
    parts = [image(), text("What is this?")]
    forms = [[{"role": "user", "content": parts}],  # a list of turns
             {"role": "user", "content": parts},  # one turn
             {"messages": [{"role": "user", "content": parts}]},  # a row
             {"conversations": [{"from": "human", "value": parts}]},  # a ShareGPT row
             {"messages": [{"role": "user", "content": [{"type": "image"}, text("What is this?")]}],
              "images": [picture()]}]  # TRL's layout: the image in the row's "images" column
    first = data_batches.prompt_batch(tiny_tokenizer, [forms[0]], **MEDIA)
    for form in forms[1:]:
        got = data_batches.prompt_batch(tiny_tokenizer, [form], **MEDIA)
        assert set(got) == set(first) and all(torch.equal(got[k], first[k]) for k in first), form
    as_string = data_batches.prompt_batch(tiny_tokenizer, ["Hi"])
    assert torch.equal(as_string["input_ids"], data_batches.prompt_batch(
        tiny_tokenizer, [[{"from": "human", "value": "Hi"}]])["input_ids"])


def test_a_batch_is_left_padded_and_each_rows_media_stays_in_its_row(tiny_tokenizer):
    prompts = [[{"role": "user", "content": [image(0, height=48, width=96), text("What?")]}],
               "A text prompt, longer than the others' text.",
               [{"role": "user", "content": [audio(0.4), image(1, height=96, width=48), text("Both?")]}]]
    batch = data_batches.prompt_batch(tiny_tokenizer, prompts, **MEDIA)
    singles = [data_batches.prompt_batch(tiny_tokenizer, [p], **MEDIA) for p in prompts]
    width = batch["input_ids"].shape[1]
    ids = data_media.media_token_ids(tiny_tokenizer)
    for row, single in enumerate(singles):
        n = single["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, width - n:], single["input_ids"][0])  # right-aligned
        assert batch["attention_mask"][row].tolist() == [0] * (width - n) + [1] * n  # padded on the left
    images = (batch["input_ids"] == ids["<|image|>"]).sum(dim=1).tolist()
    clips = (batch["input_ids"] == ids["<|audio|>"]).sum(dim=1).tolist()
    assert images[1] == clips[1] == 0 and images[0] > 0 and images[2] > 0 and clips[2] > 0
    assert ((batch["mm_token_type_ids"] == 1) == (batch["input_ids"] == ids["<|image|>"])).all()
    assert ((batch["mm_token_type_ids"] == 3) == (batch["input_ids"] == ids["<|audio|>"])).all()
    # the images in row order (row 0's, then row 2's), each padded to the batch's largest with position -1
    for i, single in enumerate((singles[0], singles[2])):
        patches = single["pixel_values"].shape[1]
        assert torch.equal(batch["pixel_values"][i, :patches], single["pixel_values"][0])
        assert (batch["image_position_ids"][i, patches:] == -1).all()
    assert torch.equal(batch["input_features"], singles[2]["input_features"])


@pytest.mark.parametrize("prompts, error, match", [
    ("Hi", ValueError, "list of prompts"),
    ([], ValueError, "list of prompts"),
    ([42], DatasetFormatError, "the prompt: got int"),
    (["Hi", [{"role": "robot", "content": "beep"}]], DatasetFormatError, "prompt 2: turn 0 has unknown role 'robot'"),
    ([[{"role": "user", "content": [{"type": "image"}]}]], DatasetFormatError, "the prompt: image 1"),
])
def test_bad_prompts_say_what_to_pass(tiny_tokenizer, prompts, error, match):
    with pytest.raises(error, match=match):
        data_batches.prompt_batch(tiny_tokenizer, prompts, **MEDIA)
