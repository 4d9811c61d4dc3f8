"""LoRA adapters on Gemma 4's language model, by exact module name.

Why not peft's usual `target_modules=["q_proj", ...]`: on a multimodal Gemma 4 that list
also matches the towers' `Gemma4ClippableLinear` wrappers, which peft rejects, and on any
Gemma 4 it would match K/V projections of KV-shared layers, which those layers never run
(they reuse an earlier layer's K/V). We list the language model's projections ourselves.
"""
import contextlib
import re
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from gemmatune.errors import CheckpointError
from gemmatune.patching import patch_lora

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
) -> PeftModel:
    """Freeze the model and add LoRA adapters (rank `r`, scale alpha/r) to its projections.

    Adapter weights are float32 (stable updates with 8-bit AdamW); the frozen base stays in
    its 4-bit/compute dtype. Returns the peft model; train it with `gemmatune.train`.
    """
    torch.manual_seed(seed)
    for param in model.parameters():
        param.requires_grad_(False)
    config = LoraConfig(
        r=r, lora_alpha=alpha if alpha is not None else r, lora_dropout=dropout, bias="none",
        target_modules=language_model_targets(model, target_modules), task_type="CAUSAL_LM",
    )
    with _quiet_peft():
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    if getattr(model, "gemmatune_use_kernels", False):
        patch_lora(peft_model)
    return peft_model


@contextlib.contextmanager
def _quiet_peft():
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model,
    which warns in every notebook run; the user can do nothing about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def trainable_parameters(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable: {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"


def load_adapter(model: nn.Module, path, trainable: bool = False) -> PeftModel:
    """Put a saved gemmatune/peft adapter on a freshly loaded base model, on the same kernels
    as add_lora (so the reloaded model computes exactly what the trained one did).

    Reads both layouts gemmatune has written: the checkpoint's own names (`model.language_model.`,
    see adapter_layout) and the text-only names of older saves, onto a text-only or a multimodal
    model. Every adapter tensor must find its module: anything missing or left over is an error."""
    from peft import set_peft_model_state_dict

    from gemmatune import adapter_layout as layout
    from gemmatune.saving import read_adapter

    saved_config, tensors = read_adapter(path, model)
    config = LoraConfig.from_pretrained(str(path))
    config.target_modules = layout.exact_names_regex(layout.split_adapter_key(k)[0] for k in tensors)
    config.inference_mode = not trainable
    with _quiet_peft():
        try:
            peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
        except ValueError as exc:  # peft: target modules not found in the model
            raise CheckpointError(f"the adapter in {path} does not fit this model ({exc}); load the base model it was "
                                  f"trained on (adapter_config.json: {saved_config.get('base_model_name_or_path')})"
                                  ) from exc
    result = set_peft_model_state_dict(peft_model, tensors)
    missing = sorted(k for k in result.missing_keys if ".lora_" in k)
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointError(f"the adapter in {path} does not fit this model (missing: {missing[:3]}, unexpected: "
                              f"{unexpected[:3]}): load the base model and LoRA settings it was trained with")
    if getattr(model, "gemmatune_use_kernels", False):
        patch_lora(peft_model)
    return peft_model
