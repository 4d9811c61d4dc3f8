"""token_logprobs: the per-token log-probabilities preference and policy-gradient losses are built from,
against the model's own logits (transformers' forward, softcap included), on the tiny model in fp32."""
import pytest
import torch

from gemmatune.data.batches import collate
from gemmatune.training.loss import causal_lm_loss, count_label_tokens, shifted_labels, token_logprobs
from tests.helpers import lora_model, random_rows


@pytest.mark.parametrize("fused", [True, False])
def test_token_logprobs_equal_the_models_own_log_softmax(fused):
    model, _ = lora_model(seed=3)
    batch = collate(random_rows(3, seed=4), pad_token_id=0)
    logp = token_logprobs(model, batch, fused=fused)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = shifted_labels(batch["labels"])
    expected = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    expected = torch.where(labels != -100, expected, torch.zeros_like(expected))
    assert logp.shape == batch["input_ids"].shape and (logp[labels == -100] == 0).all()
    torch.testing.assert_close(logp.detach(), expected, rtol=1e-4, atol=1e-4)


def test_token_logprobs_sum_to_minus_the_loss_and_carry_gradients():
    model, _ = lora_model(seed=5)
    batch = collate(random_rows(2, seed=6), pad_token_id=0)
    logp = token_logprobs(model, batch)
    loss = causal_lm_loss(model, batch, normalizer=1.0)
    torch.testing.assert_close(-logp.sum(), loss, rtol=1e-5, atol=1e-5)
    (-logp.sum() / count_label_tokens([batch])).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)
