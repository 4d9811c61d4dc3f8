"""gemmatune: fine-tune Gemma 4 E2B/E4B with LoRA/QLoRA on a small GPU."""
__version__ = "0.1.0"
