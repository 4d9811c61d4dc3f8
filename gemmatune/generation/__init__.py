"""The generation stage: replies, batches of replies, scores on held-out rows.

    sampling.py   how the next token is chosen; check_settings() refuses settings that mean nothing
    decoding.py   generate(), stream_tokens(): prefill (with the prompt's images and audio), then decode
                  steps on a static cache, replayed as CUDA graphs
    replies.py    chat(), stream_reply(), generate_replies(): prompts in any training schema, with
                  images and audio, -> replies (streamed as text pieces for a web app)
    evaluate.py   score(): generate answers for held-out rows and compare them with the references
"""
from gemmatune.generation.decoding import generate, stream_tokens
from gemmatune.generation.evaluate import (Scores, character_error_rate, exact_match, image_table, score, shorten,
                                           word_error_rate)
from gemmatune.generation.replies import Reply, chat, generate_replies, stream_reply
from gemmatune.generation.sampling import check_settings

__all__ = ["Reply", "Scores", "character_error_rate", "chat", "check_settings", "exact_match", "generate",
           "generate_replies", "image_table", "score", "shorten", "stream_reply", "stream_tokens", "word_error_rate"]
