"""Regression tests for Gemma 4's known fine-tuning traps, on the tiny model in float32.

1. KV-shared layers: the loss must not change with use_cache on/off.
2. Gradient checkpointing must give the same LoRA gradients as none, including the
   adapters of the layers whose K/V later layers reuse (reentrant checkpointing does not).
3. Gradient accumulation divides by the label-token count of the whole step.
"""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from gemmatune.data.batches import collate
from gemmatune.model.activation_checkpointing import enable_gradient_checkpointing
from gemmatune.training.loss import causal_lm_loss, count_label_tokens
from tests.helpers import assert_rel_close, load_tiny, lora_grads, lora_model, random_rows


def producer_layer_adapters(model):
    """Adapter names on the k/v projections of layers whose K/V the KV-shared layers reuse."""
    text = model.get_base_model().model
    producers = [i for i, layer in enumerate(text.layers) if layer.self_attn.store_full_length_kv]
    assert producers, "tiny model must have KV-producer layers"
    return [n for n, p in model.named_parameters()
            if p.requires_grad and any(f"layers.{i}.self_attn.{kv}" in n
                                       for i in producers for kv in ("k_proj", "v_proj"))]


def test_use_cache_does_not_change_the_loss():
    model, _ = load_tiny()
    batch = collate(random_rows(3), pad_token_id=0)
    with torch.no_grad():
        losses = [model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], use_cache=use_cache).loss for use_cache in (True, False)]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


def grads_with_checkpointing(mode):
    model, _ = lora_model()
    model.train()
    enable_gradient_checkpointing(model, mode)
    batch = collate(random_rows(2, seed=1), pad_token_id=0)
    loss = causal_lm_loss(model, batch, normalizer=count_label_tokens([batch]), fused=False)
    loss.backward()
    return model, lora_grads(model)


@pytest.mark.parametrize("mode", ["on", "offload"])
def test_checkpointing_gives_the_same_lora_gradients(mode):
    model, reference = grads_with_checkpointing("off")
    _, grads = grads_with_checkpointing(mode)
    assert grads.keys() == reference.keys()
    for name in producer_layer_adapters(model):
        assert reference[name].abs().sum() > 0, f"{name} gets no gradient: the test would prove nothing"
    for name, grad in reference.items():
        assert_rel_close(grads[name], grad, 1e-5, name)


def test_reentrant_checkpointing_breaks_kv_producer_gradients():
    # Why gemmatune never uses reentrant checkpointing: it runs the forward under no_grad, so the
    # K/V that KV-shared layers reuse carry no graph and their producers' adapters lose gradient.
    model, reference = grads_with_checkpointing("off")
    reentrant, _ = lora_model()
    reentrant.train()
    reentrant.enable_input_require_grads()  # what stock recipes do so reentrant checkpointing runs at all
    enable_gradient_checkpointing(reentrant, "on")
    for layer in reentrant.get_base_model().model.layers:
        layer._gradient_checkpointing_func = lambda f, *a: checkpoint(f, *a, use_reentrant=True)
    batch = collate(random_rows(2, seed=1), pad_token_id=0)
    causal_lm_loss(reentrant, batch, normalizer=count_label_tokens([batch]), fused=False).backward()
    grads = lora_grads(reentrant)
    differs = [n for n in producer_layer_adapters(model) if not torch.allclose(grads[n], reference[n], rtol=1e-4)]
    assert differs, "reentrant checkpointing now gives right KV-producer gradients; the trap may be fixed upstream"


@pytest.mark.parametrize("fused", [False, True])
def test_accumulation_equals_one_big_batch(fused):
    rows = random_rows(4, seed=2)  # variable lengths: a per-micro-batch mean would differ
    big_model, _ = lora_model()
    big = collate(rows, pad_token_id=0)
    loss_big = causal_lm_loss(big_model, big, normalizer=count_label_tokens([big]), fused=fused)
    loss_big.backward()

    small_model, _ = lora_model()
    micro = [collate([row], pad_token_id=0) for row in rows]
    n_tokens = count_label_tokens(micro)
    loss_sum = 0.0
    for batch in micro:
        loss = causal_lm_loss(small_model, batch, normalizer=n_tokens, fused=fused)
        loss.backward()
        loss_sum += loss.detach()
    assert_rel_close(loss_sum, loss_big.detach(), 1e-5, "loss")
    big_grads, small_grads = lora_grads(big_model), lora_grads(small_model)
    for name, grad in big_grads.items():
        assert_rel_close(small_grads[name], grad, 1e-5, name)


def test_per_micro_batch_mean_would_be_wrong():
    # The equivalence above is not automatic: averaging per micro-batch gives another loss.
    rows = random_rows(4, seed=2)
    model, _ = lora_model()
    micro = [collate([row], pad_token_id=0) for row in rows]
    mean_of_means = sum(causal_lm_loss(model, b, normalizer=count_label_tokens([b]), fused=False) for b in micro) / 4
    big = collate(rows, pad_token_id=0)
    token_mean = causal_lm_loss(model, big, normalizer=count_label_tokens([big]), fused=False)
    assert abs(float(mean_of_means) - float(token_mean)) > 1e-4
