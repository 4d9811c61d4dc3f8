"""The package versions every benchmark record carries (None for a package that is not installed)."""
import importlib.metadata as md

import torch

DEFAULT = ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate")


def package_versions(names=DEFAULT) -> dict:
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found | {"cuda": torch.version.cuda}
