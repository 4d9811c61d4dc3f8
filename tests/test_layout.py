"""The package's shape: stages that import only the stages below them, no import cycles, and a README
file table that matches the tree.

Stages, lowest first (README "Files"): the ground floor (gemmatune.errors, gemmatune.files,
gemmatune.kernels), then data, model, generation, training, export, and on top the public API
(gemmatune/__init__.py) and the command line. Every import of a gemmatune module counts, also one
inside a function: an import hidden in a function is still a dependency.
"""
import ast
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "gemmatune"
STAGES = {"errors": 0, "kernels": 0, "files": 1, "data": 2, "model": 3, "generation": 4, "training": 5,
          "export": 6, "cli": 7, "__main__": 7, "": 7}
TOP = 7  # the public API and the command line may import anything


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict) -> set[str]:
    """The gemmatune modules `name` imports: `from a.b import c` counts as a.b.c when that is a
    module, else as a.b (its __init__, for a name it re-exports)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "gemmatune"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "gemmatune":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found - {name}


def stage(name: str) -> tuple[int, str]:
    part = name.split(".")[1] if "." in name else ""
    return STAGES[part], part


@pytest.fixture(scope="module")
def graph():
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_stage(graph):
    for name in graph:
        assert (name.split(".")[1] if "." in name else "") in STAGES, f"{name}: add its subpackage to STAGES"


def test_no_module_imports_a_higher_stage_or_a_sibling_stage(graph):
    wrong = []
    for name, targets in graph.items():
        (level, part) = stage(name)
        for target in targets:
            (target_level, target_part) = stage(target)
            if target_level > level or (target_level == level and target_part != part and level != TOP):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against the stage order:\n" + "\n".join(sorted(wrong))


def test_kernels_know_nothing_about_the_rest(graph):
    wrong = [f"{n} imports {t}" for n, ts in graph.items() if n.startswith("gemmatune.kernels")
             for t in ts if not t.startswith("gemmatune.kernels")]
    assert not wrong, "\n".join(wrong)


def test_modules_do_not_import_their_own_package_init(graph):
    """A module importing names from its own package's __init__ is a cycle: the __init__ imports it."""
    wrong = [f"{n} imports {t}" for n, ts in graph.items() for t in ts
             if n != t and n.startswith(t + ".") and t != "gemmatune"]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def find_cycle(graph: dict) -> list | None:
    """One cycle of the directed graph, or None (iterative depth-first search)."""
    state = {}
    for root in graph:
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path, state[root] = [root], "open"
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = "done"
                stack.pop()
                path.pop()
            elif state.get(child) == "open":
                return path[path.index(child):] + [child]
            elif child not in state and child in graph:
                state[child] = "open"
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_stage_check_catches_an_upward_import(tmp_path):
    modules = {"gemmatune.data.rows": tmp_path / "rows.py", "gemmatune.training.trainer": tmp_path / "t.py"}
    modules["gemmatune.data.rows"].write_text("def f():\n    from gemmatune.training.trainer import train\n")
    assert imports_of("gemmatune.data.rows", modules["gemmatune.data.rows"], modules) == {"gemmatune.training.trainer"}
    assert stage("gemmatune.training.trainer")[0] > stage("gemmatune.data.rows")[0]


# ------------------------------------------------------------------ the README's file table
TREES = ("gemmatune", "tests", "benchmarks", "scripts", "notebooks", "binder", ".ci")
SKIPPED = re.compile(r"(__pycache__|\.pyc$|\.egg-info|/__init__\.py$)")


def readme_entries() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## Files", 1)[1].split("```", 2)[1]
    return [line.split()[0] for line in block.splitlines() if line.strip()]


def tree_files() -> set[str]:
    """The repository's files under TREES: what git tracks plus what it would add (ignored files,
    such as notebooks/outputs/, left out)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *TREES], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"git is needed to list the repository's files: {listed.stderr.strip()[:200]}")
    return {rel for rel in listed.stdout.splitlines()
            if (REPO / rel).is_file() and not SKIPPED.search("/" + rel) and "/results/" not in rel}


def test_the_readme_lists_every_file_and_only_files_that_exist():
    entries = readme_entries()
    missing = [e for e in entries if not (REPO / e).exists()]
    assert not missing, f"README's file table names files that do not exist: {missing}"
    folders = [e for e in entries if e.endswith("/")]
    unlisted = sorted(f for f in tree_files() if f not in entries and not any(f.startswith(d) for d in folders))
    assert not unlisted, f"files the README's file table does not list: {unlisted}"
