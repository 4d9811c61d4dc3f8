"""GRPO on the tiny model in fp32: gemmatune's loss and LoRA gradients equal a plain PyTorch
implementation (stock transformers + peft without gemmatune's kernels, full logits, one unpadded
sequence at a time, a separately loaded base model as the reference); the reference policy is the
model with its adapters disabled (also through gemmatune's NF4 + LoRA layers); train_grpo raises a
toy reward."""
import math

import pytest
import torch

import gemmatune
from gemmatune.data.prompts import PromptRow
from gemmatune.errors import TrainingSetupError
from gemmatune.training.grpo import GRPOConfig, policy_micro_step, reference_logprobs
from gemmatune.training.grpo_loss import group_advantages
from gemmatune.training.loss import token_logprobs
from gemmatune.training.rollouts import Rollout, training_batches
from tests.helpers import assert_rel_close, load_tiny, lora_grads, lora_model, randomize_lora

GROUP = 4


def hand_made_rollout(seed=0, prompts=2, group=GROUP) -> Rollout:
    """Random prompts and completions of different lengths (ids >= 17: ordinary tokens)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [PromptRow(prompt=f"p{i}", input_ids=torch.randint(17, 500, (int(torch.randint(4, 12, (1,),
                                                                                    generator=gen)),),
                                                                 generator=gen).tolist())
            for i in range(prompts)]
    rows = [row for row in rows for _ in range(group)]
    completions = [torch.randint(17, 500, (int(torch.randint(1, 20, (1,), generator=gen)),), generator=gen).tolist()
                   for _ in rows]
    return Rollout(rows=rows, completion_ids=completions, completions=[""] * len(rows),
                   truncated=[False] * len(rows), seconds=1.0)


def plain_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p of each completion token from the model's own full logits (softcap included)."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].float()
    targets = torch.tensor(completion)
    return logits[len(prompt) - 1:-1].log_softmax(-1).gather(-1, targets[:, None])[:, 0]


def plain_grpo_loss(policy, old, reference, rollout: Rollout, advantages, beta, epsilon):
    """The objective written out token by token (TRL's conventions, see grpo_loss.py)."""
    total_tokens = sum(len(c) for c in rollout.completion_ids)
    loss = torch.zeros(())
    for row, completion, advantage in zip(rollout.rows, rollout.completion_ids, advantages.tolist()):
        logp = plain_logprobs(policy, row.input_ids, completion)
        with torch.no_grad():
            old_logp = plain_logprobs(old, row.input_ids, completion)
            ref_logp = plain_logprobs(reference, row.input_ids, completion)
        for t in range(len(completion)):
            ratio = torch.exp(logp[t] - old_logp[t])
            surrogate = -torch.min(ratio * advantage, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantage)
            kl = torch.exp(ref_logp[t] - logp[t]) - (ref_logp[t] - logp[t]) - 1
            loss = loss + surrogate + beta * ratio * kl
    return loss / total_tokens


def gemmatune_grpo_loss(policy, old, rollout, advantages, config: GRPOConfig):
    """The package's path: padded micro-batches, fused log-probabilities, reference = adapters off."""
    batches = training_batches(rollout, advantages, config.micro_batch_size, pad_token_id=0, pad_to_multiple_of=8)
    n_tokens = rollout.generated_tokens
    total = torch.zeros(())
    for batch in batches:
        with torch.no_grad():
            old_logp = token_logprobs(old, {k: batch[k] for k in ("input_ids", "labels")})
        ref_logp = reference_logprobs(policy, batch)
        loss, _, _ = policy_micro_step(policy, batch, n_tokens, ref_logp, old_logp, config)
        total += loss
    return total


def stock_lora_model(seed: int):
    """The tiny model without gemmatune's kernels (transformers' own modules + peft), with the
    same LoRA weights as tests.helpers.lora_model(seed)."""
    model, _ = load_tiny(use_kernels=False)
    model = gemmatune.add_lora(model, r=8)
    randomize_lora(model, seed)
    return model


@pytest.mark.parametrize("micro_batch_size", [8, 3])
def test_loss_and_lora_gradients_equal_a_plain_pytorch_grpo(micro_batch_size):
    policy, _ = lora_model(seed=3)
    old, _ = lora_model(seed=4)  # the policy that "sampled": same A, other B, so ratios differ from 1
    rollout = hand_made_rollout()
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 1.0, 1.0, 0.0])
    advantages = group_advantages(rewards, GROUP)
    config = GRPOConfig(beta=0.3, epsilon=0.1, micro_batch_size=micro_batch_size)

    plain_policy, reference = stock_lora_model(seed=3), load_tiny(use_kernels=False)[0]
    expected = plain_grpo_loss(plain_policy, stock_lora_model(seed=4), reference, rollout, advantages, config.beta,
                               config.epsilon)
    expected.backward()
    expected_grads = lora_grads(plain_policy)
    actual = gemmatune_grpo_loss(policy, old, rollout, advantages, config)

    assert_rel_close(actual, expected.detach(), 1e-5, "loss")
    grads = lora_grads(policy)
    assert set(grads) == set(expected_grads) and grads
    for name, grad in expected_grads.items():  # measured: 5e-6 (loss: 1.3e-6), fp32 sums in another order
        assert_rel_close(grads[name], grad, 5e-5, name)


def test_the_hand_made_case_clips_some_tokens_and_has_a_kl():
    """So the comparison above covers the clip and the KL term, not only the plain policy gradient."""
    policy, _ = lora_model(seed=3)
    old, _ = lora_model(seed=4)
    rollout = hand_made_rollout()
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 1.0, 1.0, 0.0]), GROUP)
    config = GRPOConfig(beta=0.3, epsilon=0.1, micro_batch_size=8)
    (batch,) = training_batches(rollout, advantages, 8, pad_token_id=0, pad_to_multiple_of=8)
    with torch.no_grad():
        old_logp = token_logprobs(old, {k: batch[k] for k in ("input_ids", "labels")})
    _, stats, _ = policy_micro_step(policy, batch, rollout.generated_tokens, reference_logprobs(policy, batch),
                                    old_logp, config)
    assert 0 < stats["clipped"] < stats["tokens"]
    assert stats["kl"] > 0


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_reference_policy_is_the_model_with_adapters_disabled(load_in_4bit):
    model, _ = load_tiny(load_in_4bit=load_in_4bit)
    model = gemmatune.add_lora(model, r=4)
    if load_in_4bit:  # gemmatune's NF4 + LoRA layers must honour peft's disable_adapter too
        assert any(type(m).__name__ == "KernelLoRALinear4bit" for m in model.modules())
    rollout = hand_made_rollout(seed=1)
    (batch,) = training_batches(rollout, torch.zeros(len(rollout.rows)), 8, pad_token_id=0, pad_to_multiple_of=8)
    inputs = {k: batch[k] for k in ("input_ids", "labels")}
    with torch.no_grad():
        base = token_logprobs(model, inputs)  # lora_B starts at zero: the policy equals the base model
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        adapted = token_logprobs(model, inputs)
    reference = reference_logprobs(model, batch)
    assert (adapted - base).abs().max() > 1e-2  # the adapters change the policy...
    torch.testing.assert_close(reference, base, rtol=0, atol=1e-6)  # ...and disabling them gives the base back
    torch.testing.assert_close(token_logprobs(model, inputs).detach(), adapted, rtol=0, atol=1e-6)  # and re-enables


@pytest.fixture
def reference_kernels(monkeypatch):
    """The loop's tests run the kernels' PyTorch references, as on a user's CPU (GEMMATUNE_KERNELS=0):
    the Triton interpreter would make every decode step take seconds."""
    monkeypatch.setenv("GEMMATUNE_KERNELS", "0")


def digit_share(prompts, completions, **columns):
    """The toy reward of the tests and of the notebook's CPU run: the share of digit characters."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


def test_train_grpo_raises_a_toy_reward_and_saves_the_adapter(tmp_path, reference_kernels):
    model, tokenizer = load_tiny()
    model = gemmatune.add_lora(model, r=8)
    prompts = [{"prompt": f"What is {i} + {2 * i}?", "answer": str(3 * i)} for i in range(40)]
    result = gemmatune.train_grpo(model, tokenizer, prompts, digit_share, max_steps=12, prompts_per_step=4,
                                  group_size=8, max_new_tokens=16, learning_rate=5e-3, optimizer="adamw",
                                  output_dir=str(tmp_path), dashboard="off", micro_batch_size=8)
    assert result.status == "done" and len(result.steps) == 12
    assert result.reward_rose(margin=0.3, window=3), result.rewards
    first = result.steps[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # lora_B starts at zero: policy == reference
    assert result.steps[-1]["kl"] > 0
    assert 0 < first["completion_length"] <= 16
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_columns_reach_the_reward_functions_in_completion_order(tmp_path, reference_kernels):
    model, tokenizer = load_tiny()
    model = gemmatune.add_lora(model, r=4)
    seen = []

    def check(prompts, completions, completion_ids, answer, **columns):
        seen.append((list(prompts), list(answer), [len(ids) for ids in completion_ids], completions))
        return [float(p == f"q{a}") for p, a in zip(prompts, answer)]  # 1.0 when the columns line up

    prompts = [{"prompt": f"q{i}", "answer": str(i)} for i in range(6)]
    result = gemmatune.train_grpo(model, tokenizer, prompts, [check], max_steps=2, prompts_per_step=3, group_size=2,
                                  max_new_tokens=4, output_dir=str(tmp_path), dashboard="off", optimizer="adamw")
    assert result.rewards == [1.0, 1.0]
    step_prompts, answers, lengths, completions = seen[0]
    assert step_prompts[0::2] == step_prompts[1::2]  # each prompt's group is consecutive
    assert len(completions) == 6 and all(1 <= n <= 4 for n in lengths)


@pytest.mark.parametrize("change, message", [
    (dict(group_size=1), "group_size"),
    (dict(max_steps=0), "max_steps"),
    (dict(temperature=0.0), "temperature"),
    (dict(reward_weights=[1.0, 2.0]), "reward_weights"),
])
def test_settings_that_cannot_work_stop_before_any_step(change, message, tmp_path, reference_kernels):
    model, tokenizer = load_tiny()
    model = gemmatune.add_lora(model, r=4)
    with pytest.raises(TrainingSetupError, match=message):
        gemmatune.train_grpo(model, tokenizer, ["hi"] * 8, digit_share, output_dir=str(tmp_path), dashboard="off",
                             **change)
    assert not (tmp_path / "adapter").exists()


def test_a_model_without_adapters_and_a_bad_reward_function_are_refused(tmp_path, reference_kernels):
    model, tokenizer = load_tiny()
    with pytest.raises(TrainingSetupError, match="add_lora"):
        gemmatune.train_grpo(model, tokenizer, ["hi"] * 8, digit_share, output_dir=str(tmp_path), dashboard="off")
    model = gemmatune.add_lora(model, r=4)
    with pytest.raises(ValueError, match="returned 1 values for 4 completions"):
        gemmatune.train_grpo(model, tokenizer, ["hi"] * 8, lambda prompts, completions, **kw: [1.0], max_steps=1,
                             prompts_per_step=2, group_size=2, max_new_tokens=2, output_dir=str(tmp_path),
                             dashboard="off", optimizer="adamw")
    assert (tmp_path / "adapter").exists()  # a failure during training still saves the adapter


@pytest.mark.gpu
def test_on_a_gpu_rollouts_replay_cuda_graphs_and_the_toy_reward_rises(tmp_path):
    """The notebook's GPU path on the tiny model: 4-bit, bf16, rollouts through captured decode
    graphs (kept from step to step while the adapters train), the reference with adapters disabled."""
    from gemmatune.generation.decoding import describe

    model, tokenizer = load_tiny(load_in_4bit=True, dtype="bfloat16", device="cuda")
    model = gemmatune.add_lora(model, r=8)
    prompts = [{"prompt": f"What is {i} + {2 * i}?"} for i in range(40)]
    result = gemmatune.train_grpo(model, tokenizer, prompts, digit_share, max_steps=16, prompts_per_step=4,
                                  group_size=8, max_new_tokens=16, learning_rate=5e-3, optimizer="adamw",
                                  output_dir=str(tmp_path), dashboard="off")
    assert "CUDA graphs: on (1 of 1" in describe(model), describe(model)
    assert all(math.isfinite(s["loss"]) and s["kl"] >= 0 for s in result.steps)
    assert result.reward_rose(margin=0.3, window=3), result.rewards
