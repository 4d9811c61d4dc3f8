"""What a new user runs into, on the tiny model: each mistake stops early with a message that says
what to do, and no mistake costs a user's saved work."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gemmatune
import gemmatune.model.loader as model_loader
import gemmatune.training.checkpoints as training_checkpoints
from gemmatune.errors import CheckpointError, GemmatuneError, ModelLoadError, TrainingSetupError
from tests.helpers import REPO, load_tiny, random_rows

FAST = dict(batch_size=4, grad_accum=1, learning_rate=5e-3, warmup_steps=2, dashboard="off")
ROOT = REPO


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("GEMMATUNE_KERNELS", "0")


@pytest.fixture(scope="module")
def rows():
    lines = gemmatune.data.rows.bundled_dataset_path().read_text(encoding="utf-8").splitlines()[:16]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def dataset(tiny_dir, tiny_tokenizer, rows):
    return gemmatune.prepare_dataset(rows, tiny_tokenizer, max_seq_length=256)


def lora_model():
    model, tokenizer = load_tiny()
    return gemmatune.add_lora(model, r=8), tokenizer


# ------------------------------------------------------------------ data that trains nothing
def test_an_empty_dataset_is_refused_before_the_first_step(tmp_path, tiny_tokenizer):
    model, tokenizer = lora_model()
    empty = gemmatune.prepare_dataset([], tiny_tokenizer)
    with pytest.raises(TrainingSetupError, match="no rows to train on: 0 rows"):
        gemmatune.train(model, empty, tokenizer, max_steps=2, output_dir=str(tmp_path), **FAST)
    assert not (tmp_path / "adapter").exists()


def test_a_dataset_whose_every_row_was_dropped_says_how_many_and_why(tmp_path, rows, tiny_tokenizer):
    model, tokenizer = lora_model()
    cut = gemmatune.prepare_dataset(rows, tiny_tokenizer, max_seq_length=4)  # only the prompt fits
    assert cut.rows == 0 and cut.rows_dropped_untrained == len(rows)
    with pytest.raises(TrainingSetupError, match=f"{len(rows)} dropped .*{len(rows)} with no answer token left"):
        gemmatune.train(model, cut, tokenizer, max_steps=2, output_dir=str(tmp_path), **FAST)


# ------------------------------------------------------------------ settings
def test_max_steps_zero_is_refused_and_touches_no_save(tmp_path, dataset):
    model, tokenizer = lora_model()
    first = gemmatune.train(model, dataset, tokenizer, max_steps=1, output_dir=str(tmp_path), **FAST)
    saved = load_file(Path(first.adapter_dir) / "adapter_model.safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())
    for steps in (0, -1):
        with pytest.raises(TrainingSetupError, match=f"max_steps={steps}"):
            gemmatune.train(model, dataset, tokenizer, max_steps=steps, output_dir=str(tmp_path), **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing saved, nothing rotated away
    again = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(again[k], v) for k, v in saved.items())


def test_an_unwritable_output_dir_fails_before_training(tmp_path, dataset, monkeypatch):
    model, tokenizer = lora_model()
    steps = []
    monkeypatch.setattr(gemmatune.training.trainer.MicroStep, "__call__", lambda self, *a, **k: steps.append(1))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(TrainingSetupError, match="is not writable"):
        gemmatune.train(model, dataset, tokenizer, max_steps=2, output_dir=str(blocker / "run"), **FAST)
    assert steps == []  # refused before any step ran


def test_resuming_a_finished_run_is_refused(tmp_path, dataset):
    model, tokenizer = lora_model()
    gemmatune.train(model, dataset, tokenizer, max_steps=2, save_every=1, output_dir=str(tmp_path), **FAST)
    model, tokenizer = lora_model()
    with pytest.raises(TrainingSetupError, match="at step 1 and max_steps is 1: nothing is left to train"):
        gemmatune.train(model, dataset, tokenizer, max_steps=1, output_dir=str(tmp_path / "again"),
                        resume_from=str(tmp_path / "checkpoint-1"), **FAST)


def test_a_gradient_left_by_an_earlier_backward_does_not_change_training(tmp_path, dataset):
    clean, tokenizer = lora_model()
    dirty, _ = lora_model()
    batch = gemmatune.data.batches.collate(random_rows(2), pad_token_id=0)
    gemmatune.training.loss.causal_lm_loss(dirty, batch, normalizer=10.0, fused=False).backward()  # e.g. a user's check
    runs = [gemmatune.train(m, dataset, tokenizer, max_steps=3, output_dir=str(tmp_path / n), **FAST)
            for n, m in (("clean", clean), ("dirty", dirty))]
    assert runs[0].losses == runs[1].losses


# ------------------------------------------------------------------ saved work
def test_every_earlier_save_is_kept_numbered(tmp_path, capsys):
    model, tokenizer = lora_model()
    contents = []
    for value in (0.1, 0.2, 0.3):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.fill_(value)
        gemmatune.save_adapter(model, tokenizer, tmp_path / "adapter")
        contents.append(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "the earlier save is kept as" in capsys.readouterr().out
    for folder, expected in (("adapter.previous-1", contents[0]), ("adapter.previous-2", contents[1]),
                             ("adapter", contents[2])):
        got = load_file(tmp_path / folder / "adapter_model.safetensors")
        assert all(torch.equal(got[k], v) for k, v in expected.items()), folder


def test_pruning_keeps_checkpoints_of_earlier_runs(tmp_path, dataset):
    model, tokenizer = lora_model()
    gemmatune.train(model, dataset, tokenizer, max_steps=6, save_every=2, keep_checkpoints=1,
                    output_dir=str(tmp_path), **FAST)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4"]
    model, tokenizer = lora_model()  # a second, shorter run into the same folder
    gemmatune.train(model, dataset, tokenizer, max_steps=3, save_every=1, keep_checkpoints=1,
                    output_dir=str(tmp_path), **FAST)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@pytest.fixture()
def checkpoint(tmp_path, dataset):
    model, tokenizer = lora_model()
    gemmatune.train(model, dataset, tokenizer, max_steps=3, save_every=2, output_dir=str(tmp_path), **FAST)
    return tmp_path / "checkpoint-2"


def _adapter_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("broken", ["adapter_model.safetensors", "trainer_state.json", "trainer_state.safetensors"])
def test_a_truncated_checkpoint_file_is_named_and_leaves_the_model_alone(checkpoint, dataset, broken):
    file = checkpoint / broken
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    model, tokenizer = lora_model()
    before = _adapter_weights(model)
    with pytest.raises(CheckpointError, match=broken.replace(".", r"\.") + ".*broken"):
        gemmatune.train(model, dataset, tokenizer, max_steps=4, output_dir=str(checkpoint.parent / "resumed"),
                        resume_from=str(checkpoint), **FAST)
    after = _adapter_weights(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_checkpoint_of_other_lora_settings_is_refused_before_loading(checkpoint, dataset):
    model, tokenizer = load_tiny()
    model = gemmatune.add_lora(model, r=4)
    with pytest.raises(CheckpointError, match="does not fit this model's adapters.*other shape"):
        gemmatune.train(model, dataset, tokenizer, max_steps=4, output_dir=str(checkpoint.parent / "resumed"),
                        resume_from=str(checkpoint), **FAST)


class _Payload:
    def __reduce__(self):
        return (print, ("this ran while loading the checkpoint",))


def test_a_checkpoint_with_a_pickle_payload_is_refused(checkpoint, dataset, capsys):
    """A checkpoint someone sent: trainer_state.pt (the old format) carrying code. Refused, not run."""
    (checkpoint / training_checkpoints.STATE_JSON).unlink()
    (checkpoint / training_checkpoints.STATE_TENSORS).unlink()
    with open(checkpoint / training_checkpoints.LEGACY_STATE_FILE, "wb") as f:
        pickle.dump({"state": {"step": 2}, "optimizer": _Payload()}, f)
    model, tokenizer = lora_model()
    with pytest.raises(CheckpointError, match="could run code"):
        gemmatune.train(model, dataset, tokenizer, max_steps=4, output_dir=str(checkpoint.parent / "resumed"),
                        resume_from=str(checkpoint), **FAST)
    assert "this ran" not in capsys.readouterr().out


def test_checkpoints_hold_no_pickle(checkpoint):
    names = sorted(p.name for p in checkpoint.iterdir())
    assert training_checkpoints.STATE_JSON in names and training_checkpoints.STATE_TENSORS in names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl"))], names


def test_an_old_pickle_free_checkpoint_still_resumes(checkpoint, dataset, tmp_path):
    """trainer_state.pt as gemmatune wrote it before: plain tensors and containers, read with weights_only."""
    saved = training_checkpoints._read_state(checkpoint)
    saved["state"]["rng"] = saved.pop("rng")
    legacy = {"optimizer": saved["optimizer"], "state": saved["state"]}
    torch.save(legacy, checkpoint / training_checkpoints.LEGACY_STATE_FILE)
    (checkpoint / training_checkpoints.STATE_JSON).unlink()
    model, tokenizer = lora_model()
    result = gemmatune.train(model, dataset, tokenizer, max_steps=3, output_dir=str(tmp_path / "resumed"),
                             resume_from=str(checkpoint), **FAST)
    assert result.state.step == 3


# ------------------------------------------------------------------ loading a model
def test_load_model_says_what_to_do(tmp_path, tiny_dir):
    with pytest.raises(ModelLoadError, match="no model folder './no/such/folder'"):
        gemmatune.load_model("./no/such/folder", verbose=False)
    with pytest.raises(ModelLoadError, match="has no config.json"):
        gemmatune.load_model(str(tmp_path), verbose=False)
    model, tokenizer = lora_model()
    adapter = gemmatune.save_adapter(model, tokenizer, tmp_path / "my-adapter")
    with pytest.raises(ModelLoadError, match="is a LoRA adapter, not a model.*load_adapter"):
        gemmatune.load_model(str(adapter), verbose=False)


def test_an_unreachable_hub_fails_at_once(monkeypatch, tmp_path):
    import time

    monkeypatch.setattr(model_loader, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="not reachable from here.*TINY_MODEL_ID"):
        gemmatune.load_model("someone/not-cached-model", verbose=False)
    assert time.monotonic() - start < 10


# ------------------------------------------------------------------ the command line
def _cli(*args, cwd):
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "GEMMATUNE_KERNELS": "0", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO),  # this checkout's gemmatune, not an installed one
           **{k: v for k, v in __import__("os").environ.items() if k.startswith("GEMMATUNE_CACHE")}}
    return subprocess.run([sys.executable, "-m", "gemmatune", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_cli_trains_on_the_users_data_and_writes_checkpoints(tmp_path, tiny_dir, rows):
    data = tmp_path / "my.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    run = _cli("train", "--data", str(data), "--steps", "2", "--batch-size", "4", "--grad-accum", "1",
               "--save-every", "1", "--output-dir", str(tmp_path / "out"), "--max-seq-length", "256", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"your dataset '{data}'" in run.stdout and "8 rows" in run.stdout
    assert (tmp_path / "out" / "checkpoint-1" / training_checkpoints.STATE_JSON).is_file()


def test_cli_prints_a_users_mistake_as_one_line(tmp_path, tiny_dir):
    run = _cli("train", "--data", str(tmp_path / "missing.jsonl"), "--steps", "1", cwd=tmp_path)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("gemmatune: error: --data") and "missing.jsonl: no such file" in last
    assert "Loading weights" not in run.stderr  # refused before the model was loaded


def test_all_user_errors_share_one_base_class():
    for error in (CheckpointError, ModelLoadError, TrainingSetupError, gemmatune.data.rows.DatasetFormatError,
                  gemmatune.data.rows.DatasetDownloadError):
        assert issubclass(error, GemmatuneError)
