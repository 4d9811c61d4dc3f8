"""Shared fixtures: the embedded tiny Gemma 4, built once per test session into a temp cache."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GEMMATUNE_DASHBOARD", "off")

import torch  # noqa: E402

# Without a GPU the Triton kernels run in the interpreter. Triton reads this variable when a
# kernel module is imported, so it must be set before any test imports gemmatune.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny checkpoint folder, built by the same code users run (gemmatune.tiny)."""
    from gemmatune.model.tiny import tiny_model_dir

    if "GEMMATUNE_CACHE" not in os.environ:
        os.environ["GEMMATUNE_CACHE"] = str(tmp_path_factory.mktemp("gemmatune-cache"))
    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)
