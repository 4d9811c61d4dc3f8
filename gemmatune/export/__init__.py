"""The export stage: what a person carries away besides the adapter (gemmatune.model.adapters).

    merge.py   merge_and_save(): the whole model, adapter merged, as a 16-bit transformers checkpoint
    gguf.py    export_gguf(): a merged folder's language model as GGUF for llama.cpp and Ollama
    mmproj.py  export_mmproj(): its vision and audio towers as llama.cpp's projector GGUF (--mmproj)
    ollama.py  export_modelfile(): an Ollama Modelfile naming both, with Gemma 4's chat template
"""
from gemmatune.export.gguf import export_gguf
from gemmatune.export.merge import merge_and_save
from gemmatune.export.mmproj import export_mmproj
from gemmatune.export.ollama import export_modelfile

__all__ = ["export_gguf", "export_mmproj", "export_modelfile", "merge_and_save"]
