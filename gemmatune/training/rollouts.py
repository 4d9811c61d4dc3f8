"""Rollouts for GRPO: sample groups of completions from the current policy, score them with the
reward functions, and lay them out as training micro-batches.

Sampling: every completion of a step goes through one `generate` call (gemmatune.generation.decoding:
static cache, CUDA-graph decode steps), the prompts repeated group_size times in a row and
left-padded, the LoRA adapters active. A completion is its sampled tokens up to and including
the first stop token (<turn|> or <eos>); one that never stops is truncated at max_new_tokens.

Training layout: prompt + completion, right-padded to a multiple of `pad_to_multiple_of` (the
shapes repeat), labels only on the completion tokens, no attention mask (a causal token never
sees the padding after it: gemmatune.training.loss.without_needless_mask). Rows are padded, not
packed: packing several rows into one sequence needs per-row position ids and attention
boundaries that gemmatune's training forward does not take yet. Micro-batches hold completions of
similar length (sorted), which pads less and changes nothing in the loss (every token is
normalised by the step's token count, not per row or per micro-batch).
"""
import math
import time
from dataclasses import dataclass

import torch

from gemmatune.data.batches import collate
from gemmatune.data.prompts import PromptRow
from gemmatune.data.tokens import IGNORE_INDEX
from gemmatune.generation.decoding import generate


@dataclass
class Rollout:
    """The completions of one step: completion i answers rows[i]; rows repeat each prompt
    group_size times in a row."""
    rows: list[PromptRow]
    completion_ids: list[list[int]]  # sampled tokens, up to and including the stop token
    completions: list[str]           # decoded, special tokens skipped, stripped
    truncated: list[bool]            # True: no stop token within max_new_tokens
    seconds: float                   # wall time of sampling (the host has the tokens at its end)

    @property
    def generated_tokens(self) -> int:
        return sum(len(ids) for ids in self.completion_ids)


def stop_ids(tokenizer) -> list[int]:
    """Gemma 4 ends a reply with <turn|> (then <eos>): a completion ends at either."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor works too
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<turn|>")]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def pad_id(tokenizer) -> int:
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids(tokenizer)[0]


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) padded on the left to the longest row, as generate wants them."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def cut_at_stop(tokens: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """(tokens up to and including the first stop token, truncated?)."""
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i + 1], False
    return tokens, True


def sample_rollout(model, tokenizer, prompts: list[PromptRow], group_size: int, max_new_tokens: int,
                   temperature: float, top_p: float, top_k: int, seed: int, batch_size: int = 0,
                   cuda_graphs: bool = True) -> Rollout:
    """group_size sampled completions of each prompt, in one generate call (or in calls of
    batch_size completions when batch_size > 0)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    rows = [prompt for prompt in prompts for _ in range(group_size)]
    stops, pad = stop_ids(tokenizer), pad_id(tokenizer)
    size = batch_size or len(rows)
    sampled: list[list[int]] = []
    started = time.perf_counter()
    for start in range(0, len(rows), size):
        input_ids, attention_mask = left_pad([r.input_ids for r in rows[start:start + size]], pad)
        tokens = generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, stop_token_ids=stops,
                          pad_token_id=pad, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed + start,
                          cuda_graphs=cuda_graphs)
        sampled += tokens.tolist()
    seconds = time.perf_counter() - started
    cut = [cut_at_stop(tokens, set(stops)) for tokens in sampled]
    completion_ids = [ids for ids, _ in cut]
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in completion_ids]
    return Rollout(rows=rows, completion_ids=completion_ids, completions=texts,
                   truncated=[truncated for _, truncated in cut], seconds=seconds)


def reward_name(func, index: int) -> str:
    return getattr(func, "__name__", None) or f"reward_{index}"


def score_rollout(reward_funcs: list, rollout: Rollout) -> torch.Tensor:
    """(completions, reward functions) float32: each function called once for the whole rollout,
    as TRL calls it: func(prompts=[...], completions=[...], completion_ids=[...], **columns), one
    list entry per completion, columns being the prompt rows' other keys (None where a row lacks one).

    Raises:
        TypeError / ValueError: a function that does not return one finite number per completion.
    """
    keys = sorted({key for row in rollout.rows for key in row.columns})
    columns = {key: [row.columns.get(key) for row in rollout.rows] for key in keys}
    prompts = [row.prompt for row in rollout.rows]
    table = torch.zeros((len(rollout.rows), len(reward_funcs)), dtype=torch.float32)
    for j, func in enumerate(reward_funcs):
        values = func(prompts=prompts, completions=rollout.completions, completion_ids=rollout.completion_ids,
                      **columns)
        table[:, j] = checked_rewards(values, len(rollout.rows), reward_name(func, j))
    return table


def checked_rewards(values, n: int, name: str) -> torch.Tensor:
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as error:
        raise TypeError(f"reward function {name} must return a list of numbers, one per completion "
                        f"({error})") from None
    if len(values) != n:
        raise ValueError(f"reward function {name} returned {len(values)} values for {n} completions")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"reward function {name} returned a NaN or infinite reward")
    return torch.tensor(values, dtype=torch.float32)


def training_batches(rollout: Rollout, advantages: torch.Tensor, micro_batch_size: int, pad_token_id: int,
                     pad_to_multiple_of: int = 64) -> list[dict]:
    """Micro-batches of prompt + completion rows (see the module docstring): CPU tensors
    input_ids and labels (batch, length), advantages (batch,)."""
    examples = [{"input_ids": row.input_ids + ids, "labels": [IGNORE_INDEX] * len(row.input_ids) + ids}
                for row, ids in zip(rollout.rows, rollout.completion_ids)]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    batches = []
    for start in range(0, len(order), micro_batch_size):
        chosen = order[start:start + micro_batch_size]
        batch = collate([examples[i] for i in chosen], pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
        del batch["attention_mask"]  # right-padded: not needed, and harmful in sliding layers (loss.py)
        batch["advantages"] = advantages[chosen]
        batches.append(batch)
    return batches
