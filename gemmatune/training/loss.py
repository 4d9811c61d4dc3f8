"""The training loss: next-token cross-entropy over label tokens, logits never materialised.

Gemma 4's head is `softcap * tanh(h @ W.T / softcap)` over a 262144-token vocabulary: at
2048 tokens the logits alone are 1 GiB in bf16 and the softcap makes copies. We run the
decoder to its last hidden state and hand it to the fused linear cross-entropy kernel.

The loss is a *sum* divided by `normalizer`, the number of label tokens in the whole
optimizer step (all gradient-accumulation micro-batches): averaging per micro-batch
instead would weight a token in a short batch more than one in a long batch.

A multimodal model (Gemma4ForConditionalGeneration) takes the same path in two halves:
gemmatune.model.towers turns the batch into input embeddings (images' and clips' soft tokens in
their placeholders' positions, frozen towers under no_grad), then the language model runs on
them (`language_model_loss`, which gemmatune.training.step can replay as a CUDA graph). Labels are
the data's: gemmatune.data never puts a label on a placeholder, so no soft token is trained.

Packed micro-batches (gemmatune.data.packing) take the same path: several rows per buffer, with
position_ids that restart at every row and the rows' documents handed to the attention layers
(`attention_arguments`), so each row is computed as if it were alone, and the normaliser is the
label-token count of the whole step as for padded batches.
"""
import torch
import torch.nn.functional as F
from torch import nn

from gemmatune.kernels.fused_linear_ce import (fused_linear_cross_entropy, fused_linear_logprobs,
                                               fused_linear_logprobs_reference)
from gemmatune.model import towers
from gemmatune.model.attention import PackedDocuments
from gemmatune.model.patching import builds_own_masks, packed_attention_masks

IGNORE_INDEX = -100
PACKING_KEYS = ("position_ids", "document_ids", "cu_seq_lens")  # a packed micro-batch (gemmatune.data.packing)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[t] -> the token to predict at position t (shift left, pad with IGNORE_INDEX)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def count_label_tokens(batches) -> int:
    """How many tokens are trained across micro-batches: the loss normaliser for one step."""
    return int(sum((shifted_labels(b["labels"]) != IGNORE_INDEX).sum() for b in batches))


def is_right_padded(attention_mask: torch.Tensor | None) -> bool:
    """True when every row is ones then zeros (what gemmatune.data.batches.collate makes)."""
    if attention_mask is None:
        return True
    mask = attention_mask.to(torch.int8)
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def without_needless_mask(batch: dict) -> dict:
    """The batch minus the attention mask of a right-padded batch.

    Why drop it: with right padding a causal token never attends to the padding after it,
    so the mask changes no trained token. Keeping it is harmful: in a sliding-window layer a
    padding position more than a window past the last real token has no key left to attend
    to, its softmax is 0/0, and the NaN flows back into every LoRA gradient through the
    zero-weighted loss (tests/training/test_step.py). The same holds with images and audio: E2B/E4B
    attend causally over image tokens too (gemmatune.model.towers), and the towers have their own
    masks (image_position_ids, input_features_mask), which stay.
    Call it on the CPU batch where possible: on a GPU mask the check waits for the GPU.
    """
    if "attention_mask" in batch and is_right_padded(batch["attention_mask"]):
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


def model_inputs(batch: dict) -> dict:
    """What the model is called with: the batch minus labels, packing's document table and any
    needless mask (a packed batch's position_ids stay: they restart at every row)."""
    return {k: v for k, v in without_needless_mask(batch).items() if k not in ("labels", *PACKING_KEYS[1:])}


def is_packed(batch: dict) -> bool:
    return all(batch.get(key) is not None for key in PACKING_KEYS)


def attention_arguments(text_model: nn.Module, batch: dict) -> dict:
    """attention_mask (and, packed, position_ids) for a Gemma4TextModel run on `batch`.

    Packed: position_ids restarting per row (both RoPE kinds) and the rows' documents, which
    the attention layers keep apart (gemmatune.model.patching.packed_attention_masks). Padded:
    the batch's mask, or none at all for a right-padded batch, or, where the layers apply
    causality and the window themselves (builds_own_masks), no masks built by transformers."""
    if is_packed(batch):
        documents = PackedDocuments(batch["document_ids"], batch["cu_seq_lens"])
        return {"attention_mask": packed_attention_masks(text_model, documents), "position_ids": batch["position_ids"]}
    mask = without_needless_mask(batch).get("attention_mask")
    if mask is None and builds_own_masks(text_model):
        return {"attention_mask": {kind: None for kind in set(text_model.config.layer_types)}}
    return {"attention_mask": mask} if mask is not None else {}


def causal_lm_loss(model: nn.Module, batch: dict, normalizer: float, fused: bool = True) -> torch.Tensor:
    """sum of token losses in `batch` / `normalizer`, via the fused kernel or plain PyTorch."""
    return hidden_states_loss(unwrap(model), last_hidden_states(model, batch), batch["labels"], normalizer, fused)


def token_logprobs(model: nn.Module, batch: dict, fused: bool = True) -> torch.Tensor:
    """log p(label) of every position's next token, (batch, seq) fp32, 0 where the label is ignored
    (the last position included). What preference and policy-gradient losses are built from; the
    fused path never materialises the logits (gemmatune.kernels.fused_linear_ce)."""
    base = unwrap(model)
    hidden = last_hidden_states(model, batch)
    labels = shifted_labels(batch["labels"]).to(hidden.device)
    softcap = base.config.get_text_config().final_logit_softcapping
    if fused:
        return fused_linear_logprobs(hidden, base.lm_head.weight, labels, softcap=softcap, ignore_index=IGNORE_INDEX)
    return fused_linear_logprobs_reference(hidden, base.lm_head.weight, labels, softcap=softcap,
                                           ignore_index=IGNORE_INDEX)


def last_hidden_states(model: nn.Module, batch: dict) -> torch.Tensor:
    """The decoder's last hidden states for `batch` (text, or images/audio through the towers)."""
    base = unwrap(model)
    inner = towers.multimodal_model(base)
    if inner is not None:  # image/audio-capable model: towers, then the language model
        inputs = without_needless_mask(batch)
        embeds = towers.embed_inputs(inner, inputs)
        text_ids = towers.text_token_ids(inputs["input_ids"], base.config)
        return language_model_hidden_states(base, embeds, text_ids, batch=inputs)
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "attention_mask"}
    inputs.update(attention_arguments(base.model, batch))
    return base.model(**inputs, use_cache=False).last_hidden_state


def language_model_loss(base: nn.Module, inputs_embeds: torch.Tensor, text_ids: torch.Tensor, labels: torch.Tensor,
                        normalizer, fused: bool = True, batch: dict | None = None) -> torch.Tensor:
    """The loss of a Gemma4ForConditionalGeneration's language model run on `inputs_embeds`
    (from towers.embed_inputs); `text_ids` (placeholders as the pad id) pick the per-layer
    embeddings; `batch` gives the attention (attention_arguments: a mask, or a packed batch's
    position_ids and documents). No mask means a right-padded batch (see without_needless_mask)."""
    hidden = language_model_hidden_states(base, inputs_embeds, text_ids, batch)
    return hidden_states_loss(base, hidden, labels, normalizer, fused)


def language_model_hidden_states(base: nn.Module, inputs_embeds: torch.Tensor, text_ids: torch.Tensor,
                                 batch: dict | None = None) -> torch.Tensor:
    """A Gemma4ForConditionalGeneration's language model on `inputs_embeds`: its last hidden states.
    Per-layer embeddings are per token, so they stay each row's own in a packed batch."""
    text_model = base.model.language_model
    per_layer_inputs = None
    if text_model.hidden_size_per_layer_input:  # (ids, None): transformers 5.17 has no default for the second
        per_layer_inputs = text_model.get_per_layer_inputs(text_ids, None)
    return text_model(inputs_embeds=inputs_embeds, per_layer_inputs=per_layer_inputs, use_cache=False,
                      **attention_arguments(text_model, batch or {})).last_hidden_state


def hidden_states_loss(base: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, normalizer,
                       fused: bool = True) -> torch.Tensor:
    """LM head + final-logit softcap + cross-entropy of the last hidden states, summed / normalizer."""
    labels = shifted_labels(labels).to(hidden.device)
    softcap = base.config.get_text_config().final_logit_softcapping
    weight = base.lm_head.weight
    if fused:
        return fused_linear_cross_entropy(hidden.flatten(0, 1), weight, labels.flatten(), softcap=softcap,
                                          ignore_index=IGNORE_INDEX, normalizer=normalizer)
    logits = base.lm_head(hidden).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / normalizer
