"""How an audio clip becomes what Gemma 4 reads: validation, decoding, mel features and the token count.

A clip becomes `<|audio>` + N x `<|audio|>` + `<audio|>` in the token ids and N frames out of the
audio tower; N must match exactly, and it is computed here, once, with the arithmetic of
transformers' Gemma 4 feature extractor (models/gemma4/feature_extraction_gemma4.py;
tests/data/test_media.py checks it against it):

    16 kHz mono, 128 mel bins, 20 ms window, 10 ms hop, two stride-2 convolutions:
    n samples -> (n - 1) // 160 valid mel frames -> ceil(frames / 4) tokens: 25 per second,
    750 for the extractor's limit of 30 s (480,000 samples).

The features themselves come from transformers' Gemma4AudioFeatureExtractor (numpy only, no
torchaudio). As for images, `inspect_audio` reads only the header (frames, sample rate) when the
dataset is prepared; `load_audio` decodes and resamples to 16 kHz when a batch is built.
"""
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from gemmatune.data.sources import medium_source, opened
from gemmatune.errors import DatasetFormatError

SAMPLING_RATE = 16_000  # Hz, what the audio tower was trained on
HOP_LENGTH = 160  # samples between mel frames (10 ms)
FRAME_LENGTH = 320  # samples per mel window (20 ms)
MAX_AUDIO_SECONDS = 30  # the feature extractor truncates longer clips silently
MAX_AUDIO_SAMPLES = MAX_AUDIO_SECONDS * SAMPLING_RATE
MEL_BINS = 128  # the released audio tower's input width


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


def inspect_audio(value, sampling_rate: int | None, mel_bins: int, where: str, base_dir: Path | None = None,
                  max_seconds: float = MAX_AUDIO_SECONDS) -> AudioRef:
    """Check a clip from its header (or its array); its length at 16 kHz fixes its token count."""
    if isinstance(value, dict) and value.get("array") is not None:  # the hub's decoded form
        value, sampling_rate = value["array"], value.get("sampling_rate", sampling_rate)
    source = medium_source(value, "audio", where, base_dir)
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
        info = soundfile.info(opened(source))
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
            data, rate = soundfile.read(opened(ref.source), dtype="float32", always_2d=True)
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
