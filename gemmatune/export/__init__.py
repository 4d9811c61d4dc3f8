"""The export stage: what a person carries away besides the adapter (gemmatune.model.adapters).

    merge.py   merge_and_save(): the whole model, adapter merged, as a 16-bit transformers checkpoint
    gguf.py    export_gguf(): a merged folder's language model as GGUF for llama.cpp and Ollama
"""
from gemmatune.export.gguf import export_gguf
from gemmatune.export.merge import merge_and_save

__all__ = ["export_gguf", "merge_and_save"]
