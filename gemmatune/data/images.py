"""How an image becomes what Gemma 4 reads: validation, decoding, pixels and the soft-token count.

An image in a conversation becomes `<|image>` + N x `<|image|>` + `<image|>` in the token ids and
N rows of pooled patches in the vision tower. N must match exactly (transformers raises "Image
features and image tokens do not match" otherwise), and N decides the sequence length and so the
memory. N is computed here, once, with the arithmetic of transformers' Gemma 4 image processor
(models/gemma4/image_processing_pil_gemma4.py; tests/data/test_media.py checks it against it):

    patch 16 px, pooling 3x3 -> one soft token per 48x48 px, a budget of max_soft_tokens;
    (height, width) --image_target_size--> the largest 48-multiple size of the same aspect ratio
    with at most max_soft_tokens * 9 patches (small images are scaled up, large ones down);
    N = (target_h / 48) * (target_w / 48).
    pixels: RGB, bicubic resize to the target, / 255 (no normalisation: Gemma 4 was trained on
    [0, 1]), cut into 16x16 patches of 768 values, row by row; positions (x, y) per patch.

Why pixels come from our code, not the image processor: the processor composites transparency
only for 8-bit modes and clips 16-bit images to white; here every mode a person is likely to have
becomes the RGB image they see (EXIF rotation applied, 16-bit scaled, transparency on white), and
then the processor's exact resize and patch layout follow (equality is tested). JPEGs over 4x the
target size are decoded at a reduced scale by libjpeg (`draft`).

Decoding is split in two so a large dataset never sits decoded in memory: `inspect_image` reads
only the header (size, EXIF orientation) when the dataset is prepared, so a missing, remote,
corrupt or oversized file is reported with its row before training; `load_image` decodes when a
batch is built.
"""
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gemmatune.data.sources import medium_source, opened
from gemmatune.errors import DatasetFormatError

PATCH_SIZE = 16  # pixels per patch side, all Gemma 4 checkpoints
POOLING = 3  # 3x3 patches pool into one soft token
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)  # the values the processor accepts


def check_soft_token_budget(max_soft_tokens) -> None:
    if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise ValueError(f"max_soft_tokens={max_soft_tokens!r}: Gemma 4's image processor accepts "
                         f"{', '.join(map(str, SOFT_TOKEN_BUDGETS))} soft tokens per image (280 is the default)")


def image_target_size(height: int, width: int, max_soft_tokens: int = 280) -> tuple[int, int]:
    """(height, width) the processor resizes an image to: aspect kept, sides multiples of 48 px.

    The same steps as transformers' get_aspect_ratio_preserving_size, including its rule for very
    thin images (a side that would round to 0 becomes 48 px and the other is capped)."""
    check_soft_token_budget(max_soft_tokens)
    side = PATCH_SIZE * POOLING
    max_patches = max_soft_tokens * POOLING ** 2
    factor = math.sqrt(max_patches * PATCH_SIZE ** 2 / (height * width))
    target_h = int(math.floor(factor * height / side)) * side
    target_w = int(math.floor(factor * width / side)) * side
    longest = max_soft_tokens * side  # one row of max_soft_tokens soft tokens
    if target_h == 0:
        target_h, target_w = side, min(int(math.floor(width / height)) * side, longest)
    elif target_w == 0:
        target_h, target_w = min(int(math.floor(height / width)) * side, longest), side
    return target_h, target_w


def image_soft_tokens(height: int, width: int, max_soft_tokens: int = 280) -> int:
    """Soft tokens (`<|image|>` placeholders) for an image of height x width pixels."""
    target_h, target_w = image_target_size(height, width, max_soft_tokens)
    side = PATCH_SIZE * POOLING
    return (target_h // side) * (target_w // side)


@dataclass
class ImageRef:
    """An image validated at prepare time: where to read it and the size that fixes its tokens."""

    source: object  # a PIL image, a path, or the encoded bytes
    height: int  # as displayed (after EXIF rotation)
    width: int
    max_soft_tokens: int
    where: str  # "row 3, image 1", for errors at decode time

    @property
    def tokens(self) -> int:
        return image_soft_tokens(self.height, self.width, self.max_soft_tokens)


def inspect_image(value, max_soft_tokens: int, where: str, base_dir: Path | None = None) -> ImageRef:
    """Check an image from its header only; the size after EXIF rotation fixes its token count."""
    from PIL import Image

    source = medium_source(value, "image", where, base_dir)
    if isinstance(source, np.ndarray):
        source = _array_to_image(source, where)
    if isinstance(source, Image.Image):
        _check_convertible(source.mode, where)
        height, width = _displayed_size(source)
        return ImageRef(_shrunk_once(source, height, width, max_soft_tokens), height, width, max_soft_tokens, where)
    if not isinstance(source, (bytes, Path)):
        raise DatasetFormatError(f"{where}: the image is a {type(value).__name__}; pass a PIL image, a path, "
                                 "bytes or a uint8 array.", "bad image")
    with _open_image(source, where) as image:
        _check_convertible(image.mode, where)
        return ImageRef(source, *_displayed_size(image), max_soft_tokens, where)


def load_image(ref: ImageRef):
    """The RGB image a person sees, decoded, at a size close to what the processor resizes it to."""
    from PIL import Image, ImageOps

    if isinstance(ref.source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(ref.source))
    with _open_image(ref.source, ref.where) as image:
        target_h, target_w = image_target_size(ref.height, ref.width, ref.max_soft_tokens)
        if image.format == "JPEG" and min(ref.height / target_h, ref.width / target_w) >= 4:
            rotated = _orientation(image) in (5, 6, 7, 8)
            image.draft(None, (2 * target_h, 2 * target_w) if rotated else (2 * target_w, 2 * target_h))
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise DatasetFormatError(f"{ref.where}: the image cannot be decoded ({exc}); the file is probably "
                                     "cut off or damaged. Replace or drop it.", "corrupt image") from None
        return to_rgb(ImageOps.exif_transpose(image))


def _shrunk_once(image, height: int, width: int, max_soft_tokens: int):
    """An image in memory over 4x its target size, shrunk now to twice the target, as JPEGs are
    decoded (`draft`): otherwise every batch would copy and resize the full image again (a
    20000 x 20000 image took 4 GiB a step). Smaller images are kept as they are."""
    from PIL import Image, ImageOps

    target_h, target_w = image_target_size(height, width, max_soft_tokens)
    if min(height / target_h, width / target_w) < 4:
        return image
    return to_rgb(ImageOps.exif_transpose(image)).resize((2 * target_w, 2 * target_h), resample=Image.BICUBIC)


def image_patches(image, max_soft_tokens: int = 280, size: tuple[int, int] | None = None):
    """(patches, positions): float32 (num_patches, 768) in [0, 1] and int64 (num_patches, 2) as (x, y).

    `image` is RGB; `size` is the (height, width) that fixes the target (the original size when a
    JPEG was decoded at reduced scale). The resize, rescale and patch order equal the processor's."""
    from PIL import Image

    height, width = size or (image.height, image.width)
    target_h, target_w = image_target_size(height, width, max_soft_tokens)
    if image.size != (target_w, target_h):
        image = image.resize((target_w, target_h), resample=Image.BICUBIC)
    pixels = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)  # as the processor rounds
    rows, cols = target_h // PATCH_SIZE, target_w // PATCH_SIZE
    patches = pixels.reshape(rows, PATCH_SIZE, cols, PATCH_SIZE, 3).transpose(0, 2, 1, 3, 4)
    grid_x, grid_y = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
    positions = np.stack([grid_x, grid_y], axis=-1).reshape(rows * cols, 2)
    return patches.reshape(rows * cols, PATCH_SIZE * PATCH_SIZE * 3), positions.astype(np.int64)


def to_rgb(image):
    """RGB as a person sees the image: 16-bit and float scaled to 8 bits, transparency on white.

    The 8-bit cases (RGBA, LA, PA, P with a transparent colour, L, 1, CMYK, YCbCr) follow
    transformers' convert_to_rgb exactly; PIL's own 16-bit -> 8-bit conversion clips at 255,
    which turns most 16-bit images white, so those are scaled here first."""
    from PIL import Image

    if image.mode.startswith("I") or image.mode == "F":
        image = Image.fromarray(_to_uint8(np.asarray(image)), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit (and 32-bit int) grey to 0..255; float greys in [0, 1] (or already 0..255) too."""
    if np.issubdtype(values.dtype, np.floating):
        values = values * 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else values
        return np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
    return np.clip(np.round(values.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def _array_to_image(array: np.ndarray, where: str):
    from PIL import Image

    if array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
        return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    raise DatasetFormatError(f"{where}: an image array must be uint8 (height, width) or (height, width, 3 or 4); "
                             f"got {array.dtype} {array.shape}. Pass a PIL image or a file instead.", "bad image")


class _open_image:
    """PIL.Image.open with errors that name the row. PIL's decompression-bomb *warning* (over 89
    megapixels) is silenced here because a 100-megapixel photo is legitimate; its error (over 179
    megapixels) becomes a DatasetFormatError that says to shrink the image."""

    def __init__(self, source, where: str):
        self.source, self.where = source, where

    def __enter__(self):
        from PIL import Image, UnidentifiedImageError

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                self.image = Image.open(opened(self.source))
            except Image.DecompressionBombError as exc:
                raise DatasetFormatError(f"{self.where}: the image is too large to decode safely ({exc}). "
                                         "Shrink it below 179 megapixels first.", "image too large") from None
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
                raise DatasetFormatError(f"{self.where}: not an image file PIL can read ({exc}). Replace the "
                                         "file or drop the row.", "corrupt image") from None
        return self.image

    def __exit__(self, *exc_info):
        self.image.close()


def _orientation(image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))  # EXIF Orientation; 5-8 swap width and height
    except Exception:  # a broken EXIF block is ignored, as ImageOps.exif_transpose does
        return 1


def _displayed_size(image) -> tuple[int, int]:
    """(height, width) after EXIF rotation."""
    width, height = image.size
    return (width, height) if _orientation(image) in (5, 6, 7, 8) else (height, width)


def _check_convertible(mode: str, where: str) -> None:
    """Refuse at prepare time a mode that cannot become RGB (tried on a 1x1 image of that mode)."""
    try:
        from PIL import Image

        to_rgb(Image.new(mode, (1, 1)))
    except (ValueError, OSError, KeyError) as exc:
        raise DatasetFormatError(f"{where}: images of PIL mode {mode!r} cannot be converted to RGB ({exc}). "
                                 "Save it as PNG or JPEG first.", "bad image") from None
