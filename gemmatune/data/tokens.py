"""Messages (+ media runs) -> token ids and labels: the loss falls on the model's answers only.

The fourth stage of the data path. What is trained: each assistant turn's content and its closing
`<turn|>` — the model must learn to emit `<turn|>` to stop (it is one of Gemma 4's
end-of-generation ids). Not trained: the prompt, the `<|turn>model\n` header (the prompt already
supplies it at generation time), the "\n" after `<turn|>` (generation stops at `<turn|>`, so that
"\n" is never generated), and every media run (begin, soft tokens, end), even inside an answer or
with train_on_inputs=True. Truncation never cuts through a media run: `cuts_media` tells the
caller, which drops such a row (a run cut short would make the tower's output disagree with the
placeholders).
"""
from gemmatune.data.chat_format import TURN_END, TURN_START, generation_prompt, render_content, role_name
from gemmatune.errors import DatasetFormatError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


def tokenize_conversation(tokenizer, messages: list[dict], max_seq_length: int,
                          train_on_inputs: bool = False, segment_cache: dict | None = None,
                          media_runs: list[list[int]] | None = None, media_ids: dict | None = None,
                          where: str = "row", add_generation_prompt: bool = False) -> dict:
    """dict(input_ids, labels, truncated, length, media_kept, cuts_media) for one conversation, cut
    to max_seq_length tokens (`length`: before the cut).

    Why segment by segment (header, content, `<turn|>`, "\\n"): the label mask then falls exactly on
    token boundaries, and an answer's tokens start fresh after `<|turn>model\\n` as in generation
    (for the tiny tokenizer the ids equal the whole string's; tested). Labels: see the module
    docstring; train_on_inputs=True trains all but <bos>. A processor works too (`.tokenizer` is used).
    segment_cache: one dict shared over rows of one tokenizer, so the fixed pieces are tokenised
    once (prepare_dataset does this; a tokenizer call costs ~0.15 ms).
    media_runs: the placeholder run of each image/audio part in order (multimodal_data.media_run);
    they are never trained. `media_kept` counts the runs that fit; `cuts_media` says that
    max_seq_length falls inside one (prepare_dataset then drops the row). With media_ids, a text
    part that tokenises to a media token raises DatasetFormatError naming `where`.
    add_generation_prompt: end with the generation prompt (`generation_prompt()`), untrained: the
    prompt of a reply, the same ids as the start of a training row's answer turn.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    input_ids, labels, cache = [], [], {} if segment_cache is None else segment_cache
    media_spans, runs = [], list(media_runs or [])

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def fixed(text: str) -> list[int]:  # the same in every row: tokenise once
        if text not in cache:
            cache[text] = encode(text)
        return cache[text]

    def add(ids: list[int], trained: bool) -> None:
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))

    if tokenizer.bos_token_id is not None:  # added by hand: add_special_tokens differs per tokenizer
        add([tokenizer.bos_token_id], trained=False)
    for message in messages:
        answer = train_on_inputs or message["role"] in ("assistant", "model")
        add(fixed(f"{TURN_START}{role_name(message['role'])}\n"), train_on_inputs)
        if media_runs is None or isinstance(message["content"], str):
            add(encode(render_content(message["content"])), answer)
        else:
            for ids, is_media in content_pieces(message["content"], runs, encode):
                if is_media:
                    media_spans.append((len(input_ids), len(input_ids) + len(ids)))
                elif media_ids:
                    check_no_media_tokens_in_text(ids, media_ids, where)
                add(ids, answer and not is_media)
        add(fixed(TURN_END), answer)
        add(fixed("\n"), train_on_inputs)
    if add_generation_prompt:  # where the model's answer starts: what chat() and evaluation prompt with
        add(fixed(generation_prompt()), False)
    truncated = len(input_ids) > max_seq_length
    return {"input_ids": input_ids[:max_seq_length], "labels": labels[:max_seq_length], "truncated": truncated,
            "length": len(input_ids), "media_kept": sum(end <= max_seq_length for _, end in media_spans),
            "cuts_media": any(start < max_seq_length < end for start, end in media_spans)}


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
