"""Conversations with images and audio -> token ids with placeholder runs, and batches with pixels and features.

The multimodal half of gemmatune.data (the text path is unchanged; text rows never come here):

    messages with parts [{"type": "image", "image": ...}, {"type": "text", ...}, {"type": "audio", ...}]
      --plan_media-->   ImageRef / AudioRef per part (header read, size checked, tokens counted)
      --tokenize_conversation (data.py) with media_runs-->  ids with <|image> N x <|image|> <image|> runs
      --collate_media--> pixel_values, image_position_ids, input_features, input_features_mask,
                         mm_token_type_ids (decoded now, for this batch only)

Where decoded pixels live: nowhere between batches. A prepared row keeps each medium as it came
(a path, the compressed bytes a hub dataset stores, or the user's own PIL image or array) plus the
numbers that fix its tokens; `collate_media` decodes the batch's media and drops them after. At
280 soft tokens an image is 2,520 patches x 768 floats = 7.7 MB decoded, so 10,000 decoded images
would need 77 GB; kept encoded they need what the files need. The cost is decoding once per step
(milliseconds per image or clip, next to a training step of hundreds). What can go wrong with a
file is found at prepare time from its header, so the error names the row before training and
skip_bad_rows=True can skip it; `verify_media=True` decodes everything once at prepare time too,
for files whose header is intact but whose data is cut off.

Hub datasets: `datasets` decodes Image/Audio columns when a row is read (every image into memory,
and audio only with torchcodec + ffmpeg installed). `keep_media_encoded` switches those columns
to decode=False, so rows carry {"bytes", "path"} dicts, which the parts accept like paths.

Labels: media runs (begin, soft tokens, end) never carry loss, even inside an answer or with
train_on_inputs=True: the model cannot predict an image's soft tokens, it only reads them.
Truncation never cuts through a run: such a row is dropped and counted (PreparedDataset.report()
says how many and which max_seq_length would keep them), because a run cut short would make
the vision or audio tower's output disagree with the placeholders.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from gemmatune.errors import DatasetFormatError
from gemmatune.media import (MAX_AUDIO_SECONDS, MEL_BINS, AudioRef, ImageRef, audio_features, check_soft_token_budget,
                             image_patches, inspect_audio, inspect_image, load_audio, load_image)

ASSETS = Path(__file__).parent / "assets"
BUNDLED_MEDIA = {"formulas": ASSETS / "formulas", "speech": ASSETS / "speech"}
MEDIA_KINDS = ("image", "audio")
IMAGE_TYPE, AUDIO_TYPE = 1, 3  # mm_token_type_ids values, as transformers' processors write them


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


# ------------------------------------------------------------------ rows -> media
def has_media(messages: list[dict]) -> bool:
    return any(isinstance(m["content"], list) and any(p["type"] in MEDIA_KINDS for p in m["content"])
               for m in messages)


def attach_row_media(messages: list[dict], row, where: str) -> list[dict]:
    """Fill parts that carry no source from the row's "images"/"audios" columns, in order.

    The layout of TRL-style hub datasets: {"messages": [...{"type": "image"}...], "images": [...]}."""
    if not isinstance(row, dict) or not (row.get("images") is not None or row.get("audios") is not None):
        return messages
    pools = {"image": list(row.get("images") or []), "audio": list(row.get("audios") or [])}
    for message in messages:
        if not isinstance(message["content"], list):
            continue
        for part in message["content"]:
            kind = part["type"]
            if kind in MEDIA_KINDS and _part_value(part) is None:
                if not pools[kind]:
                    raise DatasetFormatError(f"{where}: more {kind} parts than entries in the row's '{kind}s' "
                                             "column.", f"missing {kind}")
                part[kind] = pools[kind].pop(0)
    return messages


def _part_value(part: dict):
    """The medium of a part: under its type's key, or "path"/"url" as chat templates write them."""
    for key in (part["type"], "path", "url"):
        if part.get(key) is not None:
            return part[key]
    return None


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
                ref = inspect_image(_part_value(part), settings.max_soft_tokens, label, settings.base_dir)
                if settings.verify:
                    load_image(ref)
            else:
                ref = inspect_audio(_part_value(part), part.get("sampling_rate"), settings.mel_bins, label,
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


def content_pieces(content: list, runs: list, encode) -> list[tuple[list[int], bool]]:
    """(ids, is_media) pieces of one message: adjacent text parts are trimmed and joined, as the
    chat template renders them, and tokenised together; each media part takes the next run."""
    pieces, text = [], []
    for part in content:
        if part["type"] == "text":
            text.append(part["text"].strip())
            continue
        if text:
            pieces.append((encode("".join(text)), False))
            text = []
        pieces.append((runs.pop(0), True))
    if text:
        pieces.append((encode("".join(text)), False))
    return pieces


def check_no_media_tokens_in_text(ids: list[int], media_ids: dict, where: str) -> None:
    """A literal "<|image|>" typed in a text part would become a placeholder with no image behind it."""
    found = set(ids) & set(media_ids.values())
    if found:
        names = ", ".join(name for name, i in media_ids.items() if i in found)
        raise DatasetFormatError(f"{where}: the text contains the media token(s) {names}, which only image and "
                                 "audio parts may produce. Remove them from the text.", "media token in text")


# ------------------------------------------------------------------ batches
def collate_media(batch: list[dict], input_ids) -> dict:
    """The media tensors of a batch: decoded now, in the order their runs appear in input_ids.

    pixel_values (images, patches, 768) float32, zero-padded to the batch's largest image, with
    image_position_ids (images, patches, 2) at -1 on padding (the vision tower's padding mark);
    input_features (clips, frames, mel_bins) float32 and input_features_mask (clips, frames) bool;
    mm_token_type_ids (batch, length): 1 on image soft tokens, 3 on audio soft tokens, 0 elsewhere.
    """
    import torch

    refs = [ref for example in batch for ref in example.get("media", ())]
    images = [ref for ref in refs if isinstance(ref, ImageRef)]
    clips = [ref for ref in refs if isinstance(ref, AudioRef)]
    ids = next(example["media_ids"] for example in batch if example.get("media"))
    out = {}
    if images:
        encoded = [image_patches(load_image(ref), ref.max_soft_tokens, (ref.height, ref.width)) for ref in images]
        longest = max(len(patches) for patches, _ in encoded)
        pixel_values = torch.zeros((len(images), longest, encoded[0][0].shape[1]), dtype=torch.float32)
        positions = torch.full((len(images), longest, 2), -1, dtype=torch.long)
        for i, (patches, where) in enumerate(encoded):
            pixel_values[i, :len(patches)] = torch.from_numpy(patches)
            positions[i, :len(patches)] = torch.from_numpy(where)
        out.update(pixel_values=pixel_values, image_position_ids=positions)
    if clips:
        encoded = [audio_features(load_audio(ref), ref.mel_bins) for ref in clips]
        longest = max(len(features) for features, _ in encoded)
        features = torch.zeros((len(clips), longest, clips[0].mel_bins), dtype=torch.float32)
        mask = torch.zeros((len(clips), longest), dtype=torch.bool)
        for i, (clip_features, clip_mask) in enumerate(encoded):
            features[i, :len(clip_features)] = torch.from_numpy(clip_features)
            mask[i, :len(clip_mask)] = torch.from_numpy(clip_mask)
        out.update(input_features=features, input_features_mask=mask)
    mm_token_type_ids = torch.zeros_like(input_ids)
    mm_token_type_ids[input_ids == ids["<|image|>"]] = IMAGE_TYPE
    mm_token_type_ids[input_ids == ids["<|audio|>"]] = AUDIO_TYPE
    out["mm_token_type_ids"] = mm_token_type_ids
    _check_counts(mm_token_type_ids, images, clips)
    return out


def _check_counts(mm_token_type_ids, images: list, clips: list) -> None:
    """The towers' outputs must fill the placeholders exactly; say so here rather than in forward."""
    for kind, type_id, refs in (("image", IMAGE_TYPE, images), ("audio", AUDIO_TYPE, clips)):
        placeholders, produced = int((mm_token_type_ids == type_id).sum()), sum(ref.tokens for ref in refs)
        if placeholders != produced:
            raise RuntimeError(f"the batch holds {placeholders} {kind} placeholder tokens but its {kind}s give "
                               f"{produced} soft tokens; rows must come from gemmatune.prepare_dataset unchanged")


def prompt_inputs(tokenizer, messages: list[dict], max_soft_tokens: int = 280, mel_bins: int | None = None,
                  max_audio_seconds: float = MAX_AUDIO_SECONDS) -> dict:
    """Tensors to generate the answer to `messages` (ending with a user turn), batch of one:
    input_ids ending in "<|turn>model\\n", attention_mask, and the media tensors of its parts.
    The same token arithmetic and pixels as training, so before/after answers see what training saw."""
    from gemmatune import data

    settings = media_settings(tokenizer, max_soft_tokens, max_audio_seconds, mel_bins)
    messages = [data._turn_to_message(turn, i, "prompt") for i, turn in enumerate(messages)]
    media = plan_media(messages, "prompt", settings)
    ids = media_token_ids(tokenizer) if media else None
    tokens = data.tokenize_conversation(tokenizer, messages, 10 ** 9, media_runs=[media_run(r, ids) for r in media],
                                        media_ids=ids, where="prompt")
    header = getattr(tokenizer, "tokenizer", tokenizer)(f"{data.TURN_START}model\n", add_special_tokens=False)
    input_ids = tokens["input_ids"] + header["input_ids"]
    example = {"input_ids": input_ids, "labels": [data.IGNORE_INDEX] * len(input_ids)}
    if media:
        example.update(media=media, media_ids=ids)
    batch = data.collate([example], pad_token_id=0)
    del batch["labels"]
    return batch


# ------------------------------------------------------------------ ready-made formats and data
def image_to_text(prompt: str, image_column: str = "image", text_column: str = "text"):
    """A formatting_func for image -> text datasets ({"image", "text"} as in unsloth/LaTeX_OCR and
    the bundled formulas): the user turn is the image then the prompt, the answer is the text."""
    return _media_to_text("image", prompt, image_column, text_column)


def audio_to_text(prompt: str, audio_column: str = "audio", text_column: str = "text"):
    """A formatting_func for speech -> text datasets ({"audio", "text"} as in LibriSpeech and the
    bundled speech set; pass text_column="sentence" for Common Voice, "transcription" for FLEURS)."""
    return _media_to_text("audio", prompt, audio_column, text_column)


def _media_to_text(kind: str, prompt: str, media_column: str, text_column: str):
    def format_row(row: dict) -> list[dict]:
        missing = [c for c in (media_column, text_column) if c not in row]
        if missing:
            raise DatasetFormatError(f"no {' or '.join(map(repr, missing))} column (found: {', '.join(map(str, row))}); "
                                     f"pass {kind}_column=... / text_column=... to name yours.", "unknown columns")
        part = {"type": kind, kind: row[media_column]}
        return [{"role": "user", "content": [part, {"type": "text", "text": prompt}]},
                {"role": "assistant", "content": row[text_column]}]

    return format_row


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
