"""Where rows come from: files, lists, `datasets` objects, the bundled sets and the hub.

The first stage of the data path (README "Data"): `numbered_rows(data)` turns whatever a person
passes to `prepare_dataset` into (where, row) pairs, `where` naming the row in errors counted
from 1 ("line 7" of a JSON Lines or CSV file, "row 3" elsewhere). Files (.jsonl, .json, .csv,
.parquet, or a folder of them) are read by gemmatune.data.readers. A line that cannot be read
comes as its DatasetFormatError in place of the row, so the caller decides whether to skip it.

Hub datasets: `datasets` decodes Image/Audio columns when a row is read (every image into
memory, audio only with torchcodec + FFmpeg installed). `keep_media_encoded` switches those
columns to decode=False, so rows carry {"bytes", "path"} dicts, which image and audio parts
accept like paths (gemmatune.data.media decodes them when a batch is built).
"""
import json
import os
import socket
from pathlib import Path

from gemmatune.data.readers import SUFFIXES, read_rows
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
    """datasets.load_dataset, with an error that says what to do when offline.

    Without a network, `datasets` retries for about half a minute before it fails; the hub is
    probed first (a TCP connection, nothing sent), and a dataset that is neither reachable nor in
    the local cache fails at once.

    Raises:
        DatasetDownloadError: the hub is not reachable and the dataset is not cached, or the
            download failed (the message says what to do instead).
    """
    import datasets
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES  # "json", "csv", ...: local builders

    on_the_hub = not Path(name).exists() and name not in _PACKAGED_DATASETS_MODULES
    if on_the_hub and not hub_reachable() and not _in_datasets_cache(name, kwargs.get("cache_dir")):
        raise DatasetDownloadError(
            f"could not download {name!r} (split {split!r}): the Hugging Face hub is not reachable from here and "
            f"the dataset is not in the local cache. Use data='bundled' for the dataset shipped with gemmatune, or "
            f"pass a local file ({', '.join(SUFFIXES)}) or a folder of them.")
    try:
        return datasets.load_dataset(name, split=split, **kwargs)
    except Exception as exc:  # connection, auth and offline-mode errors come in many types
        raise DatasetDownloadError(
            f"could not download {name!r} (split {split!r}): {type(exc).__name__}: {exc}. "
            "No network, or the dataset needs a login? Use data='bundled' for the dataset shipped "
            f"with gemmatune, or pass a local file ({', '.join(SUFFIXES)}).") from exc


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers at all (a TCP connection, nothing sent); False in offline mode."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.create_connection((host.split(":")[0], int(host.split(":")[1]) if ":" in host else 443),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _in_datasets_cache(name: str, cache_dir=None) -> bool:
    """Whether `datasets` or the hub holds a copy of a hub dataset on this machine."""
    import datasets
    from huggingface_hub import constants

    owner, _, dataset = name.rpartition("/")
    prepared = Path(cache_dir or datasets.config.HF_DATASETS_CACHE).expanduser()
    names = ["___".join(filter(None, [owner, dataset])), "___".join(filter(None, [owner, dataset.lower()]))]
    downloaded = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
    return downloaded.is_dir() or any((prepared / n).is_dir() for n in names)


def numbered_rows(data):
    """(where, row) pairs: where names the row in errors, counted from 1 ("line N" in a JSON Lines
    or CSV file, the file's own line number; "row N" elsewhere; a folder's rows start with the
    file's name). A row that cannot be read comes as its DatasetFormatError in place of the row,
    so the caller decides whether to skip it."""
    if isinstance(data, str) and data == "bundled":
        data = bundled_dataset_path()
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"data={str(data)!r} is not a file or folder. Pass data='bundled', a path to a "
                                    f"{', '.join(SUFFIXES)} file (or a folder of them), a list of rows, or "
                                    f"load_hub_dataset({str(data)!r}).")
        yield from read_rows(path)
        return
    if isinstance(data, dict):  # a DatasetDict is a dict of splits
        raise DatasetFormatError(f"data is a dict with keys {', '.join(map(str, data))}: pass one split, "
                                 "e.g. data['train'], or a list of rows.", "not a list")
    for number, row in enumerate(keep_media_encoded(data), start=1):
        yield f"row {number}", row
