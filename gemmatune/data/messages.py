"""Rows -> messages: every common chat schema becomes [{"role", "content"}, ...].

The second stage of the data path. Datasets on the hub come as ShareGPT (`conversations` with
`from`/`value`), OpenAI (`messages` with `role`/`content`) or Alpaca (`instruction`, `input`,
`output`); people should not have to convert by hand. Roles are mapped to "system", "user" and
"assistant". Content is a string, or a list of parts when it holds images or audio:
{"type": "text", "text"}, {"type": "image", "image": PIL | path | bytes},
{"type": "audio", "audio": path | bytes | array, "sampling_rate"}. A part without its medium
takes the next entry of the row's "images"/"audios" column (TRL-style datasets).
`image_to_text` / `audio_to_text` are ready-made formatting functions for {"image"|"audio", "text"}
datasets. Anything unreadable raises DatasetFormatError naming the row and the fix.
"""
from gemmatune.errors import DatasetFormatError

# Role names found in the common schemas, mapped to ours. Gemma calls the assistant "model".
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "system": "system"}
ACCEPTED_ROLES = "user/human, assistant/gpt/model, system"
MEDIA_KINDS = ("image", "audio")


def to_messages(row, where: str | None = None) -> list[dict]:
    """Convert one row of a common chat schema to [{"role": "system"|"user"|"assistant", "content"}].

    Why one function for three schemas: datasets on the hub come as ShareGPT (`conversations` with
    `from`/`value`), OpenAI (`messages` with `role`/`content`) or Alpaca (`instruction`, `input`,
    `output`), and users should not have to convert by hand. Content is a string; a list of
    {"type": "text", "text": ...} parts becomes one string (parts trimmed and concatenated, as
    Gemma's chat template does), and stays a list if it holds image or audio parts, for the
    multimodal notebooks. Anything else raises DatasetFormatError naming the row and the fix.
    `where` names the row in errors ("row 3", "line 7": prepare_dataset counts from 1).
    """
    where = where or "row"
    if not isinstance(row, dict):
        raise DatasetFormatError(f"{where}: expected a dict, got {type(row).__name__}. "
                                 "Each row must be a mapping of column name to value.", "not a dict")
    if row.get("messages") is not None:
        turns = row["messages"]
    elif row.get("conversations") is not None:
        turns = row["conversations"]
    elif row.get("instruction") is not None and row.get("output") is not None:
        return _alpaca_to_messages(row, where)
    else:
        raise DatasetFormatError(
            f"{where}: no 'conversations', 'messages' or 'instruction'/'output' columns "
            f"(found: {', '.join(map(str, row)) or 'nothing'}). "
            "Rename your columns or pass a formatting function (formatting_func=...).", "unknown columns")
    if not isinstance(turns, (list, tuple)):
        raise DatasetFormatError(f"{where}: the conversation is a {type(turns).__name__}, expected a list "
                                 "of turns ({'role': ..., 'content': ...} or {'from': ..., 'value': ...}).",
                                 "conversation not a list")
    if not turns:
        raise DatasetFormatError(f"{where}: the conversation is empty. Drop the row or fill it in.",
                                 "empty conversation")
    messages = [turn_to_message(turn, i, where) for i, turn in enumerate(turns)]
    if messages[-1]["role"] != "assistant":
        raise DatasetFormatError(
            f"{where}: the last turn is from the {messages[-1]['role']}, not the assistant, so there "
            "is no answer to train on. End each conversation with an assistant turn, or drop the row.",
            "no answer turn")
    return messages


def turn_to_message(turn, i: int, where: str) -> dict:
    """One turn, in either ShareGPT (`from`/`value`) or OpenAI (`role`/`content`) keys."""
    if not isinstance(turn, dict):
        raise DatasetFormatError(f"{where}: turn {i} is a {type(turn).__name__}, expected a dict "
                                 "with 'role' and 'content' (or 'from' and 'value').", "bad turn")
    role = turn.get("role") if turn.get("role") is not None else turn.get("from")
    content = turn.get("content") if turn.get("content") is not None else turn.get("value")
    if role is None:
        raise DatasetFormatError(f"{where}: turn {i} has no 'role' or 'from' key "
                                 f"(keys: {', '.join(turn)}).", "bad turn")
    if not isinstance(role, str) or role.lower() not in ROLES:
        raise DatasetFormatError(f"{where}: turn {i} has unknown role {role!r}. Accepted roles: "
                                 f"{ACCEPTED_ROLES}. Map other roles with a formatting function.", "unknown role")
    role = ROLES[role.lower()]
    content = _normalise_content(content, f"{where}: turn {i} ({role})")
    if role == "assistant" and not (content.strip() if isinstance(content, str) else content):
        raise DatasetFormatError(f"{where}: turn {i} (assistant) is empty; an empty answer would teach "
                                 "the model to say nothing. Drop the row or fill in the answer.", "empty answer")
    return {"role": role, "content": content}


def _normalise_content(content, where: str):
    """A string stays; text-only part lists are joined; lists with image/audio parts stay lists."""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise DatasetFormatError(
            f"{where}: content is {type(content).__name__}, expected a string or a list of "
            "{'type': 'text', 'text': ...} parts. Convert it to text, e.g. with a formatting function.",
            "bad content")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in MEDIA_KINDS:
            parts.append(dict(part))
        else:
            raise DatasetFormatError(f"{where}: content part {part!r:.80} is not a text, image or audio "
                                     "part ({'type': 'text', 'text': ...}, {'type': 'image', ...}).", "bad content")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"].strip() for p in parts)
    return parts


def _alpaca_to_messages(row: dict, where: str) -> list[dict]:
    """Alpaca: user = instruction (+ blank line + input when there is one), assistant = output."""
    instruction, extra, output = row["instruction"], row.get("input") or "", row["output"]
    for name, value in (("instruction", instruction), ("input", extra), ("output", output)):
        if not isinstance(value, str):
            raise DatasetFormatError(f"{where}: '{name}' is {type(value).__name__}, expected a string.",
                                     "bad content")
    if not output.strip():
        raise DatasetFormatError(f"{where}: 'output' is empty, so there is no answer to train on. "
                                 "Drop the row or fill in the output.", "empty answer")
    user = instruction + "\n\n" + extra if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def row_to_messages(row, where: str, formatting_func) -> list[dict]:
    if formatting_func is not None:
        try:
            formatted = formatting_func(row)
        except DatasetFormatError as error:  # e.g. image_to_text's missing column: name the row
            raise DatasetFormatError(f"{where}: {error}", error.reason) from None
        row = {"messages": formatted} if isinstance(formatted, (list, tuple)) else formatted
    return attach_row_media(to_messages(row, where), row, where)


def has_media(messages: list[dict]) -> bool:
    return any(isinstance(m["content"], list) and any(p["type"] in MEDIA_KINDS for p in m["content"])
               for m in messages)


def attach_row_media(messages: list[dict], row, where: str) -> list[dict]:
    """Fill parts that carry no source from the row's "images"/"audios" columns, in order.

    The layout of TRL-style hub datasets: {"messages": [...{"type": "image"}...], "images": [...]}."""
    if not isinstance(row, dict) or not (row.get("images") is not None or row.get("audios") is not None):
        return messages
    pools = {"image": list(row.get("images") or []), "audio": list(row.get("audios") or [])}
    for message in messages:
        if not isinstance(message["content"], list):
            continue
        for part in message["content"]:
            kind = part["type"]
            if kind in MEDIA_KINDS and part_value(part) is None:
                if not pools[kind]:
                    raise DatasetFormatError(f"{where}: more {kind} parts than entries in the row's '{kind}s' "
                                             "column.", f"missing {kind}")
                part[kind] = pools[kind].pop(0)
    return messages


def part_value(part: dict):
    """The medium of a part: under its type's key, or "path"/"url" as chat templates write them."""
    for key in (part["type"], "path", "url"):
        if part.get(key) is not None:
            return part[key]
    return None


def image_to_text(prompt: str, image_column: str = "image", text_column: str = "text"):
    """A formatting_func for image -> text datasets ({"image", "text"} as in unsloth/LaTeX_OCR and
    the bundled formulas): the user turn is the image then the prompt, the answer is the text."""
    return _media_to_text("image", prompt, image_column, text_column)


def audio_to_text(prompt: str, audio_column: str = "audio", text_column: str = "text"):
    """A formatting_func for speech -> text datasets ({"audio", "text"} as in LibriSpeech and the
    bundled speech set; pass text_column="sentence" for Common Voice, "transcription" for FLEURS)."""
    return _media_to_text("audio", prompt, audio_column, text_column)


def _media_to_text(kind: str, prompt: str, media_column: str, text_column: str):
    def format_row(row: dict) -> list[dict]:
        missing = [c for c in (media_column, text_column) if c not in row]
        if missing:
            found = ", ".join(map(str, row))
            raise DatasetFormatError(f"no {' or '.join(map(repr, missing))} column (found: {found}); "
                                     f"pass {kind}_column=... / text_column=... to name yours.", "unknown columns")
        part = {"type": kind, kind: row[media_column]}
        return [{"role": "user", "content": [part, {"type": "text", "text": prompt}]},
                {"role": "assistant", "content": row[text_column]}]

    return format_row
