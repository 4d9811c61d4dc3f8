"""No run is lost to a full disk, a second run in the same folder, or a resume onto the wrong model.

The full-disk cases run in a child process with a small tmpfs mounted on its output folder (its own
user and mount namespace), so the writes fail where a real full disk makes them fail. Where no
namespace can be made, the same child replaces the one call that writes with one that raises ENOSPC.
"""
import json
import signal
from pathlib import Path

import pytest
import torch

import gemmatune
import gemmatune.training.checkpoints as training_checkpoints
from gemmatune.errors import CheckpointError, TrainingSetupError
from gemmatune.training.run_lock import LOCK_FILE
from gemmatune.training.saving import save_sizes
from tests.helpers import load_tiny
from tests.subprocess_helpers import Child, child_env, python, small_filesystem_command

FAST = dict(batch_size=4, grad_accum=1, learning_rate=5e-3, warmup_steps=2, dashboard="off")

DISK_SCRIPT = """
import errno, json, os, shutil, sys
from collections import namedtuple
import gemmatune
import gemmatune.training.saving as saving

output_dir, mode = sys.argv[1], sys.argv[2]
fake = os.environ.get("FAKE_DISK") == "1"  # no small filesystem could be made: fake the one failing call
if fake and mode == "refuse":
    real_usage, Usage = shutil.disk_usage, namedtuple("Usage", "total used free")
    shutil.disk_usage = lambda path: Usage(2**20, 2**20 - 400_000, 400_000) if str(path).startswith(output_dir) \\
        else real_usage(path)
if mode == "fill":  # after the first checkpoint another program fills the disk
    real_save, calls = saving.save_checkpoint, []

    def filling_save(model, tokenizer, optimizer, state, folder, run_id=None):
        calls.append(folder)
        if len(calls) == 2:
            if fake:
                import safetensors.torch
                real_file = safetensors.torch.save_file

                def no_space(tensors, filename, *args, **kwargs):
                    if str(filename).startswith(output_dir):
                        raise OSError(errno.ENOSPC, "No space left on device")
                    return real_file(tensors, filename, *args, **kwargs)

                safetensors.torch.save_file = no_space
            else:
                with open(os.path.join(output_dir, "another-programs-file"), "wb") as f:
                    f.write(bytes(max(0, shutil.disk_usage(output_dir).free - 8192)))
        return real_save(model, tokenizer, optimizer, state, folder, run_id)

    saving.save_checkpoint = filling_save
model, tokenizer = gemmatune.load_model(gemmatune.TINY_MODEL_ID, load_in_4bit=False, dtype="float32", verbose=False)
model = gemmatune.add_lora(model, r=8)
dataset = gemmatune.prepare_dataset("bundled", tokenizer, max_seq_length=128)
report = {}
try:
    gemmatune.train(model, dataset, tokenizer, max_steps=6, save_every=2, keep_checkpoints=2, batch_size=2,
                    grad_accum=1, output_dir=output_dir, dashboard="text")
except gemmatune.errors.GemmatuneError as error:
    report["error"] = f"{type(error).__name__}: {error}"
report["listing"] = sorted(os.listdir(output_dir))
state_file = os.path.join(output_dir, "checkpoint-2", "trainer_state.json")
if os.path.isfile(state_file):
    report["checkpoint-2 step"] = json.load(open(state_file))["state"]["step"]
print("REPORT " + json.dumps(report), flush=True)
"""


def _run_disk_script(tmp_path, mode, size_kib) -> tuple[dict, Child]:
    script, out = tmp_path / "train.py", tmp_path / "out"
    script.write_text(DISK_SCRIPT)
    out.mkdir()
    command = python(script, out, mode)
    small = small_filesystem_command(out, size_kib, command)
    env = child_env(TMPDIR=str(tmp_path / "elsewhere"), FAKE_DISK="0" if small else "1")
    (tmp_path / "elsewhere").mkdir()
    child = Child(small or command, cwd=tmp_path, env=env)
    assert child.wait(300) == 0, child.err[-3000:]
    line = next(line for line in child.stdout if line.startswith("REPORT "))
    return json.loads(line[len("REPORT "):]), child


def test_too_little_free_space_is_refused_before_the_first_step_with_the_numbers(tmp_path, tiny_dir):
    report, child = _run_disk_script(tmp_path, "refuse", size_kib=512)
    assert report["error"].startswith("TrainingSetupError: output_dir"), report
    assert "free, and this run's saves need" in report["error"] and "3 resumable checkpoint(s)" in report["error"]
    assert "step 1/" not in child.out  # refused before any training
    assert not [name for name in report["listing"] if name.startswith(("checkpoint-", "adapter", "."))], report


def test_a_save_that_fails_on_a_full_disk_keeps_the_last_good_one_and_the_weights(tmp_path, tiny_dir):
    report, child = _run_disk_script(tmp_path, "fill", size_kib=6144)
    error = report["error"]
    assert error.startswith("SaveError: could not save to"), report
    assert "No space left on device" in error and "the last good checkpoint is" in error
    assert f"{tmp_path / 'out' / 'checkpoint-2'} (step 2)" in error
    rescued = Path(error.split(" were saved to ")[1].split(" instead")[0])
    assert rescued.is_relative_to(tmp_path / "elsewhere") and rescued.name == "checkpoint-4"
    assert report["checkpoint-2 step"] == 2  # the previous good save is intact
    assert not [name for name in report["listing"] if ".partial" in name], report  # nothing half-written left
    assert "checkpoint-4" not in report["listing"] and "adapter" not in report["listing"]

    model, tokenizer = load_tiny()  # the rescued weights resume like any checkpoint
    model = gemmatune.add_lora(model, r=8)
    dataset = gemmatune.prepare_dataset("bundled", tokenizer, max_seq_length=128)
    result = gemmatune.train(model, dataset, tokenizer, max_steps=5, batch_size=2, grad_accum=1, dashboard="off",
                             output_dir=str(tmp_path / "resumed"), resume_from=str(rescued))
    assert result.status == "done" and result.state.step == 5 and len(result.losses) == 5


def test_the_space_estimate_covers_a_real_checkpoint(tmp_path, dataset):
    model, tokenizer = _lora_model()
    gemmatune.train(model, dataset, tokenizer, max_steps=2, save_every=1, output_dir=str(tmp_path), **FAST)
    written = sum(f.stat().st_size for f in (tmp_path / "checkpoint-1").iterdir())
    estimate = save_sizes(model, tokenizer, "adamw_8bit", tmp_path)["checkpoint"]
    assert written <= estimate <= 1.5 * written + 2**20


@pytest.fixture(scope="module")
def dataset(tiny_dir, tiny_tokenizer):
    return gemmatune.prepare_dataset("bundled", tiny_tokenizer, max_seq_length=128)


def _lora_model():
    model, tokenizer = load_tiny()
    return gemmatune.add_lora(model, r=8), tokenizer


def test_a_stale_partial_save_is_removed(tmp_path, dataset, capsys):
    stale = tmp_path / ".checkpoint-3.partial-12345-1700000000000"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    model, tokenizer = _lora_model()
    gemmatune.train(model, dataset, tokenizer, max_steps=1, output_dir=str(tmp_path), **FAST)
    assert not stale.exists()
    assert f"removed {stale}" in capsys.readouterr().out


# ------------------------------------------------------------------ one run per output_dir
LOCK_SCRIPT = """
import sys, time
from gemmatune.training.run_lock import RunLock
with RunLock(sys.argv[1]):
    print("LOCKED", flush=True)
    time.sleep(600)
"""


def test_a_second_run_in_the_same_folder_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, dataset, capsys):
    script = tmp_path / "hold.py"
    script.write_text(LOCK_SCRIPT)
    out = tmp_path / "run"
    holder = Child(python(script, out), cwd=tmp_path)
    try:
        holder.wait_for("LOCKED")
        model, tokenizer = _lora_model()
        with pytest.raises(TrainingSetupError, match=f"another run is writing to {out}: process {holder.process.pid} "
                                                     r"on .* \(started"):
            gemmatune.train(model, dataset, tokenizer, max_steps=1, output_dir=str(out), **FAST)
        assert not (out / "adapter").exists()
    finally:
        holder.signal(signal.SIGKILL)  # the holder dies without releasing its lock
        holder.wait()
    assert (out / LOCK_FILE).is_file()
    result = gemmatune.train(model, dataset, tokenizer, max_steps=1, output_dir=str(out), **FAST)
    assert result.status == "done"
    assert f"process {holder.process.pid}" in capsys.readouterr().out  # the takeover is noted
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_pruning_never_deletes_a_folder_another_run_wrote(tmp_path):
    def checkpoint(name, run_id):
        folder = tmp_path / name
        folder.mkdir()
        (folder / training_checkpoints.STATE_JSON).write_text(json.dumps({"run": {"id": run_id}}))
        return folder

    written = [checkpoint("checkpoint-1", "another run"), checkpoint("checkpoint-2", "mine"),
               checkpoint("checkpoint-3", "mine")]
    left = training_checkpoints.prune_checkpoints(written, keep=1, run_id="mine")
    assert left == written[-1:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3"]


# ------------------------------------------------------------------ resuming
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dataset):
    """Read, never changed, by the tests that resume from it."""
    folder = tmp_path_factory.mktemp("first")
    model, tokenizer = _lora_model()
    gemmatune.train(model, dataset, tokenizer, max_steps=3, save_every=2, output_dir=str(folder), **FAST)
    return folder / "checkpoint-2"


def test_resuming_onto_another_base_model_of_the_same_shapes_is_refused(checkpoint, dataset, tmp_path):
    model, tokenizer = load_tiny()
    with torch.no_grad():  # the same shapes, other weights: as an -it checkpoint and its base model
        for name, param in model.named_parameters():
            if "norm" in name:
                param.mul_(1.2)
    model = gemmatune.add_lora(model, r=8)
    with pytest.raises(CheckpointError, match="same shapes but other weights"):
        gemmatune.train(model, dataset, tokenizer, max_steps=4, output_dir=str(tmp_path / "again"),
                        resume_from=str(checkpoint), **FAST)


def test_resuming_onto_other_shapes_says_which(checkpoint, dataset, tmp_path):
    model, tokenizer = _lora_model()
    model.config.vocab_size = 1024  # as if another checkpoint of the family: the recorded shapes differ
    with pytest.raises(CheckpointError, match="vocab_size 512 there, 1024 here"):
        gemmatune.train(model, dataset, tokenizer, max_steps=4, output_dir=str(tmp_path / "again"),
                        resume_from=str(checkpoint), **FAST)


def test_resuming_with_another_batch_geometry_warns(checkpoint, dataset, tmp_path, capsys):
    model, tokenizer = _lora_model()
    settings = {**FAST, "batch_size": 2, "grad_accum": 2}
    result = gemmatune.train(model, dataset, tokenizer, max_steps=3, output_dir=str(tmp_path / "again"),
                             resume_from=str(checkpoint), **settings)
    assert result.status == "done"
    out = capsys.readouterr().out
    assert "WARNING: the checkpoint's run took other rows per step (batch 4 x 1 accumulation there, batch 2 x 2" in out


def test_resuming_with_the_same_settings_is_silent(checkpoint, dataset, tmp_path, capsys):
    model, tokenizer = _lora_model()
    gemmatune.train(model, dataset, tokenizer, max_steps=3, output_dir=str(tmp_path / "again"),
                    resume_from=str(checkpoint), **FAST)
    out = capsys.readouterr().out
    assert "WARNING" not in out and "note:" not in out
