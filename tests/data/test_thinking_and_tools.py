"""Reasoning and tool-use rows: how they are read (thought fields, OpenAI function calling, the
template's own tool_responses), and exactly which positions of their rows carry loss."""
import json

import pytest

import gemmatune.data.chat_format as data_chat_format
import gemmatune.data.dataset as data_dataset
import gemmatune.data.messages as data_messages
import gemmatune.data.tokens as data_tokens
from gemmatune.data.rows import DatasetFormatError
from gemmatune.data.tokens import IGNORE_INDEX
from gemmatune.model.tiny import build_tiny_tokenizer
from tests.data.chat_samples import CALLED, RESPONDED, WEATHER, WEATHER_DECLARED, Q

OPENAI_TOOL_ROW = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
    {"role": "assistant", "content": "It is 18 C."}]}
THINKING_ROW = {"messages": [{"role": "user", "content": "What is 17 × 3?"},
                             {"role": "assistant", "reasoning_content": "17 × 3 = 51.", "content": "51."}]}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def expected_row(tokenizer, pieces):
    """(ids, trained positions) of a row written piece by piece as (text, trained); each piece is
    tokenised on its own, as tokenize_conversation cuts the rendering where the writer changes."""
    ids, trained = [tokenizer.bos_token_id], []
    for text, is_trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        trained += list(range(len(ids), len(ids) + len(piece))) if is_trained else []
        ids += piece
    return ids, trained


def trained_positions(tokens) -> list[int]:
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(tokens["labels"], tokens["input_ids"]))
    return [i for i, label in enumerate(tokens["labels"]) if label != IGNORE_INDEX]


# ------------------------------------------------------------------ which positions carry loss
@pytest.mark.parametrize("mask_thought", [False, True])
def test_reasoning_row_trains_the_thought_and_the_answer(tokenizer, mask_thought):
    prepared = data_dataset.prepare_dataset([THINKING_ROW], tokenizer, mask_thought=mask_thought)
    ids, trained = expected_row(tokenizer, [
        ("<|turn>system\n<|think|>\n<turn|>\n<|turn>user\nWhat is 17 × 3?<turn|>\n<|turn>model\n", False),
        ("<|channel>thought\n17 × 3 = 51.\n<channel|>", not mask_thought),  # the thought, markers included
        ("51.<turn|>", True),
        ("\n", False)])
    assert prepared[0]["input_ids"] == ids
    assert trained_positions(prepared[0]) == trained
    assert prepared.rows_thinking == 1 and "(1 with a thought)" in prepared.report()


def test_tool_row_trains_the_calls_and_the_answer_not_the_declarations_or_responses(tokenizer):
    prepared = data_dataset.prepare_dataset([OPENAI_TOOL_ROW], tokenizer)
    ids, trained = expected_row(tokenizer, [
        (f"<|turn>system\n{WEATHER_DECLARED}<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n", False),
        (CALLED + "<|tool_response>", True),  # the call, and the token the model stops on
        (RESPONDED[len("<|tool_response>"):], False),  # written by the caller
        ("It is 18 C.<turn|>", True),
        ("\n", False)])
    assert prepared[0]["input_ids"] == ids
    assert trained_positions(prepared[0]) == trained
    assert prepared.rows_tool_use == 1 and "(1 calling tools)" in prepared.report()


def test_thinking_tool_loop_leaves_the_served_thought_opening_untrained(tokenizer):
    """With thinking on, the prompt after tool responses ends with <|channel>thought\\n: not trained there."""
    row = {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning_content": "Call it.",
         "tool_calls": OPENAI_TOOL_ROW["messages"][1]["tool_calls"]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
        {"role": "assistant", "reasoning_content": "Answer now.", "content": "It is 18 C."}]}
    prepared = data_dataset.prepare_dataset([row], tokenizer)
    ids, trained = expected_row(tokenizer, [
        (f"<|turn>system\n<|think|>\n{WEATHER_DECLARED}<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n"
         "<|turn>model\n", False),
        ("<|channel>thought\nCall it.\n<channel|>", True),
        (CALLED + "<|tool_response>", True),
        (RESPONDED[len("<|tool_response>"):] + "<|channel>thought\n", False),
        ("Answer now.\n<channel|>", True),
        ("It is 18 C.<turn|>", True),
        ("\n", False)])
    assert prepared[0]["input_ids"] == ids
    assert trained_positions(prepared[0]) == trained


def test_an_earlier_answer_whose_thought_the_template_drops_is_not_trained(tokenizer):
    row = {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "reasoning_content": "t1",
                                                           "content": "A1"},
                        {"role": "user", "content": "Q2"}, {"role": "assistant", "reasoning_content": "t2",
                                                           "content": "A2"}]}
    tokens = data_tokens.tokenize_conversation(tokenizer, data_messages.to_messages(row), 4096)
    ids, trained = expected_row(tokenizer, [
        ("<|turn>system\n<|think|>\n<turn|>\n<|turn>user\nQ1<turn|>\n<|turn>model\n", False),
        ("A1<turn|>", False),  # shown without t1, which the model wrote before it: context only
        ("\n<|turn>user\nQ2<turn|>\n<|turn>model\n", False),
        ("<|channel>thought\nt2\n<channel|>", True), ("A2<turn|>", True), ("\n", False)])
    assert tokens["input_ids"] == ids and trained_positions(tokens) == trained


def test_rows_without_a_thought_keep_thinking_off(tokenizer):
    tokens = data_tokens.tokenize_conversation(tokenizer, [{"role": "user", "content": "Hi"},
                                                           {"role": "assistant", "content": "Hello"}], 64)
    assert tokenizer.decode(tokens["input_ids"]) == "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello<turn|>\n"


# ------------------------------------------------------------------ reading thoughts
@pytest.mark.parametrize("turn", [
    {"role": "assistant", "reasoning_content": "T", "content": "A"},
    {"role": "assistant", "reasoning": "T", "content": "A"},
    {"role": "assistant", "thinking": "T", "content": "A"},
    {"role": "assistant", "content": "<|channel>thought\nT\n<channel|>A"},
    {"from": "gpt", "value": " <|channel>thought\nT\n<channel|> A "},
])
def test_thoughts_are_read_from_the_common_fields_and_inline(turn):
    messages = data_messages.to_messages({"messages": [{"role": "user", "content": "Q"}, turn]})
    assert messages[1] == {"role": "assistant", "content": "A", "reasoning_content": "T"}


def test_an_inline_thought_renders_as_the_model_wrote_it():
    written = "<|channel>thought\nFirst, 17 × 3.\n<channel|>51."
    messages = data_messages.to_messages({"messages": [{"role": "user", "content": "Q"},
                                                       {"role": "assistant", "content": written}]})
    assert data_chat_format.format_chat(messages).endswith("<|turn>model\n" + written + "<turn|>\n")


# ------------------------------------------------------------------ reading tool use
def test_openai_tool_calls_and_tool_turns_become_the_templates_fields():
    messages = data_messages.to_messages(OPENAI_TOOL_ROW)
    assert messages == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "id": "c1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
         "tool_responses": [{"name": "get_weather", "response": "18 C"}]},
        {"role": "assistant", "content": "It is 18 C."}]
    assert data_messages.row_tools(OPENAI_TOOL_ROW) == [WEATHER]


def test_reading_does_not_change_what_the_template_shows():
    """The same row rendered from its OpenAI form (arguments as objects) and from what to_messages made."""
    raw = json.loads(json.dumps(OPENAI_TOOL_ROW))
    raw["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    assert (data_chat_format.format_chat(raw["messages"], tools=[WEATHER])
            == data_chat_format.format_chat(data_messages.to_messages(OPENAI_TOOL_ROW), tools=[WEATHER]))


def test_tool_responses_without_ids_are_matched_to_the_calls_in_order():
    calls = [{"type": "function", "function": {"name": "a", "arguments": {}}},
             {"name": "b", "arguments": {"x": 1}}]  # flat {"name", "arguments"} as some datasets write it
    messages = data_messages.to_messages({"messages": [
        {"role": "user", "content": "Q"}, {"role": "assistant", "tool_calls": calls},
        {"role": "tool", "content": "ra"}, {"role": "tool", "content": [{"type": "text", "text": "r"},
                                                                       {"type": "text", "text": "b "}]},
        {"role": "assistant", "content": "Done."}]})
    assert messages[1]["tool_responses"] == [{"name": "a", "response": "ra"}, {"name": "b", "response": "rb "}]
    text = data_chat_format.format_chat(messages)
    assert f"response:a{{value:{Q}ra{Q}}}" in text and f"response:b{{value:{Q}rb {Q}}}" in text


def test_the_templates_own_tool_responses_are_read():
    row = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Sunny.", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
        "tool_responses": [{"name": "get_weather", "response": {"sky": "sun"}}]}]}
    messages = data_messages.to_messages(row)
    assert messages[1]["tool_responses"] == [{"name": "get_weather", "response": {"sky": "sun"}}]
    assert data_chat_format.format_chat(messages).endswith(
        f"<|tool_response>response:get_weather{{sky:{Q}sun{Q}}}<tool_response|>Sunny.<turn|>\n")


@pytest.mark.parametrize("tools", [
    [WEATHER], [WEATHER["function"]], json.dumps([WEATHER]), json.dumps([WEATHER["function"]])])
def test_tools_columns_in_the_shapes_datasets_store(tools):
    assert data_messages.row_tools({"tools": tools}) == [WEATHER]


def test_no_tools():
    assert data_messages.row_tools({"messages": []}) is None and data_messages.row_tools({"tools": ""}) is None


def test_developer_is_the_system():
    messages = data_messages.to_messages({"messages": [{"role": "developer", "content": "Be brief."},
                                                       {"role": "user", "content": "Q"},
                                                       {"role": "assistant", "content": "A"}]})
    assert messages[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("turns, expected", [
    ([{"role": "user", "content": "Q"}, {"role": "tool", "content": "r"}, {"role": "assistant", "content": "A"}],
     "a tool turn must follow the assistant turn whose tool_calls it answers"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{not json"}}]}], "arguments of the call to 'f' are not valid JSON"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "[1, 2]"}}]}], "are a list, expected an object"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}],
     "has no function name"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "tool_calls": {"name": "f"}}],
     "'tool_calls' is a dict, expected a list"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "reasoning_content": "T", "content": ""}],
     "turn 1 (assistant) is empty"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "reasoning_content": ["T"], "content": "A"}],
     "the thought is a list"),
    ([{"role": "system", "content": [{"type": "image", "image": "x.png"}]}, {"role": "user", "content": "Q"},
      {"role": "assistant", "content": "A"}], "system turn holds text only"),
    ([{"role": "user", "content": [{"type": "video", "video": "x.mp4"}]}, {"role": "assistant", "content": "A"}],
     "is not a text, image or audio part"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]},
      {"role": "tool", "content": [{"type": "image", "image": "x.png"}]}, {"role": "assistant", "content": "A"}],
     "only text tool responses"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]},
      {"role": "tool", "content": "r"}], "the last turn is from the tool"),
])
def test_bad_tool_and_thought_rows_say_what_is_wrong(turns, expected):
    with pytest.raises(DatasetFormatError, match=None) as info:
        data_messages.to_messages({"messages": turns}, "row 4")
    assert str(info.value).startswith("row 4") and expected in str(info.value)


@pytest.mark.parametrize("tools, expected", [
    ("{oops", "'tools' column is not valid JSON"), ({"name": "f"}, "'tools' is a dict"),
    ([{"description": "no name"}], "has no function name")])
def test_bad_tools_columns_say_what_is_wrong(tools, expected):
    with pytest.raises(DatasetFormatError, match=expected):
        data_messages.row_tools({"tools": tools})


def test_prepare_dataset_reads_tools_through_a_formatting_function(tokenizer):
    def formatting(row):
        return {"messages": row["conversation"], "tools": row["functions"]}

    row = {"conversation": OPENAI_TOOL_ROW["messages"], "functions": json.dumps([WEATHER["function"]])}
    prepared = data_dataset.prepare_dataset([row], tokenizer, formatting_func=formatting)
    assert WEATHER_DECLARED in tokenizer.decode(prepared[0]["input_ids"])
    train, held_out = data_dataset.split_train_eval(data_dataset.prepare_dataset(
        [row, THINKING_ROW, row], tokenizer, formatting_func=lambda r: r if "messages" in r else formatting(r)), 0.34)
    assert train.rows_tool_use + held_out.rows_tool_use == 2 and train.rows_thinking + held_out.rows_thinking == 1
