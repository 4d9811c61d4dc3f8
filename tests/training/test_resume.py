"""A run stopped at step k and resumed from its last checkpoint follows the uninterrupted run exactly.

Tiny model, float32, CPU, PyTorch reference path (as on a user's CPU). The stop is a KeyboardInterrupt
between steps, as the notebook's stop button or Ctrl-C gives; the resumed run starts in a fresh model,
as a new process would. Exactly: the same floats, step for step, and the same final adapter weights.
"""
import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict

import gemmatune
import gemmatune.training.dashboard as training_dashboard
from tests.helpers import load_tiny

SETTINGS = dict(max_steps=7, save_every=2, batch_size=4, grad_accum=2, learning_rate=5e-3, warmup_steps=2,
                dashboard="off")


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("GEMMATUNE_KERNELS", "0")


@pytest.fixture(scope="module")
def dataset(tiny_dir, tiny_tokenizer):
    rows = gemmatune.data.rows.bundled_dataset_path().read_text(encoding="utf-8").splitlines()[:24]
    return gemmatune.prepare_dataset([json.loads(row) for row in rows], tiny_tokenizer, max_seq_length=256)


def fresh_lora_model():
    model, tokenizer = load_tiny()
    return gemmatune.add_lora(model, r=8), tokenizer


def adapter_weights(model) -> dict:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_interrupted_and_resumed_run_follows_the_uninterrupted_one_exactly(dataset, tmp_path, monkeypatch):
    model, tokenizer = fresh_lora_model()
    uninterrupted = gemmatune.train(model, dataset, tokenizer, output_dir=str(tmp_path / "full"), **SETTINGS)
    final_weights = adapter_weights(model)

    real_update = training_dashboard.Dashboard.update

    def stop_after_step_5(self, step, *args, **kwargs):  # the user presses stop once step 5 is done
        real_update(self, step, *args, **kwargs)
        if step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(training_dashboard.Dashboard, "update", stop_after_step_5)
    model, tokenizer = fresh_lora_model()
    stopped = gemmatune.train(model, dataset, tokenizer, output_dir=str(tmp_path / "run"), **SETTINGS)
    assert stopped.status == "interrupted" and stopped.state.step == 5
    last = max((tmp_path / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert last.name == "checkpoint-5" == Path(stopped.checkpoint_dir).name  # the stop saved step 5, resumable
    monkeypatch.setattr(training_dashboard.Dashboard, "update", real_update)

    model, tokenizer = fresh_lora_model()  # a new process would start like this
    resumed = gemmatune.train(model, dataset, tokenizer, output_dir=str(tmp_path / "run"), resume_from=str(last),
                              **SETTINGS)
    assert resumed.status == "done" and resumed.state.step == 7
    assert stopped.losses == uninterrupted.losses[:5]
    assert resumed.losses == uninterrupted.losses  # steps 1-5 carried over, 6-7 computed: equal floats
    assert resumed.state.tokens_trained == uninterrupted.state.tokens_trained
    resumed_weights = adapter_weights(model)
    assert resumed_weights.keys() == final_weights.keys()
    assert all(torch.equal(resumed_weights[k], final_weights[k]) for k in final_weights)
