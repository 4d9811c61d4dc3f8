"""gemmatune.data: schema conversion, Gemma 4 chat rendering, label masks, truncation, batching.

Fast and CPU-only: the tiny tokenizer (a BPE trained on the bundled dataset in about a second)
is built once for the module.
"""
import importlib.util
import json

import pytest
import torch

import gemmatune.data.batches as data_batches
import gemmatune.data.chat_format as data_chat_format
import gemmatune.data.dataset as data_dataset
import gemmatune.data.messages as data_messages
import gemmatune.data.rows as data_rows
import gemmatune.data.tokens as data_tokens
from gemmatune.data.rows import DatasetFormatError
from gemmatune.data.tokens import IGNORE_INDEX
from gemmatune.model.tiny import build_tiny_tokenizer
from tests.helpers import REPO

ROOT = REPO

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4. ➕"},
    {"role": "user", "content": "  And 3 + 3?\n"},  # the template trims whitespace
    {"role": "assistant", "content": "3 + 3 = 6. ➕"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def bundled_rows():
    return [json.loads(line) for line in data_rows.bundled_dataset_path().read_text(encoding="utf-8").splitlines()]


def trained_text(tokenizer, example) -> str:
    """Decode only the tokens whose label is trained."""
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


# ------------------------------------------------------------------ to_messages
def test_openai_schema_with_string_and_text_parts():
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        {"role": "model", "content": "Hi!"},
    ]}
    assert data_messages.to_messages(row) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hellothere"},  # parts trimmed and concatenated, as the template does
        {"role": "assistant", "content": "Hi!"},
    ]


def test_openai_schema_keeps_image_parts_as_a_list():
    parts = [{"type": "image", "url": "cat.png"}, {"type": "text", "text": "What is this?"}]
    messages = data_messages.to_messages({"messages": [{"role": "user", "content": parts},
                                              {"role": "assistant", "content": "A cat. 🐈"}]})
    assert messages[0]["content"] == parts
    assert data_chat_format.format_chat(messages).startswith("<bos><|turn>user\n<|image|>What is this?<turn|>\n")


def test_sharegpt_schema():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                             {"from": "gpt", "value": "A"}, {"from": "user", "value": "Q2"},
                             {"from": "assistant", "value": "A2"}]}
    assert [(m["role"], m["content"]) for m in data_messages.to_messages(row)] == [
        ("system", "S"), ("user", "Q"), ("assistant", "A"), ("user", "Q2"), ("assistant", "A2")]


def test_alpaca_schema_with_and_without_input():
    assert data_messages.to_messages({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}) == [
        {"role": "user", "content": "Translate.\n\nBonjour"}, {"role": "assistant", "content": "Hello"}]
    assert data_messages.to_messages({"instruction": "Say hi.", "input": "", "output": "Hi"})[0]["content"] == "Say hi."
    assert data_messages.to_messages({"instruction": "Say hi.", "output": "Hi"})[0]["content"] == "Say hi."


@pytest.mark.parametrize("row, expected", [
    ({"question": "Q", "answer": "A"},
     ["row 17", "no 'conversations', 'messages' or 'instruction'/'output'", "found: question, answer",
      "formatting function"]),
    ({"messages": []}, ["row 17", "empty"]),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]},
     ["row 17", "turn 1", "unknown role 'bot'", "user/human, assistant/gpt/model, system"]),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                   {"role": "user", "content": "Q2"}]},
     ["row 17", "last turn is from the user, not the assistant"]),
    ({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "A"}]},
     ["row 17", "turn 0", "content is int", "expected a string"]),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}]},
     ["row 17", "turn 1 (assistant) is empty"]),
    ({"messages": [{"content": "Q"}]}, ["row 17", "turn 0 has no 'role' or 'from' key"]),
    ({"instruction": "Q", "output": None}, ["row 17", "no 'conversations'"]),
    ({"instruction": "Q", "output": 3}, ["row 17", "'output' is int"]),
])
def test_bad_rows_name_the_row_and_the_problem(row, expected):
    with pytest.raises(DatasetFormatError) as info:
        data_messages.to_messages(row, "row 17")
    for text in expected:
        assert text in str(info.value)
    assert isinstance(info.value, ValueError)


def test_prepare_dataset_names_a_bad_row_counting_from_one(tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}] * 3
    rows.append({"prompt": "Q", "completion": "A"})
    with pytest.raises(DatasetFormatError, match=r"row 4: .*found: prompt, completion.*skip_bad_rows=True"):
        data_dataset.prepare_dataset(rows, tokenizer)


def test_jsonl_errors_name_the_file_line_and_rows_count_from_one(tokenizer, tmp_path):
    good = json.dumps(_row("Hi", "Hello"))
    path = tmp_path / "rows.jsonl"
    path.write_text(f"{good}\n\n{good}\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"^line 4: turn 0 has unknown role 'bot'"):
        data_dataset.prepare_dataset(path, tokenizer)  # line 2 is blank: the 3rd row is on line 4
    rows = [_row("Hi", "Hello"), {"messages": [{"role": "bot", "content": "x"}]}]
    with pytest.raises(DatasetFormatError, match=r"^row 2: turn 0 has unknown role"):
        data_dataset.prepare_dataset(rows, tokenizer)


def test_skip_bad_rows_skips_and_counts_them_by_reason(tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(_row("Hi", "Hello")), "{oops", json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
             json.dumps({"instruction": "Q", "output": ""}), "[1, 2", json.dumps(_row("Bye", "Goodbye"))]
    path.write_text("\n".join(lines) + "\n")
    prepared = data_dataset.prepare_dataset(path, tokenizer, skip_bad_rows=True)
    assert prepared.rows == 2
    assert prepared.rows_skipped == {"not valid JSON": 2, "unknown role": 1, "empty answer": 1}
    assert prepared.rows_dropped == 4
    report = prepared.report()
    assert "4 dropped" in report and "2 skipped: not valid JSON" in report and "1 skipped: unknown role" in report
    assert "first skipped: " in report and "line 2: not valid JSON" in report
    train, held_out = data_dataset.split_train_eval(prepared, eval_fraction=0.5)
    assert train.rows_skipped == prepared.rows_skipped and held_out.rows_skipped == {}


@pytest.mark.parametrize("length", [0, 1, -5, 2.5])
def test_max_seq_length_below_two_tokens_is_refused(tokenizer, length):
    with pytest.raises(ValueError, match=f"max_seq_length={length!r}"):
        data_dataset.prepare_dataset("bundled", tokenizer, max_seq_length=length)


# ------------------------------------------------------------------ chat rendering
def conversations(bundled_rows) -> list[tuple[list[dict], dict]]:
    """(messages, format keywords) of CONVERSATION's slices and every bundled row: its tools, and
    thinking on when it carries a thought (as prepare_dataset renders it)."""
    found = [(CONVERSATION, {}), (CONVERSATION[1:3], {}), (CONVERSATION[:2], {})]
    for row in bundled_rows:
        messages = data_messages.to_messages(row)
        found.append((messages, {"tools": data_messages.row_tools(row),
                                 "enable_thinking": data_chat_format.conversation_thinks(messages)}))
    return found


@pytest.mark.parametrize("generation", [False, True])
def test_format_chat_matches_the_tokenizer_chat_template(tokenizer, bundled_rows, generation):
    for messages, keywords in conversations(bundled_rows):
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **keywords)
        assert data_chat_format.format_chat(messages, add_generation_prompt=generation, **keywords) == expected


def test_format_chat_shape():
    text = data_chat_format.format_chat(CONVERSATION[1:3], add_generation_prompt=False)
    assert text == "<bos><|turn>user\nWhat is 2 + 2?<turn|>\n<|turn>model\n2 + 2 = 4. ➕<turn|>\n"
    prompt = data_chat_format.format_chat(CONVERSATION[1:2], add_generation_prompt=True)
    assert prompt.endswith("<turn|>\n<|turn>model\n")


# ------------------------------------------------------------------ tokenisation and labels
def test_labels_cover_only_answers_and_their_end_of_turn(tokenizer):
    tokens = data_tokens.tokenize_conversation(tokenizer, CONVERSATION, max_seq_length=512)
    assert not tokens["truncated"]
    assert tokens["input_ids"][0] == tokenizer.bos_token_id and tokens["labels"][0] == IGNORE_INDEX
    assert trained_text(tokenizer, tokens) == "2 + 2 = 4. ➕<turn|>3 + 3 = 6. ➕<turn|>"
    # Two trained spans, each exactly one answer: no header, no "\n" after <turn|>.
    trained = [label != IGNORE_INDEX for label in tokens["labels"]]
    starts = sum(1 for prev, cur in zip([False] + trained, trained) if cur and not prev)
    assert starts == 2


def test_train_on_inputs_trains_everything_but_bos(tokenizer):
    tokens = data_tokens.tokenize_conversation(tokenizer, CONVERSATION, 512, train_on_inputs=True)
    assert tokens["labels"][0] == IGNORE_INDEX
    assert tokens["labels"][1:] == tokens["input_ids"][1:]


def test_segment_ids_equal_the_ids_of_the_rendered_string(tokenizer, bundled_rows):
    """The label mask is built segment by segment; the model at inference sees the whole string."""
    for messages, keywords in conversations(bundled_rows):
        ids = data_tokens.tokenize_conversation(tokenizer, messages, 4096, tools=keywords.get("tools"))["input_ids"]
        text = data_chat_format.format_chat(messages, **keywords)
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_truncation(tokenizer):
    full = data_tokens.tokenize_conversation(tokenizer, CONVERSATION, 4096)
    cut = data_tokens.tokenize_conversation(tokenizer, CONVERSATION, 10)
    assert cut["truncated"] and len(cut["input_ids"]) == len(cut["labels"]) == 10
    assert cut["input_ids"] == full["input_ids"][:10] and cut["labels"] == full["labels"][:10]
    exact = data_tokens.tokenize_conversation(tokenizer, CONVERSATION, len(full["input_ids"]))
    assert not exact["truncated"]


def _row(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def test_prepare_dataset_counts_truncated_and_dropped_rows(tokenizer):
    short = _row("Hi", "Hello!")
    long_answer = _row("Hi", "word " * 200)
    long_prompt = _row("word " * 200, "Hello!")  # nothing of the answer survives truncation
    rows = [short, long_answer, long_prompt, short]
    n_short = len(data_tokens.tokenize_conversation(tokenizer, data_messages.to_messages(short), 4096)["input_ids"])
    max_len = 64
    assert n_short < max_len

    prepared = data_dataset.prepare_dataset(rows, tokenizer, max_seq_length=max_len)
    assert (prepared.rows, prepared.rows_truncated, prepared.rows_dropped) == (3, 1, 1)
    assert prepared.rows_dropped_untrained == 1 and prepared.rows_dropped_long == 0
    assert len(prepared) == 3 and len(prepared[1]["input_ids"]) == max_len
    assert prepared.total_tokens == 2 * n_short + max_len
    assert prepared.trained_tokens == sum(sum(label != IGNORE_INDEX for label in ex["labels"]) for ex in prepared)
    assert prepared.report().startswith(
        f"3 rows, {prepared.total_tokens:,} tokens ({prepared.trained_tokens:,} trained); "
        "1 rows longer than 64 tokens were truncated; 1 dropped")

    dropped = data_dataset.prepare_dataset(rows, tokenizer, max_seq_length=max_len, drop_long=True)
    assert (dropped.rows, dropped.rows_truncated, dropped.rows_dropped_long, dropped.rows_dropped) == (2, 0, 2, 2)
    assert "0 rows longer than 64 tokens were truncated; 2 dropped (2 longer than 64 tokens" in dropped.report()


def test_collate_pads_right(tokenizer):
    batch = [{"input_ids": [2, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [2, 7], "labels": [-100, 7]}]
    out = data_batches.collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[2, 5, 6], [2, 7, 0]]
    assert out["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert all(t.dtype == torch.long for t in out.values())


# ------------------------------------------------------------------ inputs
def test_bundled_dataset_loads_and_every_row_converts(tokenizer, bundled_rows):
    assert len(bundled_rows) > 300
    assert data_rows.bundled_dataset_path().stat().st_size < 200_000
    for index, row in enumerate(bundled_rows):
        messages = data_messages.to_messages(row, f"row {index + 1}")
        assert all(isinstance(m["content"], str) for m in messages)  # the tiny BPE trains on strings
    prepared = data_dataset.prepare_dataset("bundled", tokenizer, max_seq_length=512)
    assert prepared.rows == len(bundled_rows) and prepared.rows_dropped == prepared.rows_truncated == 0
    assert 0 < prepared.trained_tokens < prepared.total_tokens


def test_bundled_file_matches_its_generator():
    spec = importlib.util.spec_from_file_location("make_bundled_dataset", ROOT / "scripts" / "make_bundled_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in module.build_rows())
    assert text == data_rows.bundled_dataset_path().read_text(encoding="utf-8")


def test_hf_dataset_input(tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = [{"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i} 🔢"}]}
            for i in range(5)]
    prepared = data_dataset.prepare_dataset(datasets.Dataset.from_list(rows), tokenizer, max_seq_length=128)
    assert prepared.rows == 5
    assert trained_text(tokenizer, prepared[3]) == "3 🔢<turn|>"
    with pytest.raises(DatasetFormatError, match="pass one split"):
        data_dataset.prepare_dataset(datasets.DatasetDict(train=datasets.Dataset.from_list(rows)), tokenizer)


def test_json_and_jsonl_paths(tokenizer, tmp_path):
    rows = [_row("Hi", "Hello! 👋"), {"instruction": "Count to 2.", "output": "1, 2 🔢"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    for name in ("rows.json", "rows.jsonl"):
        assert data_dataset.prepare_dataset(str(tmp_path / name), tokenizer).rows == 2
    (tmp_path / "broken.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(DatasetFormatError, match="line 2: not valid JSON"):
        data_dataset.prepare_dataset(tmp_path / "broken.jsonl", tokenizer)
    with pytest.raises(FileNotFoundError, match="load_hub_dataset"):
        data_dataset.prepare_dataset("someone/some-dataset", tokenizer)


def test_formatting_func(tokenizer):
    rows = [{"question": "Q?", "answer": "A. ✅"}]
    prepared = data_dataset.prepare_dataset(rows, tokenizer, formatting_func=lambda r: [
        {"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}])
    assert trained_text(tokenizer, prepared[0]) == "A. ✅<turn|>"


def test_show_example_shows_only_answers_as_trained(tokenizer):
    prepared = data_dataset.prepare_dataset([{"messages": CONVERSATION}], tokenizer)
    text = data_dataset.show_example(prepared, tokenizer, 0)
    reads, trains = text.split("--- what the loss trains (labels != -100) ---")
    assert "<|turn>user\nWhat is 2 + 2?<turn|>" in reads
    assert trains.strip().splitlines() == ["[1] 2 + 2 = 4. ➕<turn|>", "[2] 3 + 3 = 6. ➕<turn|>"]


def test_load_hub_dataset_offline_says_what_to_do(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data_rows.DatasetDownloadError, match=r"could not download 'some/set'.*data='bundled'"):
        data_rows.load_hub_dataset("some/set")


def test_split_train_eval(tokenizer):
    prepared = data_dataset.prepare_dataset("bundled", tokenizer, max_seq_length=512)
    train, held_out = data_dataset.split_train_eval(prepared, eval_fraction=0.1, seed=0)
    assert len(held_out) == round(len(prepared) * 0.1) and len(train) + len(held_out) == len(prepared)
    ids = {id(ex) for ex in train.examples}
    assert not any(id(ex) in ids for ex in held_out.examples)
