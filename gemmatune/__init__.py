"""gemmatune: fine-tune Gemma 4 E2B/E4B with LoRA/QLoRA on a small GPU.

    model, tokenizer = gemmatune.load_model("google/gemma-4-E2B-it", max_seq_length=2048)
    model = gemmatune.add_lora(model, r=16)
    dataset = gemmatune.prepare_dataset("bundled", tokenizer, max_seq_length=2048)
    result = gemmatune.train(model, dataset, tokenizer, max_steps=60)
    gemmatune.chat(model, tokenizer, "Convert 5 km to miles.")
"""
import logging


def _drop_bitsandbytes_cpu_kernel_notice() -> None:
    """bitsandbytes logs a warning at import on CPUs with AVX512-BF16: it could not fetch an
    optional CPU matmul kernel from the model hub (through the `kernels` package). gemmatune never
    runs that kernel (every 4-bit layer takes gemmatune's NF4 path, see patching.NF4Linear4bit),
    so the warning is not the user's concern. Only that one record of that one logger is dropped."""
    notice = "Failed to load CPU gemm_4bit_forward from kernels-community"
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: notice not in record.getMessage())


_drop_bitsandbytes_cpu_kernel_notice()

from gemmatune import evaluate  # noqa: E402,F401 (gemmatune.evaluate.score in the notebooks)
from gemmatune.chat import chat, generate_replies  # noqa: E402
from gemmatune.data import load_hub_dataset, prepare_dataset, show_example  # noqa: E402
from gemmatune.export import merge_and_save  # noqa: E402
from gemmatune.gguf_export import export_gguf  # noqa: E402
from gemmatune.loader import load_model  # noqa: E402
from gemmatune.lora import add_lora, load_adapter, trainable_parameters  # noqa: E402
from gemmatune.machine import choose_model_and_data  # noqa: E402
from gemmatune.memory import predict_peak_gib  # noqa: E402
from gemmatune.saving import save_adapter  # noqa: E402
from gemmatune.tiny import TINY_MODEL_ID  # noqa: E402
from gemmatune.trainer import TrainConfig, TrainResult, train  # noqa: E402

__version__ = "0.1.0"
__all__ = ["TINY_MODEL_ID", "TrainConfig", "TrainResult", "add_lora", "chat", "choose_model_and_data",
           "export_gguf", "generate_replies", "load_adapter", "load_hub_dataset", "load_model", "merge_and_save",
           "predict_peak_gib", "prepare_dataset", "save_adapter", "show_example", "train", "trainable_parameters"]
