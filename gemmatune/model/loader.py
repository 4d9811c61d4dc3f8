"""Load Gemma 4 for QLoRA: 4-bit NF4 language model, PLE table on the CPU, right dtype.

`load_model` returns `(model, tokenizer)`. For a text-only fine-tune of a multimodal
checkpoint (every Gemma 4 E-series checkpoint is one) it builds the language model alone,
`Gemma4ForCausalLM`, and maps the checkpoint's `model.language_model.*` keys onto it:
without that mapping transformers silently leaves the weights random. The vision and audio
towers are never built, so they cost no memory.

With `modalities=("text", "image")` or `("text", "audio")` it builds
`Gemma4ForConditionalGeneration` with only the towers asked for (the other tower's config is
removed, so it is never built, and its checkpoint keys are ignored): the language model in
4-bit, the towers and their embedders in the compute dtype (small, and sensitive to 4-bit
error). The tokenizer is all the rest of gemmatune needs: images and audio are turned into
tensors by gemmatune.data (no torchvision, which transformers' Gemma4Processor needs for
its video processor and which fails beside the CPU build of torch). With audio, the
tokenizer carries the audio feature extractor that matches the loaded tower
(`tokenizer.feature_extractor`, where a processor keeps it), so prepare_dataset computes mel
features of the width the tower takes: 128 for the released checkpoints, 32 for the tiny one.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, BitsAndBytesConfig
from transformers.models.gemma4 import modeling_gemma4 as hf_gemma4

from gemmatune.data.rows import hub_reachable
from gemmatune.errors import ModelLoadError
from gemmatune.model import ple, towers
from gemmatune.model.device import is_main_process, local_device
from gemmatune.model.memory import check_fits
from gemmatune.model.patching import patch_model
from gemmatune.model.tiny import TINY_MODEL_ID, tiny_model_dir

LANGUAGE_MODEL_KEYS = {r"^model\.language_model\.": "model."}

# Kept in the compute dtype: embeddings/LM head (a row lookup and the fused loss read them
# directly) and the towers with their embedders (small, and sensitive to 4-bit error).
# transformers 5.23 matches these from the start of a module's full name or as its suffix
# (quantizers_utils.should_convert_module), so the towers need their full prefix (a bare
# "vision_tower" matched nothing and the towers were quantised); the bare names stay for
# releases that match substrings.
NOT_QUANTIZED = ["lm_head", "embed_tokens", "embed_tokens_per_layer", "vision_tower", "audio_tower",
                 "embed_vision", "embed_audio", "model.vision_tower", "model.audio_tower", "model.embed_vision",
                 "model.embed_audio"]


@dataclass(frozen=True)
class CheckpointSource:
    """Where a loaded model came from (`model.gemmatune_source`). Saved adapters name `path` as
    their base and use the checkpoint's own tensor names; the merge reads the towers and every
    other tensor the fine-tune left alone from these files."""

    model_id: str                # as the user passed it
    path: str                    # hub id or folder the files come from (the tiny model: its folder)
    language_model_only: bool    # Gemma4ForCausalLM built from a multimodal checkpoint (LANGUAGE_MODEL_KEYS)
    hub_kwargs: dict = field(default_factory=dict)


class Gemma4ForCausalLMHostPLE(hf_gemma4.Gemma4ForCausalLM):
    """Gemma4ForCausalLM whose per-layer-embedding table stays in CPU memory (see ple.py)."""

    # The towers of a multimodal checkpoint are not built for text-only work.
    _keys_to_ignore_on_load_unexpected = [r"^model\.(vision_tower|audio_tower|embed_vision|embed_audio)\."]

    def __init__(self, config):
        super().__init__(config)
        ple.use_host_embedding(self.model)
        # added to what post_init collected from the text model (its KV-shared layers' K/V, which
        # the released checkpoints carry): replacing it printed a load report on every load
        self._keys_to_ignore_on_load_unexpected = {r"embed_tokens_per_layer\.weight",
                                                   *type(self)._keys_to_ignore_on_load_unexpected,
                                                   *(self._keys_to_ignore_on_load_unexpected or ())}


class Gemma4ForConditionalGenerationSomeTowers(hf_gemma4.Gemma4ForConditionalGeneration):
    """Gemma4ForConditionalGeneration built from a config whose unused towers were removed
    (towers.keep_towers): the checkpoint keys of those towers are expected and ignored."""

    def __init__(self, config):
        super().__init__(config)
        # added to what post_init collected from the text model (its KV-shared layers' K/V, which
        # the released checkpoints carry): replacing it printed a load report on every load
        self._keys_to_ignore_on_load_unexpected = {*towers.dropped_tower_keys(config),
                                                   *(self._keys_to_ignore_on_load_unexpected or ())}


class Gemma4ForConditionalGenerationHostPLE(Gemma4ForConditionalGenerationSomeTowers):
    """... whose per-layer-embedding table also stays in CPU memory."""

    def __init__(self, config):
        super().__init__(config)
        ple.use_host_embedding(self.model.language_model)
        self._keys_to_ignore_on_load_unexpected.add(r"embed_tokens_per_layer\.weight")


def resolve_model_id(model_id: str) -> str:
    """The embedded tiny model answers to TINY_MODEL_ID; everything else goes to the hub/disk."""
    return str(tiny_model_dir()) if model_id == TINY_MODEL_ID else model_id


def load_config(model_id: str, path: str, **hub_kwargs):
    """(config, hub_kwargs) of a hub id or a local folder, with an error that says what to do.

    transformers' own errors are cryptic for the usual mistakes (a missing folder reads "Repo id
    must be in the form...", an adapter folder "Unrecognized model"), and without a network it
    retries for about 25 s before failing. A folder is checked before transformers sees it; for
    a hub id the hub is probed first and, when unreachable, only the local cache is used."""
    local = Path(path).expanduser()
    if local.is_dir():
        _check_model_folder(model_id, local)
    elif _looks_like_a_path(path):
        raise ModelLoadError(f"no model folder {path!r} (relative paths start from {os.getcwd()}): check the "
                             "path, or pass a hub id such as 'google/gemma-4-E2B-it'")
    elif not hub_kwargs.get("local_files_only") and not hub_reachable():
        hub_kwargs = {**hub_kwargs, "local_files_only": True}  # no network: the cache or nothing, at once
    try:
        return AutoConfig.from_pretrained(path, **hub_kwargs), hub_kwargs
    except (OSError, ValueError) as exc:
        offline = hub_kwargs.get("local_files_only")
        raise ModelLoadError(
            f"could not load {model_id!r} from the Hugging Face hub"
            f"{' (the hub is not reachable from here and it is not in the local cache)' if offline else ''}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0]}. Check the name; for a gated model such as Gemma, "
            "accept its license on huggingface.co and log in (`hf auth login` or HF_TOKEN). Without a network, "
            "pass a local folder, or gemmatune.TINY_MODEL_ID for the embedded tiny model.") from exc


def _check_model_folder(model_id: str, folder: Path) -> None:
    if (folder / "config.json").is_file():
        return
    if (folder / "adapter_config.json").is_file():
        raise ModelLoadError(f"{model_id!r} is a LoRA adapter, not a model: load its base model with load_model "
                             f"(adapter_config.json names it), then gemmatune.load_adapter(model, {model_id!r})")
    raise ModelLoadError(f"the folder {model_id!r} has no config.json, so it is not a model checkpoint: pass the "
                         "folder that save_pretrained wrote, or a hub id such as 'google/gemma-4-E2B-it'")


def _looks_like_a_path(name: str) -> bool:
    """A name that cannot be a hub id ('name' or 'owner/name')."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or Path(name).is_file()


def pick_device(device: str | None = None) -> torch.device:
    """The given device, else this process's GPU (cuda:LOCAL_RANK under torchrun), else the CPU."""
    if device is not None:
        return torch.device(device)
    return local_device()


def pick_dtype(dtype, device: torch.device) -> tuple[torch.dtype, str]:
    """The compute dtype and the reason for it (printed, so nobody has to guess)."""
    if dtype not in (None, "auto"):
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        return dtype, "as requested"
    if device.type != "cuda":
        return torch.float32, "CPU: float32 (bf16/fp16 matmuls are slow or inexact on CPUs)"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16, f"{torch.cuda.get_device_name(device)} supports bfloat16"
    return torch.float16, f"{torch.cuda.get_device_name(device)} has no bfloat16 (e.g. a T4): float16"


def quantization_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=NOT_QUANTIZED,
    )


def load_model(
    model_id: str = "google/gemma-4-E2B-it",
    max_seq_length: int = 2048,
    load_in_4bit: bool = True,
    dtype="auto",
    modalities: tuple[str, ...] = ("text",),
    offload_per_layer_embeddings: bool = True,
    use_kernels: bool = True,
    device: str | None = None,
    verbose: bool = True,
    **hub_kwargs,
):
    """Load a Gemma 4 checkpoint for LoRA/QLoRA fine-tuning.

    Args:
        model_id: a hub id ("google/gemma-4-E2B-it"), a local folder, or gemmatune.TINY_MODEL_ID
            (the embedded tiny model: no network, no GPU).
        max_seq_length: the longest row you will train on; train's memory check and its "auto"
            checkpointing choice use it (nothing is truncated here: prepare_dataset does that).
        load_in_4bit: NF4 + double quantisation for the language model's linear layers (QLoRA).
            The towers, embeddings and per-layer embeddings stay in the compute dtype.
        dtype: "auto" picks bfloat16 where the GPU has it, float16 on a T4, float32 on a CPU.
        modalities: ("text",) builds the language model alone; add "image" and/or "audio" to build
            those towers (only those: an unused tower costs no memory).
        offload_per_layer_embeddings: keep the per-layer-embedding table (4.7-5.6 GB in bf16) in
            CPU memory; each step copies only its tokens' rows.
        use_kernels: swap in gemmatune's Triton kernels (False: PyTorch reference code).
        device: where the model goes (default: this process's GPU, cuda:LOCAL_RANK under torchrun,
            else the CPU).
        verbose: print what was loaded, in which dtype and why.
        **hub_kwargs: passed to from_pretrained (revision, token, cache_dir, local_files_only).

    Returns:
        (model, tokenizer). With "audio" in modalities the tokenizer carries the tower's
        `feature_extractor`, which prepare_dataset uses for the mel-bin count.

    Raises:
        ModelLoadError: a missing folder, an adapter folder passed as a model, a hub id that
            cannot be reached or found (at once when the hub is unreachable, not after retries).
        ValueError: unknown modalities, or a tower the checkpoint does not have.
    """
    path = resolve_model_id(model_id)
    target = pick_device(device)
    compute_dtype, why_dtype = pick_dtype(dtype, target)
    config, hub_kwargs = load_config(model_id, path, **hub_kwargs)
    modalities = towers.check_modalities(modalities)
    model_cls, load_kwargs = _model_class_and_kwargs(config, modalities, offload_per_layer_embeddings)
    if load_in_4bit:
        load_kwargs["quantization_config"] = quantization_config(compute_dtype)
    model = model_cls.from_pretrained(path, dtype=compute_dtype, device_map={"": target}, **load_kwargs,
                                      **hub_kwargs)
    for module in model.modules():
        if isinstance(module, ple.HostEmbedding):
            ple.load_host_table(module, path, compute_dtype, **hub_kwargs)
    model.config.use_cache = False  # training default; chat() turns the cache on for generation
    model.gemmatune_source = CheckpointSource(model_id, path, "key_mapping" in load_kwargs, dict(hub_kwargs))
    model.gemmatune_max_seq_length = max_seq_length
    model.gemmatune_use_kernels = use_kernels
    patched = patch_model(model, use_kernels=use_kernels)
    tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
    if "audio" in modalities:
        tokenizer.feature_extractor = audio_feature_extractor(model.config)
    if verbose and is_main_process():  # under torchrun: once, not once per GPU
        print(describe_model(model, compute_dtype, why_dtype, load_in_4bit))
        print("  kernels: " + ("; ".join(patched) if patched else "off (PyTorch reference code)"))
    if target.type == "cuda" and load_in_4bit:
        warning = check_fits(model, max_seq_length, batch=1)
        if warning and is_main_process():
            print(f"gemmatune: WARNING: {warning}")
    return model, tokenizer


def _model_class_and_kwargs(config, modalities: tuple[str, ...], offload_ple: bool):
    """Which class to build and how to map the checkpoint's keys onto it."""
    is_multimodal = config.model_type == "gemma4"
    if modalities == ("text",):
        cls = Gemma4ForCausalLMHostPLE if offload_ple else hf_gemma4.Gemma4ForCausalLM
        if is_multimodal:  # the language model alone, with the checkpoint's keys mapped onto it
            return cls, {"config": config.get_text_config(), "key_mapping": LANGUAGE_MODEL_KEYS}
        return cls, {}
    if not is_multimodal:
        raise ValueError("image/audio fine-tuning needs a multimodal Gemma 4 checkpoint (model_type 'gemma4'), "
                         f"got model_type={config.model_type!r}: load it with modalities=('text',)")
    for modality in modalities[1:]:
        if getattr(config, towers.CONFIG_OF[modality]) is None:
            raise ValueError(f"this checkpoint has no {modality} tower ({towers.CONFIG_OF[modality]} is empty): "
                             f"load it without {modality!r} in modalities")
    cls = Gemma4ForConditionalGenerationHostPLE if offload_ple else Gemma4ForConditionalGenerationSomeTowers
    return cls, {"config": towers.keep_towers(config, modalities)}


def audio_feature_extractor(config):
    """transformers' Gemma 4 audio feature extractor (numpy only) for this model's audio tower.
    The tower fixes the mel-bin count: its first convolution's channel count is also the input
    width its projection is built for (Gemma4AudioSubSampleConvProjection)."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    return Gemma4AudioFeatureExtractor(feature_size=config.audio_config.subsampling_conv_channels[0])


def describe_model(model, compute_dtype, why_dtype: str, load_in_4bit: bool) -> str:
    """The derived facts a user wants at load time: what is quantised, where, in which dtype."""
    import bitsandbytes as bnb

    n_4bit = sum(1 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    params = sum(p.numel() for p in model.parameters())
    host = [m for m in model.modules() if isinstance(m, ple.HostEmbedding)]
    lines = [
        f"gemmatune: {type(model).__name__.replace('HostPLE', '')} with {params / 1e6:,.1f} M parameters on the "
        f"{'GPU' if next(model.parameters()).is_cuda else 'CPU'}",
        f"  compute dtype {str(compute_dtype).replace('torch.', '')}: {why_dtype}",
        f"  4-bit NF4 + double quantisation: {n_4bit} linear layers" if load_in_4bit else "  no quantisation",
    ]
    for modality, tower in towers.towers_of(model).items():
        n = sum(p.numel() for p in tower.parameters())
        dtype = str(next(tower.parameters()).dtype).replace("torch.", "")
        lines.append(f"  {modality} tower: {n / 1e6:,.1f} M parameters in {dtype}, frozen (run without keeping "
                     f"activations) unless add_lora(train_{'vision' if modality == 'image' else 'audio'}_tower=True)")
    for m in host:
        lines.append(f"  per-layer embeddings in CPU memory: {m.num_embeddings * m.embedding_dim / 1e6:,.1f} M "
                     f"parameters ({m.table.numel() * m.table.element_size() / 2**30:.2f} GiB) kept off the GPU")
    return "\n".join(lines)
