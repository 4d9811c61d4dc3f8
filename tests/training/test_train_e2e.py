"""The notebook's flow end to end on the tiny model (float32, CPU): train, checkpoint, resume,
interrupt, save, reload, chat. Each run is a few steps of batch 4 on 16 bundled rows, which the
random tiny model can start to fit within 8 steps (on all 350 rows the loss is too noisy to judge).

The kernels take their PyTorch reference path here (GEMMATUNE_KERNELS=0), as on a user's CPU:
through the Triton interpreter each step would take seconds. tests/kernels checks the kernels and
test_patching the patched model."""
import importlib
import json

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

import gemmatune
import gemmatune.training.dashboard as training_dashboard
from gemmatune.generation.replies import stop_token_ids
from tests.helpers import load_tiny

FAST = dict(batch_size=4, grad_accum=1, learning_rate=5e-3, warmup_steps=2, dashboard="off")


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("GEMMATUNE_KERNELS", "0")


@pytest.fixture(scope="module")
def dataset(tiny_dir, tiny_tokenizer):
    rows = gemmatune.data.rows.bundled_dataset_path().read_text(encoding="utf-8").splitlines()[:16]
    return gemmatune.prepare_dataset([json.loads(row) for row in rows], tiny_tokenizer, max_seq_length=256)


def lora_model():
    model, tokenizer = load_tiny()
    return gemmatune.add_lora(model, r=8), tokenizer


def adapter_weights(model) -> dict:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_loss_falls(dataset, tmp_path):
    model, tokenizer = lora_model()
    result = gemmatune.train(model, dataset, tokenizer, max_steps=8, output_dir=str(tmp_path), **FAST)
    assert result.status == "done" and len(result.losses) == 8
    assert result.loss_fell(), f"loss did not fall: {result.losses}"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert result.summary.steps == 8


def test_checkpoints_are_pruned_and_resume_continues_exactly(dataset, tmp_path):
    model, tokenizer = lora_model()
    full = gemmatune.train(model, dataset, tokenizer, max_steps=6, output_dir=str(tmp_path / "full"),
                           save_every=2, keep_checkpoints=2, **FAST)
    # checkpoints at steps 2 and 4 (the end is saved as the adapter), the oldest beyond 2 pruned
    assert sorted(p.name for p in (tmp_path / "full").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    model, tokenizer = lora_model()  # a fresh process would start like this
    resumed = gemmatune.train(model, dataset, tokenizer, max_steps=6, output_dir=str(tmp_path / "resumed"),
                              resume_from=str(tmp_path / "full" / "checkpoint-4"), **FAST)
    assert resumed.state.step == 6 and len(resumed.losses) == 6
    assert resumed.losses[:4] == full.losses[:4]  # carried over from the checkpoint
    # same data order, optimizer state and weights: the steps after the checkpoint repeat
    assert resumed.losses[4:] == pytest.approx(full.losses[4:], rel=1e-4)
    assert resumed.state.tokens_trained == full.state.tokens_trained


def test_interrupt_saves_a_loadable_adapter(dataset, tmp_path, monkeypatch):
    real_update = training_dashboard.Dashboard.update

    def update(self, step, *args, **kwargs):  # the user presses stop after step 3
        real_update(self, step, *args, **kwargs)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(training_dashboard.Dashboard, "update", update)
    model, tokenizer = lora_model()
    result = gemmatune.train(model, dataset, tokenizer, max_steps=20, output_dir=str(tmp_path), **FAST)
    assert result.status == "interrupted" and result.state.step == 3 and len(result.losses) == 3
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()

    trained = adapter_weights(model)
    fresh, _ = load_tiny()
    reloaded = gemmatune.load_adapter(fresh, adapter)
    loaded = adapter_weights(reloaded)
    assert loaded.keys() == trained.keys() and trained
    for name, weight in trained.items():
        assert torch.equal(loaded[name], weight), name
    assert any(w.abs().sum() > 0 for n, w in trained.items() if "lora_B" in n)  # it did train


def test_saving_over_an_adapter_keeps_the_old_one(tmp_path):
    model, tokenizer = lora_model()
    first = gemmatune.save_adapter(model, tokenizer, tmp_path / "adapter")
    before = load_file(first / "adapter_model.safetensors")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)
    gemmatune.save_adapter(model, tokenizer, tmp_path / "adapter")
    previous = load_file(tmp_path / "adapter.previous-1" / "adapter_model.safetensors")
    latest = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert previous.keys() == before.keys()
    assert all(torch.equal(previous[k], before[k]) for k in before)
    assert any(not torch.equal(latest[k], before[k]) for k in before)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8
    assert not list(tmp_path.glob(".adapter.partial-*"))  # no half-written folder left behind


def test_chat_returns_text_and_stops_at_turn_end(tiny_tokenizer, monkeypatch):
    model, tokenizer = load_tiny()
    word = tokenizer.convert_tokens_to_ids("▁the") if "▁the" in tokenizer.get_vocab() else 300
    turn_end = tokenizer.convert_tokens_to_ids("<turn|>")
    assert turn_end in stop_token_ids(tokenizer)
    forced, calls = [word, word, turn_end], []

    def force_next_token(module, inputs, logits):  # the lm_head: make the i-th generated token forced[i]
        i = min(len(calls), len(forced) - 1)
        calls.append(i)
        logits = logits.clone()
        logits[:, -1, forced[i]] += 1e4
        return logits

    hook = model.get_output_embeddings().register_forward_hook(force_next_token)
    chat_module = importlib.import_module("gemmatune.generation.replies")
    stream_tokens, lengths = chat_module.stream_tokens, []

    def spy(*args, **kwargs):
        chunks = list(stream_tokens(*args, **kwargs))
        lengths.append(sum(chunk.shape[1] for chunk in chunks))  # new tokens only
        yield from chunks

    monkeypatch.setattr(chat_module, "stream_tokens", spy)
    reply = gemmatune.chat(model, tokenizer, "Say something.", max_new_tokens=30, stream=False)
    assert isinstance(reply, str)
    assert reply == tokenizer.decode([word, word], skip_special_tokens=True).strip()
    assert lengths == [3]  # stopped at <turn|>, long before max_new_tokens

    monkeypatch.undo()
    hook.remove()  # the random model, a message list, cut at max_new_tokens
    noise = gemmatune.chat(model, tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=5,
                           stream=False)
    assert isinstance(noise, str)
