"""chat and generate_replies with Gemma 4's thinking and tools: the prompt is the training row's start
(with tool declarations, with thinking on), the reply is parsed into answer, thought and tool calls, and
generation stops at <|tool_response> (the model waits for the tools' responses). The tiny model's
replies are forced token by token through its LM head, so what it "says" is known."""
import pytest
import torch

import gemmatune
from gemmatune.data.batches import prompt_batch
from gemmatune.data.chat_format import format_chat
from gemmatune.data.tokens import tokenize_conversation
from gemmatune.generation.replies import Reply, stop_token_ids
from tests.helpers import load_tiny

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_dir):
    return load_tiny()


def force(model, tokenizer, text: str, monkeypatch=None):
    """Make the model's next tokens spell `text` (special tokens included), one forced id a step."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    step = {"i": 0}

    def hook(module, inputs, logits):
        logits = logits.clone()
        logits[:, -1, ids[min(step["i"], len(ids) - 1)]] += 1e4
        step["i"] += 1
        return logits

    return model.get_output_embeddings().register_forward_hook(hook)


def test_the_prompt_with_tools_and_thinking_is_the_training_rows_start(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    batch = prompt_batch(tokenizer, [messages], enable_thinking=True, tools=[WEATHER])
    expected = tokenize_conversation(tokenizer, messages, 10 ** 9, add_generation_prompt=True, enable_thinking=True,
                                     tools=[WEATHER])["input_ids"]
    assert batch["input_ids"][0].tolist() == expected
    text = tokenizer.decode(expected)
    assert text == format_chat(messages, add_generation_prompt=True, enable_thinking=True, tools=[WEATHER])
    assert "<|think|>" in text and "get_weather" in text
    plain = prompt_batch(tokenizer, [messages])["input_ids"][0].tolist()
    assert plain != expected and "<|think|>" not in tokenizer.decode(plain)


def test_chat_returns_the_answer_with_the_thought_beside_it(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    handle = force(model, tokenizer, "<|channel>thought\nsix times seven<channel|>forty two<turn|>")
    try:
        reply = gemmatune.chat(model, tokenizer, "What is 6 x 7?", enable_thinking=True, max_new_tokens=40,
                               stream=False)
    finally:
        handle.remove()
    assert isinstance(reply, Reply) and isinstance(reply, str)
    assert reply == "forty two" and reply.thought == "six times seven" and reply.tool_calls == []


def test_chat_stops_at_a_tool_call_and_parses_it(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert tokenizer.convert_tokens_to_ids("<|tool_response>") in stop_token_ids(tokenizer)
    handle = force(model, tokenizer, '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|><|tool_response>'
                                     "never generated")
    try:
        reply = gemmatune.chat(model, tokenizer, "Weather in Oslo?", tools=[WEATHER], max_new_tokens=60,
                               stream=False)
    finally:
        handle.remove()
    assert reply == "" and reply.thought is None
    assert reply.tool_calls == [("get_weather", {"city": "Oslo"})]


def test_generate_replies_parses_each_reply(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    handle = force(model, tokenizer, "<|channel>thought\nhmm<channel|>yes<turn|>")
    try:
        replies = gemmatune.generate_replies(model, tokenizer, ["Is it?", "Really, is it?"], enable_thinking=True,
                                             max_new_tokens=20)
    finally:
        handle.remove()
    assert [str(r) for r in replies] == ["yes", "yes"] and [r.thought for r in replies] == ["hmm", "hmm"]


def test_a_reply_without_markers_is_all_answer(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    ids = tokenizer("plain words<turn|><pad><pad>", add_special_tokens=False)["input_ids"]
    reply = Reply.from_tokens(tokenizer, torch.tensor(ids).tolist())
    assert reply == "plain words" and reply.thought is None and reply.tool_calls == []
