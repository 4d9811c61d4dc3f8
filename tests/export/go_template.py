"""A small renderer for the subset of Go's text/template that gemmatune's Ollama template uses
(tests/export/test_ollama.py), written from the Go documentation (pkg.go.dev/text/template):

- actions `{{ ... }}` with trim markers: `{{-` removes all white space before it, `-}}` all after it;
- `range $i, $x := pipeline`, `if` / `else if` / `else` / `end`;
- `$name := pipeline` (scoped to the enclosing block, as in Go);
- operands: "strings", integers, `.Field` (of the current dot), `$` and `$.Field`, `$name`, `( ... )`;
- functions: eq, ne, and, or, not, len, slice (Go's builtins; `and`/`or` return an operand, as in Go).
Truth is Go's: false, 0, "", empty lists and nil are false. Anything else raises.
"""
import re

ACTION = re.compile(r"{{(-\s)?(.*?)(\s-)?}}", re.S)
TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|\$?[\w.]*|-?\d+)')


def render(template: str, data: dict) -> str:
    """template rendered with `data` as the dot."""
    tree, rest = _parse(_tokens(template), 0, ())
    assert rest == len(_tokens(template)), "unbalanced {{ end }}"
    out: list[str] = []
    _run(tree, data, [{"$": data}], out)
    return "".join(out)


def _tokens(template: str) -> list[tuple[str, str]]:
    """[("text", ...), ("action", ...)] with the trim markers applied to the neighbouring text."""
    parts, pos, trim_next = [], 0, False
    for match in ACTION.finditer(template):
        text = template[pos:match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        parts.append(("text", text))
        parts.append(("action", match.group(2).strip()))
        trim_next, pos = bool(match.group(3)), match.end()
    tail = template[pos:]
    parts.append(("text", tail.lstrip() if trim_next else tail))
    return parts


def _parse(tokens, i, stop):
    """Nodes until an action starting with one of `stop`; returns (nodes, index of that action)."""
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        word = value.split(" ", 1)[0]
        if word in stop:
            return nodes, i
        if word == "range":
            header = re.fullmatch(r"range\s+(\$\w+)\s*,\s*(\$\w+)\s*:=\s*(.+)", value)
            body, i = _parse(tokens, i + 1, ("end",))
            nodes.append(("range", header.group(1), header.group(2), header.group(3), body))
            i += 1
        elif word == "if":
            branches, i = _parse_if(tokens, i, value[2:].strip())
            nodes.append(("if", branches))
        elif ":=" in value:
            name, expression = (s.strip() for s in value.split(":=", 1))
            nodes.append(("set", name, expression))
            i += 1
        else:
            nodes.append(("print", value))
            i += 1
    return nodes, i


def _parse_if(tokens, i, condition):
    branches = []
    while True:
        body, i = _parse(tokens, i + 1, ("else", "end"))
        branches.append((condition, body))
        value = tokens[i][1]
        if value == "end":
            return branches, i + 1
        condition = value[len("else"):].strip()
        condition = condition[2:].strip() if condition.startswith("if") else "true"


def _run(nodes, dot, scopes, out) -> None:
    scopes = scopes + [{}]  # variables set in this block end with it
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            out.append(str(_evaluate(node[1], dot, scopes)))
        elif node[0] == "set":
            scopes[-1][node[1]] = _evaluate(node[2], dot, scopes)
        elif node[0] == "range":
            _, index_name, item_name, expression, body = node
            for index, item in enumerate(_evaluate(expression, dot, scopes)):
                _run(body, item, scopes + [{index_name: index, item_name: item}], out)
        elif node[0] == "if":
            for condition, body in node[1]:
                if condition == "true" or _truth(_evaluate(condition, dot, scopes)):
                    _run(body, dot, scopes, out)
                    break


def _truth(value) -> bool:
    return value not in (False, None, 0, "") and not (isinstance(value, (list, dict)) and not value)


FUNCTIONS = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not _truth(a), "len": len,
    "slice": lambda seq, start: seq[start:],
}


def _evaluate(expression: str, dot, scopes):
    tokens = [t for t in TOKEN.findall(expression) if t]
    value, rest = _command(tokens, dot, scopes)
    assert not rest, f"could not read {expression!r}"
    return value


def _command(tokens, dot, scopes):
    """A function call `f a b ...` or a single operand, up to a closing parenthesis."""
    if tokens[0] in FUNCTIONS or tokens[0] in ("and", "or"):
        name, args, tokens = tokens[0], [], tokens[1:]
        while tokens and tokens[0] != ")":
            arg, tokens = _operand(tokens, dot, scopes)
            args.append(arg)
        if name == "and":  # Go: the first false argument, else the last
            return next((a for a in args if not _truth(a)), args[-1]), tokens
        if name == "or":  # Go: the first true argument, else the last
            return next((a for a in args if _truth(a)), args[-1]), tokens
        return FUNCTIONS[name](*args), tokens
    return _operand(tokens, dot, scopes)


def _operand(tokens, dot, scopes):
    token, tokens = tokens[0], tokens[1:]
    if token == "(":
        value, tokens = _command(tokens, dot, scopes)
        assert tokens[0] == ")"
        return value, tokens[1:]
    if token.startswith('"'):
        return token[1:-1].encode().decode("unicode_escape"), tokens
    if re.fullmatch(r"-?\d+", token):
        return int(token), tokens
    if token.startswith("$"):
        name, _, fields = token.partition(".")
        value = next(scope[name] for scope in reversed(scopes) if name in scope)
        return _fields(value, fields), tokens
    if token.startswith("."):
        return _fields(dot, token[1:]), tokens
    raise ValueError(f"unknown token {token!r}")


def _fields(value, path: str):
    for field in filter(None, path.split(".")):
        value = value[field]
    return value
