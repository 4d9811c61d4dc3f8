"""The pieces of GRPO on hand-made numbers (advantages, KL estimator, clipping, token-level
normalisation), the rollout helpers, the prompt rows, the bundled prompt set, and the dashboard's
extra values."""
import json
import math
import re
import subprocess
import sys

import pytest
import torch

from gemmatune.data.prompts import BUNDLED_PROMPTS, PromptRow, load_bundled_prompts, prepare_prompts
from gemmatune.errors import DatasetFormatError
from gemmatune.model.memory import predict_peak_gib
from gemmatune.training.grpo import GRPOConfig, GRPOResult, choose_micro_batch, prompt_tokens, rollout_cache_gib
from gemmatune.training.grpo_loss import clipped_surrogate, group_advantages, grpo_loss, kl_estimate
from gemmatune.training.rollouts import Rollout, cut_at_stop, left_pad, score_rollout, training_batches
from tests.helpers import REPO, FakeClock, widget_dashboard


# -- advantages -------------------------------------------------------------------------------
def test_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    std = math.sqrt(1 / 3)  # Bessel's correction: sum of squares 4 * 0.25 over 3
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4)
    advantages = group_advantages(rewards, 4)
    torch.testing.assert_close(advantages[:4], expected)
    assert (advantages[4:] == 0).all()  # equal rewards say nothing: no push either way
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    torch.testing.assert_close(group_advantages(rewards, 2), torch.tensor([0.7070, -0.7070, -0.7070, 0.7070,
                                                                           0.0, 0.0, 0.0, 0.0]), rtol=0, atol=1e-4)


def test_advantages_refuse_rewards_that_do_not_fill_whole_groups():
    with pytest.raises(ValueError, match="prompts"):
        group_advantages(torch.ones(7), 4)


# -- KL ---------------------------------------------------------------------------------------
def test_kl_estimator_on_hand_made_numbers():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.25), math.log(0.3)]), torch.tensor(
        [math.log(0.25), math.log(0.5), math.log(0.3)])
    # d = ref - logp: log(1/2) -> 0.5 + log 2 - 1; log 2 -> 2 - log 2 - 1; 0 -> 0
    expected = torch.tensor([0.5 + math.log(2) - 1, 1 - math.log(2), 0.0])
    torch.testing.assert_close(kl_estimate(logp, ref), expected)


def test_kl_estimate_is_unbiased_for_the_kl_under_samples_from_the_policy():
    policy, reference = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.2, 0.3, 0.5])
    exact = float((policy * (policy / reference).log()).sum())
    per_token = kl_estimate(policy.log(), reference.log())
    assert float((policy * per_token).sum()) == pytest.approx(exact, rel=1e-6)


# -- clipping ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio, advantage, loss, has_gradient", [
    (1.5, 1.0, -1.2, False),   # better than sampled and already pushed past 1 + eps: clipped, no gradient
    (0.5, 1.0, -0.5, True),    # below 1 - eps with a positive advantage: not clipped, pushed up
    (0.5, -1.0, 0.8, False),   # already pushed down past 1 - eps: clipped
    (1.5, -1.0, 1.5, True),    # above 1 + eps with a negative advantage: not clipped, pushed down
    (1.1, 2.0, -2.2, True),    # inside the range
])
def test_the_clip_on_hand_made_numbers(ratio, advantage, loss, has_gradient):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    per_token, rho = clipped_surrogate(logp, torch.zeros(1, 1), torch.tensor([advantage]), 0.2, 0.2)
    assert float(per_token.detach()) == pytest.approx(loss) and float(rho.detach()) == pytest.approx(ratio)
    per_token.sum().backward()
    assert (float(logp.grad) != 0) == has_gradient


def test_upper_clip_bound_can_differ_from_the_lower_one():
    per_token, _ = clipped_surrogate(torch.tensor([[math.log(1.5)]]), torch.zeros(1, 1), torch.tensor([1.0]), 0.2,
                                     0.28)
    assert float(per_token) == pytest.approx(-1.28)


# -- the whole loss ---------------------------------------------------------------------------
def test_grpo_loss_sums_over_completion_tokens_and_divides_by_the_steps_tokens():
    logp = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[False, True, True, False], [False, True, False, False]])
    advantages = torch.tensor([2.0, -1.0])
    loss, stats = grpo_loss(logp, mask, advantages, normalizer=10)  # on-policy: rho = 1 in value
    assert float(loss.detach()) == pytest.approx((-2 - 2 + 1) / 10)
    loss.backward()
    expected = torch.tensor([[0.0, -0.2, -0.2, 0.0], [0.0, 0.1, 0.0, 0.0]])  # -A / normalizer per token
    torch.testing.assert_close(logp.grad, expected)
    assert float(stats["tokens"]) == 3 and float(stats["clipped"]) == 0 and float(stats["kl"]) == 0


def test_grpo_loss_adds_beta_times_the_kl_weighted_by_the_ratio():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    old = torch.tensor([[math.log(0.4)]])
    kl = 0.5 + math.log(2) - 1
    ratio = 0.5 / 0.4
    loss, stats = grpo_loss(logp, torch.ones(1, 1, dtype=torch.bool), torch.tensor([0.0]), 1, old_logp=old,
                            ref_logp=ref, beta=0.1)
    assert float(loss) == pytest.approx(0.1 * ratio * kl, rel=1e-6)
    assert float(stats["kl"]) == pytest.approx(kl, rel=1e-6)
    loss, _ = grpo_loss(logp, torch.ones(1, 1, dtype=torch.bool), torch.tensor([0.0]), 1, old_logp=old,
                        ref_logp=ref, beta=0.1, kl_ratio_correction=False)
    assert float(loss) == pytest.approx(0.1 * kl, rel=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, torch.ones(1, 1, dtype=torch.bool), torch.tensor([0.0]), 1, beta=0.1)


def test_micro_batches_give_the_gradient_of_the_whole_step():
    """Token-level normalisation across accumulation: halves with the step's token count add up
    to the whole step; per-micro-batch means would not."""
    gen = torch.Generator().manual_seed(0)
    logp = (-torch.rand(4, 6, generator=gen)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]).bool()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    ref = -torch.rand(4, 6, generator=gen)
    whole, _ = grpo_loss(logp, mask, advantages, int(mask.sum()), ref_logp=ref, beta=0.2)
    (expected,) = torch.autograd.grad(whole, logp)
    halves = sum(grpo_loss(logp[i:i + 2], mask[i:i + 2], advantages[i:i + 2], int(mask.sum()), ref_logp=ref[i:i + 2],
                           beta=0.2)[0] for i in (0, 2))
    (actual,) = torch.autograd.grad(halves, logp)
    torch.testing.assert_close(halves, whole)
    torch.testing.assert_close(actual, expected)


# -- rollouts ---------------------------------------------------------------------------------
def test_a_completion_ends_at_its_first_stop_token():
    assert cut_at_stop([20, 21, 6, 1, 0], {1, 6}) == ([20, 21, 6], False)
    assert cut_at_stop([20, 21, 22], {1, 6}) == ([20, 21, 22], True)
    assert cut_at_stop([1, 0, 0], {1, 6}) == ([1], False)


def test_left_padding_for_generate():
    ids, mask = left_pad([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def rollout_of(prompts: list[list[int]], completions: list[list[int]]) -> Rollout:
    rows = [PromptRow(prompt=str(p), input_ids=p, columns={"answer": str(len(p))}) for p in prompts]
    return Rollout(rows=rows, completion_ids=completions, completions=["x" * len(c) for c in completions],
                   truncated=[False] * len(rows), seconds=1.0)


def test_training_batches_put_labels_on_completion_tokens_only():
    rollout = rollout_of([[2, 30, 31], [2, 40]], [[50, 51, 6], [60]])
    (batch,) = training_batches(rollout, torch.tensor([0.5, -0.5]), micro_batch_size=4, pad_token_id=0,
                                pad_to_multiple_of=8)
    assert set(batch) == {"input_ids", "labels", "advantages"}  # right-padded: no attention mask
    # sorted by length: the shorter row first, advantages follow their rows
    assert batch["input_ids"].tolist() == [[2, 40, 60, 0, 0, 0, 0, 0], [2, 30, 31, 50, 51, 6, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 60] + [-100] * 5, [-100, -100, -100, 50, 51, 6, -100, -100]]
    assert batch["advantages"].tolist() == [-0.5, 0.5]
    assert prompt_tokens(batch) == 5


def test_rewards_are_called_once_per_rollout_with_the_columns():
    calls = []

    def reward(prompts, completions, completion_ids, answer, **kwargs):
        calls.append(answer)
        return [len(c) for c in completions]

    table = score_rollout([reward, lambda prompts, completions, **kw: [1] * len(completions)],
                          rollout_of([[2, 3], [2, 3, 4]], [[7], [8, 9]]))
    assert calls == [["2", "3"]]
    assert table.tolist() == [[1.0, 1.0], [2.0, 1.0]]
    with pytest.raises(ValueError, match="NaN"):
        score_rollout([lambda prompts, completions, **kw: [math.nan, 1.0]], rollout_of([[2], [2]], [[7], [8]]))
    with pytest.raises(TypeError, match="numbers"):
        score_rollout([lambda prompts, completions, **kw: ["a", 1.0]], rollout_of([[2], [2]], [[7], [8]]))


def test_reward_rose_compares_the_first_and_last_windows():
    result = GRPOResult("done", "x", steps=[{"reward": r} for r in [0.1, 0.2, 0.1, 0.6, 0.7, 0.8]])
    assert result.reward_rose(margin=0.4, window=3) and not result.reward_rose(margin=0.6, window=3)
    assert not GRPOResult("done", "x", steps=[{"reward": 0.5}]).reward_rose()


# -- prompts ----------------------------------------------------------------------------------
def test_prompts_end_with_the_generation_prompt_and_keep_their_columns(tiny_tokenizer):
    rows = prepare_prompts(["Hi", {"prompt": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "2+2?"}], "answer": "4"}], tiny_tokenizer)
    turn_model = tiny_tokenizer("<|turn>model\n", add_special_tokens=False)["input_ids"]
    for row in rows:
        assert row.input_ids[0] == tiny_tokenizer.bos_token_id and row.input_ids[-len(turn_model):] == turn_model
    assert rows[0].columns == {} and rows[1].columns == {"answer": "4"} and rows[1].prompt[1]["content"] == "2+2?"
    assert tiny_tokenizer.decode(rows[0].input_ids) == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"


@pytest.mark.parametrize("rows, message", [
    ([], "no prompts"),
    ([{"question": "Hi"}], "no 'prompt' key"),
    ([""], "empty"),
    ([{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}], "end it with a user"),
    (["word " * 600], "max_prompt_length"),
])
def test_bad_prompt_rows_are_refused_with_their_row_number(rows, message, tiny_tokenizer):
    with pytest.raises(DatasetFormatError, match=message):
        prepare_prompts(rows, tiny_tokenizer)


def test_the_bundled_prompts_are_what_the_script_makes(tmp_path):
    script = (REPO / "scripts" / "make_arithmetic_prompts.py").read_text(encoding="utf-8")
    script = script.replace('OUT = Path(__file__).resolve().parents[1] / "gemmatune" / "assets" / "arithmetic"',
                            f"OUT = Path({str(tmp_path)!r})")
    (tmp_path / "make.py").write_text(script, encoding="utf-8")
    subprocess.run([sys.executable, str(tmp_path / "make.py")], check=True, capture_output=True)
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (BUNDLED_PROMPTS / f"{split}.jsonl").read_bytes()


def test_the_bundled_prompts_are_held_out_and_their_answers_are_right():
    train, test = load_bundled_prompts("train"), load_bundled_prompts("test")
    assert len(train) == 800 and len(test) == 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    checked = 0
    for row in train + test:
        assert row["prompt"].endswith("\nGive the final answer on the last line as: Answer: <number>")
        if row["kind"] == "arithmetic":  # recompute from the text, independently of the script
            expression = re.fullmatch(r"What is (.*)\?", row["prompt"].splitlines()[0]).group(1)
            value = eval(expression.replace("×", "*").replace("÷", "/").replace("−", "-"))  # digits and operators
            assert float(row["answer"]) == pytest.approx(value), row
            checked += 1
    assert checked > 200
    with pytest.raises(ValueError, match="split"):
        load_bundled_prompts("validation")


def test_the_bundled_prompts_are_listed_as_package_data():
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"assets/arithmetic/*"' in pyproject
    assert json.loads((BUNDLED_PROMPTS / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])["answer"]


# -- dashboard --------------------------------------------------------------------------------
def test_the_dashboard_names_its_value_and_shows_extra_numbers(capsys, monkeypatch):
    from gemmatune.training.dashboard import make_dashboard

    monkeypatch.delenv("GEMMATUNE_DASHBOARD", raising=False)  # tests/conftest.py turns it off

    dash = make_dashboard(4, mode="text", clock=FakeClock(), value_name="reward")
    dash.update(1, 0.25, 1e-5, 100, extra={"KL": 0.0123, "rollout tok/s": 2345.6})
    line = capsys.readouterr().out
    assert "reward 0.250" in line and "KL 0.0123" in line and "rollout tok/s 2,346" in line and "loss" not in line
    summary = dash.close()
    assert "reward first → last" in str(summary)

    clock = FakeClock()
    dash, shown, _ = widget_dashboard(clock, total=4)
    dash.update(1, 2.0, 1e-4, 100)  # the training loop's dashboard is unchanged
    dash.view.cards.value.index("loss")
    clock.t += 1.0  # past the widget's text refresh interval
    dash.update(2, 1.5, 1e-4, 100, extra={"KL": 0.5})
    assert "KL" in dash.view.cards.value and "0.5" in dash.view.cards.value


# -- memory -----------------------------------------------------------------------------------
def test_the_rollout_cache_counts_the_layers_that_compute_keys_and_values(tiny_dir):
    from tests.helpers import load_tiny

    model, _ = load_tiny()  # fp32; layers 0 (sliding, 2 x 32) and 1 (full, 2 x 64) compute K/V, 2 and 3 share
    assert rollout_cache_gib(model, rows=3, length=256) * 2**30 == pytest.approx(3 * 256 * 2 * (64 + 128) * 4)


@pytest.mark.parametrize("name, expected", [("e2b", 16), ("e4b", 8)])
def test_the_automatic_micro_batch_keeps_a_full_size_step_within_the_target(name, expected, monkeypatch):
    from transformers import Gemma4ForCausalLM

    from benchmarks.gemma4_configs import CONFIGS
    from gemmatune.training import grpo

    monkeypatch.setattr(grpo, "usable_gib", lambda: 79.0)  # an H100: the 7 GiB target decides, not the card
    with torch.device("meta"):
        model = Gemma4ForCausalLM(CONFIGS[name]()).to(torch.bfloat16)
    config = GRPOConfig()  # 8 prompts x 8 completions x 256 new tokens
    size = choose_micro_batch(model, 45 + 256, config)
    assert size == expected
    peak = predict_peak_gib(model, 301, size, checkpointing="on") + rollout_cache_gib(model, 64, 512)
    assert peak <= grpo.MEMORY_TARGET_GIB
    monkeypatch.setattr(grpo, "usable_gib", lambda: 3.0)  # a small card: the smallest micro-batch
    assert choose_micro_batch(model, 301, config) == 1
