"""How the next token is chosen (greedy, or sampled with temperature, top-k and top-p), and the
check that refuses settings which mean nothing before any work starts.

Sampling follows transformers' warpers (temperature, then top-k, then top-p keeping at least one
token); the draw is the exponential-race trick, one kernel and capturable in a CUDA graph
(gemmatune.generation.decoding replays it inside each decode step).
"""
import math
import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (temperature 0) or sampled (temperature, top-k, top-p)."""
    temperature: float = 0.0
    top_k: int = 0      # 0: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def choose_tokens(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Next token ids (B,) from fp32 logits (B, V). Sampling as transformers' warpers do it
    (temperature, then top-k, then top-p keeping at least one token), drawn with the
    exponential-race trick (argmax of p / Exp(1)), which is one kernel and capturable."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        values, indices = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1)
    else:
        values, indices = logits.sort(dim=-1, descending=True)
    probs = values.softmax(dim=-1)
    if sampling.top_p < 1.0:
        before = probs.cumsum(dim=-1) - probs  # probability mass of the better tokens
        probs = probs.masked_fill(before >= sampling.top_p, 0.0)
    pick = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1, keepdim=True)
    return indices.gather(-1, pick).squeeze(-1)


def check_settings(max_new_tokens, temperature, top_k, top_p) -> None:
    """Refuse generation settings that mean nothing, naming the value, before any work.

    Raises:
        ValueError: max_new_tokens not a whole number >= 0, temperature < 0, top_k < 0 (or not a
            whole number), top_p outside (0, 1].
    """
    def whole(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    def real(value) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)

    if not whole(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: the longest reply, in tokens: a whole number >= 0 "
                         "(e.g. 128)")
    if not real(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r}: 0 picks the most likely token (repeatable), above 0 samples "
                         "(Gemma 4's recommended setting is 1.0); it cannot be negative")
    if not whole(top_k) or top_k < 0:
        raise ValueError(f"top_k={top_k!r}: sample from the k most likely tokens (Gemma 4's recommended setting is "
                         "64), or 0 for no cut; a whole number >= 0")
    if not real(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}: sample from the most likely tokens that together hold this probability, "
                         "in (0, 1] (Gemma 4's recommended setting is 0.95; 1 for no cut)")
