"""Talk to the model in the Gemma 4 chat format, streaming the reply as it is generated."""
import torch

from gemmatune.data import format_chat


def stop_token_ids(tokenizer) -> list[int]:
    """Gemma 4 ends a reply with <turn|> (then <eos>): generation stops at either."""
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<turn|>")]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def chat(model, tokenizer, messages, max_new_tokens: int = 128, stream: bool = True,
         temperature: float = 0.0, top_p: float = 0.95, seed: int = 0) -> str:
    """Reply to `messages` (a string, or a list of {"role", "content"} dicts) and return it.

    temperature 0 decodes greedily (repeatable before/after comparisons); stream=True
    prints the words as they come.
    """
    from transformers import TextStreamer

    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    prompt = format_chat(messages, add_generation_prompt=True)
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
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

