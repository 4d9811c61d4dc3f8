"""Messages -> media: each image or audio part checked and counted, ready to become tokens.

The third stage of the data path. `plan_media` turns every media part of a conversation into an
ImageRef or AudioRef (gemmatune.data.images / .audio): the file's header read, its size checked,
its soft tokens counted. A prepared row keeps each medium as it came (a path, the compressed bytes
a hub dataset stores, or the user's own PIL image or array) plus the numbers that fix its tokens;
gemmatune.data.batches decodes a batch's media when the batch is built and drops them after. At
280 soft tokens an image is 2,520 patches x 768 floats = 7.7 MB decoded, so 10,000 decoded images
would need 77 GB; kept encoded they need what the files need. `verify=True` decodes every medium
once at prepare time too, for files whose header is intact but whose data is cut off.

`media_run` is the placeholder run the processor expands one medium into; media runs never carry
loss (the model cannot predict an image's soft tokens, it only reads them).
"""
from dataclasses import dataclass
from pathlib import Path

from gemmatune.data.audio import MAX_AUDIO_SECONDS, MEL_BINS, inspect_audio, load_audio
from gemmatune.data.images import ImageRef, check_soft_token_budget, inspect_image, load_image
from gemmatune.data.messages import MEDIA_KINDS, part_value, row_to_messages


@dataclass(frozen=True)
class MediaSettings:
    """What prepare_dataset was asked for about images and audio."""

    max_soft_tokens: int = 280
    max_audio_seconds: float = MAX_AUDIO_SECONDS
    mel_bins: int = MEL_BINS
    base_dir: Path | None = None  # relative media paths are read from here (the data file's folder)
    verify: bool = False  # decode every medium once at prepare time


def media_settings(tokenizer, max_soft_tokens: int = 280, max_audio_seconds: float = MAX_AUDIO_SECONDS,
                   mel_bins: int | None = None, base_dir=None, verify: bool = False) -> MediaSettings:
    """Check the options. A processor's feature extractor gives mel_bins when none is passed (the
    released tower takes 128; the tiny test model 32)."""
    check_soft_token_budget(max_soft_tokens)
    if not isinstance(max_audio_seconds, (int, float)) or not 0 < max_audio_seconds <= MAX_AUDIO_SECONDS:
        raise ValueError(f"max_audio_seconds={max_audio_seconds!r}: Gemma 4's audio encoder takes clips of at most "
                         f"{MAX_AUDIO_SECONDS} s; pass a number of seconds in (0, {MAX_AUDIO_SECONDS}]")
    if mel_bins is None:
        mel_bins = getattr(getattr(tokenizer, "feature_extractor", None), "feature_size", MEL_BINS)
    return MediaSettings(max_soft_tokens, max_audio_seconds, int(mel_bins), base_dir and Path(base_dir), verify)


def media_token_ids(tokenizer) -> dict:
    """The six media token ids (begin, soft token, end for images and audio), from the tokenizer."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    names = {"<|image>": "boi_token", "<|image|>": "image_token", "<image|>": "eoi_token",
             "<|audio>": "boa_token", "<|audio|>": "audio_token", "<audio|>": "eoa_token"}
    ids = {}
    for literal, attribute in names.items():
        token = getattr(tokenizer, attribute, None) or literal
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token} token: load the Gemma 4 tokenizer (or processor) of "
                             "the model you train; images and audio need its special tokens")
        ids[literal] = token_id
    return ids


def plan_media(messages: list[dict], where: str, settings: MediaSettings) -> list:
    """ImageRef/AudioRef for each media part, in order; raises DatasetFormatError naming the row."""
    refs, counts = [], {"image": 0, "audio": 0}
    for message in messages:
        for part in message["content"] if isinstance(message["content"], list) else ():
            kind = part["type"]
            if kind not in MEDIA_KINDS:
                continue
            counts[kind] += 1
            label = f"{where}: {kind} {counts[kind]}"
            if kind == "image":
                ref = inspect_image(part_value(part), settings.max_soft_tokens, label, settings.base_dir)
                if settings.verify:
                    load_image(ref)
            else:
                ref = inspect_audio(part_value(part), part.get("sampling_rate"), settings.mel_bins, label,
                                    settings.base_dir, settings.max_audio_seconds)
                if settings.verify:
                    load_audio(ref)
            refs.append(ref)
    return refs


def media_run(ref, ids: dict) -> list[int]:
    """The placeholder run the processor expands one image or clip into."""
    if isinstance(ref, ImageRef):
        return [ids["<|image>"]] + [ids["<|image|>"]] * ref.tokens + [ids["<image|>"]]
    return [ids["<|audio>"]] + [ids["<|audio|>"]] * ref.tokens + [ids["<audio|>"]]


def row_media(row, formatting_func=None, where: str = "row"):
    """(kind, decoded medium) of the first image or audio part of a row: a PIL image, or a
    float32 16 kHz mono array; (None, None) for a text-only row. Decoded as for training."""
    for message in row_to_messages(row, where, formatting_func):
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part["type"] == "image":
                return "image", load_image(inspect_image(part_value(part), 280, where))
            if part["type"] == "audio":
                ref = inspect_audio(part_value(part), part.get("sampling_rate"), MEL_BINS, where)
                return "audio", load_audio(ref)
    return None, None
