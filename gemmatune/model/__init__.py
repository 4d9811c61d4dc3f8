"""The model stage: load a Gemma 4 checkpoint, change it for LoRA training, predict its memory.

What gemmatune changes on a model object, one module per concern (nothing happens at import time
and nothing global changes; only the object you pass is touched):

    loader.py                   builds the model: 4-bit NF4, only the towers asked for, the language
                                model alone for text (checkpoint keys mapped); sets the attributes below
    ple.py                      the per-layer-embedding table in CPU memory (a HostEmbedding replaces it)
    towers.py                   which towers are built; images and audio -> input embeddings; inputs
                                with media a model has no tower for are refused (require_towers)
    patching.py                 module classes swapped for gemmatune's kernels (undone by unpatch_model)
    activation_checkpointing.py each decoder layer's checkpoint function ("offload", "on", "off")
    lora.py                     LoRA adapters (peft) on the language model, optionally the towers
    adapters.py                 adapter files in the released checkpoint's layout (adapter_names.py: names)

Beside them: attention.py (the attention the patched layers call), memory.py (predict_peak_gib),
device.py (this process's device and rank), tiny.py (the embedded tiny Gemma 4), machine.py
(choose_model_and_data).

The attributes gemmatune sets on a model object, all named `gemmatune_*` (peft's wrapper forwards them):

    gemmatune_source          CheckpointSource: where the weights came from. Adapters name its path as
                              their base; merge_and_save reads every tensor the fine-tune left alone from it.
    gemmatune_max_seq_length  load_model's max_seq_length: train's memory check and "auto" checkpointing.
    gemmatune_use_kernels     load_model's use_kernels: add_lora and load_adapter patch LoRA layers when set.
    gemmatune_patches         [(module, original class)] swapped by patch_model / patch_lora.
    gemmatune_hooks           the fp16 clamp hooks patch_model registered.

While generating, LoRA layers hold `gemmatune_decode_lora` / `gemmatune_decoding` in their
__dict__ (patching.lora_weights_for_decoding); gemmatune.generation keeps its decode state in a
weak dictionary keyed by the model, never on it.
"""
from gemmatune.model.adapters import load_adapter, save_adapter
from gemmatune.model.loader import load_model
from gemmatune.model.lora import add_lora, trainable_parameters
from gemmatune.model.machine import choose_model_and_data
from gemmatune.model.memory import check_fits, predict_peak_gib
from gemmatune.model.tiny import TINY_MODEL_ID

__all__ = ["TINY_MODEL_ID", "add_lora", "check_fits", "choose_model_and_data", "load_adapter", "load_model",
           "predict_peak_gib", "save_adapter", "trainable_parameters"]
