"""An Ollama Modelfile beside the GGUF files: the model, its projector, Gemma 4's chat format, stop tokens
and sampling.

    gemmatune.export_modelfile("outputs/run1/model-Q8_0.gguf", mmproj="outputs/run1/mmproj-BF16.gguf")
    ollama create my-gemma -f outputs/run1/Modelfile && ollama run my-gemma

The template is the E2B/E4B chat template Google ships with those checkpoints (the format
gemmatune.data.chat_format renders and trains on) written in Go's template language, for what Ollama
passes it:
- a first system or developer message becomes the `<|turn>system` turn; every other message is
  `<|turn>{role}\\n{content}<turn|>\\n`, with "model" for the assistant;
- the generation prompt is `<|turn>model\\n`: E2B/E4B with thinking off write no thought block
  (the larger Gemma 4 models' template, the copy llama.cpp keeps as models/templates/gemma4.jinja,
  adds an empty `<|channel>thought\\n<channel|>` there);
- a last assistant message is left open, so Ollama continues it.
`<bos>` is not in the template: llama.cpp adds it (the GGUF says add_bos_token). What the Go template
cannot do: trim the content (the official template does; send trimmed messages), render tool calls
and thinking, and place images: Ollama puts each image where its own `[img-N]` tag stands, in front of
the message's text, not between blank lines as the official template does.
tests/export/test_ollama.py renders the template with a small Go-template renderer and compares the text
with gemmatune's own prompt (gemmatune.data.chat_format.format_chat) and with hand-written prompts.

Sampling: Gemma 4's recommended temperature 1.0, top_p 0.95, top_k 64. Stop tokens: `<turn|>` (end of
a turn, id 106), `<eos>` (id 1) and `<|tool_response>` (where the model waits after a tool call), as
gemmatune.chat stops.
"""
from pathlib import Path

from gemmatune.files import publish, staging_dir

TEMPLATE = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if and (eq $i 0) (or (eq .Role "system") (eq .Role "developer")) }}<|turn>system
{{ .Content }}<turn|>
{{ else if eq .Role "assistant" }}<|turn>model
{{ .Content }}{{ if not $last }}<turn|>
{{ end }}
{{- else }}<|turn>{{ .Role }}
{{ .Content }}<turn|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|turn>model
{{ end }}
{{- end }}"""
STOP_TOKENS = ("<turn|>", "<eos>", "<|tool_response>")
SAMPLING = {"temperature": 1.0, "top_p": 0.95, "top_k": 64}


def modelfile_text(model_file: str, mmproj_file: str | None = None) -> str:
    """The Modelfile's text for a model GGUF (and projector GGUF) named relative to the Modelfile."""
    lines = ["# ollama create <name> -f Modelfile   (from this folder; written by gemmatune.export_modelfile)",
             f"FROM ./{model_file}"]
    if mmproj_file:
        lines.append(f"FROM ./{mmproj_file}")  # Ollama takes a projector GGUF as a second FROM
    lines.append(f'TEMPLATE """{TEMPLATE}"""')
    lines += [f'PARAMETER stop "{token}"' for token in STOP_TOKENS]
    lines += [f"PARAMETER {name} {value}" for name, value in SAMPLING.items()]
    return "\n".join(lines) + "\n"


def export_modelfile(model_gguf, mmproj=None, path=None) -> Path:
    """Write an Ollama Modelfile naming export_gguf's file (and export_mmproj's), in their folder.

    Args:
        model_gguf: the language model's .gguf (export_gguf).
        mmproj: the projector's .gguf (export_mmproj), in the same folder; None for text only.
        path: the Modelfile to write (default: `Modelfile` beside model_gguf). A file already there
            is kept as `Modelfile.previous-K`.

    Returns:
        The Modelfile's path; `ollama create <name> -f <path>` imports the model.

    Raises:
        FileNotFoundError: a named GGUF does not exist.
        ValueError: the projector is not in the model's folder (the Modelfile names both relative to it).
    """
    model_gguf = Path(model_gguf)
    path = Path(path) if path is not None else model_gguf.with_name("Modelfile")
    for file in (model_gguf, mmproj):
        if file is not None and not Path(file).is_file():
            raise FileNotFoundError(f"{file}: no such GGUF file; write it with gemmatune.export_gguf / export_mmproj")
    for file in (model_gguf, mmproj):
        if file is not None and Path(file).resolve().parent != path.resolve().parent:
            raise ValueError(f"{file} is not in {path.parent}: keep the GGUF files beside the Modelfile, which "
                             "names them relative to its folder")
    text = modelfile_text(model_gguf.name, Path(mmproj).name if mmproj is not None else None)
    tmp = staging_dir(path)  # a temporary file beside it, moved into place when written
    tmp.write_text(text, encoding="utf-8")
    kept = publish(tmp, path)
    if kept is not None:
        print(f"gemmatune: {path} already existed; the earlier file is kept as {kept}")
    return path
