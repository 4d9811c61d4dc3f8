"""Rows whose image or clip turns out broken when decoded are skipped during training, and counted.

prepare_dataset reads only the headers of images and clips unless it verifies them (verify_media,
on with skip_bad_rows=True), because decoding a large dataset takes time. A file cut off after an
intact header then passes, and used to stop training at the batch that held it. When a dataset
with media was not verified, `train` reads its rows through `DecodableRows`: the first time a row
is used its media are decoded once; a row that fails is replaced by the next row that decodes, and
counted by reason (`rows_skipped`, in the result and the report printed at the end). The
replacement is the same every time, so resuming replays the same data order.
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

    def __init__(self, dataset, say=print):
        self.dataset, self.say = dataset, say
        self.good: set[int] = set()
        self.bad: set[int] = set()
        self.rows_skipped: dict[str, int] = {}  # reason -> count

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.dataset)):
            candidate = (index + offset) % len(self.dataset)
            if candidate in self.bad:
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
                continue
            self.good.add(candidate)
            return row
        raise TrainingSetupError("no row of the dataset has images or audio that decode: check the files "
                                 "(prepare_dataset(..., verify_media=True) finds them before training)")

    def __getattr__(self, name):
        return getattr(self.dataset, name)
