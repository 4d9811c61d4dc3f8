"""The command line as a person meets it: a first line at once, defaults in --help, data checked before
the model loads, the towers the data needs, offline hub ids failing at once, a quiet notebook run."""
import json
import re
import signal
import time

import nbformat
import numpy as np
import pytest
from PIL import Image

import gemmatune.data.rows as data_rows
from gemmatune.data.rows import load_bundled_dataset
from gemmatune.errors import DatasetDownloadError
from tests.subprocess_helpers import Child, python

FIRST_LINE_S = 2.0  # "within a second" on an idle machine; the shared CI machine gets some slack (it was 7-12 s)


def _cli(*args, cwd) -> Child:
    return Child(python("-m", "gemmatune", *args), cwd=cwd)


def test_the_first_line_comes_before_the_heavy_imports(tmp_path):
    started = time.monotonic()
    child = _cli("train", "--data", str(tmp_path / "missing.jsonl"), cwd=tmp_path)
    child.wait_for("gemmatune: train:", timeout=30)
    assert time.monotonic() - started < FIRST_LINE_S, child.out
    child.kill()


def test_help_shows_the_defaults(tmp_path):
    child = _cli("train", "--help", cwd=tmp_path)
    assert child.wait() == 0
    text = re.sub(r"\s+", " ", child.out)
    for shown in ("optimizer steps (default: 60)", "(default: 2048)", "(default: outputs/gemma4-e2b-text)",
                  "(default: 20)", "(default: 280)"):
        assert shown in text, shown


def test_a_bad_row_is_reported_before_the_model_loads(tmp_path, tiny_dir):
    data = tmp_path / "my.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    bad = {"messages": [{"role": "bot", "content": "x"}]}
    data.write_text("\n".join(json.dumps(r) for r in (good, good, bad)) + "\n")
    child = _cli("train", "--data", str(data), "--steps", "1", cwd=tmp_path)
    assert child.wait() == 2
    last = child.err.strip().splitlines()[-1]
    assert last.startswith("gemmatune: error: line 3: turn 0 has unknown role 'bot'"), child.err
    assert "Loading weights" not in child.err and "Gemma4ForCausalLM" not in child.out  # no model was loaded


def test_a_hub_dataset_fails_at_once_without_a_network(monkeypatch, tmp_path):
    """datasets retried for about 33 s before it failed."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data_rows, "hub_reachable", lambda timeout=3.0: False, raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.monotonic()
    with pytest.raises(DatasetDownloadError, match="not reachable from here and the dataset is not in the local cache"):
        data_rows.load_hub_dataset("someone/not-cached-dataset", split="train[:10]")
    assert time.monotonic() - started < 5


def _image_rows(folder, pixels) -> str:
    """A .jsonl of formula images (or random pixels of the same size) with their LaTeX."""
    folder.mkdir()
    lines = []
    for i, row in enumerate(load_bundled_dataset("formulas", "train")[:4]):
        image = Image.open(row["image"]).convert("RGB")
        if pixels == "random":
            image = Image.fromarray(np.random.default_rng(i).integers(0, 256, (image.height, image.width, 3),
                                                                      dtype=np.uint8))
        image.save(folder / f"{i}.png")
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"{i}.png"}, {"type": "text", "text": "LaTeX?"}]},
            {"role": "assistant", "content": row["text"]}]}))
    (folder / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "rows.jsonl")


def test_image_rows_train_with_the_vision_tower(tmp_path, tiny_dir):
    losses = {}
    for pixels in ("real", "random"):
        data = _image_rows(tmp_path / pixels, pixels)
        child = _cli("train", "--data", data, "--steps", "1", "--batch-size", "4", "--grad-accum", "1",
                     "--max-soft-tokens", "70", "--max-seq-length", "512",
                     "--output-dir", str(tmp_path / f"out-{pixels}"), cwd=tmp_path)
        assert child.wait(300) == 0, child.err[-3000:]
        assert "data checked: 4 rows with image" in child.out
        assert "loading the language model with the vision tower (--modalities text,image)" in child.out
        assert "image tower" in child.out  # load_model describes the tower it built
        losses[pixels] = float(re.search(r"done: loss ([\d.]+) ->", child.out).group(1))
    assert losses["real"] != losses["random"]  # the pixels reach the loss: the tower is in the model


def test_modalities_that_leave_out_what_the_data_holds_are_refused(tmp_path, tiny_dir):
    data = _image_rows(tmp_path / "rows", "real")
    child = _cli("train", "--data", data, "--modalities", "text", "--steps", "1", cwd=tmp_path)
    assert child.wait() == 2
    assert "--modalities text: the data has image parts; add image" in child.err


def test_running_a_notebook_prints_no_kernel_warning(tmp_path):
    notebook = tmp_path / "tiny.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")]), notebook)
    child = _cli("notebook", str(notebook), "--out", str(tmp_path / "ran.ipynb"), cwd=tmp_path)
    assert child.wait(120) == 0, child.err
    assert "without encryption" not in child.err and "WARNING" not in child.err, child.err
    assert "42" in (tmp_path / "ran.ipynb").read_text()


def test_stopping_while_the_model_loads_says_nothing_was_trained(tmp_path, tiny_dir):
    child = _cli("train", "--steps", "5", "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    child.wait_for("data checked")
    child.signal(signal.SIGTERM)
    code = child.wait()
    if "training summary" in child.out:  # the machine was quick: training had already begun
        assert code in (0, 128 + signal.SIGTERM)
        return
    assert code == 130 and "stopped before training started" in child.err
