"""The data path, one module per stage; text and media take the same stages.

    readers.py      .jsonl, .json, .csv, .parquet files (or a folder of them) -> numbered rows
    rows.py         files, lists, `datasets` objects, the bundled sets, the hub -> numbered rows
    tool_syntax.py  Gemma 4's value syntax inside tool blocks: declarations, calls, responses
    chat_format.py  messages -> Gemma 4's chat format as text and labelled pieces; a reply -> its parts
    messages.py     a row of any common schema -> [{"role", "content"}] (content parts for media;
                    thoughts, tool calls and tool responses in the fields the chat format reads)
    sources.py      where a medium's bytes come from (a path, bytes, an object in memory)
    images.py       an image: checked from its header, decoded, pixels, soft-token count
    audio.py        a clip: checked from its header, decoded, mel features, token count
    media.py        messages -> an ImageRef/AudioRef per media part (checked and counted)
    tokens.py       messages + media runs -> token ids and labels (what the model writes only)
    batches.py      messages -> tokens + media refs, the one way for a training row and a prompt alike
                    (conversation_tokens); examples -> padded tensors, media decoded now (collate);
                    prompts -> left-padded tensors to generate from (prompt_batch)
    dataset.py      prepare_dataset: every row through the above, with a report; scan_rows (no tokenizer)
    prompts.py      prompts for reinforcement learning (ids + reward columns); the bundled arithmetic prompts
    packing.py      prepared rows -> fixed token buffers, rows back to back (train's default)
    prefetch.py     the next micro-batches collated on a background thread while the GPU trains

"How an image becomes tokens" is read by following these modules in order. Each imports only the
modules above it in this list (and gemmatune.errors).
"""
from gemmatune.data.batches import collate, conversation_tokens, prompt_batch
from gemmatune.data.chat_format import format_chat, parse_reply
from gemmatune.data.dataset import PreparedDataset, prepare_dataset, scan_rows, show_example, split_train_eval
from gemmatune.data.media import row_media
from gemmatune.data.messages import audio_to_text, image_to_text, prompt_messages, to_messages
from gemmatune.data.prompts import load_bundled_prompts, prepare_prompts
from gemmatune.data.rows import bundled_dataset_path, keep_media_encoded, load_bundled_dataset, load_hub_dataset
from gemmatune.data.tokens import IGNORE_INDEX, tokenize_conversation

__all__ = ["IGNORE_INDEX", "PreparedDataset", "audio_to_text", "bundled_dataset_path", "collate", "conversation_tokens",
           "format_chat", "image_to_text", "keep_media_encoded", "load_bundled_dataset", "load_bundled_prompts",
           "load_hub_dataset", "parse_reply", "prepare_dataset", "prepare_prompts", "prompt_batch", "prompt_messages",
           "row_media", "scan_rows", "show_example", "split_train_eval", "to_messages", "tokenize_conversation"]
