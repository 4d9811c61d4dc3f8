"""The one place where gemmatune changes a loaded Gemma 4 model object.

`patch_model(model)` swaps modules of *this* model for gemmatune's (kernels, offloaded
checkpointing); nothing happens at import time and nothing global changes. It is
idempotent, reports what it swapped, and `unpatch_model(model)` puts the originals back.
"""
from torch import nn


def patch_model(model: nn.Module, use_kernels: bool = True) -> list[str]:
    """Swap this model's modules for gemmatune's; returns a line per kind of swap."""
    if getattr(model, "gemmatune_patches", None) is not None:
        return model.gemmatune_patches_report
    model.gemmatune_patches = []  # (parent, name, original module)
    report = []
    model.gemmatune_patches_report = report
    return report


def unpatch_model(model: nn.Module) -> None:
    """Put every module patch_model swapped back in place."""
    for parent, name, original in reversed(getattr(model, "gemmatune_patches", None) or []):
        setattr(parent, name, original)
    model.gemmatune_patches = None
    model.gemmatune_patches_report = []


def enable_gradient_checkpointing(model: nn.Module, mode: str = "offload") -> None:
    """Checkpoint every decoder layer ("offload": saved inputs in CPU memory; "on"; "off")."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from gemmatune.checkpointing import set_layer_checkpointing

    if mode is True:
        mode = "on"
    elif mode in (False, None):
        mode = "off"
    set_layer_checkpointing([m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)], mode)
