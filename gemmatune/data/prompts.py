"""Prompts for reinforcement learning: rows -> the prompt's token ids, plus the columns a reward
function reads; and the bundled arithmetic prompt set.

A prompt row is what TRL's GRPOTrainer takes: a string, or a dict with a "prompt" (a string or a
list of {"role", "content"} messages ending with a user turn) and any other columns ("answer",
...), which reach the reward functions by name. The prompt is rendered in Gemma 4's chat format
and ends with the generation prompt "<|turn>model\\n" (tokenize_conversation, the one place a
prompt ends), so sampling and training see the same ids.
"""
import json
from dataclasses import dataclass, field

from gemmatune.data.messages import prompt_messages
from gemmatune.data.rows import ASSETS
from gemmatune.data.tokens import tokenize_conversation
from gemmatune.errors import DatasetFormatError

BUNDLED_PROMPTS = ASSETS / "arithmetic"


@dataclass
class PromptRow:
    """One prompt, ready to sample from."""
    prompt: object                # as given: what reward functions receive as `prompts`
    input_ids: list[int]          # chat-formatted, ending with the generation prompt
    columns: dict = field(default_factory=dict)  # the row's other keys ("answer", ...)


def load_bundled_prompts(split: str = "train") -> list[dict]:
    """The bundled arithmetic prompts: [{"prompt", "answer", "kind"}], "answer" a number as text.

    split: "train" or "test" (held out). Made by scripts/make_arithmetic_prompts.py (seeded,
    CC0-1.0); gemmatune/assets/README.md describes them."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: the bundled prompts have a 'train' and a 'test' split")
    path = BUNDLED_PROMPTS / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def question_messages(prompt, where: str) -> list[dict]:
    """A prompt in any form chat takes (data.messages.prompt_messages) whose last turn is the user's
    question: what a rollout answers."""
    if isinstance(prompt, str) and not prompt.strip():
        raise DatasetFormatError(f"{where}: the prompt is empty", "empty prompt")
    messages = prompt_messages(prompt, where)
    if messages[-1]["role"] != "user":
        raise DatasetFormatError(f"{where}: the prompt's last message is from the {messages[-1]['role']}; "
                                 "end it with a user turn (the model answers it)", "prompt not ending with user")
    return messages


def prepare_prompts(rows, tokenizer, max_prompt_length: int = 512) -> list[PromptRow]:
    """Every row as a PromptRow, checked before any work starts.

    Args:
        rows: strings, or dicts with "prompt" and any other columns.
        tokenizer: the model's tokenizer (or processor).
        max_prompt_length: the longest prompt in tokens; a longer one is refused (cutting a
            prompt would change the question).

    Returns:
        A list of PromptRow in the rows' order.

    Raises:
        DatasetFormatError: no rows, a row without "prompt", an empty or malformed prompt, or one
            longer than max_prompt_length (the message names the row, counted from 1).
    """
    rows = list(rows)
    if not rows:
        raise DatasetFormatError("no prompts: pass a list of strings or of {'prompt': ..., ...} rows", "no rows")
    prepared, cache = [], {}
    for number, row in enumerate(rows, start=1):
        where = f"prompt row {number}"
        if isinstance(row, dict):
            if "prompt" not in row:
                raise DatasetFormatError(f"{where}: no 'prompt' key (keys: {', '.join(map(str, row))}); "
                                         "rename the column holding the question to 'prompt'", "no prompt")
            prompt, columns = row["prompt"], {k: v for k, v in row.items() if k != "prompt"}
        else:
            prompt, columns = row, {}
        tokens = tokenize_conversation(tokenizer, question_messages(prompt, where), 10 ** 9, segment_cache=cache,
                                       add_generation_prompt=True)
        if tokens["length"] > max_prompt_length:
            raise DatasetFormatError(f"{where}: the prompt has {tokens['length']} tokens, more than "
                                     f"max_prompt_length={max_prompt_length}; shorten it or raise the limit",
                                     "prompt too long")
        prepared.append(PromptRow(prompt=prompt, input_ids=tokens["input_ids"], columns=columns))
    return prepared
