"""Where rows come from: files, lists, `datasets` objects, the bundled sets and the hub.

The first stage of the data path (README "Data"): `numbered_rows(data)` turns whatever a person
passes to `prepare_dataset` into (where, row) pairs, `where` naming the row in errors counted
from 1 ("line 7" of a JSON Lines file, "row 3" elsewhere). A line that is not valid JSON comes
as its DatasetFormatError in place of the row, so the caller decides whether to skip it.

Hub datasets: `datasets` decodes Image/Audio columns when a row is read (every image into
memory, audio only with torchcodec + FFmpeg installed). `keep_media_encoded` switches those
columns to decode=False, so rows carry {"bytes", "path"} dicts, which image and audio parts
accept like paths (gemmatune.data.media decodes them when a batch is built).
"""
import json
import os
from pathlib import Path

from gemmatune.errors import DatasetDownloadError, DatasetFormatError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_DATASET = ASSETS / "gemmatune_instruct.jsonl"
BUNDLED_MEDIA = {"formulas": ASSETS / "formulas", "speech": ASSETS / "speech"}


def bundled_dataset_path() -> Path:
    """The small instruction dataset shipped with gemmatune (works offline)."""
    return BUNDLED_DATASET


def load_bundled_dataset(name: str, split: str = "train") -> list[dict]:
    """Rows of a media dataset shipped with gemmatune, with absolute file paths.

    "formulas": {"image", "text"}: LaTeX formulas rendered by matplotlib, the text their source.
    "speech": {"audio", "text"}: short English sentences spoken by espeak-ng, the text the sentence.
    split: "train" or "test" (held out). See gemmatune/assets/README.md for how they are made."""
    if name not in BUNDLED_MEDIA:
        raise ValueError(f"no bundled dataset {name!r}; choose one of {', '.join(BUNDLED_MEDIA)}")
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: the bundled datasets have a 'train' and a 'test' split")
    folder = BUNDLED_MEDIA[name]
    column = "image" if name == "formulas" else "audio"
    rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    return [{**row, column: str(folder / row[column])} for row in rows]


def keep_media_encoded(dataset):
    """A datasets.Dataset with its Image/Audio columns switched to decode=False (see the module doc)."""
    features = getattr(dataset, "features", None) or {}
    for name, feature in features.items():
        if type(feature).__name__ in ("Image", "Audio") and getattr(feature, "decode", False):
            dataset = dataset.cast_column(name, type(feature)(decode=False))
    return dataset


def load_hub_dataset(name: str, split: str = "train", **kwargs):
    """datasets.load_dataset, with an error that says what to do when offline."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split, **kwargs)
    except Exception as exc:  # connection, auth and offline-mode errors come in many types
        raise DatasetDownloadError(
            f"could not download {name!r} (split {split!r}): {type(exc).__name__}: {exc}. "
            "No network, or the dataset needs a login? Use data='bundled' for the dataset shipped "
            "with gemmatune, or pass a local .json/.jsonl file.") from exc


def numbered_rows(data):
    """(where, row) pairs: where names the row in errors, counted from 1 ("line N" in a JSON Lines
    file, the file's own line number; "row N" elsewhere). A broken JSON line comes as its
    DatasetFormatError in place of the row, so the caller decides whether to skip it."""
    if isinstance(data, str) and data == "bundled":
        data = bundled_dataset_path()
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"data={str(data)!r} is not a file. Pass data='bundled', a .json or "
                                    f".jsonl path, a list of rows, or load_hub_dataset({str(data)!r}).")
        if path.suffix == ".jsonl":
            yield from _read_jsonl(path)
            return
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise DatasetFormatError(f"{path}: expected a JSON list of rows, got {type(data).__name__}. "
                                     "Use a list, or JSON Lines (.jsonl) with one row a line.", "not a list")
    if isinstance(data, dict):  # a DatasetDict is a dict of splits
        raise DatasetFormatError(f"data is a dict with keys {', '.join(map(str, data))}: pass one split, "
                                 "e.g. data['train'], or a list of rows.", "not a list")
    for number, row in enumerate(keep_media_encoded(data), start=1):
        yield f"row {number}", row


def _read_jsonl(path: Path):
    """JSON Lines: (line N, row) for each non-blank line, N being the file's line number."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"line {number}", DatasetFormatError(f"{path} line {number}: not valid JSON ({exc.msg}).",
                                                           "not valid JSON")
