"""A fresh run of each notebook shows the reader nothing that is not their concern.

nbmake (pytest --nbmake) checks that every cell runs; this runs the notebooks the way
`python -m gemmatune notebook` does and reads what a person would see: no stderr stream (red
boxes in Jupyter: library warnings, progress noise), no warning text, no error, and no widget
left in the saved copy (reopened without its kernel, a widget reads "model not found"). It also checks
statically that a notebook never prints a check's result without acting on it (a printed
`False` that lets the run pass)."""
import ast
import json
from pathlib import Path

import pytest

from tests.test_notebook_api import NOTEBOOKS, TransformerManager

UNIT_TEST_SETTINGS = ("TRITON_INTERPRET", "GEMMATUNE_DASHBOARD")  # a user's run has neither (notebooks/conftest.py)


def _code_cells(notebook: Path):
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    to_python = TransformerManager()
    return [to_python.transform_cell("".join(c["source"])) for c in cells if c["cell_type"] == "code"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_no_check_is_only_printed(notebook):
    """print("...", a == b) is a check nobody acts on: it must raise or assert instead."""
    for source in _code_cells(notebook):
        tree = ast.parse(source)
        raises = any(isinstance(n, (ast.Raise, ast.Assert)) for n in ast.walk(tree))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                printed_checks = [a for a in node.args if isinstance(a, ast.Compare)]
                assert not printed_checks or raises, f"{notebook.name}: a printed comparison without a raise:\n{source}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_a_fresh_run_shows_no_warnings(notebook, tmp_path, monkeypatch, tiny_dir):
    from gemmatune.cli import run_notebook

    for name in UNIT_TEST_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GEMMATUNE_OUTPUT_DIR", str(tmp_path / "outputs"))
    out = run_notebook(notebook, tmp_path / "executed.ipynb")
    shown = []
    for index, cell in enumerate(json.loads(out.read_text(encoding="utf-8"))["cells"]):
        streamed = "".join("".join(o.get("text", "")) for o in cell.get("outputs", []) if o.get("name") == "stdout")
        if "\n\n\n\n" in streamed:
            shown.append(f"cell {index}: runs of blank lines in its printed output")
        for output in cell.get("outputs", []):
            if "application/vnd.jupyter.widget-view+json" in output.get("data", {}):  # needs the live kernel
                shown.append(f"cell {index}: a widget, which the saved notebook shows as 'model not found'")
            text = "".join(output.get("text", "")) + json.dumps(output.get("data", {}))
            if output.get("name") == "stderr" or output["output_type"] == "error" or "Warning" in text:
                shown.append(f"cell {index}: {output.get('name', output['output_type'])}: {text[:300]}")
    assert not shown, "\n".join(shown)
