"""The generation stage: replies, batches of replies, scores on held-out rows.

    decoding.py   generate(): prefill, then decode steps on a static cache, replayed as CUDA graphs
    chat.py       chat() and generate_replies(): messages in Gemma 4's chat format -> replies
    evaluate.py   score(): generate answers for held-out rows and compare them with the references
"""
from gemmatune.generation.decoding import generate
from gemmatune.generation.evaluate import (
                                           Scores,
                                           character_error_rate,
                                           exact_match,
                                           image_table,
                                           score,
                                           shorten,
                                           word_error_rate,
)
from gemmatune.generation.replies import chat, generate_replies

__all__ = ["Scores", "character_error_rate", "chat", "exact_match", "generate", "generate_replies", "image_table",
           "score", "shorten", "word_error_rate"]
