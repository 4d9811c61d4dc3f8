"""Talk to the model: chat() answers one conversation and prints the reply as it comes,
stream_reply() yields it piece by piece (for a web app), generate_replies() answers many prompts
in left-padded batches (held-out evaluation).

A prompt takes every form a training row takes: a string, OpenAI (`role`/`content`) or ShareGPT
(`from`/`value`, `human`/`gpt`) turns, content parts with images (PIL, path, bytes) and audio
(path, bytes, array + sampling_rate). It becomes token ids, pixels and mel features through the
function that builds training rows (gemmatune.data.batches.prompt_batch: the same placeholder runs,
pixels and features), so the model reads a prompt as it read its training data. A model loaded
without the tower a prompt needs refuses it (gemmatune.model.towers.require_towers) rather than
answer without looking at the image or listening to the clip.

Thinking and tools follow Gemma 4's chat format (gemmatune.data.chat_format): enable_thinking=True
asks for a thought before the answer, `tools` declares functions the model may call. chat and
generate_replies return each reply as a `Reply`: the answer as a string, with the thought and the
parsed tool calls beside it (data.chat_format.parse_reply on the reply's tokens).

All three run gemmatune's decode loop (gemmatune.generation.decoding: static cache, CUDA-graph
steps, no host round trip per token), media prompts included: the images and clips go into the
prefill, the decode steps are the text ones.
"""
import contextlib
from collections.abc import Iterator

import torch

from gemmatune.data.audio import MAX_AUDIO_SECONDS
from gemmatune.data.batches import collate_prompts, example_media_kinds, prompt_examples
from gemmatune.data.chat_format import parse_reply
from gemmatune.generation.decoding import stream_tokens
from gemmatune.generation.sampling import check_settings
from gemmatune.model.towers import require_towers

STOP_TOKENS = ("<turn|>", "<|tool_response>")  # the end of an answer; the wait for a tool's response


def stop_token_ids(tokenizer) -> list[int]:
    """Gemma 4 ends a reply with <turn|> (then <eos>), and stops at <|tool_response> after its tool
    calls (the caller runs the tools and answers with their responses): generation stops at any."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor works too
    ids = [tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS)]
    return [i for i in dict.fromkeys(ids) if i is not None and i != tokenizer.unk_token_id]


class Reply(str):
    """A reply: the answer itself (a str, so it prints and compares as text), with the parts Gemma 4
    writes beside it: `thought` (the thinking, or None) and `tool_calls` ([(name, arguments)]).

        reply = gemmatune.chat(model, tokenizer, "What is 17 * 23?", enable_thinking=True)
        print(reply.thought, "->", reply)"""

    thought: str | None
    tool_calls: list

    def __new__(cls, answer: str, thought: str | None = None, tool_calls: list | None = None):
        reply = super().__new__(cls, answer)
        reply.thought, reply.tool_calls = thought, list(tool_calls or [])
        return reply

    @classmethod
    def from_tokens(cls, tokenizer, token_ids) -> "Reply":
        """Parse generated ids: decoded with their special tokens (parse_reply needs the thought and
        call markers), the rest of the special tokens then removed, as skip_special_tokens would."""
        answer, thought, calls = parse_reply(tokenizer.decode(token_ids, skip_special_tokens=False))
        special = sorted(set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()
                                                              if t.special}, key=len, reverse=True)

        def clean(text):
            for token in special:
                text = text.replace(token, "")
            return text.strip()

        return cls(clean(answer), clean(thought) if thought is not None else None, calls)


def _pad_token_id(tokenizer) -> int:
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    pad = tokenizer.pad_token_id
    return pad if pad is not None else stop_token_ids(tokenizer)[0]


def checked_prompts(model, tokenizer, prompts: list, what: str, max_soft_tokens: int = 280,
                    max_audio_seconds: float = MAX_AUDIO_SECONDS, mel_bins: int | None = None,
                    enable_thinking: bool = False, tools: list[dict] | None = None) -> list[dict]:
    """Every prompt as an example (data.batches.prompt_examples: read, media checked and counted,
    nothing decoded yet), refused with MissingTowerError if the model lacks a tower they need."""
    examples = prompt_examples(tokenizer, prompts, max_soft_tokens, max_audio_seconds, mel_bins, enable_thinking,
                               tools)
    require_towers(model, example_media_kinds(examples), what)
    return examples


def _token_stream(model, tokenizer, examples: list[dict], settings: dict) -> Iterator:
    """stream_tokens for some prompt examples, left-padded together."""
    inputs = collate_prompts(examples, _pad_token_id(tokenizer))
    return stream_tokens(model, inputs.pop("input_ids"), inputs.pop("attention_mask"), **settings, **inputs,
                         stop_token_ids=stop_token_ids(tokenizer), pad_token_id=_pad_token_id(tokenizer))


def stream_reply(model, tokenizer, messages, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 0.95, top_k: int = 64, seed: int = 0, max_soft_tokens: int = 280,
                 max_audio_seconds: float = MAX_AUDIO_SECONDS, mel_bins: int | None = None,
                 enable_thinking: bool = False, tools: list[dict] | None = None) -> Iterator[str]:
    """The reply to `messages`, as pieces of text while it is generated: for a web app or a UI.

        for piece in gemmatune.generation.stream_reply(model, tokenizer, "Convert 5 km to miles."):
            send(piece)

    A piece comes each time the host reads new tokens (every token on a CPU, every few on a GPU)
    and holds what they add to the text, never half a character. The prompt is read and checked
    when stream_reply is called; the generation runs as the pieces are read, and stops when the
    iterator is closed (or dropped) before the end. One reply at a time per model: read one to the
    end or close() it before starting another (a reader that may stop early, e.g. on a client's
    disconnect, wraps it in contextlib.closing).

    Args:
        model, tokenizer: as for chat. messages, max_new_tokens, temperature, top_p, top_k, seed,
            max_soft_tokens, max_audio_seconds, mel_bins, enable_thinking, tools: as for chat.

    Returns:
        An iterator of strings; joined, they are the reply's text with no leading whitespace and no
        special tokens (with enable_thinking, the thought and then the answer; chat returns them
        apart, as a Reply).

    Raises:
        ValueError: a setting check_settings refuses (naming the value), a prompt that cannot be read.
        MissingTowerError: images or audio for a model loaded without that tower.
    """
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    check_settings(max_new_tokens, temperature, top_k, top_p)
    examples = checked_prompts(model, tokenizer, [messages], "the prompt", max_soft_tokens, max_audio_seconds,
                               mel_bins, enable_thinking, tools)
    return _text_pieces(_token_stream(model, tokenizer, examples, settings), getattr(tokenizer, "tokenizer", tokenizer))


def _text_pieces(token_chunks: Iterator, tokenizer, tokens: list | None = None) -> Iterator[str]:
    """New text as tokens come: the decoded reply so far, less what was already given. Text that
    ends in an incomplete character (a byte-level token cut mid-character decodes to U+FFFD) waits
    for the next tokens. `tokens`, when given, collects the reply's token ids as they come."""
    tokens, given = ([] if tokens is None else tokens), ""
    try:
        for chunk in token_chunks:
            tokens += chunk[0].tolist()
            text = tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
            if text.startswith(given) and not text.endswith("\ufffd") and len(text) > len(given):
                yield text[len(given):]
                given = text
        text = tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
        if text.startswith(given) and len(text) > len(given):
            yield text[len(given):]
    finally:
        token_chunks.close()  # a reader that stopped early stops the generation now


class _ReplyPrinter:
    """Prints a reply's pieces as they come: no leading blank lines, and no run of more than one
    empty line (a random or barely trained model can emit hundreds of newlines, screens of nothing)."""

    def __init__(self):
        self.started, self.newlines = False, 0

    def __call__(self, text: str) -> None:
        shown = []
        for char in text:
            if char == "\n":
                self.newlines += 1
                continue
            if not self.started and char.isspace():
                continue
            if self.started and self.newlines:
                shown.append("\n" * min(self.newlines, 2))
            self.started, self.newlines = True, 0
            shown.append(char)
        print("".join(shown), flush=True, end="")

    def end(self) -> None:
        print(flush=True)


def chat(model, tokenizer, messages, max_new_tokens: int = 128, stream: bool = True,
         temperature: float = 0.0, top_p: float = 0.95, top_k: int = 64, seed: int = 0,
         max_soft_tokens: int = 280, max_audio_seconds: float = MAX_AUDIO_SECONDS, mel_bins: int | None = None,
         enable_thinking: bool = False, tools: list[dict] | None = None) -> "Reply":
    """Reply to `messages` in Gemma 4's chat format, printing the words as they come.

        gemmatune.chat(model, tokenizer, [{"role": "user", "content": [
            {"type": "image", "image": "formula.png"}, {"type": "text", "text": "Write the LaTeX."}]}])

    Args:
        model, tokenizer: what load_model / add_lora / train / load_adapter returned; for images
            or audio, a model loaded with modalities=("text", "image") / ("text", "audio").
        messages: a string (one user turn), or the turns in any schema prepare_dataset reads:
            {"role", "content"} or ShareGPT {"from": "human"|"gpt", "value"}; content a string or a
            list of {"type": "text"|"image"|"audio", ...} parts (images as PIL, path or bytes; audio
            as path, bytes or array with "sampling_rate"), or a row with "messages"/"conversations".
        max_new_tokens: the longest reply. stream: print the reply as it is generated
            (stream_reply gives the pieces to your own code instead).
        temperature: 0 decodes greedily (repeatable before/after comparisons); otherwise the reply
            is sampled from the top_k tokens (0: all) within top_p probability, seeded by `seed`.
        max_soft_tokens, max_audio_seconds, mel_bins: as given to prepare_dataset, so that an image
            or a clip becomes the tokens the model was trained on.
        enable_thinking: ask for a thought before the answer (Gemma 4's <|think|> switch); the
            E2B/E4B prompt is the same either way, as their chat template writes it.
        tools: functions the model may call, as OpenAI tool declarations ({"type": "function",
            "function": {"name", "description", "parameters"}}). When the reply calls them, run them
            and append {"role": "assistant", "tool_calls": ...} and {"role": "tool", "name", "content"}
            turns to `messages` for the next call.

    Returns:
        A Reply: the answer as a str, without special tokens, with `.thought` (None without one) and
        `.tool_calls` ([(name, arguments)]) beside it.

    Raises:
        ValueError: max_new_tokens < 0, temperature < 0, top_k < 0, top_p outside (0, 1] (naming the
            value); a prompt that cannot be read (DatasetFormatError).
        MissingTowerError: images or audio for a model loaded without that tower, before any token.
    """
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    check_settings(max_new_tokens, temperature, top_k, top_p)
    examples = checked_prompts(model, tokenizer, [messages], "the prompt", max_soft_tokens, max_audio_seconds,
                               mel_bins, enable_thinking, tools)
    text_tokenizer, tokens = getattr(tokenizer, "tokenizer", tokenizer), []
    pieces = _text_pieces(_token_stream(model, tokenizer, examples, settings), text_tokenizer, tokens)
    show = _ReplyPrinter() if stream else None
    with contextlib.closing(pieces):  # Ctrl-C while printing must not leave the model mid-generation
        for piece in pieces:
            if show is not None:
                show(piece)
    if show is not None:
        show.end()
    return Reply.from_tokens(text_tokenizer, tokens)


def left_padded(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token id lists, padded on the left to the longest: prompts
    for decoding.generate given as ids (the benchmarks' and tests' random prompts)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def generate_replies(model, tokenizer, prompts, max_new_tokens: int = 128, batch_size: int = 8,
                     temperature: float = 0.0, top_p: float = 0.95, top_k: int = 64, seed: int = 0,
                     max_soft_tokens: int = 280, max_audio_seconds: float = MAX_AUDIO_SECONDS,
                     mel_bins: int | None = None, enable_thinking: bool = False,
                     tools: list[dict] | None = None) -> list["Reply"]:
    """The replies to many prompts, in their order, for evaluation.

    Args:
        model, tokenizer: as for chat.
        prompts: a list of prompts, each as chat's `messages` (text, images, audio).
        max_new_tokens: the longest reply. batch_size: prompts decoded together (left-padded, each
            row's images and clips in its own placeholders; prompts of similar length are batched
            together to pad less).
        temperature, top_p, top_k, seed: as for chat (greedy by default, so a reply does not depend
            on the others in its batch beyond floating-point rounding).
        max_soft_tokens, max_audio_seconds, mel_bins, enable_thinking, tools: as for chat.

    Returns:
        A list of Reply (str answers, with .thought and .tool_calls), in the prompts' order.

    Raises:
        ValueError: batch_size below 1, a setting chat refuses, a prompt that cannot be read
            (naming it, counted from 1).
        MissingTowerError: images or audio for a model loaded without that tower, before any token.
    """
    check_settings(max_new_tokens, temperature, top_k, top_p)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: prompts decoded together, a whole number of at least 1")
    prompts = list(prompts)
    if not prompts:
        return []
    examples = checked_prompts(model, tokenizer, prompts, "the prompts", max_soft_tokens, max_audio_seconds, mel_bins,
                               enable_thinking, tools)
    text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    replies: list[Reply | None] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        seed=seed + start)
        with contextlib.closing(_token_stream(model, tokenizer, [examples[i] for i in batch], settings)) as stream:
            chunks = list(stream)
        tokens = torch.cat(chunks, dim=1) if chunks else torch.zeros((len(batch), 0), dtype=torch.long)
        for row, i in enumerate(batch):
            replies[i] = Reply.from_tokens(text_tokenizer, tokens[row].tolist())
    return replies
