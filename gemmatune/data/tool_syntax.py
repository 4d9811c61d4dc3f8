"""Gemma 4's value syntax for tools: declarations, call arguments, responses, and reading them back.

Gemma 4 does not write JSON inside its tool blocks. Strings are delimited by the special token
`<|"|>`, object keys in calls and responses are bare, numbers and booleans are written as Python
prints them, and a function declaration is a schema flattened to `key:value` pairs:

    <|tool>declaration:get_weather{description:<|"|>Weather now<|"|>,parameters:{properties:{
        city:{description:<|"|>A city<|"|>,type:<|"|>STRING<|"|>}},required:[<|"|>city<|"|>],
        type:<|"|>OBJECT<|"|>}}<tool|>                                  (one line, wrapped here)
    <|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>
    <|tool_response>response:get_weather{value:<|"|>18 °C, sunny<|"|>}<tool_response|>

This module writes exactly what Gemma 4's own chat template writes (the E2B/E4B template of
2026-07-09, checked by rendering it), quirks included, so that a fine-tune sees its tools as the
model saw them in Google's training and as vLLM, llama.cpp and Ollama show them: keys in
case-insensitive order (Jinja's `dictsort`); a schema `type` upper-cased as text (a type list
["string", "null"] becomes `['STRING', 'NULL']`); a missing field written as nothing, `None` as
`None` in a schema and `null` in a value. `parse_value` reads the value syntax back (the model's
call arguments).
"""
QUOTE = '<|"|>'  # Gemma 4's string delimiter, one special token
STANDARD_SCHEMA_KEYS = ("description", "type", "properties", "required", "nullable")


class _Missing:
    """A key that is not there: Jinja's Undefined, false and written as nothing."""

    def __bool__(self) -> bool:
        return False


MISSING = _Missing()


def dictsort(mapping: dict) -> list[tuple]:
    """Items by key, case-insensitively, as Jinja's `dictsort` filter orders them."""
    return sorted(mapping.items(), key=lambda item: item[0].lower() if isinstance(item[0], str) else item[0])


def format_value(value, escape_keys: bool = True) -> str:
    """One value: `<|"|>text<|"|>`, true/false, null, {k:v,...}, [a,b], or the number as printed.

    escape_keys: object keys delimited like strings (declarations) or bare (call arguments,
    responses)."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ",".join((QUOTE + str(k) + QUOTE if escape_keys else str(k)) + ":" + format_value(v, escape_keys)
                              for k, v in dictsort(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v, escape_keys) for v in value) + "]"
    return str(value)


def format_fields(mapping: dict) -> str:
    """`k:v,...` with bare keys: a call's arguments or a response's fields."""
    return ",".join(f"{k}:{format_value(v, escape_keys=False)}" for k, v in dictsort(mapping))


def format_call(name: str, arguments) -> str:
    """`<|tool_call>call:NAME{k:v,...}<tool_call|>`; arguments is a mapping (or None: `{}`)."""
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ValueError(f"the arguments of the call to {name!r} are a {type(arguments).__name__}; Gemma 4's "
                         "template takes a mapping (decode a JSON string with json.loads first)")
    return f"<|tool_call>call:{name}{{{format_fields(arguments)}}}<tool_call|>"


def format_response(name: str, response) -> str:
    """`<|tool_response>response:NAME{...}<tool_response|>`: a mapping's fields, else {value:...}."""
    body = format_fields(response) if isinstance(response, dict) else "value:" + format_value(response, False)
    return f"<|tool_response>response:{name}{{{body}}}<tool_response|>"


def format_declaration(tool: dict) -> str:
    """`<|tool>declaration:NAME{description:...,parameters:{...}}<tool|>` for one OpenAI-style tool
    ({"type": "function", "function": {"name", "description", "parameters"}})."""
    function = _field(tool, "function")
    name, description = _text(_field(function, "name")), _text(_field(function, "description"))
    text = f"declaration:{name}{{description:{QUOTE}{description}{QUOTE}"
    params = _field(function, "parameters")
    if params:
        text += ",parameters:{" + _parameters_body(params)
    if isinstance(function, dict) and "response" in function:
        text += ",response:{" + _response_body(function["response"])
    return "<|tool>" + text + "}<tool|>"


def _parameters_body(params) -> str:
    """The function's parameters; closed by its `type` only, as the template writes it."""
    text = ""
    if _field(params, "properties"):
        text += "properties:{" + _properties(params["properties"]) + "},"
    if _field(params, "required"):
        text += "required:[" + ",".join(QUOTE + _text(item) + QUOTE for item in params["required"]) + "],"
    if _field(params, "type"):
        text += f"type:{QUOTE}{_upper(params['type'])}{QUOTE}}}"
    return text


def _response_body(response) -> str:
    text = ""
    if _field(response, "description"):
        text += f"description:{QUOTE}{_text(response['description'])}{QUOTE},"
    if _upper(_field(response, "type")) == "OBJECT":
        text += f"type:{QUOTE}OBJECT{QUOTE}}}"
    return text


def _properties(properties, filter_keys: bool = False) -> str:
    """Each property `name:{description,enum|items|nullable|properties,required,type}`, by name."""
    entries = [f"{key}:{{{_property(value)}}}" for key, value in dictsort(properties)
               if not filter_keys or key not in STANDARD_SCHEMA_KEYS]
    return ",".join(entries)


def _property(value) -> str:
    fields = []
    if _field(value, "description"):
        fields.append(f"description:{QUOTE}{_text(value['description'])}{QUOTE}")
    kind = _upper(_field(value, "type"))
    if kind == "STRING" and _field(value, "enum"):
        fields.append("enum:" + format_value(value["enum"]))
    if kind == "ARRAY" and isinstance(_field(value, "items"), dict) and value["items"]:
        fields.append("items:{" + _items(value["items"]) + "}")
    if _field(value, "nullable"):
        fields.append("nullable:true")
    if kind == "OBJECT":
        nested = _field(value, "properties")
        if isinstance(nested, dict):
            fields.append("properties:{" + _properties(nested) + "}")
        elif isinstance(value, dict):  # an object schema without "properties": its own other keys
            fields.append("properties:{" + _properties(value, filter_keys=True) + "}")
        if _field(value, "required"):
            fields.append("required:[" + ",".join(QUOTE + _text(item) + QUOTE for item in value["required"]) + "]")
    fields.append(f"type:{QUOTE}{kind}{QUOTE}")
    return ",".join(fields)


def _items(items: dict) -> str:
    fields = []
    for key, value in dictsort(items):
        if value is None:
            continue
        if key == "properties":
            fields.append("properties:{" + (_properties(value) if isinstance(value, dict) else "") + "}")
        elif key == "required":
            fields.append("required:[" + ",".join(QUOTE + _text(item) + QUOTE for item in value) + "]")
        elif key == "type":
            upper = _upper(value) if isinstance(value, str) else [_upper(v) for v in value]
            fields.append("type:" + format_value(upper))
        else:
            fields.append(f"{key}:{format_value(value)}")
    return ",".join(fields)


def _field(obj, key):
    """obj[key] as Jinja reads it: MISSING when obj is not a mapping or has no such key."""
    return obj.get(key, MISSING) if isinstance(obj, dict) else MISSING


def _text(value) -> str:
    """A value printed into the template: nothing when missing, else str() (None -> "None")."""
    return "" if value is MISSING else str(value)


def _upper(value) -> str:
    """Jinja's `upper` filter: the printed value in upper case (a list prints as a list)."""
    return _text(value).upper()


# ------------------------------------------------------------------ reading values back
def parse_value(text: str):
    """A value in Gemma 4's syntax -> Python (dict, list, str, int, float, bool, None).

    Raises:
        ValueError: the text is not one complete value.
    """
    value, end = _parse(text, 0)
    if text[end:].strip():
        raise ValueError(f"unexpected text after the value: {text[end:end + 40]!r}")
    return value


def _parse(text: str, i: int):
    """(value, index after it) of the value starting at text[i]."""
    i = _skip_spaces(text, i)
    if text.startswith(QUOTE, i):
        end = text.find(QUOTE, i + len(QUOTE))
        if end < 0:
            raise ValueError("a string without its closing <|\"|>")
        return text[i + len(QUOTE):end], end + len(QUOTE)
    if text.startswith("{", i):
        return _parse_object(text, i + 1)
    if text.startswith("[", i):
        return _parse_array(text, i + 1)
    end = i
    while end < len(text) and text[end] not in ",}]":
        end += 1
    return _scalar(text[i:end].strip()), end


def _parse_object(text: str, i: int):
    result = {}
    i = _skip_spaces(text, i)
    if text.startswith("}", i):
        return result, i + 1
    while True:
        i = _skip_spaces(text, i)
        if text.startswith(QUOTE, i):
            key, i = _parse(text, i)
        else:
            colon = text.find(":", i)
            if colon < 0:
                raise ValueError(f"an object key without ':' at {text[i:i + 40]!r}")
            key, i = text[i:colon].strip(), colon
        i = _skip_spaces(text, i)
        if not text.startswith(":", i):
            raise ValueError(f"expected ':' after the key {key!r}")
        result[key], i = _parse(text, i + 1)
        i = _skip_spaces(text, i)
        if text.startswith(",", i):
            i += 1
        elif text.startswith("}", i):
            return result, i + 1
        else:
            raise ValueError(f"expected ',' or '}}' at {text[i:i + 40]!r}")


def _parse_array(text: str, i: int):
    result = []
    i = _skip_spaces(text, i)
    if text.startswith("]", i):
        return result, i + 1
    while True:
        item, i = _parse(text, i)
        result.append(item)
        i = _skip_spaces(text, i)
        if text.startswith(",", i):
            i += 1
        elif text.startswith("]", i):
            return result, i + 1
        else:
            raise ValueError(f"expected ',' or ']' at {text[i:i + 40]!r}")


def _scalar(token: str):
    if token in ("true", "false"):
        return token == "true"
    if token == "null":
        return None
    for kind in (int, float):
        try:
            return kind(token)
        except ValueError:
            pass
    if not token:
        raise ValueError("a missing value")
    return token  # a bare word: kept as text


def _skip_spaces(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i
