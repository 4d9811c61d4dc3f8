"""How an image or an audio clip becomes what Gemma 4 reads: decoding, validation, pixels, features, token counts.

An image in a conversation becomes `<|image>` + N x `<|image|>` + `<image|>` in the token ids and N
rows of pooled patches in the vision tower; a clip becomes `<|audio>` + N x `<|audio|>` + `<audio|>`
and N frames out of the audio tower. N must match exactly (transformers raises "Image/Audio features
and image/audio tokens do not match" otherwise), and N decides the sequence length and so the memory.
This file computes N once, from the same arithmetic as transformers' Gemma 4 processors
(models/gemma4/processing_gemma4.py, image_processing_pil_gemma4.py, feature_extraction_gemma4.py;
tests/test_media.py checks it against them):

Images (patch 16 px, pooling 3x3 -> one soft token per 48x48 px, a budget of max_soft_tokens):
    (height, width) --image_target_size--> the largest 48-multiple size of the same aspect ratio with
    at most max_soft_tokens * 9 patches (small images are scaled up, large ones down);
    N = (target_h / 48) * (target_w / 48).
    pixels: RGB, bicubic resize to the target, / 255 (no normalisation: Gemma 4 was trained on [0, 1]),
    cut into 16x16 patches of 768 values, row by row; positions (x, y) per patch.
Audio (16 kHz mono, 128 mel bins, 20 ms window, 10 ms hop, two stride-2 convolutions):
    n samples -> (n - 1) // 160 valid mel frames -> ceil(frames / 4) tokens: 25 per second,
    750 for the extractor's limit of 30 s (480,000 samples).

Why pixels come from our code, not the image processor: the processor itself is fine and needs no
torchvision (its PIL backend), but it composites transparency only for 8-bit modes and clips 16-bit
images to white; here every mode a person is likely to have becomes the RGB image they see (EXIF
rotation applied, 16-bit scaled, transparency on white, as the processor does), and then the
processor's exact resize and patch layout follow (equality is tested). JPEGs over 4x the target size
are decoded at a reduced scale by libjpeg (`draft`): a 100-megapixel photo costs 50 ms, not 1.5 s.
Audio features do come from transformers' Gemma4AudioFeatureExtractor (numpy only, no torchaudio).

Decoding is split in two so a large dataset never sits decoded in memory: `inspect_image` /
`inspect_audio` read only the file header (size, EXIF orientation; frames, sample rate) when the
dataset is prepared, so a missing, remote, corrupt or oversized file is reported with its row before
training; `load_image` / `load_audio` decode when a batch is built.
"""
import io
import math
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from gemmatune.errors import DatasetFormatError

PATCH_SIZE = 16  # pixels per patch side, all Gemma 4 checkpoints
POOLING = 3  # 3x3 patches pool into one soft token
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)  # the values the processor accepts
SAMPLING_RATE = 16_000  # Hz, what the audio tower was trained on
HOP_LENGTH = 160  # samples between mel frames (10 ms)
FRAME_LENGTH = 320  # samples per mel window (20 ms)
MAX_AUDIO_SECONDS = 30  # the feature extractor truncates longer clips silently
MAX_AUDIO_SAMPLES = MAX_AUDIO_SECONDS * SAMPLING_RATE
MEL_BINS = 128  # the released audio tower's input width


# ------------------------------------------------------------------ token arithmetic
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


def audio_tokens(num_samples: int) -> int:
    """Audio tokens (`<|audio|>` placeholders) for a clip of num_samples samples at 16 kHz.

    A mel frame is valid when its whole window is real audio: (n - 1) // 160 frames (the extractor
    pads 160 zeros on the left and needs 321 samples per frame). Each stride-2 convolution keeps
    every other frame of the mask, so ceil(frames / 4) tokens come out of the tower."""
    frames = max(0, (num_samples - 1) // HOP_LENGTH)
    return -(-frames // 4)


def resampled_length(num_samples: int, sampling_rate: int) -> int:
    """Samples after resampling to 16 kHz: soxr keeps the duration, n * 16000 / rate rounded half up."""
    return (2 * num_samples * SAMPLING_RATE + sampling_rate) // (2 * sampling_rate)


# ------------------------------------------------------------------ sources
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


@dataclass
class AudioRef:
    """A clip validated at prepare time; num_samples is its fixed length at 16 kHz."""

    source: object  # a path, the encoded bytes, or an array
    sampling_rate: int | None  # of an array source; files carry their own
    num_samples: int
    mel_bins: int
    where: str

    @property
    def tokens(self) -> int:
        return audio_tokens(self.num_samples)


def _source(value, kind: str, where: str, base_dir: Path | None):
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


def _opened(source):
    return io.BytesIO(source) if isinstance(source, bytes) else source


# ------------------------------------------------------------------ images
def inspect_image(value, max_soft_tokens: int, where: str, base_dir: Path | None = None) -> ImageRef:
    """Check an image from its header only; the size after EXIF rotation fixes its token count."""
    from PIL import Image

    source = _source(value, "image", where, base_dir)
    if isinstance(source, np.ndarray):
        source = _array_to_image(source, where)
    if isinstance(source, Image.Image):
        _check_convertible(source.mode, where)
        return ImageRef(source, *_displayed_size(source), max_soft_tokens, where)
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
                self.image = Image.open(_opened(self.source))
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


# ------------------------------------------------------------------ audio
def inspect_audio(value, sampling_rate: int | None, mel_bins: int, where: str, base_dir: Path | None = None,
                  max_seconds: float = MAX_AUDIO_SECONDS) -> AudioRef:
    """Check a clip from its header (or its array); its length at 16 kHz fixes its token count."""
    if isinstance(value, dict) and value.get("array") is not None:  # the hub's decoded form
        value, sampling_rate = value["array"], value.get("sampling_rate", sampling_rate)
    source = _source(value, "audio", where, base_dir)
    if isinstance(source, (bytes, Path)):
        frames, rate = _audio_header(source, where)
    else:
        array = _audio_array(source, where)
        if not isinstance(sampling_rate, (int, np.integer)) or sampling_rate <= 0:
            raise DatasetFormatError(f"{where}: an audio array needs its sampling rate: add 'sampling_rate': "
                                     "16000 (or whatever it was recorded at) to the part.", "bad audio")
        frames, rate, sampling_rate = len(array), int(sampling_rate), int(sampling_rate)
    num_samples = resampled_length(frames, rate)
    _check_duration(num_samples, where, max_seconds)
    return AudioRef(source, sampling_rate, num_samples, mel_bins, where)


def _check_duration(num_samples: int, where: str, max_seconds: float) -> None:
    seconds = num_samples / SAMPLING_RATE
    if num_samples > max_seconds * SAMPLING_RATE:
        raise DatasetFormatError(
            f"{where}: the clip is {seconds:.1f} s long; at most {max_seconds:g} s per clip fit "
            f"(max_audio_seconds; Gemma 4's audio encoder takes at most 30 s). Cut it into clips of at "
            "most that length, each with its own transcript, or drop the row.", "audio too long")
    if audio_tokens(num_samples) == 0:
        raise DatasetFormatError(f"{where}: the clip is {seconds * 1000:.1f} ms long, shorter than one audio "
                                 "token (10 ms of audio are needed for the first one). Drop the row.",
                                 "audio too short")


def _audio_header(source, where: str) -> tuple[int, int]:
    import soundfile

    try:
        info = soundfile.info(_opened(source))
    except (RuntimeError, soundfile.LibsndfileError, TypeError, ValueError) as exc:
        raise DatasetFormatError(f"{where}: not an audio file soundfile can read ({exc}). WAV, FLAC, OGG and MP3 "
                                 "work; convert other formats, or drop the row.", "corrupt audio") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise DatasetFormatError(f"{where}: the audio file holds no samples. Drop the row.", "empty audio")
    return int(info.frames), int(info.samplerate)


def _audio_array(value, where: str) -> np.ndarray:
    """A numeric 1-D or 2-D array (any layout of a few channels), checked for finite values."""
    array = np.asarray(value)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DatasetFormatError(f"{where}: the audio array has dtype {array.dtype}; pass int16, int32, uint8 or "
                                 "float samples.", "bad audio")
    if array.ndim == 2:
        channels_first = array.shape[0] < array.shape[1]
        if min(array.shape) > 8:
            raise DatasetFormatError(f"{where}: the audio array has shape {array.shape}; expected (samples,) or "
                                     "(samples, channels) with at most 8 channels.", "bad audio")
        array = array.T if channels_first else array
    elif array.ndim != 1:
        raise DatasetFormatError(f"{where}: the audio array has {array.ndim} dimensions; expected (samples,) or "
                                 "(samples, channels).", "bad audio")
    if len(array) == 0:
        raise DatasetFormatError(f"{where}: the audio array is empty. Drop the row.", "empty audio")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise DatasetFormatError(f"{where}: the audio array holds NaN or infinite samples.", "bad audio")
    return array


def to_float_mono(array: np.ndarray) -> np.ndarray:
    """float32 mono in [-1, 1] from (samples,) or (samples, channels) of any common sample type."""
    if np.issubdtype(array.dtype, np.unsignedinteger):  # 8-bit WAV is unsigned, centred on 128
        half = float(2 ** (8 * array.dtype.itemsize - 1))
        samples = (array.astype(np.float64) - half) / half
    elif np.issubdtype(array.dtype, np.integer):
        samples = array.astype(np.float64) / float(2 ** (8 * array.dtype.itemsize - 1))
    else:
        samples = array.astype(np.float64)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    return samples.astype(np.float32)


def load_audio(ref: AudioRef) -> np.ndarray:
    """float32 mono at 16 kHz, exactly ref.num_samples long (the length its tokens were counted for)."""
    if isinstance(ref.source, (bytes, Path)):
        import soundfile

        try:
            data, rate = soundfile.read(_opened(ref.source), dtype="float32", always_2d=True)
        except (RuntimeError, soundfile.LibsndfileError, ValueError) as exc:
            raise DatasetFormatError(f"{ref.where}: the audio cannot be decoded ({exc}); the file is probably "
                                     "cut off or damaged. Replace or drop it.", "corrupt audio") from None
        samples = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    else:
        samples, rate = to_float_mono(_audio_array(ref.source, ref.where)), ref.sampling_rate
    if rate != SAMPLING_RATE:
        import soxr

        samples = soxr.resample(samples, rate, SAMPLING_RATE, quality="HQ").astype(np.float32)
    return _fit_length(samples, ref)


def _fit_length(samples: np.ndarray, ref: AudioRef) -> np.ndarray:
    """Pad or trim by the few samples a header or a resampler can be off; refuse a real mismatch
    (a file cut short keeps its old length in the header)."""
    if abs(len(samples) - ref.num_samples) > max(HOP_LENGTH, ref.num_samples // 100):
        raise DatasetFormatError(f"{ref.where}: the header announced {ref.num_samples / SAMPLING_RATE:.2f} s of "
                                 f"audio but {len(samples) / SAMPLING_RATE:.2f} s were decoded; the file is damaged. "
                                 "Replace or drop it.", "corrupt audio")
    if len(samples) >= ref.num_samples:
        return np.ascontiguousarray(samples[:ref.num_samples])
    return np.pad(samples, (0, ref.num_samples - len(samples)))


@lru_cache(maxsize=4)
def _feature_extractor(mel_bins: int):
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    return Gemma4AudioFeatureExtractor(feature_size=mel_bins)


def audio_features(samples: np.ndarray, mel_bins: int = MEL_BINS) -> tuple[np.ndarray, np.ndarray]:
    """(features, mask): float32 (frames, mel_bins) log-mel and bool (frames,) from a 16 kHz clip,
    by transformers' Gemma4AudioFeatureExtractor; masked frames are zero, as in a processor batch."""
    out = _feature_extractor(mel_bins)([samples], return_tensors="np")  # a batch of one, as the processor calls it
    features, mask = out["input_features"][0], out["input_features_mask"][0].astype(bool)
    # Our token count must be the tower's: its output mask keeps every 4th frame of this mask.
    if int(mask[::2][::2].sum()) != audio_tokens(len(samples)):
        raise AssertionError(f"audio token arithmetic disagrees with the feature mask for {len(samples)} samples")
    return features.astype(np.float32), mask
