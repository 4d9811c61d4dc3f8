"""The data path, one module per stage; text and media take the same stages.

    rows.py         files, lists, `datasets` objects, the bundled sets, the hub -> numbered rows
    messages.py     a row of any common schema -> [{"role", "content"}] (content parts for media)
    sources.py      where a medium's bytes come from (a path, bytes, an object in memory)
    images.py       an image: checked from its header, decoded, pixels, soft-token count
    audio.py        a clip: checked from its header, decoded, mel features, token count
    media.py        messages -> an ImageRef/AudioRef per media part (checked and counted)
    chat_format.py  messages -> Gemma 4's chat format as text
    tokens.py       messages + media runs -> token ids and labels (answers only)
    dataset.py      prepare_dataset: all of the above for every row, with a report
    batches.py      prepared rows -> padded tensors (media decoded now); a generation prompt's tensors
    packing.py      prepared rows -> fixed token buffers, rows back to back (train's default)
    prefetch.py     the next micro-batches collated on a background thread while the GPU trains

"How an image becomes tokens" is read by following these modules in order. Each imports only the
modules above it in this list (and gemmatune.errors).
"""
from gemmatune.data.batches import collate, prompt_inputs
from gemmatune.data.chat_format import format_chat
from gemmatune.data.dataset import (
           PreparedDataset,
           prepare_dataset,
           show_example,
           split_train_eval,
)
from gemmatune.data.media import row_media
from gemmatune.data.messages import audio_to_text, image_to_text, to_messages
from gemmatune.data.rows import (
           bundled_dataset_path,
           keep_media_encoded,
           load_bundled_dataset,
           load_hub_dataset,
)
from gemmatune.data.tokens import IGNORE_INDEX, tokenize_conversation

__all__ = ["IGNORE_INDEX", "PreparedDataset", "audio_to_text", "bundled_dataset_path", "collate", "format_chat",
           "image_to_text", "keep_media_encoded", "load_bundled_dataset", "load_hub_dataset", "prepare_dataset",
           "prompt_inputs", "row_media", "show_example", "split_train_eval", "to_messages", "tokenize_conversation"]
