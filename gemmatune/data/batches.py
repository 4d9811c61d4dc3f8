"""Prepared rows -> tensors: a right-padded training batch, or a generation prompt.

The last stage of the data path. `collate` pads token ids and labels and, when rows hold images or
audio, decodes their media now (for this batch only) into the tensors the towers take:
pixel_values, image_position_ids, input_features, input_features_mask, mm_token_type_ids.
`prompt_inputs` builds the same tensors for a conversation to answer, with the same token
arithmetic and pixels as training, so generation sees what training saw.
"""
from gemmatune.data.audio import MAX_AUDIO_SECONDS, AudioRef, audio_features, load_audio
from gemmatune.data.images import ImageRef, image_patches, load_image
from gemmatune.data.media import media_run, media_settings, media_token_ids, plan_media
from gemmatune.data.messages import prompt_messages
from gemmatune.data.tokens import IGNORE_INDEX, tokenize_conversation

IMAGE_TYPE, AUDIO_TYPE = 1, 3  # mm_token_type_ids values, as transformers' processors write them


def collate(batch: list[dict], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict:
    """Right-pad a list of examples into tensors: input_ids with pad, labels with -100, attention_mask.

    The length is rounded up to `pad_to_multiple_of`, so batches come in a few shapes (each
    shape is captured once as a CUDA graph, see gemmatune.training.step); the padding is masked out
    of the loss and, being on the right, never seen by a real token. When rows hold images or
    audio, their pixels and features are decoded now and added (multimodal_data.collate_media:
    pixel_values, image_position_ids, input_features, input_features_mask, mm_token_type_ids);
    a text-only batch has exactly the three keys above."""
    import torch

    if not batch:
        raise ValueError("collate got an empty batch")
    longest = max(len(ex["input_ids"]) for ex in batch)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if any(ex.get("media") for ex in batch):
        out.update(collate_media(batch, input_ids))
    return out


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
                  max_audio_seconds: float = MAX_AUDIO_SECONDS, enable_thinking: bool | None = None,
                  tools: list[dict] | None = None) -> dict:
    """Tensors to generate the answer to `messages` (ending with a user turn, or with tool turns after
    the model's calls), batch of one: input_ids ending with the generation prompt ("<|turn>model\\n"
    after a user turn), attention_mask, and the media tensors of its parts. The same token arithmetic
    and pixels as training, so before/after answers see what training saw. enable_thinking and tools
    as in tokenize_conversation."""
    settings = media_settings(tokenizer, max_soft_tokens, max_audio_seconds, mel_bins)
    messages = prompt_messages(messages)
    media = plan_media(messages, "prompt", settings)
    ids = media_token_ids(tokenizer) if media else None
    tokens = tokenize_conversation(tokenizer, messages, 10 ** 9, media_runs=[media_run(r, ids) for r in media],
                                   media_ids=ids, where="prompt", add_generation_prompt=True,
                                   enable_thinking=enable_thinking, tools=tools)
    input_ids = tokens["input_ids"]
    example = {"input_ids": input_ids, "labels": [IGNORE_INDEX] * len(input_ids)}
    if media:
        example.update(media=media, media_ids=ids)
    batch = collate([example], pad_token_id=0)
    del batch["labels"]
    return batch
