"""A pytest plugin (pyproject's addopts: `-p tests.notebook_settings`): nbmake runs the notebooks as a
user would run them on this machine.

tests/conftest.py switches the Triton interpreter on (TRITON_INTERPRET=1, to check the kernels on
a CPU) and the dashboard off, in this process's environment, which a notebook kernel would
inherit. A user's CPU run has neither: the kernels fall back to their PyTorch references (the
interpreter would make training ~100x slower) and the dashboard draws its widget and loss plot.
So both are taken out of the environment while a notebook runs, and put back afterwards. It lives
here, not beside the notebooks, so that the notebooks' folder holds only what a person opens.
"""
import os

import pytest

UNIT_TEST_SETTINGS = ("TRITON_INTERPRET", "GEMMATUNE_DASHBOARD")
_saved = {}


def _is_notebook(item) -> bool:
    return getattr(item, "path", None) is not None and item.path.suffix == ".ipynb"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _is_notebook(item):
        for name in UNIT_TEST_SETTINGS:
            if name in os.environ:
                _saved[name] = os.environ.pop(name)


def pytest_runtest_teardown(item):
    os.environ.update(_saved)
    _saved.clear()
