"""Gemma 4's chat format, shape by shape: the renderings below are written out by hand from Google's
chat template for Gemma 4 E2B/E4B (the 2026-07-09 version, rendered with jinja2 outside this
repository to check them). Each is checked character for character against format_chat and the tiny
tokenizer's chat template, and token for token against tokenize_conversation; then the prompt a
server builds is shown to be the untrained start of the training row, and replies are parsed back.
"""
import pytest

import gemmatune.data.chat_format as data_chat_format
import gemmatune.data.tokens as data_tokens
import gemmatune.data.tool_syntax as data_tool_syntax
from gemmatune.data.tokens import IGNORE_INDEX
from gemmatune.model.tiny import build_tiny_tokenizer
from tests.data.chat_samples import CALL, CALLED, RESPONDED, TOOL, USER, WEATHER, WEATHER_DECLARED, Q

THINK = "<bos><|turn>system\n<|think|>\n<turn|>\n"
MODEL = "<|turn>model\n"

# name: (messages, format_chat keywords, the rendering, what add_generation_prompt=True appends)
CASES = {
    "system": ([{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": " Hello! "}], {},
               "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n", MODEL),
    "developer is the system": ([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                {}, "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n", MODEL),
    "system parts": ([{"role": "system", "content": [{"type": "text", "text": " A "}, {"type": "text", "text": "B"}]},
                      {"role": "user", "content": "Hi"}], {},
                     "<bos><|turn>system\nA B <turn|>\n<|turn>user\nHi<turn|>\n", MODEL),
    "multi-turn": ([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                    {"role": "user", "content": " Q2\n"}, {"role": "assistant", "content": "A2"}], {},
                   "<bos><|turn>user\nQ1<turn|>\n<|turn>model\nA1<turn|>\n<|turn>user\nQ2<turn|>\n"
                   "<|turn>model\nA2<turn|>\n", MODEL),
    "image": ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is this? "}]},
               {"role": "assistant", "content": "A cat."}], {},
              "<bos><|turn>user\n<|image|>What is this?<turn|>\n<|turn>model\nA cat.<turn|>\n", MODEL),
    "audio": ([{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Transcribe."}]}], {},
              "<bos><|turn>user\n<|audio|>Transcribe.<turn|>\n", MODEL),
    "video": ([{"role": "user", "content": [{"type": "text", "text": "Describe: "}, {"type": "video"}]}], {},
              "<bos><|turn>user\nDescribe:<|video|><turn|>\n", MODEL),
    "thinking on": ([{"role": "user", "content": "What is 17 × 3?"}], {"enable_thinking": True},
                    THINK + "<|turn>user\nWhat is 17 × 3?<turn|>\n", MODEL),
    "thinking on, system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}],
                            {"enable_thinking": True},
                            "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nQ<turn|>\n", MODEL),
    "thought": ([{"role": "user", "content": "Q"},
                 {"role": "assistant", "reasoning_content": "17 × 3 = 51.", "content": "51."}],
                {"enable_thinking": True},
                THINK + "<|turn>user\nQ<turn|>\n<|turn>model\n<|channel>thought\n17 × 3 = 51.\n<channel|>51.<turn|>\n",
                MODEL),
    "earlier thought dropped": ([{"role": "user", "content": "Q1"},
                                 {"role": "assistant", "reasoning_content": "t1", "content": "A1"},
                                 {"role": "user", "content": "Q2"},
                                 {"role": "assistant", "reasoning_content": "t2", "content": "A2"}],
                                {"enable_thinking": True},
                                THINK + "<|turn>user\nQ1<turn|>\n<|turn>model\nA1<turn|>\n<|turn>user\nQ2<turn|>\n"
                                "<|turn>model\n<|channel>thought\nt2\n<channel|>A2<turn|>\n", MODEL),
    "inline channel text is left out": ([{"role": "user", "content": "Q"},
                                         {"role": "assistant", "content": "<|channel>thought\nhmm\n<channel|>Answer"}],
                                        {}, "<bos><|turn>user\nQ<turn|>\n<|turn>model\nAnswer<turn|>\n", MODEL),
    "tools": ([{"role": "system", "content": "Be brief."}, USER], {"tools": [WEATHER]},
              f"<bos><|turn>system\nBe brief.{WEATHER_DECLARED}<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n",
              MODEL),
    "tool call": ([USER, CALL], {"tools": [WEATHER]},
                  f"<bos><|turn>system\n{WEATHER_DECLARED}<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n"
                  f"<|turn>model\n{CALLED}<|tool_response>", ""),
    "tool response": ([USER, CALL, TOOL], {},
                      f"<bos><|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n{CALLED}{RESPONDED}", ""),
    "tool response, then the answer": ([USER, CALL, TOOL, {"role": "assistant", "content": "It is 18 C."}], {},
                                       f"<bos><|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n{CALLED}{RESPONDED}"
                                       "It is 18 C.<turn|>\n", MODEL),
    "tool_responses, a mapping": ([USER, dict(CALL, tool_responses=[
        {"name": "get_weather", "response": {"temp": 18, "sky": "sun", "wind": None}}])], {},
        f"<bos><|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n{CALLED}"
        f"<|tool_response>response:get_weather{{sky:{Q}sun{Q},temp:18,wind:null}}<tool_response|>", ""),
    "thinking tool loop": ([USER, dict(CALL, reasoning_content="I need the weather."), TOOL],
                           {"enable_thinking": True, "tools": [WEATHER]},
                           f"<bos><|turn>system\n<|think|>\n{WEATHER_DECLARED}<turn|>\n"
                           f"<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n<|channel>thought\n"
                           f"I need the weather.\n<channel|>{CALLED}{RESPONDED}", "<|channel>thought\n"),
    "arguments": ([USER, {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": {"B": [1, 2.5, "x", None, True], "a": {"z": False}}}}]}], {},
        f"<bos><|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
        f"<|tool_call>call:f{{a:{{z:false}},B:[1,2.5,{Q}x{Q},null,true]}}<tool_call|><|tool_response>", ""),
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("generation", [False, True])
def test_rendering_character_for_character(name, generation):
    messages, keywords, text, prompt = CASES[name]
    expected = text + (prompt if generation else "")
    assert data_chat_format.format_chat(messages, add_generation_prompt=generation, **keywords) == expected


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("generation", [False, True])
def test_tiny_chat_template_renders_the_same(tokenizer, name, generation):
    messages, keywords, text, prompt = CASES[name]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **keywords)
    assert rendered == text + (prompt if generation else "")


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("generation", [False, True])
def test_tokens_token_for_token(tokenizer, name, generation):
    """tokenize_conversation's ids are the tokenizer's ids of the whole rendering."""
    messages, keywords, text, prompt = CASES[name]
    tokens = data_tokens.tokenize_conversation(tokenizer, messages, 4096, add_generation_prompt=generation,
                                               enable_thinking=keywords.get("enable_thinking", False),
                                               tools=keywords.get("tools"))
    expected = text + (prompt if generation else "")
    assert tokens["input_ids"] == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(tokens["input_ids"]) == expected


def test_saved_tiny_tokenizer_keeps_the_template(tiny_tokenizer):
    messages, keywords, text, prompt = CASES["thinking tool loop"]
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **keywords)
    assert rendered == text + prompt
    for token in ("<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", "<|tool>", "<tool|>", Q):
        assert len(tiny_tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token


def test_generation_prompt_follows_the_conversation():
    assert data_chat_format.generation_prompt() == MODEL
    assert data_chat_format.generation_prompt([USER], enable_thinking=True) == MODEL  # E2B/E4B: no empty thought
    assert data_chat_format.generation_prompt([USER, CALL]) == ""
    assert data_chat_format.generation_prompt([USER, CALL, TOOL]) == ""
    assert data_chat_format.generation_prompt([USER, CALL, TOOL], enable_thinking=True) == "<|channel>thought\n"


def test_string_arguments_are_refused_as_the_template_refuses_them():
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}
    with pytest.raises(ValueError, match="json.loads"):
        data_chat_format.format_chat([USER, call])


# ------------------------------------------------------------------ train what will be served
ANSWERS = {
    "answer": {"role": "assistant", "content": "It is 18 C."},
    "thought and answer": {"role": "assistant", "reasoning_content": "Look it up.", "content": "It is 18 C."},
    "tool call": {"role": "assistant", "content": "", "tool_calls": CALL["tool_calls"]},
    "thought and tool calls": dict(CALL, reasoning_content="Two calls.", tool_calls=CALL["tool_calls"] * 2),
}
RESPONDED_CALL = dict(CALL, tool_responses=[{"name": "get_weather", "response": "18 C"}])
CONVERSATIONS = {
    "one question": [USER],
    "system and images": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}],
    "second turn": [USER, {"role": "assistant", "reasoning_content": "old", "content": "Sunny."},
                    {"role": "user", "content": "And tomorrow?"}],
    "after tool responses": [USER, RESPONDED_CALL],
    "after OpenAI tool turns": [USER, CALL, TOOL],
    "second tool round": [USER, RESPONDED_CALL, dict(RESPONDED_CALL, reasoning_content="Again.")],
}


def _served_cases():
    for conversation, messages in CONVERSATIONS.items():
        after_tools = messages[-1]["role"] != "user"
        for answer_name, answer in ANSWERS.items():
            for thinking in (False, True):
                if thinking and after_tools and "thought" not in answer_name:
                    continue  # the prompt then ends with <|channel>thought\n: the answer must think
                yield pytest.param(messages, answer, thinking, id=f"{conversation}-{answer_name}-think={thinking}")


@pytest.mark.parametrize("messages, answer, thinking", list(_served_cases()))
@pytest.mark.parametrize("mask_thought", [False, True])
def test_the_prompt_is_the_start_of_the_training_row(tokenizer, messages, answer, thinking, mask_thought):
    """What a server renders as the prompt (add_generation_prompt=True on the conversation without the
    answer) is token for token the start of the training row; the row trains those tokens exactly as
    the prompt's own row would (the model's earlier calls yes, the generation prompt and the tool
    responses never), and the first token the model writes is trained unless it is a masked thought's."""
    tools = [WEATHER]
    prompt = data_tokens.tokenize_conversation(tokenizer, messages, 4096, add_generation_prompt=True,
                                               enable_thinking=thinking, tools=tools, mask_thought=mask_thought)
    row = data_tokens.tokenize_conversation(tokenizer, messages + [answer], 4096, enable_thinking=thinking,
                                            tools=tools, mask_thought=mask_thought)
    n = len(prompt["input_ids"])
    assert row["input_ids"][:n] == prompt["input_ids"]
    assert row["labels"][:n] == prompt["labels"] and row["labels"][n - 1] == IGNORE_INDEX
    text = data_chat_format.format_chat(messages, add_generation_prompt=True, enable_thinking=thinking, tools=tools)
    assert tokenizer.decode(row["input_ids"]).startswith(text)
    assert (row["labels"][n] == IGNORE_INDEX) == (mask_thought and "reasoning_content" in answer)


# ------------------------------------------------------------------ replies
@pytest.mark.parametrize("reply, expected", [
    ("It is 18 C.<turn|>", ("It is 18 C.", None, [])),
    ("  Sunny. ☀️\n<turn|><eos>", ("Sunny. ☀️", None, [])),
    ("<|channel>thought\nLook it up.\n<channel|>It is 18 C.<turn|>", ("It is 18 C.", "Look it up.", [])),
    ("<|channel>thought\n<channel|>Hi", ("Hi", None, [])),  # the 26B/31B models' empty thought
    (CALLED + "<|tool_response>", ("", None, [("get_weather", {"city": "Paris"})])),
    ("<|channel>thought\nTwo calls.\n<channel|>" + CALLED
     + f"<|tool_call>call:convert{{from:{Q}km{Q},to:{Q}mi{Q},value:4.5}}<tool_call|><|tool_response>",
     ("", "Two calls.", [("get_weather", {"city": "Paris"}), ("convert", {"from": "km", "to": "mi", "value": 4.5})])),
    ("<|channel>thought\nthinking when max_new_tokens ran ou", ("", "thinking when max_new_tokens ran ou", [])),
    ("Let me check." + CALLED, ("Let me check.", None, [("get_weather", {"city": "Paris"})])),
    ("<|tool_call>call:f{a:<|\"|>unclosed}<tool_call|>", ("", None, [("f", '{a:<|"|>unclosed}')])),
])
def test_parse_reply(reply, expected):
    assert data_chat_format.parse_reply(reply) == expected


def test_parse_reply_reads_back_every_value_the_format_writes():
    arguments = {"s": "a, b: {c}", "n": -3, "x": 0.25, "t": True, "f": False, "none": None,
                 "list": [1, "two", [3.5], {"k": "v"}], "obj": {"Deep": {"er": []}, "e": {}}}
    text = data_tool_syntax.format_call("tool_1", arguments)
    assert data_chat_format.parse_reply(text + "<|tool_response>") == ("", None, [("tool_1", arguments)])
    assert data_tool_syntax.parse_value(data_tool_syntax.format_value(arguments)) == arguments


@pytest.mark.parametrize("bad", ["{a:1", "[1,2", "{a 1}", f"{Q}open", "{a:1} tail", "{a:}"])
def test_parse_value_refuses_broken_values(bad):
    with pytest.raises(ValueError):
        data_tool_syntax.parse_value(bad)
