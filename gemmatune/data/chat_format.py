"""Messages -> Gemma 4's chat format, as text.

    <bos><|turn>user\n{content}<turn|>\n<|turn>model\n{content}<turn|>\n

Why the package renders it itself: the official chat template lives only on the model hub, and
offline runs (CI, the tiny model) must produce the same text. `format_chat` matches the template of
`gemmatune.model.tiny.build_tiny_tokenizer()` exactly; the tests check it.
"""
BOS, TURN_START, TURN_END = "<bos>", "<|turn>", "<turn|>"
PART_PLACEHOLDERS = {"image": "<|image|>", "audio": "<|audio|>"}  # the processor expands these


def generation_prompt() -> str:
    """The text after which the model writes its answer (the opening of a model turn): the end of
    every prompt, and the untrained start of every answer turn in training."""
    return f"{TURN_START}model\n"


def role_name(role: str) -> str:
    """The name Gemma 4 writes after <|turn>: the assistant is "model"."""
    return "model" if role in ("assistant", "model") else role


def render_content(content) -> str:
    """Content as the chat template writes it: trimmed text, image/audio parts as placeholders."""
    if isinstance(content, str):
        return content.strip()
    return "".join(p["text"].strip() if p["type"] == "text" else PART_PLACEHOLDERS[p["type"]]
                   for p in content)


def format_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render messages in Gemma 4's chat format, e.g. for display or as a generation prompt.

    `<bos><|turn>user\\n{content}<turn|>\\n<|turn>model\\n{content}<turn|>\\n`; with
    add_generation_prompt the string ends with `<|turn>model\\n`, where the model's answer starts.
    Identical to the tiny tokenizer's chat template (tested), so no hub template is needed.
    """
    text = BOS + "".join(f"{TURN_START}{role_name(m['role'])}\n{render_content(m['content'])}{TURN_END}\n"
                         for m in messages)
    return text + (generation_prompt() if add_generation_prompt else "")
