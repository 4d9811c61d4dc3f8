"""Messages (+ media runs) -> token ids and labels: the loss falls on what the model itself writes.

The fourth stage of the data path. A row is Gemma 4's own rendering of the conversation
(gemmatune.data.chat_format.render_pieces), so the prompt a server builds for the same conversation
is exactly the row's untrained start. Trained: each model turn's answer and the `<turn|>` that ends
it (the model must learn to stop: it is one of Gemma 4's end-of-generation ids), its tool calls and
the `<|tool_response>` it stops on after them, and its thought (`<|channel>thought\\n...<channel|>`)
unless mask_thought=True. Not trained: the system turn (with `<|think|>` and the tool declarations),
user turns, every `<|turn>model\\n` header (the generation prompt supplies it; after tool responses
with thinking on, the prompt also supplies `<|channel>thought\\n`, so that is not trained either),
the tool responses (the caller writes them), the "\\n" after `<turn|>` (generation stops at
`<turn|>`), an earlier model turn whose thought the template leaves out (the model never wrote
that answer without its thought), and every media run, even inside an answer or with
train_on_inputs=True. Truncation never cuts through a media run: `cuts_media` tells the caller,
which drops such a row (a run cut short would make the tower's output disagree with the placeholders).
"""
from itertools import groupby

from gemmatune.data.chat_format import ANSWER, BOS, PART_PLACEHOLDERS, THOUGHT, conversation_thinks, render_pieces
from gemmatune.errors import DatasetFormatError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
CACHED_LENGTH = 32  # texts this short are the format's own pieces ("<|turn>model\n", "<turn|>"): tokenised once


def tokenize_conversation(tokenizer, messages: list[dict], max_seq_length: int,
                          train_on_inputs: bool = False, segment_cache: dict | None = None,
                          media_runs: list[list[int]] | None = None, media_ids: dict | None = None,
                          where: str = "row", add_generation_prompt: bool = False,
                          enable_thinking: bool | None = None, tools: list[dict] | None = None,
                          mask_thought: bool = False) -> dict:
    """Token ids and labels of one conversation in Gemma 4's chat format, cut to max_seq_length.

    Every stage takes its tokens from here: training rows, evaluation prompts and generation prompts.

    Args:
        tokenizer: the tokenizer, or a processor (its `.tokenizer` is used).
        messages: as gemmatune.data.to_messages returns them (a thought under "reasoning_content",
            tool calls and their responses on the model's message).
        max_seq_length: longer rows are cut (`truncated`; `length` is the length before the cut).
        train_on_inputs: train every token but <bos> and the media runs, not only the model's.
        segment_cache: one dict shared over the rows of one tokenizer: the format's short pieces are
            then tokenised once (prepare_dataset does this).
        media_runs: the placeholder run of each image/audio part, in order (media.media_run); without
            them a placeholder stays the one token the text has.
        media_ids: the media token ids; a text that tokenises to one raises DatasetFormatError.
        where: names the row in errors.
        add_generation_prompt: end where the model's reply starts (chat_format.generation_prompt).
        enable_thinking: `<|think|>` in the system turn. None: on when a model turn carries a thought
            (a reasoning row trains as a thinking conversation). Pass it explicitly for prompts.
        tools: tool declarations for the system turn (OpenAI shape, as prepare_dataset reads a row's
            "tools" column).
        mask_thought: no loss on the thought blocks (markers included); the answers are still trained.

    Returns:
        dict(input_ids, labels, truncated, length, media_kept, cuts_media): labels are -100 where not
        trained; media_kept counts the media runs that fit; cuts_media says max_seq_length falls
        inside one.

    Raises:
        DatasetFormatError: a text part that tokenises to a media token (with media_ids).
        ValueError: a tool call whose arguments are not a mapping.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    thinking = conversation_thinks(messages) if enable_thinking is None else enable_thinking
    pieces = render_pieces(messages, add_generation_prompt, thinking, tools)
    input_ids, labels, cache = [], [], {} if segment_cache is None else segment_cache
    media_spans, runs = [], list(media_runs or [])

    def add(ids: list[int], trained: bool) -> None:
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))

    if pieces[0].text == BOS:  # added by hand: add_special_tokens differs per tokenizer
        pieces = pieces[1:]
        if tokenizer.bos_token_id is not None:
            add([tokenizer.bos_token_id], trained=False)
    for kind, run in groupby(pieces, key=lambda piece: piece.kind):
        if kind in PART_PLACEHOLDERS and media_runs is not None:
            for _ in run:
                ids = runs.pop(0)
                media_spans.append((len(input_ids), len(input_ids) + len(ids)))
                add(ids, trained=False)
            continue
        ids = _encode(tokenizer, "".join(piece.text for piece in run), cache)
        if media_ids and kind not in PART_PLACEHOLDERS:
            check_no_media_tokens_in_text(ids, media_ids, where)
        trained = kind == ANSWER or (kind == THOUGHT and not mask_thought)
        add(ids, (train_on_inputs or trained) and kind not in PART_PLACEHOLDERS)
    truncated = len(input_ids) > max_seq_length
    return {"input_ids": input_ids[:max_seq_length], "labels": labels[:max_seq_length], "truncated": truncated,
            "length": len(input_ids), "media_kept": sum(end <= max_seq_length for _, end in media_spans),
            "cuts_media": any(start < max_seq_length < end for start, end in media_spans)}


def _encode(tokenizer, text: str, cache: dict) -> list[int]:
    """The ids of one stretch of text, tokenised as a whole (special tokens split it as in the full
    string). A stretch starts fresh where its writer changes: the model's answer after the prompt's
    `<|turn>model\\n` is tokenised as generation produces it."""
    if not text:
        return []
    if len(text) > CACHED_LENGTH:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if text not in cache:
        cache[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return cache[text]


def check_no_media_tokens_in_text(ids: list[int], media_ids: dict, where: str) -> None:
    """A literal "<|image|>" typed in a text part would become a placeholder with no image behind it."""
    found = set(ids) & set(media_ids.values())
    if found:
        names = ", ".join(name for name, i in media_ids.items() if i in found)
        raise DatasetFormatError(f"{where}: the text contains the media token(s) {names}, which only image and "
                                 "audio parts may produce. Remove them from the text.", "media token in text")
