"""Direct Preference Optimization (DPO) on gemmatune's model: log-probabilities through the fused head.

DPO (Rafailov et al. 2023) trains a policy pi on pairs (prompt x, chosen y_w, rejected y_l) against a
frozen reference pi_ref:

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

averaged over pairs, where log pi(y|x) sums the completion tokens' log-probabilities.

Memory is what decides DPO on 8 GB. Here:
- the reference is the same model with its LoRA adapters disabled (peft's disable_adapter), run
  under no_grad: there is no second copy of the weights, and it keeps no activations;
- every log-probability comes from gemmatune.training.loss.token_logprobs, the fused LM head +
  softcap whose logits (2 x 1024 tokens x 262144 at the benchmark's size: 1 GiB in bf16, more in
  fp32) are never materialised, and whose backward recomputes them a chunk at a time.

The batch layout is TRL's (DataCollatorForPreference: the chosen rows then the rejected rows,
`completion_mask` on the completion tokens); gemmatune.training.hf_trainer.FusedDPOLoss serves TRL's
DPOTrainer with these functions.
"""
import torch
import torch.nn.functional as F
from torch import nn

from gemmatune.training.loss import IGNORE_INDEX, token_logprobs


def preference_batch(inputs: dict) -> dict:
    """TRL's preference batch -> a gemmatune batch: labels are the completion tokens (-100 elsewhere).

    Args:
        inputs: input_ids (2B, S) with the B chosen rows first, attention_mask, completion_mask.

    Returns:
        {"input_ids", "attention_mask", "labels"}, as gemmatune.training.loss takes them.
    """
    completion = inputs["completion_mask"].bool()
    if "attention_mask" in inputs:
        completion = completion & inputs["attention_mask"].bool()
    batch = {"input_ids": inputs["input_ids"], "labels": inputs["input_ids"].masked_fill(~completion, IGNORE_INDEX)}
    if "attention_mask" in inputs:
        batch["attention_mask"] = inputs["attention_mask"]
    return batch


def sequence_logprobs(model: nn.Module, batch: dict) -> torch.Tensor:
    """log pi(completion | prompt) of every row: the fused per-token log-probabilities summed (fp32)."""
    return token_logprobs(model, batch).sum(dim=-1)


def reference_logprobs(model: nn.Module, batch: dict) -> torch.Tensor:
    """sequence_logprobs of the reference: the same model with its adapters disabled, without gradients."""
    with torch.no_grad(), model.disable_adapter():
        return sequence_logprobs(model, batch)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1):
    """DPO's sigmoid loss of summed log-probabilities (one value per pair in each tensor).

    Returns:
        (loss averaged over the pairs, chosen rewards, rejected rewards); a reward is
        beta * (log pi - log pi_ref) of that completion, detached (for logging).
    """
    chosen = policy_chosen - reference_chosen
    rejected = policy_rejected - reference_rejected
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return loss, beta * chosen.detach(), beta * rejected.detach()
