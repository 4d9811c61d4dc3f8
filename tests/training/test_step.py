"""The CUDA-graph micro-step (gemmatune.training.step) and what its correctness rests on.

On CPU: MicroStep falls back to the eager step with a reason; the graph's simplification
(right-padded batches need no attention mask) gives the same loss and gradients; reused
offload buffers stay correct across micro-batches of different lengths. On a GPU
(`pytest -m gpu`): graph replays give the same losses and LoRA gradients as the eager step.
"""
import pytest
import torch

from gemmatune.data.batches import collate
from gemmatune.model.activation_checkpointing import enable_gradient_checkpointing
from gemmatune.training.loss import causal_lm_loss, count_label_tokens, is_right_padded, model_inputs
from gemmatune.training.step import MicroStep
from tests.helpers import assert_graphed_steps_match_eager, assert_rel_close, lora_grads, lora_model, random_rows


def test_is_right_padded():
    assert is_right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not is_right_padded(torch.tensor([[1, 1, 1], [0, 1, 1]]))
    assert is_right_padded(None)


def test_replay_reattaches_grads_set_to_none_or_replaced():
    """A graph adds into the .grad tensors it saw at capture: after zero_grad(set_to_none=True)
    or a replaced .grad, the next replay must add into tensors the optimizer reads."""
    from gemmatune.training.step import _Graph

    param = torch.nn.Parameter(torch.zeros(3))
    captured = torch.full((3,), 5.0)
    graph = _Graph.__new__(_Graph)  # no CUDA graph needed for the bookkeeping
    graph.grads = [(param, captured)]
    param.grad = None
    graph.reattach_grads()
    assert param.grad is captured and torch.equal(captured, torch.zeros(3))
    param.grad = torch.ones(3)
    graph.reattach_grads()
    assert param.grad is captured and torch.equal(captured, torch.ones(3))


def test_collate_rounds_length_up():
    rows = random_rows(3, min_len=5, max_len=40)
    batch = collate(rows, pad_token_id=0, pad_to_multiple_of=64)
    assert batch["input_ids"].shape[1] == 64
    assert batch["attention_mask"].sum() == sum(len(r["input_ids"]) for r in rows)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def loss_and_grads(model, inputs, labels, n):
    """Plain-PyTorch loss of model(**inputs) exactly as given (mask or not), and LoRA grads."""
    from gemmatune.kernels.fused_linear_ce import fused_linear_cross_entropy_reference
    from gemmatune.training.loss import shifted_labels, unwrap

    model.zero_grad(set_to_none=True)
    base = unwrap(model)
    hidden = base.model(**inputs, use_cache=False).last_hidden_state
    loss = fused_linear_cross_entropy_reference(hidden.flatten(0, 1), base.lm_head.weight,
                                                shifted_labels(labels).flatten(), normalizer=n)
    loss.backward()
    return loss.detach(), lora_grads(model)


def test_model_inputs_drops_only_a_right_padded_mask():
    mask = torch.tensor([[1, 1, 0]])
    assert set(model_inputs({"input_ids": mask, "attention_mask": mask, "labels": mask})) == {"input_ids"}
    left = torch.tensor([[0, 1, 1]])
    assert "attention_mask" in model_inputs({"input_ids": left, "attention_mask": left})
    # image batches too (E2B/E4B attend causally over image tokens); the towers' own masks stay
    media = model_inputs({"input_ids": mask, "attention_mask": mask, "pixel_values": mask, "image_position_ids": mask})
    assert set(media) == {"input_ids", "pixel_values", "image_position_ids"}


def test_right_padded_batch_needs_no_attention_mask(tiny_dir):
    """What dropping the mask relies on: without it, a right-padded batch gives the same
    loss and LoRA gradients as with it (a causal token never sees later padding)."""
    model, _ = lora_model()
    model.train()
    batch = collate(random_rows(4, seed=3, min_len=20, max_len=30), pad_token_id=0, pad_to_multiple_of=8)
    assert (batch["attention_mask"] == 0).any(), "the test needs padding"
    n = count_label_tokens([batch])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    loss_masked, grads_masked = loss_and_grads(model, {"input_ids": ids, "attention_mask": mask}, batch["labels"], n)
    loss_plain, grads_plain = loss_and_grads(model, {"input_ids": ids}, batch["labels"], n)
    assert torch.isfinite(loss_masked)
    assert_rel_close(loss_plain, loss_masked, 1e-5, "loss")
    for name in grads_masked:
        assert_rel_close(grads_plain[name], grads_masked[name], 1e-4, name)


def test_long_padding_gives_finite_gradients(tiny_dir):
    """Regression: padding longer than the sliding window turned LoRA gradients into NaN on
    the GPU (padding rows with no key to attend to: SDPA's CUDA kernels return NaN there;
    its CPU kernel returns 0, so on CPU this checks the path; the GPU test below compares
    the eager step, which had the NaN, with the graph)."""
    model, _ = lora_model()
    model.train()
    window = unwrap_config(model).sliding_window
    long_row = random_rows(1, seed=2, min_len=3 * window, max_len=3 * window + 1)
    rows = random_rows(2, seed=1, min_len=8, max_len=9) + long_row
    batch = collate(rows, pad_token_id=0)
    assert (batch["attention_mask"] == 0).sum(1).max() > 2 * window
    n = count_label_tokens([batch])
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch, normalizer=n)
    loss.backward()
    assert torch.isfinite(loss)
    for name, grad in lora_grads(model).items():
        assert torch.isfinite(grad).all(), name


def unwrap_config(model):
    from gemmatune.training.loss import unwrap

    return unwrap(model).config.get_text_config()


def test_micro_step_on_cpu_is_the_eager_step(tiny_dir):
    model, _ = lora_model()
    enable_gradient_checkpointing(model, "offload")
    model.train()
    step = MicroStep(model)
    assert "no CUDA" in step.describe()
    batches = [collate(random_rows(2, seed=s), pad_token_id=0) for s in (5, 6)]  # two lengths
    n = count_label_tokens(batches)
    losses = [step(b, normalizer=n) for b in batches]
    grads = lora_grads(model)

    enable_gradient_checkpointing(model, "off")
    model.zero_grad(set_to_none=True)
    expected = []
    for b in batches:
        loss = causal_lm_loss(model, b, normalizer=n)
        loss.backward()
        expected.append(loss.detach())
    for got, want in zip(losses, expected):
        assert_rel_close(got, want, 1e-5, "loss")
    reference = lora_grads(model)
    for name in reference:
        assert_rel_close(grads[name], reference[name], 1e-4, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replays_match_the_eager_step():
    from gemmatune.model.lora import add_lora
    from tests.helpers import load_tiny

    results = {}
    for graphs in (False, True):
        model, _ = load_tiny(load_in_4bit=True, dtype="bfloat16", device="cuda")
        model = add_lora(model, r=8, seed=0)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        enable_gradient_checkpointing(model, "offload")
        model.train()
        step = MicroStep(model, cuda_graphs=graphs)
        losses, grads = [], []
        for seed in range(4):  # same shape: eager, capture + replay, replay, replay
            batch = collate(random_rows(2, seed=seed, min_len=30, max_len=60), pad_token_id=0, pad_to_multiple_of=64)
            losses.append(step(batch, normalizer=count_label_tokens([batch])))
            grads.append(lora_grads(model))
            model.zero_grad(set_to_none=False)
        assert ("on" in step.describe()) == graphs, step.describe()
        results[graphs] = losses, grads
    assert_graphed_steps_match_eager(results)
