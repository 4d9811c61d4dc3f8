"""Adapter names in the released checkpoint's own layout, so plain peft, transformers and vLLM load them.

Why: a text-only fine-tune builds the language model alone (`Gemma4ForCausalLM`, module names
`model.layers.N...`), but the checkpoint it came from, and every tool that loads that checkpoint, is
`Gemma4ForConditionalGeneration` (`model.language_model.layers.N...`, towers under
`model.vision_tower` / `model.audio_tower`). Saved under the in-memory names, the adapter loads onto
nothing but gemmatune's text-only model. And a list of 20 or more `target_modules` is shortened by
peft (`_find_minimal_target_modules`, peft 0.21 tuners_utils.py) to suffixes such as `q_proj`, which on
the full model also match the towers' `Gemma4ClippableLinear` wrappers, which peft refuses.

So adapters are saved with the checkpoint's tensor names and with `target_modules` as one regular
expression that matches exactly the adapted modules and nothing else (peft never minimises a string;
it matches it with `re.fullmatch` against each module name). The "canonical" name of a module below
is its name in the checkpoint; older gemmatune adapters used the text-only names and are read too.
"""
import re

from torch import nn

# The first component after `model.` of every top-level part of a multimodal Gemma 4 checkpoint.
_MULTIMODAL_PARTS = ("language_model", "vision_tower", "audio_tower", "embed_vision", "embed_audio")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def language_model_only(model: nn.Module) -> bool:
    """True for gemmatune's text-only model of a multimodal checkpoint (its names lack `language_model.`)."""
    source = getattr(model, "gemmatune_source", None)
    return bool(source is not None and source.language_model_only)


def canonical_name(name: str) -> str:
    """A module name of any gemmatune adapter, old (text-only names) or new, in the checkpoint's names."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "model" and parts[1] not in _MULTIMODAL_PARTS:
        return "model.language_model." + name[len("model."):]
    return name


def to_checkpoint_name(model: nn.Module, name: str) -> str:
    """This model's module name -> the checkpoint's."""
    if language_model_only(model) and name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def to_model_name(model: nn.Module, name: str) -> str | None:
    """The checkpoint's module name -> this model's (None: a tower this text-only model does not have)."""
    if not language_model_only(model):
        return name
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name if not name.startswith("model.") else None


def exact_names_regex(names) -> str:
    """One regular expression that `re.fullmatch`es exactly these module names.

    Names that differ only in their layer index share one alternative
    (`model\\.language_model\\.layers\\.(?:0|1|2)\\.self_attn\\.q_proj`), so the expression stays short."""
    groups: dict[str, list[str]] = {}
    for name in sorted(set(names)):
        match = _LAYER_INDEX.search(name)
        if match is None:
            groups.setdefault(re.escape(name), [])
            continue
        template = re.escape(name[:match.start()]) + r"\.layers\.{}\." + re.escape(name[match.end():])
        groups.setdefault(template, []).append(match.group(1))
    alternatives = []
    for template, layers in groups.items():
        if layers:
            ordered = sorted(set(layers), key=int)
            template = template.replace("{}", ordered[0] if len(ordered) == 1 else "(?:" + "|".join(ordered) + ")")
        alternatives.append(template)
    if not alternatives:
        raise ValueError("no module names to match")
    return "(?:" + "|".join(alternatives) + ")"


def split_adapter_key(key: str) -> tuple[str, str]:
    """`base_model.model.<module>.lora_A.weight` -> (`<module>`, `lora_A.weight`)."""
    body = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    module, sep, rest = body.partition(".lora_")
    if not sep:
        raise ValueError(f"{key!r} is not a LoRA tensor name")
    return module, "lora_" + rest


def adapter_key(module: str, rest: str) -> str:
    return f"base_model.model.{module}.{rest}"
