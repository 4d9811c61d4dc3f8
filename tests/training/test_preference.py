"""DPO on gemmatune's model (gemmatune/training/preference.py, hf_trainer.FusedDPOLoss in TRL's DPOTrainer):
the loss and the LoRA gradients equal a plain PyTorch DPO on the model's own logits, with the reference
being the same model with its adapters disabled (no second copy)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

import gemmatune
from gemmatune.training import hf_trainer
from gemmatune.training.preference import dpo_loss, preference_batch, reference_logprobs, sequence_logprobs
from tests.helpers import assert_rel_close, load_tiny, lora_model, randomize_lora

trl = pytest.importorskip("trl")
BETA = 0.1


def preference_rows(n=2, seed=0):
    """Random prompt / chosen / rejected ids (>= 17: no turn or media tokens) of different lengths."""
    gen = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(20, 400, (int(torch.randint(low, high, (1,), generator=gen)),), generator=gen).tolist()

    return [{"prompt_ids": [2] + ids(4, 12), "chosen_ids": ids(3, 15), "rejected_ids": ids(3, 15)} for _ in range(n)]


def collated(rows):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=0)(rows)


def plain_pytorch_dpo(model, inputs, beta=BETA):
    """DPO from the model's own logits (transformers' forward, softcap included): log-softmax, the
    completion tokens' log-probabilities summed; the reference under no_grad with adapters disabled."""
    def summed_logprobs():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
        logp = logits[:, :-1].log_softmax(-1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
        return (logp * inputs["completion_mask"][:, 1:]).sum(-1)

    with torch.no_grad(), model.disable_adapter():
        ref_chosen, ref_rejected = summed_logprobs().chunk(2)
    chosen, rejected = summed_logprobs().chunk(2)
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


def lora_grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def test_dpo_loss_and_gradients_equal_plain_pytorch():
    model, _ = lora_model(seed=2)
    inputs = collated(preference_rows(3))
    expected = plain_pytorch_dpo(model, inputs)
    expected.backward()
    want = lora_grads(model)

    batch = preference_batch(inputs)
    reference = reference_logprobs(model, batch).chunk(2)
    loss, chosen_reward, rejected_reward = dpo_loss(*sequence_logprobs(model, batch).chunk(2), *reference, beta=BETA)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert abs(float(loss.detach()) - 0.6931) > 1e-3  # the reference really differs from the policy
    for name, grad in lora_grads(model).items():
        assert_rel_close(grad, want[name], 1e-4, name)
    assert chosen_reward.shape == rejected_reward.shape == (3,) and not chosen_reward.requires_grad


class GradsBeforeStep(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def dpo_trainer(model, tokenizer, rows, tmp_path, callbacks=(), **config):
    from datasets import Dataset

    cls = type("DPO", (hf_trainer.FusedDPOLoss, trl.DPOTrainer), {})
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=len(rows), beta=BETA,
                    report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, max_grad_norm=0)
    return cls(model=model, args=trl.DPOConfig(**{**settings, **config}), train_dataset=Dataset.from_list(rows),
               processing_class=tokenizer, callbacks=list(callbacks))


CONVERSATIONS = [
    {"prompt": [{"role": "user", "content": "Convert 5 km to miles."}],
     "chosen": [{"role": "assistant", "content": "5 km is about 3.11 miles."}],
     "rejected": [{"role": "assistant", "content": "Miles are longer, so it is more."}]},
    {"prompt": [{"role": "user", "content": "Name a prime number above 10."}],
     "chosen": [{"role": "assistant", "content": "11"}],
     "rejected": [{"role": "assistant", "content": "Twelve, since it has many divisors."}]},
]


def test_trls_dpo_trainer_with_gemmatunes_loss_on_the_4bit_model(tmp_path):
    model, tokenizer = load_tiny(load_in_4bit=True)
    model = gemmatune.add_lora(model, r=4, alpha=8)
    randomize_lora(model, 3)
    grads = GradsBeforeStep()
    trainer = dpo_trainer(model, tokenizer, CONVERSATIONS, tmp_path,
                          callbacks=[grads, hf_trainer.SaveAdapter(tokenizer)])
    assert trainer.ref_model is None  # the reference is the model with its adapters disabled
    tokenized = [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in trainer.train_dataset]
    plain_pytorch_dpo(model, collated(tokenized)).backward()  # TRL's own tokenisation of the same pairs
    want = lora_grads(model)
    trainer.train()
    for name, grad in grads.steps[0].items():  # both pairs in one batch: the mean does not depend on order
        assert_rel_close(grad, want[name], 1e-4, name)
    logged = trainer.state.log_history[0]
    assert logged["rewards/accuracies"] in (0.0, 0.5, 1.0) and "rewards/margins" in logged
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert isinstance(gemmatune.chat(model, tokenizer, "Hi", max_new_tokens=3, stream=False), str)


def test_losses_other_than_dpos_own_are_refused(tmp_path):
    model, tokenizer = lora_model(seed=1)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_trainer(model, tokenizer, CONVERSATIONS, tmp_path, loss_type=["ipo"])
