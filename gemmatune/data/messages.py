"""Rows -> messages: every common chat schema becomes [{"role", "content"}, ...].

The second stage of the data path. Datasets on the hub come as ShareGPT (`conversations` with
`from`/`value`), OpenAI (`messages` with `role`/`content`) or Alpaca (`instruction`, `input`,
`output`); people should not have to convert by hand. Roles are mapped to "system" (also
"developer"), "user" and "assistant". Content is a string, or a list of parts when it holds images
or audio: {"type": "text", "text"}, {"type": "image", "image": PIL | path | bytes},
{"type": "audio", "audio": path | bytes | array, "sampling_rate"}. A part without its medium
takes the next entry of the row's "images"/"audios" column (TRL-style datasets).

Thinking and tools, in the shapes datasets use, become the fields Gemma 4's template reads:
- a model turn's thought, from `reasoning_content`, `reasoning` or `thinking`, or written inline
  as `<|channel>thought\n...<channel|>` before the answer, goes to "reasoning_content";
- OpenAI tool calls (`tool_calls`: {"id", "type": "function", "function": {"name", "arguments"}},
  arguments a mapping or a JSON string; or flat {"name", "arguments"}) become
  {"type": "function", "id"?, "function": {"name", "arguments": dict}};
- the tool's answers, OpenAI `role: "tool"` turns after the calls or the template's own
  `tool_responses` ([{"name", "response"}]), become the calling turn's "tool_responses", each named
  after its call (by `tool_call_id`, else by position);
- a row's `tools` column (OpenAI tools, bare {"name", "description", "parameters"} functions, or a
  JSON string of either) is read by `row_tools`.
`image_to_text` / `audio_to_text` are ready-made formatting functions for {"image"|"audio", "text"}
datasets. Anything unreadable raises DatasetFormatError naming the row and the fix.
"""
import json

from gemmatune.data.chat_format import CHANNEL_END, CHANNEL_START, strip_thinking
from gemmatune.errors import DatasetFormatError

# Role names found in the common schemas, mapped to ours. Gemma calls the assistant "model".
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "system": "system", "developer": "system", "tool": "tool"}
ACCEPTED_ROLES = "user/human, assistant/gpt/model, system/developer, tool"
MEDIA_KINDS = ("image", "audio")
THOUGHT_FIELDS = ("reasoning_content", "reasoning", "thinking")


def to_messages(row, where: str | None = None) -> list[dict]:
    """Convert one row of a common chat schema to [{"role": "system"|"user"|"assistant", "content", ...}].

    Why one function for three schemas: datasets on the hub come as ShareGPT (`conversations` with
    `from`/`value`), OpenAI (`messages` with `role`/`content`) or Alpaca (`instruction`, `input`,
    `output`), and users should not have to convert by hand.

    Args:
        row: one dataset row (a dict).
        where: names the row in errors ("row 3", "line 7": prepare_dataset counts from 1).

    Returns:
        The messages. Content is a string: a list of {"type": "text", "text": ...} parts becomes one
        string (parts trimmed and concatenated, as Gemma's chat template does); it stays a list if it
        holds image or audio parts (and for a system turn, whose parts the template writes apart).
        A model turn may also carry "reasoning_content", "tool_calls" and "tool_responses" (see the
        module docstring); tool turns are folded into the model turn that called them.

    Raises:
        DatasetFormatError: the row cannot be read, or its last turn is not the assistant's.
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
    return fold_tool_turns(messages, where)


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
    label = f"{where}: turn {i} ({role})"
    if role == "tool":
        return _tool_turn(turn, content, label)
    if content is None and role == "assistant" and (turn.get("tool_calls") or turn.get("tool_responses")):
        content = ""
    content = _normalise_content(content, label, keep_text_parts=role == "system")
    if role == "system" and isinstance(content, list) and any(p["type"] != "text" for p in content):
        raise DatasetFormatError(f"{label}: Gemma 4's system turn holds text only; put images and audio in a "
                                 "user turn.", "media in system turn")
    message = {"role": role, "content": content}
    if role == "assistant":
        message.update(_model_fields(turn, content, label))
        if not (_has_text(message["content"]) or message.get("tool_calls") or message.get("tool_responses")):
            raise DatasetFormatError(f"{where}: turn {i} (assistant) is empty; an empty answer would teach "
                                     "the model to say nothing. Drop the row or fill in the answer.", "empty answer")
    return message


def prompt_messages(prompt, where: str = "the prompt") -> list[dict]:
    """A prompt in any form chat takes -> the messages of a conversation to answer (ending with a
    user turn, or with tool turns after the model's calls), read as to_messages reads a row's turns
    without requiring an answer at the end: a string (one user turn), one turn, a list of turns with
    role/content or from/value keys ("human" -> "user", "gpt" -> "assistant", tool turns folded into
    the calling model turn), or a row with "messages" or "conversations" (and TRL-style
    "images"/"audios" columns for parts that carry no medium). Content may list text, image and
    audio parts (PIL images, paths, bytes, arrays), as in a training row."""
    if isinstance(prompt, str):
        turns = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, dict) and ("role" in prompt or "from" in prompt):
        turns = [prompt]
    elif isinstance(prompt, dict):
        turns = prompt.get("messages") if prompt.get("messages") is not None else prompt.get("conversations")
    else:
        turns = prompt
    if not isinstance(turns, (list, tuple)) or not turns:
        raise DatasetFormatError(
            f"{where}: got {type(prompt).__name__} {str(prompt)[:60]!r}; pass a string, a list of messages "
            "({'role': 'user', 'content': ...} or {'from': 'human', 'value': ...}), or a row with 'messages' or "
            "'conversations'", "bad prompt")
    messages = fold_tool_turns([turn_to_message(turn, i, where) for i, turn in enumerate(turns)], where)
    return attach_row_media(messages, prompt, where)


def fold_tool_turns(messages: list[dict], where: str) -> list[dict]:
    """Move each run of tool turns into the model turn whose calls they answer, as its
    "tool_responses" named after the calls (by tool_call_id, else in order)."""
    folded = []
    for message in messages:
        if message["role"] != "tool":
            folded.append(message)
            continue
        caller = folded[-1] if folded else None
        if caller is None or caller["role"] != "assistant" or not caller.get("tool_calls"):
            raise DatasetFormatError(f"{where}: a tool turn must follow the assistant turn whose tool_calls it "
                                     "answers.", "tool turn without a call")
        responses = caller.setdefault("tool_responses", [])
        calls = caller["tool_calls"]
        by_id = [c for c in calls if message.get("tool_call_id") is not None and c.get("id") == message["tool_call_id"]]
        if by_id:
            name = by_id[-1]["function"]["name"]
        elif message.get("name"):
            name = message["name"]
        else:  # the n-th response answers the n-th call
            name = calls[min(len(responses), len(calls) - 1)]["function"]["name"]
        responses.append({"name": name, "response": message["content"]})
    return folded


def row_tools(row, where: str = "row") -> list[dict] | None:
    """A row's "tools" column as OpenAI tool declarations ({"type": "function", "function": {...}}).

    Accepted: a list of OpenAI tools or of bare functions ({"name", "description", "parameters"}),
    or a JSON string of such a list (as many hub datasets store it). None when the row has none."""
    tools = row.get("tools") if isinstance(row, dict) else None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as error:
            raise DatasetFormatError(f"{where}: the 'tools' column is not valid JSON ({error.msg}).",
                                     "bad tools") from None
    if not tools:
        return None
    if not isinstance(tools, (list, tuple)):
        raise DatasetFormatError(f"{where}: 'tools' is a {type(tools).__name__}, expected a list of tool "
                                 "declarations.", "bad tools")
    declared = []
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DatasetFormatError(f"{where}: a tool declaration {tool!r:.80} has no function name "
                                     "({'type': 'function', 'function': {'name', 'description', 'parameters'}}).",
                                     "bad tools")
        declared.append({"type": "function", "function": function})
    return declared


def _model_fields(turn: dict, content, label: str) -> dict:
    """A model turn's thought, calls and responses, in the keys Gemma 4's template reads."""
    fields = {}
    thought = next((turn[key] for key in THOUGHT_FIELDS if turn.get(key)), None)
    if isinstance(content, str) and CHANNEL_START in content:  # an inline <|channel>thought ...<channel|>
        inline, fields["content"] = _inline_thought(content), strip_thinking(content)
        thought = thought or inline
    if thought is not None:
        if not isinstance(thought, str):
            raise DatasetFormatError(f"{label}: the thought is a {type(thought).__name__}, expected a string.",
                                     "bad thought")
        fields["reasoning_content"] = thought
    if turn.get("tool_calls"):
        fields["tool_calls"] = [_tool_call(call, label) for call in _listed(turn["tool_calls"], "tool_calls", label)]
    if turn.get("tool_responses"):
        fields["tool_responses"] = [_tool_response(r, label) for r in _listed(turn["tool_responses"],
                                                                               "tool_responses", label)]
    return fields


def _inline_thought(content: str) -> str:
    """The text of the first `<|channel>thought\n...\n<channel|>` block (without "thought\n" and
    the newline the template adds before <channel|>)."""
    inside = content.split(CHANNEL_START, 1)[1].split(CHANNEL_END, 1)[0]
    inside = inside[len("thought"):] if inside.startswith("thought") else inside
    inside = inside[1:] if inside.startswith("\n") else inside
    return inside[:-1] if inside.endswith("\n") else inside


def _tool_call(call, label: str) -> dict:
    """An OpenAI (or flat {"name", "arguments"}) tool call, arguments decoded to a mapping."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise DatasetFormatError(f"{label}: a tool call {call!r:.80} has no function name ({{'type': 'function', "
                                 "'function': {'name': ..., 'arguments': {...}}}).", "bad tool call")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise DatasetFormatError(f"{label}: the arguments of the call to {function['name']!r} are not valid "
                                     f"JSON ({error.msg}).", "bad tool call") from None
    if arguments is not None and not isinstance(arguments, dict):
        raise DatasetFormatError(f"{label}: the arguments of the call to {function['name']!r} are a "
                                 f"{type(arguments).__name__}, expected an object of named arguments.",
                                 "bad tool call")
    normalised = {"type": "function", "function": {"name": function["name"], "arguments": arguments or {}}}
    if isinstance(call, dict) and call.get("id") is not None:
        normalised["id"] = call["id"]
    return normalised


def _tool_response(response, label: str) -> dict:
    if not isinstance(response, dict) or "response" not in response:
        raise DatasetFormatError(f"{label}: a tool response {response!r:.80} is not {{'name': ..., "
                                 "'response': ...}.", "bad tool response")
    return {"name": response.get("name") or "unknown", "response": response["response"]}


def _tool_turn(turn: dict, content, label: str) -> dict:
    """A tool's answer: text (parts joined as written), or a mapping kept as named fields."""
    if isinstance(content, (list, tuple)):
        if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            raise DatasetFormatError(f"{label}: only text tool responses can be trained; images and audio "
                                     "returned by a tool are not supported.", "bad tool response")
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, (str, dict)):
        raise DatasetFormatError(f"{label}: the tool's content is {type(content).__name__}, expected its "
                                 "result as a string (or an object).", "bad tool response")
    message = {"role": "tool", "content": content}
    for key in ("tool_call_id", "name"):
        if turn.get(key) is not None:
            message[key] = turn[key]
    return message


def _listed(value, key: str, label: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise DatasetFormatError(f"{label}: '{key}' is a {type(value).__name__}, expected a list.", f"bad {key}")
    return list(value)


def _has_text(content) -> bool:
    return bool(content.strip()) if isinstance(content, str) else bool(content)


def _normalise_content(content, where: str, keep_text_parts: bool = False):
    """A string stays; text-only part lists are joined (kept with keep_text_parts); lists with
    image/audio parts stay lists."""
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
    if all(p["type"] == "text" for p in parts) and not keep_text_parts:
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


def row_to_conversation(row, where: str, formatting_func=None) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) of one row, through formatting_func when given (it may return messages, or
    a row in a known schema, e.g. {"messages": [...], "tools": [...]})."""
    if formatting_func is not None:
        try:
            formatted = formatting_func(row)
        except DatasetFormatError as error:  # e.g. image_to_text's missing column: name the row
            raise DatasetFormatError(f"{where}: {error}", error.reason) from None
        row = {"messages": formatted} if isinstance(formatted, (list, tuple)) else formatted
    return attach_row_media(to_messages(row, where), row, where), row_tools(row, where)


def row_to_messages(row, where: str, formatting_func) -> list[dict]:
    return row_to_conversation(row, where, formatting_func)[0]


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
