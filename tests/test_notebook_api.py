"""Every `gemmatune.<name>(..., keyword=...)` call in the notebooks must exist with those keywords.

A renamed function or argument then fails here, in CI, not in a user's Colab session. IPython
syntax (%pip, !cmd) is turned into Python with IPython's own transformer before parsing.
"""
import ast
import dataclasses
import inspect
import json
from pathlib import Path

import pytest

TransformerManager = pytest.importorskip("IPython.core.inputtransformer2").TransformerManager

import gemmatune  # noqa: E402

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _dotted(node) -> str | None:
    """'gemmatune.data.rows.bundled_dataset_path' for an attribute chain rooted at the name gemmatune."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "gemmatune" and parts:
        return ".".join(reversed(parts))
    return None


def gemmatune_calls(notebook: Path) -> list[tuple[int, str, list[str]]]:
    """(cell index, dotted name after 'gemmatune.', keyword names) for each call in the code cells."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    calls, to_python = [], TransformerManager()
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        source = to_python.transform_cell("".join(cell["source"]))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and (name := _dotted(node.func)):
                keywords = [kw.arg for kw in node.keywords if kw.arg is not None]
                calls.append((index, name, keywords))
    return calls


def accepted_keywords(func) -> tuple[set[str], bool]:
    """(named parameters, whether **kwargs is accepted); train's **overrides are TrainConfig fields."""
    params = inspect.signature(func).parameters
    names = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if func is gemmatune.train:
        return names | {f.name for f in dataclasses.fields(gemmatune.TrainConfig)}, False
    if func is gemmatune.train_grpo:
        return names | {f.name for f in dataclasses.fields(gemmatune.GRPOConfig)}, False
    return names, var_kw


def public_names(notebook: Path) -> set[str]:
    """Every `gemmatune.<name>` or `gemmatune.<subpackage>.<name>` chain in the code cells."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    names, to_python = set(), TransformerManager()
    for cell in cells:
        if cell["cell_type"] == "code":
            tree = ast.parse(to_python.transform_cell("".join(cell["source"])))
            names |= {name for node in ast.walk(tree) if (name := _dotted(node))}
    return {name for name in names if not any(other.startswith(name + ".") for other in names)}


def is_public(name: str) -> bool:
    """In gemmatune.__all__, or in the __all__ of a subpackage that gemmatune.__all__ lists."""
    first, _, rest = name.partition(".")
    if first not in gemmatune.__all__:
        return False
    if not rest:
        return True
    sub = getattr(gemmatune, first)
    return inspect.ismodule(sub) and rest.split(".")[0] in getattr(sub, "__all__", ())


def test_notebooks_exist():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_calls_match_the_package(notebook):
    calls = gemmatune_calls(notebook)
    assert calls, f"{notebook.name} calls no gemmatune function"
    problems = []
    for cell, name, keywords in calls:
        func = gemmatune
        for part in name.split("."):
            func = getattr(func, part, None)
        if not callable(func):
            problems.append(f"cell {cell}: gemmatune.{name} does not exist")
            continue
        accepted, var_kw = accepted_keywords(func)
        unknown = [k for k in keywords if k not in accepted and not var_kw]
        if unknown:
            problems.append(f"cell {cell}: gemmatune.{name}() has no keyword(s) {unknown}; "
                            f"it accepts {sorted(accepted)}")
    assert not problems, f"{notebook.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_use_only_the_public_api(notebook):
    private = sorted(name for name in public_names(notebook) if not is_public(name))
    assert not private, f"{notebook.name} uses names outside gemmatune's public API: {private}"


def test_the_public_api_check_refuses_module_paths():
    assert is_public("train") and is_public("data.row_media")
    assert not is_public("data.rows.bundled_dataset_path") and not is_public("model.loader")


def test_parameters_cell_is_tagged():
    for notebook in NOTEBOOKS:
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{notebook.name}: expected one cell tagged 'parameters', found {len(tagged)}"


def test_outputs_are_stripped():
    for notebook in NOTEBOOKS:
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        dirty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])]
        assert not dirty, f"{notebook.name}: cells {dirty} have outputs; clear them before committing"


def test_the_checker_catches_a_wrong_keyword():
    accepted, var_kw = accepted_keywords(gemmatune.train)
    assert "learning_rate" in accepted and "max_steps" in accepted and not var_kw
    assert "learning_rte" not in accepted
    assert "max_new_tokens" in accepted_keywords(gemmatune.chat)[0]
