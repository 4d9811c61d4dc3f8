"""gemmatune: fine-tune Gemma 4 E2B/E4B with LoRA/QLoRA on a small GPU.

    model, tokenizer = gemmatune.load_model("google/gemma-4-E2B-it", max_seq_length=2048)
    model = gemmatune.add_lora(model, r=16)
    dataset = gemmatune.prepare_dataset("bundled", tokenizer, max_seq_length=2048)
    result = gemmatune.train(model, dataset, tokenizer, max_steps=60)
    gemmatune.chat(model, tokenizer, "Convert 5 km to miles.")

The package is split by stage, each importing only the stages before it:
gemmatune.data -> gemmatune.model -> gemmatune.generation -> gemmatune.training -> gemmatune.export,
with gemmatune.kernels, gemmatune.errors and gemmatune.files underneath. The names below are the
public API; each subpackage lists more of its own in `__all__`.
"""
import logging


def _drop_bitsandbytes_cpu_kernel_notice() -> None:
    """bitsandbytes logs a warning at import on CPUs with AVX512-BF16: it could not fetch an
    optional CPU matmul kernel from the model hub (through the `kernels` package). gemmatune never
    runs that kernel (every 4-bit layer takes gemmatune's NF4 path, see model/patching.py), so the
    warning is not the user's concern. Only that one record of that one logger is dropped."""
    notice = "Failed to load CPU gemm_4bit_forward from kernels-community"
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: notice not in record.getMessage())


_drop_bitsandbytes_cpu_kernel_notice()

# The public names and the stage each comes from. Loaded on first use (PEP 562 `__getattr__`):
# `python -m gemmatune` imports this package before the command line runs, and the stages import
# torch, transformers, peft and bitsandbytes (seconds), so the command line can print first.
_STAGE_OF = {
    "audio_to_text": "data", "image_to_text": "data", "load_bundled_dataset": "data", "load_bundled_prompts": "data",
    "load_hub_dataset": "data", "prepare_dataset": "data", "show_example": "data",
    "export_gguf": "export", "export_mmproj": "export", "export_modelfile": "export", "merge_and_save": "export",
    "chat": "generation", "generate_replies": "generation", "score": "generation", "stream_reply": "generation",
    "TINY_MODEL_ID": "model", "add_lora": "model", "check_fits": "model", "choose_model_and_data": "model",
    "load_adapter": "model", "load_model": "model", "predict_peak_gib": "model", "save_adapter": "model",
    "trainable_parameters": "model",
    "GRPOConfig": "training", "GRPOResult": "training", "TrainConfig": "training", "TrainResult": "training",
    "train": "training", "train_grpo": "training",
}
_SUBPACKAGES = ("data", "export", "generation", "model", "training")  # the documented subpackages

__version__ = "0.1.0"
__all__ = sorted([*_STAGE_OF, *_SUBPACKAGES])


def __getattr__(name: str):
    """A public name or subpackage, imported the first time it is used."""
    import importlib

    if name in _SUBPACKAGES:
        return importlib.import_module(f"gemmatune.{name}")
    if name in _STAGE_OF:
        value = getattr(importlib.import_module(f"gemmatune.{_STAGE_OF[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gemmatune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
