"""Messages -> model inputs: one conversation's tokens and media, then padded tensors.

The last stage of the data path, shared by training, evaluation and generation, so that each sees
exactly what the others see:

    conversation_tokens   messages -> token ids, labels and media refs (training rows and prompts)
    collate               examples -> padded tensors: right-padded for training, left-padded for
                          generation; images and audio decoded now (for this batch only) into the
                          tensors the towers take: pixel_values, image_position_ids,
                          input_features, input_features_mask, mm_token_type_ids
    prompt_batch          prompts (any schema prepare_dataset reads) -> left-padded tensors to
                          generate the answers: conversation_tokens(..., add_generation_prompt=True)
                          for each, then collate

A prompt is never rendered as text and tokenised again: tokenize_conversation with
add_generation_prompt=True is the one place a prompt ends, so a prompt's ids are the ids of a
training row up to where its answer starts (tests/data/test_media_rows.py checks it).
"""
from gemmatune.data.audio import MAX_AUDIO_SECONDS, AudioRef, audio_features, load_audio
from gemmatune.data.images import ImageRef, image_patches, load_image
from gemmatune.data.media import MediaSettings, media_run, media_settings, media_token_ids, plan_media
from gemmatune.data.messages import MEDIA_KINDS, has_media, prompt_messages
from gemmatune.data.tokens import IGNORE_INDEX, tokenize_conversation

IMAGE_TYPE, AUDIO_TYPE = 1, 3  # mm_token_type_ids values, as transformers' processors write them


def collate(batch: list[dict], pad_token_id: int, pad_to_multiple_of: int = 1, padding_side: str = "right") -> dict:
    """Pad a list of examples into tensors: input_ids with pad, labels with -100, attention_mask.

    Training pads on the right: the padding is masked out of the loss and, being after every real
    token, never seen by one. Generation pads on the left (padding_side="left"), so that every row's
    answer starts at the same position. The length is rounded up to `pad_to_multiple_of`, so
    batches come in a few shapes (each shape is captured once as a CUDA graph, see
    gemmatune.training.step). When rows hold images or audio, their pixels and features are decoded
    now and added (collate_media: pixel_values, image_position_ids, input_features,
    input_features_mask, mm_token_type_ids); a text-only batch has exactly the three keys above."""
    import torch

    if not batch:
        raise ValueError("collate got an empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r}: 'right' (training) or 'left' (generation)")
    longest = max(len(ex["input_ids"]) for ex in batch)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        span = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        input_ids[i, span] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[i, span] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[i, span] = 1
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


def conversation_tokens(tokenizer, messages: list[dict], settings: MediaSettings, where: str = "row",
                        max_seq_length: int | None = None, train_on_inputs: bool = False,
                        segment_cache: dict | None = None, add_generation_prompt: bool = False,
                        enable_thinking: bool | None = None, tools: list[dict] | None = None,
                        mask_thought: bool = False) -> dict:
    """The one place messages become tokens, for a training row and for a prompt alike.

    Each image or audio part is checked and counted (plan_media), its placeholder run laid out
    (media_run), and the conversation tokenised around the runs (tokenize_conversation).

    Args:
        tokenizer: the tokenizer or processor load_model returned.
        messages: [{"role", "content"}] as gemmatune.data.messages makes them (roles mapped).
        settings: media_settings(...): soft tokens per image, the longest clip, mel bins.
        where: names the row or prompt in errors.
        max_seq_length: cut to this many tokens (None: no cut, as for a prompt).
        train_on_inputs, segment_cache: as for tokenize_conversation.
        add_generation_prompt: end where the model's answer starts (a prompt), untrained.
        enable_thinking, tools, mask_thought: as for tokenize_conversation (thinking, tool
            declarations, the thought left untrained).

    Returns:
        tokenize_conversation's dict (input_ids, labels, truncated, length, media_kept, cuts_media)
        plus "media", the ImageRef/AudioRef of every media part in order, and "media_ids", the
        media token ids (None without media).

    Raises:
        DatasetFormatError: a medium that cannot be read, or media tokens typed in a text part.
    """
    media = plan_media(messages, where, settings) if has_media(messages) else []
    ids = media_token_ids(tokenizer) if media else None
    runs = [media_run(ref, ids) for ref in media] if media else None
    tokens = tokenize_conversation(tokenizer, messages, max_seq_length or 10 ** 9, train_on_inputs=train_on_inputs,
                                   segment_cache=segment_cache, media_runs=runs, media_ids=ids, where=where,
                                   add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                                   tools=tools, mask_thought=mask_thought)
    return {**tokens, "media": media, "media_ids": ids}


def as_example(tokens: dict) -> dict:
    """What collate takes from conversation_tokens' output: input_ids, labels, and the media whose
    placeholder runs survived truncation (with the media token ids)."""
    example = {"input_ids": tokens["input_ids"], "labels": tokens["labels"]}
    kept = tokens["media"][:tokens["media_kept"]]
    if kept:
        example.update(media=kept, media_ids=tokens["media_ids"])
    return example


def media_kinds(conversations) -> set[str]:
    """The kinds of media ("image", "audio") in some conversations (lists of messages): which
    towers a model needs to read them."""
    return {part["type"] for messages in conversations for message in messages
            if isinstance(message["content"], list) for part in message["content"] if part["type"] in MEDIA_KINDS}


def example_media_kinds(examples) -> set[str]:
    """The kinds of media ("image", "audio") in prepared examples (prepare_dataset's rows)."""
    refs = (ref for example in examples for ref in example.get("media", ()))
    return {"image" if isinstance(ref, ImageRef) else "audio" for ref in refs}


def prompt_examples(tokenizer, prompts: list, max_soft_tokens: int = 280,
                    max_audio_seconds: float = MAX_AUDIO_SECONDS, mel_bins: int | None = None,
                    enable_thinking: bool = False, tools: list[dict] | None = None) -> list[dict]:
    """Each prompt as an example to collate: conversation_tokens(..., add_generation_prompt=True) of
    prompt_messages(prompt). Images and clips are checked and counted here, decoded by collate.
    enable_thinking and tools (declarations in the system turn) as for tokenize_conversation."""
    if isinstance(prompts, (str, dict)) or not len(prompts):
        raise ValueError("expected a non-empty list of prompts: wrap a single one as [prompt]")
    settings = media_settings(tokenizer, max_soft_tokens, max_audio_seconds, mel_bins)
    cache, examples = {}, []
    for i, prompt in enumerate(prompts, start=1):
        where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
        tokens = conversation_tokens(tokenizer, prompt_messages(prompt, where), settings, where, segment_cache=cache,
                                     add_generation_prompt=True, enable_thinking=enable_thinking, tools=tools)
        examples.append(as_example(tokens))
    return examples


def collate_prompts(examples: list[dict], pad_token_id: int = 0) -> dict:
    """collate, padded on the left (every row's answer starts at the same position), without labels."""
    batch = collate(examples, pad_token_id, padding_side="left")
    del batch["labels"]
    return batch


def prompt_batch(tokenizer, prompts: list, max_soft_tokens: int = 280, max_audio_seconds: float = MAX_AUDIO_SECONDS,
                 mel_bins: int | None = None, pad_token_id: int | None = None, enable_thinking: bool = False,
                 tools: list[dict] | None = None) -> dict:
    """Left-padded tensors to generate the answers to `prompts`, built as training rows are.

    Each prompt goes through conversation_tokens(..., add_generation_prompt=True) (prompt_examples)
    and the batch through collate(padding_side="left") (collate_prompts): the same token
    arithmetic, placeholder runs and pixels as training, so generation and evaluation see what
    training saw. chat, generate_replies and score build their inputs this way.

    Args:
        tokenizer: the tokenizer or processor load_model returned.
        prompts: a list of prompts, each as prompt_messages takes it (a string, a list of messages
            in OpenAI or ShareGPT keys with text/image/audio parts, or a row).
        max_soft_tokens, max_audio_seconds, mel_bins: as given to prepare_dataset.
        pad_token_id: the left padding's id (default: the tokenizer's pad id, else 0).
        enable_thinking, tools: thinking on, and tool declarations, as for tokenize_conversation.

    Returns:
        {"input_ids" (B, L), each row ending with the generation prompt, "attention_mask" (0 on the
        left padding)}, plus, when a prompt holds media, pixel_values, image_position_ids,
        input_features, input_features_mask and mm_token_type_ids (images and clips in row order).

    Raises:
        DatasetFormatError: a prompt that cannot be read (naming it, counted from 1).
        ValueError: no prompts, an unknown soft-token budget, a clip limit over 30 s.
    """
    examples = prompt_examples(tokenizer, prompts, max_soft_tokens, max_audio_seconds, mel_bins, enable_thinking,
                               tools)
    if pad_token_id is None:
        pad_token_id = getattr(getattr(tokenizer, "tokenizer", tokenizer), "pad_token_id", None) or 0
    return collate_prompts(examples, pad_token_id)
