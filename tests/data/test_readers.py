"""The files people have: .jsonl, .json, .csv, .parquet and folders of them; BOMs, UTF-16, a bad byte in
one line, a row too large to read. Every row a file holds becomes the same conversation."""
import codecs
import json

import pytest

import gemmatune.data.readers as data_readers
from gemmatune.data.dataset import prepare_dataset
from gemmatune.data.rows import numbered_rows
from gemmatune.errors import DatasetFormatError

ROWS = [{"instruction": "Say hi.", "input": "", "output": "Hi! 👋"},
        {"instruction": "Count to 2, «vite».", "input": "in French", "output": "un, deux"},
        {"instruction": "Name a colour.", "input": "", "output": "blue, like the sea"}]
MESSAGES = [{"messages": [{"role": "user", "content": "Q, with a comma"}, {"role": "assistant", "content": "A"}]}]


def _jsonl(rows) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _csv(rows) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _rows(path) -> list:
    return [row for _, row in numbered_rows(path)]


@pytest.fixture(scope="module")
def expected(tiny_tokenizer):
    return prepare_dataset(ROWS, tiny_tokenizer, max_seq_length=128).examples


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_every_file_kind_and_encoding_gives_the_same_rows(tmp_path, tiny_tokenizer, expected, kind, encoding):
    path = tmp_path / f"rows.{kind}"
    if kind == "parquet":
        if encoding != "utf-8":
            pytest.skip("Parquet stores UTF-8 itself")
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    else:
        text = {"jsonl": _jsonl, "json": lambda rows: json.dumps(rows, ensure_ascii=False), "csv": _csv}[kind](ROWS)
        path.write_bytes(text.encode(encoding))
    assert prepare_dataset(path, tiny_tokenizer, max_seq_length=128).examples == expected


def test_utf16_without_a_bom_is_recognised(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(_jsonl(ROWS).encode("utf-16-le"))
    assert _rows(path) == ROWS


def test_a_bom_does_not_cost_line_one(tmp_path):
    """It used to: line 1 became invalid JSON, and skip_bad_rows dropped it silently."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + _jsonl(ROWS).encode())
    assert [where for where, _ in numbered_rows(path)] == ["line 1", "line 2", "line 3"]
    assert _rows(path) == ROWS


def test_an_undecodable_line_names_the_file_and_line_and_can_be_skipped(tmp_path, tiny_tokenizer):
    path = tmp_path / "rows.jsonl"
    lines = _jsonl(ROWS).encode().splitlines(keepends=True)
    lines[1] = lines[1].replace("«".encode(), b"\xab")  # a Latin-1 byte in a UTF-8 file
    path.write_bytes(b"".join(lines))
    with pytest.raises(DatasetFormatError, match=rf"{path} line 2: not valid UTF-8 \(byte 0xab at column \d+\)"):
        prepare_dataset(path, tiny_tokenizer)
    prepared = prepare_dataset(path, tiny_tokenizer, skip_bad_rows=True)
    assert prepared.rows == 2 and prepared.rows_skipped == {"not valid UTF-8": 1}
    assert "line 2: not valid UTF-8" in prepared.report()


def test_an_undecodable_csv_row_is_one_bad_row(tmp_path, tiny_tokenizer):
    path = tmp_path / "rows.csv"
    data = _csv(ROWS).encode().replace("«".encode(), b"\xab")
    path.write_bytes(data)
    prepared = prepare_dataset(path, tiny_tokenizer, skip_bad_rows=True)
    assert prepared.rows == 2 and prepared.rows_skipped == {"not valid UTF-8": 1}
    assert "line 3: not valid UTF-8" in prepared.first_skipped


def test_csv_rows_name_their_line_and_parse_json_conversations(tmp_path):
    path = tmp_path / "chats.csv"
    path.write_text('messages,source\n"' + json.dumps(MESSAGES[0]["messages"]).replace('"', '""') + '",web\n\n'
                    + 'not json,web\n', encoding="utf-8")
    rows = list(numbered_rows(path))
    assert rows[0] == ("line 2", {**MESSAGES[0], "source": "web"})
    assert rows[1] == ("line 4", {"messages": "not json", "source": "web"})  # to_messages says what is wrong


def test_a_long_csv_cell_is_read(tmp_path):
    """csv's own limit is 128 KB a cell; a long document is a legitimate row."""
    path = tmp_path / "long.csv"
    path.write_text(_csv([{"instruction": "Summarise.", "input": "word " * 60_000, "output": "Words."}]))
    assert len(_rows(path)[0]["input"]) == 300_000


def test_a_folder_of_files_is_read_in_name_order(tmp_path):
    (tmp_path / "b.csv").write_text(_csv(ROWS[1:]))
    (tmp_path / "a.jsonl").write_text(_jsonl(ROWS[:1]))
    (tmp_path / "notes.txt").write_text("not data")
    rows = list(numbered_rows(tmp_path))
    assert [where for where, _ in rows] == ["a.jsonl line 1", "b.csv line 2", "b.csv line 3"]
    assert [row for _, row in rows] == ROWS
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="holds no .jsonl, .json, .csv, .parquet files"):
        list(numbered_rows(tmp_path / "empty"))


def test_a_json_file_with_a_bom_or_holding_json_lines_is_read(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(codecs.BOM_UTF8 + json.dumps(ROWS).encode())
    assert _rows(path) == ROWS
    path.write_text(_jsonl(ROWS))  # JSON Lines under a .json name
    assert _rows(path) == ROWS


def test_another_file_kind_is_refused_with_the_kinds_read(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello")
    with pytest.raises(DatasetFormatError, match=r"reads .jsonl, .json, .csv, .parquet files .* not .txt"):
        _rows(path)


def test_a_row_too_large_is_refused_without_reading_it(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(data_readers, "MAX_ROW_BYTES", 2**20)
    path = tmp_path / "rows.jsonl"
    huge = {"instruction": "x" * (3 * 2**20), "output": "y"}
    path.write_text(_jsonl(ROWS[:1]) + _jsonl([huge]) + _jsonl(ROWS[1:]))
    with pytest.raises(DatasetFormatError, match=r"line 2: the row is 3 MiB long; rows over 1 MiB are refused"):
        prepare_dataset(path, tiny_tokenizer)
    prepared = prepare_dataset(path, tiny_tokenizer, skip_bad_rows=True)
    assert prepared.rows == 3 and prepared.rows_skipped == {"row too large": 1}


def test_a_broken_parquet_file_is_named(tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DatasetFormatError, match=f"{path}: not a readable Parquet file"):
        _rows(path)
