"""The Ollama Modelfile (gemmatune/export/ollama.py): its template, rendered by a small Go-template renderer
(tests/export/go_template.py), gives Gemma 4 E2B/E4B's prompt (hand-written below) and the prompt gemmatune
builds; the file names the GGUFs, stop tokens and sampling."""
import pytest

from gemmatune.data.chat_format import format_chat
from gemmatune.export.ollama import TEMPLATE, export_modelfile, modelfile_text
from tests.export.go_template import render

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Convert 5 km to miles."}],
    "several turns": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
                      {"role": "user", "content": "Name a prime above 10."}],
    "system": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Good morning"}],
    "developer": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
}
# The E2B/E4B template's output (add_generation_prompt=True, thinking off), written out by hand, without
# the <bos> that llama.cpp adds for Ollama: no thought block after <|turn>model (tests/data/test_chat_format.py).
OFFICIAL = {
    "one turn": "<|turn>user\nConvert 5 km to miles.<turn|>\n<|turn>model\n",
    "several turns": "<|turn>user\nHi!<turn|>\n<|turn>model\nHello. How can I help?<turn|>\n"
                     "<|turn>user\nName a prime above 10.<turn|>\n<|turn>model\n",
    "system": "<|turn>system\nAnswer in French.<turn|>\n<|turn>user\nGood morning<turn|>\n"
              "<|turn>model\n",
    "developer": "<|turn>system\nBe brief.<turn|>\n<|turn>user\nWhy is the sky blue?<turn|>\n"
                 "<|turn>model\n",
}


def ollama_prompt(messages: list[dict]) -> str:
    """What Ollama renders: its messages carry Role and Content."""
    return render(TEMPLATE, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_the_template_renders_gemma4s_official_prompt(name):
    assert ollama_prompt(CONVERSATIONS[name]) == OFFICIAL[name]


def test_a_last_assistant_message_is_left_open_for_ollama_to_continue():
    messages = CONVERSATIONS["one turn"] + [{"role": "assistant", "content": "5 km is"}]
    assert ollama_prompt(messages) == "<|turn>user\nConvert 5 km to miles.<turn|>\n<|turn>model\n5 km is"


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_the_template_renders_the_prompt_gemmatune_builds(name):
    assert "<bos>" + ollama_prompt(CONVERSATIONS[name]) == format_chat(CONVERSATIONS[name], add_generation_prompt=True)


def test_the_renderer_follows_go_where_the_template_relies_on_it():
    """Trim markers, scoped variables, and/or returning an operand, slices, else-if chains."""
    assert render("a  {{- 1 -}}  b\n{{ 2 }}", {}) == "a1b\n2"
    assert render('{{ range $i, $x := .L }}{{ $y := len (slice $.L $i) }}{{ $y }}{{ end }}', {"L": [5, 6, 7]}) == "321"
    assert render('{{ and 1 0 }}{{ or 0 "x" }}{{ if not 0 }}n{{ end }}', {}) == "0xn"
    assert render('{{ if eq .A "a" }}1{{ else if eq .A "b" }}2{{ else }}3{{ end }}', {"A": "b"}) == "2"


def test_the_modelfile_names_the_files_stops_and_sampling(tmp_path):
    (tmp_path / "model-Q8_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "mmproj-BF16.gguf").write_bytes(b"GGUF")
    path = export_modelfile(tmp_path / "model-Q8_0.gguf", mmproj=tmp_path / "mmproj-BF16.gguf")
    text = path.read_text()
    assert path == tmp_path / "Modelfile" and text == modelfile_text("model-Q8_0.gguf", "mmproj-BF16.gguf")
    lines = text.splitlines()
    assert lines[1:3] == ["FROM ./model-Q8_0.gguf", "FROM ./mmproj-BF16.gguf"]
    assert 'PARAMETER stop "<turn|>"' in lines and 'PARAMETER stop "<eos>"' in lines
    assert 'PARAMETER stop "<|tool_response>"' in lines
    assert {"PARAMETER temperature 1.0", "PARAMETER top_p 0.95", "PARAMETER top_k 64"} <= set(lines)
    assert f'TEMPLATE """{TEMPLATE}"""' in text
    export_modelfile(tmp_path / "model-Q8_0.gguf")  # text only; the earlier file is kept
    assert (tmp_path / "Modelfile.previous-1").read_text() == text
    assert "mmproj" not in (tmp_path / "Modelfile").read_text()


def test_missing_or_scattered_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="export_gguf"):
        export_modelfile(tmp_path / "model.gguf")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mmproj.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="beside the Modelfile"):
        export_modelfile(tmp_path / "model.gguf", mmproj=tmp_path / "other" / "mmproj.gguf")
