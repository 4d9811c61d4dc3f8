"""LoRA adapters on Gemma 4's language model (and optionally its towers), by exact module name.

Why not peft's usual `target_modules=["q_proj", ...]`: on a multimodal Gemma 4 that list
also matches the towers' `Gemma4ClippableLinear` wrappers, which peft rejects, and on any
Gemma 4 it would match K/V projections of KV-shared layers, which those layers never run
(they reuse an earlier layer's K/V). We list the language model's projections ourselves.

The towers' projections are all `Gemma4ClippableLinear` (a clamp around an `nn.Linear`):
a tower's adapters go on the inner `.linear` of every such layer inside that tower's layers
(`tower_targets`), never on the other tower, and the projectors (`embed_vision`/`embed_audio`:
tower width -> language-model width) only when asked.
"""
import contextlib
import re
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from gemmatune.model import towers
from gemmatune.model.patching import patch_lora

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"(?:^|\.)(?:language_model|model)\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def language_model_targets(model: nn.Module, targets=DEFAULT_TARGETS) -> list[str]:
    """Full names of the language-model projections to adapt; skips K/V of KV-shared layers."""
    shared = _kv_shared_layers(model)
    names = []
    for name, _ in model.named_modules():
        match = _LAYER.search(name)
        if not match or "vision" in name or "audio" in name:
            continue
        layer, proj = int(match.group(1)), match.group(2)
        if proj not in targets or (proj in ("k_proj", "v_proj") and layer in shared):
            continue
        names.append(name)
    if not names:
        raise ValueError(f"no language-model projections named {list(targets)} found in {type(model).__name__}")
    return names


def tower_targets(model: nn.Module, modality: str) -> list[str]:
    """Full names of the linears to adapt in one tower ("image" or "audio"): the inner
    `.linear` of each Gemma4ClippableLinear in its layers (attention, MLP / feed-forward,
    light convolution)."""
    in_layers = re.compile(rf"(?:^|\.){towers.TOWERS[modality][0]}\.(?:encoder\.)?layers\.\d+\.")
    names = [f"{name}.linear" for name, module in model.named_modules()
             if type(module).__name__ == "Gemma4ClippableLinear" and in_layers.search(name)]
    if not names:
        raise ValueError(f"no {modality} tower in {type(model).__name__}: load the model with "
                         f"gemmatune.load_model(..., modalities=('text', {modality!r}))")
    return names


def projector_target(model: nn.Module, modality: str) -> str:
    """Full name of the projection from a tower's output into the language model's width."""
    embedder = towers.TOWERS[modality][1]
    return next(name for name, _ in model.named_modules() if name.endswith(f"{embedder}.embedding_projection"))


def lora_targets(model: nn.Module, targets=DEFAULT_TARGETS, train_vision_tower: bool = False,
                 train_audio_tower: bool = False, train_projectors: bool = False) -> list[str]:
    """Every module add_lora puts an adapter on, by full name (see the module docstring).
    `train_projectors` adds the projectors of the towers the model has."""
    names = language_model_targets(model, targets)
    loaded = towers.towers_of(model)
    for modality, train in (("image", train_vision_tower), ("audio", train_audio_tower)):
        if train:
            names += tower_targets(model, modality)
    if train_projectors:
        if not loaded:
            raise ValueError("train_projectors=True: this model has no vision or audio tower; load it with "
                             "gemmatune.load_model(..., modalities=('text', 'image')) or ('text', 'audio')")
        names += [projector_target(model, modality) for modality in loaded]
    return names


def _kv_shared_layers(model: nn.Module) -> set[int]:
    return {
        module.layer_idx
        for module in model.modules()
        if type(module).__name__ == "Gemma4TextAttention" and getattr(module, "is_kv_shared_layer", False)
    }


def add_lora(
    model: nn.Module,
    r: int = 16,
    alpha: int | None = None,
    dropout: float = 0.0,
    target_modules=DEFAULT_TARGETS,
    seed: int = 3407,
    train_vision_tower: bool = False,
    train_audio_tower: bool = False,
    train_projectors: bool = False,
) -> PeftModel:
    """Freeze the model and add LoRA adapters (rank `r`, scale alpha/r) to its projections.

    By default only the language model gets adapters (q, k, v, o, gate, up, down; never the K/V
    of KV-shared layers, which those layers never run) and the towers stay frozen, running
    without keeping activations.

    Args:
        model: what load_model returned.
        r: LoRA rank. alpha: scale numerator (default r, so the scale is 1). dropout: LoRA dropout
            (0 keeps training steps capturable as CUDA graphs).
        target_modules: projection names of the language model to adapt.
        seed: for the adapters' initialisation.
        train_vision_tower / train_audio_tower: adapters on that tower's layers too (they are
            then gradient-checkpointed while training).
        train_projectors: adapters on the projections from the towers into the language model.

    Returns:
        The peft model; adapter weights are float32 (stable updates with 8-bit AdamW), the frozen
        base stays in its 4-bit/compute dtype. Train it with gemmatune.train.

    Raises:
        ValueError: no such projections, or a tower option on a model without that tower.
    """
    torch.manual_seed(seed)
    for param in model.parameters():
        param.requires_grad_(False)
    names = lora_targets(model, target_modules, train_vision_tower, train_audio_tower, train_projectors)
    config = LoraConfig(
        r=r, lora_alpha=alpha if alpha is not None else r, lora_dropout=dropout, bias="none",
        target_modules=names, task_type="CAUSAL_LM",
    )
    with quiet_peft():
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    if getattr(model, "gemmatune_use_kernels", False):
        patch_lora(peft_model)
    return peft_model


@contextlib.contextmanager
def quiet_peft():
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model,
    which warns in every notebook run; the user can do nothing about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def trainable_parameters(model: nn.Module) -> str:
    """How many parameters train, of how many; with tower adapters, where they are."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    line = f"trainable: {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
    parts = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            part = next((m for m, names in towers.TOWERS.items() if any(f".{n}." in f".{name}" for n in names)),
                        "language model")
            parts[part] = parts.get(part, 0) + param.numel()
    if set(parts) - {"language model"}:
        where = {"image": "vision tower + projector", "audio": "audio tower + projector"}
        line += ": " + ", ".join(f"{where.get(k, k)} {v:,}" for k, v in parts.items())
    return line
