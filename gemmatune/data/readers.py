"""Data files -> numbered rows: one reader per file kind, naming each row the way a person finds it.

    .jsonl     one JSON object a line         "line 7" (the file's own line number, blank lines counted)
    .json      a JSON list of rows            "row 3"  (a .json file holding JSON Lines is read as such)
    .csv       a header line, then rows       "line 4" (where the row starts; cells are text)
    .parquet   columns of rows                "row 3"
    a folder   the files above directly in it, by name: "part-2.jsonl line 7"

Why this care: the files people have come from Excel (CSV, often UTF-16 or with a BOM), Windows'
Notepad ("Unicode" is UTF-16 with a BOM; "UTF-8" has a BOM), pandas and the hub (Parquet), and
scrapers (a stray Latin-1 byte in one line of a million). So: UTF-8 with or without a BOM and
UTF-16 (with a BOM, or recognised from its NUL bytes) are read; a line that does not decode is a
DatasetFormatError naming the file and line, yielded in place of its row, so that
`skip_bad_rows=True` skips and counts it like any bad row. Lines are read one at a time, never the
whole file, and a line over MAX_ROW_BYTES is refused without being read into memory: a row of
max_seq_length tokens needs a few KB of text, and parsing a 3 GB line would exhaust the machine.
"""
import codecs
import csv
import io
import json
from pathlib import Path

from gemmatune.errors import DatasetFormatError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_ROW_BYTES = 64 * 2**20  # a row longer than this is refused (reason "row too large")
JSON_CELLS = ("messages", "conversations", "images", "audios")  # CSV cells that hold JSON lists
_CHUNK = 2**20


def read_rows(path: Path):
    """(where, row or DatasetFormatError) for every row of a data file or a folder of them.

    Raises:
        DatasetFormatError: a file kind gemmatune does not read, a folder without data files,
            or a file that is broken as a whole (a .json list that does not parse, a bad Parquet file).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DatasetFormatError(f"the folder {path} holds no {', '.join(SUFFIXES)} files: put the data files "
                                     "directly in it, or pass one file", "no data files")
        for file in files:
            for where, row in _read_file(file):
                yield f"{file.name} {where}", row
        return
    yield from _read_file(path)


def _read_file(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        return _json_rows(path)
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    raise DatasetFormatError(f"{path}: gemmatune reads {', '.join(SUFFIXES)} files (or a folder of them), not "
                             f"{suffix or 'files without a suffix'}; convert it, or pass a list of rows",
                             "unknown file kind")


def sniff_encoding(head: bytes) -> str:
    """The encoding of a file from its first bytes: a BOM, else NUL bytes for UTF-16, else UTF-8."""
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if len(head) >= 4 and head[1] == 0 and head[3] == 0 and head[0] and head[2]:
        return "utf-16-le"  # ASCII text in UTF-16 without a BOM: every other byte is NUL
    if len(head) >= 4 and head[0] == 0 and head[2] == 0 and head[1] and head[3]:
        return "utf-16-be"
    return "utf-8"


def _text_lines(path: Path):
    """(line number, text or DatasetFormatError) of a text file, one line at a time.

    A line that does not decode, or is longer than MAX_ROW_BYTES, comes as its error (the rest of
    an over-long line is skipped unread)."""
    with open(path, "rb") as file:
        encoding = sniff_encoding(file.read(4))
        file.seek(0)
        wide = encoding.startswith("utf-16")
        if wide:  # lines end in two-byte newlines: decode as a stream
            file = io.TextIOWrapper(file, encoding=encoding, errors="surrogateescape", newline="")
        number = 0
        while True:
            line = file.readline(MAX_ROW_BYTES + 1)
            if not line:
                return
            number += 1
            if len(line) > MAX_ROW_BYTES and not line.endswith("\n" if wide else b"\n"):
                size = len(line) + _skip_rest_of_line(file, "\n" if wide else b"\n")
                yield number, DatasetFormatError(
                    f"{path} line {number}: the row is {size / 2**20:,.0f} MiB long; rows over "
                    f"{MAX_ROW_BYTES // 2**20} MiB are refused (a row of max_seq_length tokens needs a few KB of "
                    "text): shorten it, or store its images and audio as files", "row too large")
                continue
            if not wide:
                if number == 1 and encoding == "utf-8-sig":
                    line = line[len(codecs.BOM_UTF8):]
                line = line.decode("utf-8", errors="surrogateescape")
            bad = _undecodable(line)
            yield number, line if bad is None else DatasetFormatError(
                f"{path} line {number}: not valid {'UTF-16' if wide else 'UTF-8'} (byte 0x{bad[1]:02x} at column "
                f"{bad[0] + 1}); the file, or this line, is in another encoding (Latin-1 / Windows-1252?): save it "
                "as UTF-8", f"not valid {'UTF-16' if wide else 'UTF-8'}")


def _skip_rest_of_line(file, newline) -> int:
    skipped = 0
    while True:
        chunk = file.readline(_CHUNK)
        skipped += len(chunk)
        if not chunk or chunk.endswith(newline):
            return skipped


def _undecodable(text: str) -> tuple[int, int] | None:
    """(column, byte) of the first byte that did not decode (kept by "surrogateescape" as U+DC80-U+DCFF)."""
    for column, char in enumerate(text):
        if "\udc80" <= char <= "\udcff":
            return column, ord(char) - 0xDC00
    return None


def _jsonl_rows(path: Path):
    for number, line in _text_lines(path):
        if isinstance(line, DatasetFormatError):
            yield f"line {number}", line
        elif line.strip():
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"line {number}", DatasetFormatError(f"{path} line {number}: not valid JSON ({exc.msg}).",
                                                           "not valid JSON")


def _json_rows(path: Path):
    raw = path.read_bytes()
    encoding = sniff_encoding(raw[:4])
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DatasetFormatError(f"{path} line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); the file is in "
                                 "another encoding (Latin-1 / Windows-1252?): save it as UTF-8",
                                 "not valid UTF-8") from None
    del raw
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object a line: JSON Lines under a .json name
            yield from _jsonl_rows(path)
            return
        raise DatasetFormatError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg}). A .json file holds one "
                                 "list of rows; JSON Lines (.jsonl) holds one row a line.", "not valid JSON") from None
    if not isinstance(data, list):
        raise DatasetFormatError(f"{path}: expected a JSON list of rows, got {type(data).__name__}. "
                                 "Use a list, or JSON Lines (.jsonl) with one row a line.", "not a list")
    for number, row in enumerate(data, start=1):
        yield f"row {number}", row


def _csv_rows(path: Path):
    """CSV rows as {column: text}; the JSON_CELLS columns are parsed when they hold JSON. A line
    that does not decode is one bad row, reported in its place."""
    first_line, errors = [None], {}  # the first line of the record being read; undecodable lines

    def lines():
        for number, line in _text_lines(path):
            if isinstance(line, DatasetFormatError):
                errors[number] = line
                yield "\n"  # a blank line, which csv skips
            else:
                if first_line[0] is None and line.strip():
                    first_line[0] = number
                yield line

    reader, header = csv.reader(lines()), None
    while True:
        first_line[0] = None
        previous = csv.field_size_limit(MAX_ROW_BYTES)  # a long text cell is legitimate (default: 128 KB)
        try:
            record = next(reader)
        except StopIteration:
            record = None
        except csv.Error as exc:
            record = DatasetFormatError(f"{path} line {first_line[0]}: not a valid CSV row ({exc}).", "not valid CSV")
        finally:
            csv.field_size_limit(previous)
        start = first_line[0]
        for number in sorted(errors):
            yield f"line {number}", errors.pop(number)
        if record is None:
            return
        if isinstance(record, DatasetFormatError):
            yield f"line {start}", record
        elif record and header is None:
            header = record
        elif record:
            yield f"line {start}", _csv_row(header, record, path, f"line {start}")


def _csv_row(header: list, record: list, path: Path, where: str):
    if len(record) != len(header):
        return DatasetFormatError(f"{path} {where}: {len(record)} cells under a header of {len(header)} columns "
                                  f"({', '.join(header)}); quote cells that contain commas or line breaks",
                                  "not valid CSV")
    row = dict(zip(header, record))
    for column in JSON_CELLS:
        value = row.get(column, "").strip()
        if value.startswith(("[", "{")):
            try:
                row[column] = json.loads(value)
            except json.JSONDecodeError as exc:
                return DatasetFormatError(f"{path} {where}: the '{column}' cell is not valid JSON ({exc.msg}).",
                                          "not valid JSON")
    return row


def _parquet_rows(path: Path):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        batches = table.iter_batches(batch_size=256)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield f"row {number}", row
    except (pyarrow.ArrowException, OSError) as exc:
        raise DatasetFormatError(f"{path}: not a readable Parquet file ({exc}); write it again, e.g. with "
                                 "pandas' to_parquet or datasets' to_parquet", "not valid Parquet") from None
