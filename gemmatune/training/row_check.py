"""Rows whose image or clip turns out broken when decoded are skipped during training, and counted.

prepare_dataset reads only the headers of images and clips unless it verifies them (verify_media,
on with skip_bad_rows=True), because decoding a large dataset takes time. A file cut off after an
intact header then passes, and used to stop training at the batch that held it. When a dataset
with media was not verified, `train` reads its rows through `DecodableRows`: the first time a row
is used its media are decoded once; a row that fails is replaced by the next row that decodes
(padded micro-batches) or left out of its buffer (packed ones, whose buffers were planned from the
rows' lengths: a replacement of another length could not fit), and counted by reason
(`rows_skipped`, in the result and the report printed at the end). Either way it is the same every
time, so resuming replays the same data order.
"""
from gemmatune.data.audio import load_audio
from gemmatune.data.images import ImageRef, load_image
from gemmatune.errors import DatasetFormatError, TrainingSetupError


def needs_decode_check(dataset) -> bool:
    """Media rows that prepare_dataset did not decode (verify_media was off)."""
    if getattr(dataset, "media_verified", False):
        return False
    return any(dataset[i].get("media") for i in range(len(dataset)))


class DecodableRows:
    """A view of a prepared dataset in which every row's media decode (see the module docstring)."""

    def __init__(self, dataset, say=print, replace: bool = True):
        self.dataset, self.say, self.replace = dataset, say, replace
        self.good: set[int] = set()
        self.bad: set[int] = set()
        self.rows_skipped: dict[str, int] = {}  # reason -> count

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def lengths(self) -> list[int]:
        """Every row's token count, read without decoding anything (what packing plans with)."""
        return [len(self.dataset[i]["input_ids"]) for i in range(len(self.dataset))]

    def __getitem__(self, index: int) -> dict | None:
        """The row at `index`, or (its media broken) the next row that decodes; None instead when
        replace=False."""
        if not 0 <= index < len(self.dataset):
            raise IndexError(index)
        for offset in range(len(self.dataset)):
            candidate = (index + offset) % len(self.dataset)
            if candidate in self.bad:
                if not self.replace:
                    return None
                continue
            row = self.dataset[candidate]
            if candidate in self.good or not row.get("media"):
                return row
            try:
                for ref in row["media"]:
                    if isinstance(ref, ImageRef):
                        load_image(ref)
                    else:
                        load_audio(ref)
            except DatasetFormatError as error:
                self.bad.add(candidate)
                self.rows_skipped[error.reason] = self.rows_skipped.get(error.reason, 0) + 1
                self.say(f"gemmatune: skipped a row whose media does not decode: {error}")
                if not self.replace:
                    return None
                continue
            self.good.add(candidate)
            return row
        raise TrainingSetupError("no row of the dataset has images or audio that decode: check the files "
                                 "(prepare_dataset(..., verify_media=True) finds them before training)")

    def __getattr__(self, name):
        return getattr(self.dataset, name)
