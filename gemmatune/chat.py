"""Talk to the model in the Gemma 4 chat format, streaming the reply as it is generated."""
import torch

from gemmatune.data import format_chat


def stop_token_ids(tokenizer) -> list[int]:
    """Gemma 4 ends a reply with <turn|> (then <eos>): generation stops at either."""
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


def chat(model, tokenizer, messages, max_new_tokens: int = 128, stream: bool = True,
         temperature: float = 0.0, top_p: float = 0.95, seed: int = 0) -> str:
    """Reply to `messages` (a string, or a list of {"role", "content"} dicts) and return it.

    temperature 0 decodes greedily (repeatable before/after comparisons); stream=True
    prints the words as they come.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    prompt = format_chat(messages, add_generation_prompt=True)
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    streamer = _reply_streamer(tokenizer) if stream else None
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer),
                pad_token_id=tokenizer.pad_token_id, streamer=streamer, use_cache=True, **sampling)
    finally:
        model.train(was_training)
    reply = output[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(reply, skip_special_tokens=True).strip()

