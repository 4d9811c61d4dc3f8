"""gemmatune.media: every image and audio case a person is likely to have, and the token arithmetic
against transformers' own Gemma 4 processors (their code, run on CPU, is the reference here: it
is deterministic numpy/PIL code, not a numerical kernel)."""
import io
import struct
import warnings
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import gemmatune.data.audio as data_audio
import gemmatune.data.images as data_images
from gemmatune.errors import DatasetFormatError

BUDGETS = data_images.SOFT_TOKEN_BUDGETS


@pytest.fixture(scope="module")
def image_processor():
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil()


def processor_namespace():
    """What Gemma4Processor's token methods read from `self` (the class itself needs a video
    processor, which needs torchvision)."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    return SimpleNamespace(feature_extractor=Gemma4AudioFeatureExtractor(), audio_seq_length=750,
                           boi_token="<|image>", image_token="<|image|>", eoi_token="<image|>",
                           boa_token="<|audio>", audio_token="<|audio|>", eoa_token="<audio|>")


def noise(height, width, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None, "LA": 2, "CMYK": 4}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def png_bytes(image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def loaded_patches(source, budget=280):
    ref = data_images.inspect_image(source, budget, "row 1: image 1")
    return data_images.image_patches(data_images.load_image(ref), budget, (ref.height, ref.width)), ref


# ------------------------------------------------------------------ image token arithmetic
SIZES = [(1, 1), (1, 2), (2, 1), (1, 10000), (10000, 1), (7, 3000), (3000, 7), (47, 47), (48, 48), (49, 49),
         (37, 100), (224, 224), (480, 640), (768, 768), (1024, 768), (1080, 1920), (3000, 4000), (10000, 10000)]
RANDOM_SIZES = [tuple(map(int, s)) for s in np.random.default_rng(0).integers(1, 5000, (300, 2))]


@pytest.mark.parametrize("budget", BUDGETS)
def test_image_target_size_and_tokens_equal_the_processors_arithmetic(budget):
    from transformers.models.gemma4 import image_processing_pil_gemma4, processing_gemma4

    for height, width in SIZES + RANDOM_SIZES:
        expected = processing_gemma4.get_aspect_ratio_preserving_size(height, width, 16, budget * 9, 3)
        processor = image_processing_pil_gemma4.get_aspect_ratio_preserving_size(height, width, 16, budget * 9, 3)
        assert expected == processor
        assert data_images.image_target_size(height, width, budget) == expected, (height, width)
        tokens = data_images.image_soft_tokens(height, width, budget)
        assert tokens == (expected[0] // 16) * (expected[1] // 16) // 9
        assert 0 < tokens <= budget and expected[0] % 48 == 0 and expected[1] % 48 == 0


def test_soft_tokens_fill_most_of_the_budget_whatever_the_size():
    # Small images are scaled up: a 1x1 image gets as many tokens as a 10000x10000 one.
    assert data_images.image_soft_tokens(1, 1) == data_images.image_soft_tokens(10000, 10000) == 256
    assert data_images.image_soft_tokens(48, 48 * 280) == 280  # one row of 280 soft tokens
    assert data_images.image_soft_tokens(768, 768, 70) == 64


def test_an_unsupported_budget_is_refused():
    with pytest.raises(ValueError, match="70, 140, 280, 560, 1120"):
        data_images.image_soft_tokens(100, 100, 300)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("height, width", [(1, 1), (37, 100), (768, 768), (300, 200), (50, 900), (2000, 30)])
def test_pixels_and_positions_equal_the_image_processor(image_processor, budget, height, width):
    image = noise(height, width, seed=height * width)
    out = image_processor(images=[image], max_soft_tokens=budget, return_tensors="np")
    (patches, positions), ref = loaded_patches(png_bytes(image), budget)
    n = len(patches)
    assert out["num_soft_tokens_per_image"][0] == ref.tokens == n // 9
    np.testing.assert_array_equal(out["pixel_values"][0][:n], patches)
    np.testing.assert_array_equal(out["image_position_ids"][0][:n], positions)
    assert (out["image_position_ids"][0][n:] == -1).all()  # the processor pads to the budget; we pad per batch


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "CMYK", "1", "P", "PA", "P-transparent"])
def test_every_8bit_mode_becomes_the_rgb_the_processor_makes(image_processor, mode):
    base = noise(30, 70, "RGBA", seed=3)
    if mode == "P-transparent":  # a palette with one transparent colour, as GIFs and small PNGs have
        image = base.convert("RGB").convert("P", palette=Image.ADAPTIVE, colors=16)
        image.info["transparency"] = 3
    elif mode in ("1", "P", "PA"):
        image = base.convert(mode)
    else:
        image = noise(30, 70, mode, seed=3)
    expected = image_processor(images=[image], return_tensors="np")
    (patches, _), _ = loaded_patches(image)
    np.testing.assert_array_equal(expected["pixel_values"][0][:len(patches)], patches)


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert data_images.to_rgb(image).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("LA", (4, 4), (0, 128))
    assert data_images.to_rgb(half).getpixel((0, 0)) == (127, 127, 127)


@pytest.mark.parametrize("source_mode", ["I;16", "I", "F"])
def test_16bit_and_float_images_keep_their_contrast(source_mode):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    if source_mode == "F":
        image = Image.fromarray((ramp / 65535).astype(np.float32), mode="F")
    elif source_mode == "I":
        image = Image.fromarray(ramp.astype(np.int32), mode="I")
    else:
        image = Image.open(io.BytesIO(png_bytes(Image.fromarray(ramp.astype(np.uint16)))))
        assert image.mode == "I;16"
    grey = np.asarray(data_images.to_rgb(image))[..., 0].astype(int)
    expected = np.round(ramp / 257).astype(int)
    assert np.abs(grey - expected).max() <= 1 and grey.min() == 0 and grey.max() == 255


def test_pils_own_16bit_conversion_clips_which_is_why_we_scale():
    image = Image.fromarray(np.full((2, 2), 1600, dtype=np.uint16))
    assert np.asarray(image.convert("L"))[0, 0] == 255  # 1600/65535 is dark grey, not white
    assert np.asarray(data_images.to_rgb(image))[0, 0, 0] == 6


@pytest.mark.parametrize("orientation, rotate", [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270),
                                                 (3, Image.Transpose.ROTATE_180)])
def test_exif_rotation_is_applied_before_counting_and_decoding(orientation, rotate):
    shown = noise(60, 20, seed=5)  # 20 wide, 60 tall as a person sees it
    stored = shown.transpose(rotate)  # what a camera writes before its Orientation tag
    exif = Image.Exif()
    exif[0x0112] = orientation
    ref = data_images.inspect_image(png_bytes(stored, exif=exif), 280, "row 1: image 1")
    assert (ref.height, ref.width) == (60, 20)
    assert ref.tokens == data_images.image_soft_tokens(60, 20)
    np.testing.assert_array_equal(np.asarray(data_images.load_image(ref)), np.asarray(shown))


def test_a_100_megapixel_png_decodes_without_a_decompression_bomb_warning():
    big = Image.linear_gradient("L").resize((10000, 10000))
    data = png_bytes(big)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (patches, _), ref = loaded_patches(data)
    assert (ref.height, ref.width) == (10000, 10000) and len(patches) == 256 * 9


def test_a_100_megapixel_jpeg_is_decoded_at_reduced_scale_and_stays_close():
    big = Image.merge("RGB", [Image.linear_gradient("L").resize((10000, 10000))] * 3)
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=95)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (patches, _), ref = loaded_patches(buffer.getvalue())
    full = data_images.image_patches(big, 280)[0]
    assert patches.shape == full.shape
    # libjpeg's DCT scaling + JPEG loss against a lossless full-size resize of a smooth gradient:
    # a few grey levels at most (1 grey level = 1/255).
    assert np.abs(patches - full).mean() < 2 / 255


def fake_png_header(width: int, height: int) -> bytes:
    """A PNG that only announces its size (PIL reads the header before any pixel)."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_with_a_reason():
    with pytest.raises(DatasetFormatError, match="row 1: image 1: the image is too large") as info:
        data_images.inspect_image(fake_png_header(40000, 40000), 280, "row 1: image 1")
    assert info.value.reason == "image too large"


@pytest.mark.parametrize("value, reason, text", [
    (b"definitely not an image", "corrupt image", "not an image file"),
    (b"", "corrupt image", "bytes are empty"),
    ("/nowhere/cat.png", "missing image", "not found: /nowhere/cat.png"),
    ("https://example.com/cat.png", "remote image", "is a URL"),
    (None, "missing image", "has no image"),
    (np.zeros((4, 4), dtype=np.float32), "bad image", "must be uint8"),
    (42, "bad image", "is a int"),
])
def test_bad_images_raise_with_the_row_and_a_reason(value, reason, text):
    with pytest.raises(DatasetFormatError, match=text) as info:
        data_images.inspect_image(value, 280, "row 7: image 2")
    assert info.value.reason == reason and str(info.value).startswith("row 7: image 2: ")


def test_a_cut_off_image_passes_the_header_check_and_fails_at_decode():
    data = png_bytes(noise(200, 200))
    ref = data_images.inspect_image(data[:len(data) // 2], 280, "row 3: image 1")
    with pytest.raises(DatasetFormatError, match="row 3: image 1: the image cannot be decoded") as info:
        data_images.load_image(ref)
    assert info.value.reason == "corrupt image"


def test_image_sources(tmp_path):
    image = noise(40, 30)
    path = tmp_path / "cat.png"
    image.save(path)
    expected = np.asarray(image)
    for source in (image, str(path), path, f"file://{path}", png_bytes(image),
                   {"bytes": png_bytes(image), "path": None}, {"bytes": None, "path": str(path)}, np.asarray(image)):
        ref = data_images.inspect_image(source, 280, "row 1")
        np.testing.assert_array_equal(np.asarray(data_images.load_image(ref)), expected)
    assert data_images.inspect_image("cat.png", 280, "row 1", base_dir=tmp_path).source == path


# ------------------------------------------------------------------ audio token arithmetic
def test_audio_tokens_equal_the_processors_count_from_lengths():
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    namespace = processor_namespace()
    lengths = list(range(0, 2000)) + [15999, 16000, 16001, 160 * 4 * 100 + 1, 479999, 480000]
    lengths += list(np.random.default_rng(1).integers(1, 480000, 300))
    for n in lengths:
        processor = Gemma4Processor._compute_audio_num_tokens(namespace, np.zeros(n), 16000)
        assert data_audio.audio_tokens(int(n)) == processor, n


@pytest.mark.parametrize("n", [161, 320, 321, 641, 1599, 1600, 1601, 16000, 16123, 48000, 95999, 480000])
def test_audio_tokens_equal_the_processors_expansion_from_the_feature_mask(n):
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    namespace = processor_namespace()
    rng = np.random.default_rng(n)
    waveforms = [rng.standard_normal(n).astype(np.float32) * 0.1, np.zeros(7 * n + 999, np.float32)]
    batch = namespace.feature_extractor(waveforms, return_tensors="np")  # padded to the longer clip, as a batch is
    expansion = Gemma4Processor.replace_audio_token(namespace, batch, 0)
    assert expansion == "<|audio>" + "<|audio|>" * data_audio.audio_tokens(n) + "<audio|>"
    features, mask = data_audio.audio_features(waveforms[0])
    frames = int(mask.sum())
    np.testing.assert_array_equal(batch["input_features"][0][:len(features)][mask], features[mask])
    assert (features[~mask] == 0).all() and (batch["input_features"][0][frames:] == 0).all()


def test_25_audio_tokens_a_second_and_750_for_30_seconds():
    assert [data_audio.audio_tokens(16000 * s) for s in range(1, 31)] == [25 * s for s in range(1, 31)]
    assert data_audio.audio_tokens(data_audio.MAX_AUDIO_SAMPLES) == 750
    assert data_audio.audio_tokens(160) == 0 and data_audio.audio_tokens(161) == 1


# ------------------------------------------------------------------ audio decoding
def sine(seconds=1.0, rate=16000, freq=440.0, amplitude=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float64)


def dominant_frequency(samples, rate=16000):
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()]


def audio_bytes(samples, rate, fmt="WAV", subtype=None) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def load(source, sampling_rate=None, max_seconds=30):
    ref = data_audio.inspect_audio(source, sampling_rate, 128, "row 1: audio 1", max_seconds=max_seconds)
    return data_audio.load_audio(ref), ref


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 44100, 48000, 96000])
def test_any_sample_rate_is_resampled_to_16khz_keeping_pitch_and_length(rate):
    samples, ref = load(sine(2.0, rate), rate)
    assert len(samples) == ref.num_samples == 32000 and samples.dtype == np.float32
    assert abs(dominant_frequency(samples) - 440) < 2
    assert abs(np.abs(samples).max() - 0.5) < 0.02


@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("WAV", "PCM_U8"), ("WAV", "PCM_32"), ("WAV", "FLOAT"),
                                          ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("OGG", "OPUS"),
                                          ("MP3", "MPEG_LAYER_III")])
def test_audio_file_formats_decode_without_ffmpeg(fmt, subtype):
    samples, ref = load(audio_bytes(sine(2.0, 24000), 24000, fmt, subtype))  # Opus takes 8/12/16/24/48 kHz
    assert ref.num_samples == 32000 and len(samples) == 32000
    assert abs(dominant_frequency(samples) - 440) < 2
    assert abs(np.abs(samples).max() - 0.5) < 0.08  # lossy codecs and 8-bit quantisation move peaks a little


@pytest.mark.parametrize("dtype, scale, offset", [(np.int16, 32767, 0), (np.int32, 2 ** 31 - 1, 0), (np.int8, 127, 0),
                                                  (np.uint8, 127, 128), (np.float32, 1, 0), (np.float64, 1, 0)])
def test_array_sample_types_are_scaled_to_plus_minus_one(dtype, scale, offset):
    array = (sine(1.0, amplitude=1.0) * scale + offset).round().astype(dtype)
    samples, _ = load(array, 16000)
    assert abs(samples.max() - 1.0) < 0.01 and abs(samples.min() + 1.0) < 0.02


@pytest.mark.parametrize("layout", ["samples, channels", "channels, samples", "file"])
def test_stereo_becomes_mono_by_averaging(layout):
    left, right = sine(1.0, freq=440), sine(1.0, freq=1000)
    stereo = np.stack([left, right], axis=1)
    if layout == "file":
        samples, _ = load(audio_bytes(stereo.astype(np.float32), 16000, "WAV", "FLOAT"))
    else:
        samples, _ = load(stereo if layout == "samples, channels" else stereo.T, 16000)
    np.testing.assert_allclose(samples, (left + right) / 2, atol=1e-6)


def test_the_hub_forms_of_audio(tmp_path):
    array = sine(1.0, 8000)
    path = tmp_path / "clip.flac"
    path.write_bytes(audio_bytes(array, 8000, "FLAC"))
    for source, rate in (({"array": array, "sampling_rate": 8000}, None),
                         ({"bytes": path.read_bytes(), "path": None}, None),
                         ({"bytes": None, "path": str(path)}, None), (str(path), None), (array.tolist(), 8000)):
        samples, ref = load(source, rate)
        assert ref.num_samples == 16000 and abs(dominant_frequency(samples) - 440) < 2


def test_silence_gives_finite_features_and_tokens():
    samples, ref = load(np.zeros(16000 * 2, np.int16), 16000)
    features, mask = data_audio.audio_features(samples)
    assert np.isfinite(features).all() and ref.tokens == 50 and int(mask[::4].sum()) == 50


def test_clips_over_the_limit_are_rejected_with_what_to_do():
    with pytest.raises(DatasetFormatError) as info:
        load(np.zeros(16000 * 31, np.float32), 16000)
    assert info.value.reason == "audio too long"
    assert str(info.value).startswith("row 1: audio 1: the clip is 31.0 s long")
    assert "Cut it into clips" in str(info.value)
    assert load(np.zeros(16000 * 30, np.float32), 16000)[1].tokens == 750  # exactly 30 s fits
    with pytest.raises(DatasetFormatError, match="at most 10 s per clip"):
        load(np.zeros(16000 * 11, np.float32), 16000, max_seconds=10)


def test_clips_shorter_than_one_token_are_rejected():
    with pytest.raises(DatasetFormatError, match="shorter than one audio token") as info:
        load(np.zeros(160, np.float32), 16000)
    assert info.value.reason == "audio too short"
    assert load(np.zeros(161, np.float32), 16000)[1].tokens == 1


@pytest.mark.parametrize("value, rate, reason, text", [
    (b"RIFF....not audio at all", None, "corrupt audio", "not an audio file"),
    ("/nowhere/clip.wav", None, "missing audio", "not found: /nowhere/clip.wav"),
    ("https://example.com/clip.wav", None, "remote audio", "is a URL"),
    (np.zeros(1600, np.float32), None, "bad audio", "needs its sampling rate"),
    (np.array([0.0, np.nan] * 800), 16000, "bad audio", "NaN"),
    (np.zeros(0, np.float32), 16000, "empty audio", "is empty"),
    (np.zeros((1600, 20), np.float32), 16000, "bad audio", "at most 8 channels"),
    (np.array(["a", "b"]), 16000, "bad audio", "dtype"),
    (None, None, "missing audio", "has no audio"),
])
def test_bad_audio_raises_with_the_row_and_a_reason(value, rate, reason, text):
    with pytest.raises(DatasetFormatError, match=text) as info:
        data_audio.inspect_audio(value, rate, 128, "row 4: audio 1")
    assert info.value.reason == reason and str(info.value).startswith("row 4: audio 1: ")


@pytest.mark.parametrize("fmt, text", [("FLAC", "the audio cannot be decoded"), ("MP3", "the header announced 3.00 s")])
def test_a_cut_off_audio_file_passes_the_header_check_and_fails_at_decode(fmt, text):
    data = audio_bytes(sine(3.0), 16000, fmt)
    ref = data_audio.inspect_audio(data[:len(data) // 3], None, 128, "row 2: audio 1")  # the header still says 3 s
    assert ref.num_samples == 48000
    with pytest.raises(DatasetFormatError, match=f"row 2: audio 1: {text}") as info:
        data_audio.load_audio(ref)
    assert info.value.reason == "corrupt audio"


def test_resampled_length_is_what_soxr_returns():
    import soxr

    rng = np.random.default_rng(2)
    for rate in (8000, 11025, 22050, 32000, 44100, 48000, 12345):
        for n in rng.integers(1, 100000, 20):
            assert len(soxr.resample(np.zeros(n, np.float32), rate, 16000)) == data_audio.resampled_length(int(n), rate)
