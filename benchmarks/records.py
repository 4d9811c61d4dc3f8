"""What every benchmark record carries, and where result files go.

`package_versions()` for the record; `results_file("train-step")` for the file name:
benchmarks/results/<date>-<gpu>-train-step.json, <gpu> naming the card it ran on ("h200", "h100",
"t4"; "cpu" without one), so runs on different cards never overwrite or pass for each other.
"""
import datetime
import importlib.metadata as md
import re
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate")


def package_versions(names=DEFAULT) -> dict:
    """{package: version} (None for a package that is not installed), plus the CUDA version."""
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found | {"cuda": torch.version.cuda}


def gpu_slug(name: str | None = None) -> str:
    """A short name for the GPU: "NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" -> "h100",
    "Tesla T4" -> "t4"; "cpu" without a GPU."""
    if name is None:
        if not torch.cuda.is_available():
            return "cpu"
        name = torch.cuda.get_device_name(0)
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in ("nvidia", "tesla", "geforce")]
    model = next((w for w in words if re.fullmatch(r"[a-z]+\d+[a-z]*", w)), None)
    return model or "-".join(words[:2]) or "gpu"


def results_file(stem: str, suffix: str = ".json", gpu: str | None = None) -> Path:
    """benchmarks/results/<today>-<gpu>-<stem><suffix>."""
    return RESULTS / f"{datetime.date.today().isoformat()}-{gpu or gpu_slug()}-{stem}{suffix}"


def command_line() -> str:
    """How this benchmark was started, as a person would type it: `python -m benchmarks.<name> ...`."""
    import sys

    script = Path(sys.argv[0])
    module = f"-m benchmarks.{script.stem}" if script.parent.name == "benchmarks" else str(script)
    return " ".join(["python", module, *sys.argv[1:]])
