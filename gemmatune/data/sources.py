"""Where an image's or a clip's bytes come from: a path (checked), bytes, or an object in memory.

Shared by gemmatune.data.images and gemmatune.data.audio. URLs are refused: nothing is
downloaded while data is prepared.
"""
import io
import os
from pathlib import Path

from gemmatune.errors import DatasetFormatError


def medium_source(value, kind: str, where: str, base_dir: Path | None):
    """A path (checked to exist), bytes, or the object itself. URLs are refused: no network."""
    if isinstance(value, dict):  # the hub's undecoded form {"bytes", "path"}
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not len(value):
            raise DatasetFormatError(f"{where}: the {kind} bytes are empty.", f"corrupt {kind}")
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if text.startswith(("http://", "https://", "ftp://", "s3://", "gs://", "hf://")):
            raise DatasetFormatError(
                f"{where}: the {kind} is a URL ({text[:80]}); gemmatune does not download files while "
                f"preparing data. Download it first and pass the local path, or the bytes.", f"remote {kind}")
        path = Path(text.removeprefix("file://")).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise DatasetFormatError(f"{where}: {kind} file not found: {path}"
                                     + (f" (relative paths are read from {base_dir})" if base_dir else ""),
                                     f"missing {kind}")
        return path
    if value is None:
        raise DatasetFormatError(f"{where}: the {kind} part has no {kind} (give '{kind}': a path, bytes"
                                 + (", a PIL image" if kind == "image" else ", an array with 'sampling_rate'")
                                 + ").", f"missing {kind}")
    return value


def opened(source):
    return io.BytesIO(source) if isinstance(source, bytes) else source
