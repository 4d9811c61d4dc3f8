"""Messages -> Gemma 4's chat format, exactly as Google's own template writes it; replies -> parts.

The format (Gemma 4 E2B/E4B, the chat template of the released checkpoints as Google last published
it, 2026-07-09; gemmatune renders it itself because offline runs have no hub template, and tests
compare it with hand-written renderings of every shape):

    <bos>
    <|turn>system\\n[<|think|>\\n]{system, trimmed}{<|tool>declaration:...<tool|> per tool}<turn|>\\n
        only when thinking is on, tools are given, or the first message is system/developer
    <|turn>user\\n{text, trimmed; an image <|image|>, audio <|audio|>, video <|video|>}<turn|>\\n
    <|turn>model\\n[<|channel>thought\\n{thought}\\n<channel|>]{answer, trimmed}<turn|>\\n
    <|turn>model\\n[thought]<|tool_call>call:NAME{k:v}<tool_call|>...<|tool_response>      (no answer yet)
    <|turn>model\\n[thought]<|tool_call>call:NAME{k:v}<tool_call|>
        <|tool_response>response:NAME{value:<|"|>...<|"|>}<tool_response|>...{answer}<turn|>\\n

- A thought is written only for model turns after the last user turn (the current answer or tool
  loop); earlier turns lose theirs, as does any `<|channel>...<channel|>` text inside content.
- Tool responses (the template's own `tool_responses`, or OpenAI `role: "tool"` messages after the
  calls) stay inside the model's turn; the answer that follows continues that turn (no new header).
  A model turn whose calls have no responses yet ends with `<|tool_response>` (where the model
  stops and the caller runs the tools), not with `<turn|>`.
- Values inside tool blocks use Gemma 4's own syntax (gemmatune.data.tool_syntax).
- A tool message whose content is an object (which the template cannot render) is written as that
  object's fields, as a mapping in `tool_responses` is.
- The generation prompt is `<|turn>model\\n`, with thinking on or off (E2B/E4B write no empty thought
  block: that is the 26B/31B template); after tool responses it is nothing, or `<|channel>thought\\n`
  with thinking on.

`render_pieces` also says who writes each piece, which is what training needs: PROMPT pieces are
never trained; ANSWER and THOUGHT pieces are what the model generates (its calls, its answers, the
`<|tool_response>` it stops on, the `<turn|>` it ends a turn with); HISTORY pieces are an earlier
model turn shown without the thought it was generated with (not what the model would say there, so
not trained); media pieces are expanded to their soft tokens by the processor. A training row is the
rendering of the prompt followed by the answer, so the prompt a server builds (vLLM and llama.cpp
render the checkpoint's template, Ollama a renderer tested against it) is token for token the start
of the row, and the row trains only what the model wrote.
"""
from dataclasses import dataclass

from gemmatune.data.tool_syntax import format_call, format_declaration, format_response, parse_value

BOS, TURN_START, TURN_END = "<bos>", "<|turn>", "<turn|>"
THINK = "<|think|>"
CHANNEL_START, CHANNEL_END = "<|channel>", "<channel|>"
THOUGHT_START = CHANNEL_START + "thought\n"
CALL_START, CALL_END = "<|tool_call>", "<tool_call|>"
RESPONSE_START, RESPONSE_END = "<|tool_response>", "<tool_response|>"
PART_PLACEHOLDERS = {"image": "<|image|>", "audio": "<|audio|>", "video": "<|video|>"}  # the processor expands these
PART_ALIASES = {"image_url": "image", "input_audio": "audio"}  # OpenAI's names for the same parts

PROMPT, ANSWER, THOUGHT, HISTORY = "prompt", "answer", "thought", "history"


@dataclass(frozen=True)
class Piece:
    """A stretch of the rendering and who writes it: PROMPT, ANSWER, THOUGHT, HISTORY, or a
    medium ("image", "audio", "video") whose placeholder the processor expands."""

    text: str
    kind: str


def format_chat(messages: list[dict], add_generation_prompt: bool = False, enable_thinking: bool = False,
                tools: list[dict] | None = None) -> str:
    """Render messages in Gemma 4's chat format (see the module docstring), e.g. for display or as a prompt.

    Args:
        messages: [{"role": "system"|"developer"|"user"|"assistant"|"tool", "content": str | parts,
            optionally "reasoning_content" (or "reasoning"), "tool_calls" (OpenAI shape, arguments a
            mapping), "tool_responses" ([{"name", "response"}]), and on tool messages "tool_call_id"/"name"}].
        add_generation_prompt: end where the model's reply starts.
        enable_thinking: `<|think|>` at the top of the system turn (the model then thinks first).
        tools: OpenAI-style tool declarations ({"type": "function", "function": {...}}).

    Returns:
        The text, character for character what Gemma 4's chat template renders for the same arguments.

    Raises:
        ValueError: a call's arguments are not a mapping (the template refuses a JSON string too).
    """
    return "".join(piece.text for piece in render_pieces(messages, add_generation_prompt, enable_thinking, tools))


def generation_prompt(messages: list[dict] = (), enable_thinking: bool = False) -> str:
    """The text that add_generation_prompt appends after `messages`: `<|turn>model\\n` after a user
    turn; after tool responses nothing, or `<|channel>thought\\n` with thinking on."""
    messages = list(messages)
    loop = messages[1:] if messages and messages[0]["role"] in ("system", "developer") else messages
    return "".join(piece.text for piece in _generation_prompt(_last_block(loop), enable_thinking))


def role_name(role: str) -> str:
    """The name Gemma 4 writes after <|turn>: the assistant is "model"."""
    return "model" if role == "assistant" else role


def strip_thinking(text: str) -> str:
    """Text without its `<|channel>...<channel|>` stretches, trimmed (the template's strip_thinking)."""
    kept = [part.split(CHANNEL_START)[0] if CHANNEL_START in part else part for part in text.split(CHANNEL_END)]
    return "".join(kept).strip()


def conversation_thinks(messages: list[dict]) -> bool:
    """Whether a model turn carries a thought (a reasoning field or an inline channel)."""
    return any(m.get("role") == "assistant" and (_thought(m) or CHANNEL_START in _text_of(m.get("content")))
               for m in messages)


def render_pieces(messages: list[dict], add_generation_prompt: bool = False, enable_thinking: bool = False,
                  tools: list[dict] | None = None) -> list[Piece]:
    """The rendering as Pieces (text + who writes it); format_chat joins their texts."""
    messages = list(messages)
    pieces, loop = [Piece(BOS, PROMPT)], messages
    if enable_thinking or tools or (messages and messages[0]["role"] in ("system", "developer")):
        pieces += _system_turn(messages, enable_thinking, tools)
        loop = messages[1:] if messages and messages[0]["role"] in ("system", "developer") else messages
    last_user = max((i for i, m in enumerate(loop) if m["role"] == "user"), default=-1)
    for i, message in enumerate(loop):
        if message["role"] == "tool":
            continue  # rendered inside the model turn whose calls it answers
        pieces += _message(loop, i, last_user, enable_thinking)
    if add_generation_prompt:
        pieces += _generation_prompt(_last_block(loop), enable_thinking)
    return pieces


def _system_turn(messages: list[dict], enable_thinking: bool, tools) -> list[Piece]:
    text = "<|turn>system\n" + (THINK + "\n" if enable_thinking else "")
    if messages and messages[0]["role"] in ("system", "developer"):
        content = messages[0].get("content")
        if isinstance(content, str):
            text += content.strip()
        elif isinstance(content, (list, tuple)):  # each part trimmed and followed by a space
            text += "".join(str(part.get("text", "")).strip() + " " for part in content)
    text += "".join(format_declaration(tool) for tool in tools or ())
    return [Piece(text + TURN_END + "\n", PROMPT)]


def _message(loop: list[dict], i: int, last_user: int, enable_thinking: bool) -> list[Piece]:
    """The pieces of one non-tool message (loop: the messages after the system turn)."""
    message = loop[i]
    role = role_name(message["role"])
    thought = _thought(message)
    keeps_thought = bool(thought) and i > last_user
    kind = (HISTORY if _drops_thought(message, keeps_thought) else ANSWER) if role == "model" else PROMPT
    continues = role == "model" and _neighbour_role(loop, i, -1) == "assistant"  # no new header
    pieces = [] if continues else [Piece(f"{TURN_START}{role}\n", PROMPT)]
    if keeps_thought:  # after tool responses with thinking on, the generation prompt opens the thought
        served = continues and enable_thinking and _last_block(loop[:i]) == "tool_response"
        pieces += [Piece(THOUGHT_START, PROMPT if served else THOUGHT), Piece(thought + "\n" + CHANNEL_END, THOUGHT)]
    responses = _responses(loop, i)
    pieces += _tool_pieces(message.get("tool_calls") or [], responses, kind)
    content = _content(message, role, kind)
    return pieces + content + _turn_end(message, role, kind, responses, content, _neighbour_role(loop, i, +1))


def _tool_pieces(calls: list[dict], responses: list[tuple], kind: str) -> list[Piece]:
    """The calls (the model's) and the responses (the caller's, but for the `<|tool_response>` the
    model stops on after its calls)."""
    pieces = [Piece(format_call(call["function"]["name"], call["function"].get("arguments")), kind) for call in calls]
    for n, (name, response) in enumerate(responses):
        text = format_response(name, response)
        if n == 0 and calls:
            pieces += [Piece(RESPONSE_START, kind), Piece(text[len(RESPONSE_START):], PROMPT)]
        else:
            pieces.append(Piece(text, PROMPT))
    return pieces


def _turn_end(message: dict, role: str, kind: str, responses: list, content: list[Piece], following) -> list[Piece]:
    """`<turn|>\n`; or `<|tool_response>` after calls that have no responses yet; or nothing when the
    next message continues this model turn, or when it ends on tool responses awaiting the answer."""
    calls = message.get("tool_calls")
    if calls and not responses:
        return [Piece(RESPONSE_START, kind)]
    if role == "model" and following == "assistant" and (not calls or responses):
        return []
    if responses and not "".join(p.text for p in content).strip() and following is None:
        return []
    return [Piece(TURN_END, kind), Piece("\n", PROMPT)]


def _content(message: dict, role: str, kind: str) -> list[Piece]:
    """Text trimmed (a model's also stripped of channel text), media as placeholders."""
    content = message.get("content")
    clean = strip_thinking if role == "model" else str.strip
    if isinstance(content, str):
        return [Piece(clean(content), kind)]
    pieces = []
    for part in content if isinstance(content, (list, tuple)) else ():
        part_type = PART_ALIASES.get(part.get("type"), part.get("type"))
        if part_type == "text":
            pieces.append(Piece(clean(part["text"]), kind))
        elif part_type in PART_PLACEHOLDERS:
            pieces.append(Piece(PART_PLACEHOLDERS[part_type], part_type))
    return pieces


def _responses(loop: list[dict], i: int) -> list[tuple[str, object]]:
    """(name, response) of each tool response rendered in message i: its own `tool_responses`, or
    the `role: "tool"` messages right after it when it made calls. A tool message is named after
    the call whose id it answers, else by its own "name" (the template's rule)."""
    message = loop[i]
    if message.get("tool_responses"):
        return [(r.get("name") or "unknown", r.get("response")) for r in message["tool_responses"]]
    if not message.get("tool_calls"):
        return []
    responses = []
    for follow in loop[i + 1:]:
        if follow["role"] != "tool":
            break
        name = follow.get("name") or "unknown"
        for call in message["tool_calls"]:
            if call.get("id") == follow.get("tool_call_id"):
                name = call["function"]["name"]
        responses.append((name, _tool_body(follow.get("content"))))
    return responses


def _tool_body(content):
    """A tool message's content as a response: text parts joined (untrimmed); a mapping as fields."""
    if isinstance(content, (list, tuple)):
        return "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")
    return content


def _generation_prompt(state: str | None, enable_thinking: bool) -> list[Piece]:
    if state not in ("tool_response", "tool_call"):
        return [Piece(f"{TURN_START}model\n", PROMPT)]
    return [Piece(THOUGHT_START, PROMPT)] if state == "tool_response" and enable_thinking else []


def _last_block(loop: list[dict]) -> str | None:
    """How the rendering of these messages (after the system turn) ends: with "tool_response"s,
    a "tool_call" awaiting them, or None (the template's prev_message_type)."""
    indices = [i for i, m in enumerate(loop) if m["role"] != "tool"]
    if not indices:
        return None
    last = loop[indices[-1]]
    if last.get("tool_responses") or (last.get("tool_calls") and indices[-1] + 1 < len(loop)):
        return "tool_response"
    return "tool_call" if last.get("tool_calls") else None


def _neighbour_role(loop: list[dict], i: int, step: int) -> str | None:
    """The role of the nearest non-tool message before (step -1) or after (+1) message i."""
    j = i + step
    while 0 <= j < len(loop):
        if loop[j]["role"] != "tool":
            return loop[j]["role"]
        j += step
    return None


def _thought(message: dict) -> str:
    return message.get("reasoning") or message.get("reasoning_content") or message.get("thinking") or ""


def _drops_thought(message: dict, keeps_thought: bool) -> bool:
    """A model turn generated with a thought that the rendering leaves out."""
    return (bool(_thought(message)) and not keeps_thought) or CHANNEL_START in _text_of(message.get("content"))


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text", "")) for p in content or () if isinstance(p, dict))


# ------------------------------------------------------------------ reading a reply
def parse_reply(text: str) -> tuple[str, str | None, list[tuple[str, object]]]:
    """Split what the model generated into (answer, thought, tool calls).

    Args:
        text: the decoded reply with its special tokens kept (skip_special_tokens=False), from just
            after the prompt; a trailing <turn|>, <|tool_response> or <eos> is ignored.

    Returns:
        answer: the text outside the thought and the calls, trimmed ("" when the model only called tools).
        thought: the text of the `<|channel>thought\\n...<channel|>` block, trimmed, or None (also when the
            reply was cut inside the thought: then all of it is thought and the answer is "").
        tool_calls: [(name, arguments)] in order; arguments a dict, or the raw text when it does not
            parse as Gemma 4's value syntax.
    """
    for stop in ("<eos>", TURN_END, RESPONSE_START):  # where generation stops
        text = text.split(stop)[0]
    thought = None
    if CHANNEL_START in text:
        before, _, rest = text.partition(CHANNEL_START)
        inside, closed, after = rest.partition(CHANNEL_END)
        inside = inside[len("thought"):] if inside.startswith("thought") else inside
        thought, text = inside.strip() or None, before + after if closed else before
    calls, answer = [], []
    while CALL_START in text:
        before, _, rest = text.partition(CALL_START)
        inside, closed, text = rest.partition(CALL_END)
        answer.append(before)
        if closed:
            calls.append(_parse_call(inside))
    answer.append(text)
    return "".join(answer).strip(), thought, calls


def _parse_call(text: str) -> tuple[str, object]:
    """`call:NAME{k:v,...}` -> (NAME, {k: v}); unparsable arguments stay text."""
    text = text[len("call:"):] if text.startswith("call:") else text
    name, brace, arguments = text.partition("{")
    try:
        return name.strip(), parse_value(brace + arguments)
    except ValueError:
        return name.strip(), brace + arguments

