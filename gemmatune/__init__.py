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

from gemmatune import data, export, generation, model, training  # noqa: F401  (the documented subpackages)
from gemmatune.data import (
    audio_to_text,
    image_to_text,
    load_bundled_dataset,
    load_hub_dataset,
    prepare_dataset,
    show_example,
)
from gemmatune.export import export_gguf, export_mmproj, export_modelfile, merge_and_save
from gemmatune.generation import chat, generate_replies, score
from gemmatune.model import (
    TINY_MODEL_ID,
    add_lora,
    check_fits,
    choose_model_and_data,
    load_adapter,
    load_model,
    predict_peak_gib,
    save_adapter,
    trainable_parameters,
)
from gemmatune.training import TrainConfig, TrainResult, train

__version__ = "0.1.0"
__all__ = ["TINY_MODEL_ID", "TrainConfig", "TrainResult", "add_lora", "audio_to_text", "chat", "check_fits",
           "choose_model_and_data", "data", "export", "export_gguf", "export_mmproj", "export_modelfile",
           "generate_replies", "generation", "image_to_text", "load_adapter", "load_bundled_dataset",
           "load_hub_dataset", "load_model", "merge_and_save", "model", "predict_peak_gib", "prepare_dataset",
           "save_adapter", "score", "show_example", "train", "trainable_parameters", "training"]
