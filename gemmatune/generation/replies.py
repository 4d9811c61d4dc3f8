"""Talk to the model in the Gemma 4 chat format: chat() streams one reply, generate_replies()
answers many prompts in left-padded batches (held-out evaluation). Both run gemmatune's decode
loop (gemmatune.generation.decoding: static cache, CUDA-graph steps, no host round trip per token)."""
import torch

from gemmatune.data.chat_format import format_chat
from gemmatune.generation.decoding import generate


def stop_token_ids(tokenizer) -> list[int]:
    """Gemma 4 ends a reply with <turn|> (then <eos>): generation stops at either."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor works too
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<turn|>")]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def _reply_streamer(tokenizer):
    """transformers' TextStreamer, printing the reply as chat() returns it: no leading blank
    lines, and no run of more than one empty line (a random or barely trained model can emit
    hundreds of newline tokens, screens of nothing)."""
    from transformers import TextStreamer

    class ReplyStreamer(TextStreamer):
        started, newlines = False, 0

        def on_finalized_text(self, text: str, stream_end: bool = False):
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
            print("".join(shown), flush=True, end="\n" if stream_end else "")

    return ReplyStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else stop_token_ids(tokenizer)[0]


def chat(model, tokenizer, messages, max_new_tokens: int = 128, stream: bool = True,
         temperature: float = 0.0, top_p: float = 0.95, top_k: int = 64, seed: int = 0) -> str:
    """Reply to `messages` in Gemma 4's chat format, streaming the words as they come.

    Args:
        model, tokenizer: what load_model / add_lora / train / load_adapter returned.
        messages: a string (one user turn) or a list of {"role", "content"} messages.
        max_new_tokens: the longest reply. stream: print the reply as it is generated.
        temperature: 0 decodes greedily (repeatable before/after comparisons); otherwise the reply
            is sampled from the top_k tokens within top_p probability, seeded by `seed`.

    Returns:
        The reply text, without special tokens.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    prompt = format_chat(_as_messages(messages), add_generation_prompt=True)
    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    streamer = _reply_streamer(tokenizer) if stream else None
    reply = generate(model, input_ids, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids(tokenizer),
                     pad_token_id=_pad_token_id(tokenizer), streamer=streamer, temperature=temperature,
                     top_k=top_k, top_p=top_p, seed=seed)
    return tokenizer.decode(reply[0], skip_special_tokens=True).strip()


def left_padded(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token lists, padded on the left to the longest."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def generate_replies(model, tokenizer, prompts, max_new_tokens: int = 128, batch_size: int = 8,
                     temperature: float = 0.0, top_p: float = 0.95, top_k: int = 64, seed: int = 0) -> list[str]:
    """The replies to many prompts, in their order, for evaluation.

    Args:
        model, tokenizer: as for chat.
        prompts: strings or message lists.
        max_new_tokens: the longest reply. batch_size: prompts decoded together (left-padded;
            prompts of similar length are batched together to pad less).
        temperature, top_p, top_k, seed: as for chat (greedy by default, so a reply does not depend
            on the others in its batch beyond floating-point rounding).

    Returns:
        A list of reply strings.

    Raises:
        ValueError: batch_size below 1.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rows = [tokenizer(format_chat(_as_messages(p), add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    replies: list[str | None] = [None] * len(rows)
    pad = _pad_token_id(tokenizer)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        input_ids, attention_mask = left_padded([rows[i] for i in batch], pad)
        tokens = generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                          stop_token_ids=stop_token_ids(tokenizer), pad_token_id=pad, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed + start)
        for i, reply in zip(batch, tokens):
            replies[i] = tokenizer.decode(reply, skip_special_tokens=True).strip()
    return replies
