"""gemmatune: fine-tune Gemma 4 E2B/E4B with LoRA/QLoRA on a small GPU.

    model, tokenizer = gemmatune.load_model("google/gemma-4-E2B-it", max_seq_length=2048)
    model = gemmatune.add_lora(model, r=16)
    dataset = gemmatune.prepare_dataset("bundled", tokenizer, max_seq_length=2048)
    result = gemmatune.train(model, dataset, tokenizer, max_steps=60)
    gemmatune.chat(model, tokenizer, "Convert 5 km to miles.")
"""
from gemmatune.chat import chat
from gemmatune.data import load_hub_dataset, prepare_dataset, show_example
from gemmatune.loader import load_model
from gemmatune.lora import add_lora, load_adapter, trainable_parameters
from gemmatune.machine import choose_model_and_data
from gemmatune.memory import predict_peak_gib
from gemmatune.saving import save_adapter
from gemmatune.tiny import TINY_MODEL_ID
from gemmatune.trainer import TrainConfig, TrainResult, train

__version__ = "0.1.0"
__all__ = ["TINY_MODEL_ID", "TrainConfig", "TrainResult", "add_lora", "chat", "choose_model_and_data",
           "load_adapter", "load_hub_dataset", "load_model", "predict_peak_gib", "prepare_dataset", "save_adapter",
           "show_example", "train", "trainable_parameters"]
