"""SIGTERM and Ctrl-C stop a run with a resumable checkpoint, written exactly once, and a second
signal during that save is told to wait: real signals to real processes (tiny model, CPU)."""
import json
import os
import re
import shlex
import signal
import sys

import pytest

from gemmatune.training.stop_signals import StopSignals
from tests.subprocess_helpers import Child, python

TRAIN_SCRIPT = """
import json, sys, time
import gemmatune
import gemmatune.training.saving as saving

output_dir, slow = sys.argv[1], sys.argv[2] == "slow"
if slow:  # a save long enough to press Ctrl-C during it
    real_save = saving.save_checkpoint

    def slow_save(*args, **kwargs):
        print("SAVING", flush=True)
        time.sleep(4)
        return real_save(*args, **kwargs)

    saving.save_checkpoint = slow_save
model, tokenizer = gemmatune.load_model(gemmatune.TINY_MODEL_ID, load_in_4bit=False, dtype="float32", verbose=False)
model = gemmatune.add_lora(model, r=8)
dataset = gemmatune.prepare_dataset("bundled", tokenizer, max_seq_length=128)
result = gemmatune.train(model, dataset, tokenizer, max_steps=100000, batch_size=2, grad_accum=1, warmup_steps=1,
                         output_dir=output_dir, dashboard="text")
print("RESULT " + json.dumps({"status": result.status, "step": result.state.step, "stopped_by": result.stopped_by,
                              "checkpoint": result.checkpoint_dir}), flush=True)
"""


def _result(child) -> dict:
    line = next(line for line in child.stdout if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _checkpoint_step(folder) -> int:
    return json.loads((folder / "trainer_state.json").read_text())["state"]["step"]


def test_sigterm_on_the_command_line_saves_a_checkpoint_once_and_prints_how_to_resume(tmp_path, tiny_dir):
    """The issue's case: `timeout 14 python -m gemmatune train --steps 200 --output-dir run1` left an empty folder."""
    args = ["train", "--steps", "100000", "--output-dir", "run1", "--save-every", "0", "--batch-size", "2",
            "--grad-accum", "1", "--max-seq-length", "128"]
    child = Child(python("-m", "gemmatune", *args), cwd=tmp_path)
    child.wait_for("step 1/")  # training has begun
    child.signal(signal.SIGTERM)
    assert child.wait() == 128 + signal.SIGTERM, child.err[-2000:]
    checkpoints = sorted((tmp_path / "run1").glob("checkpoint-*"))
    assert len(checkpoints) == 1, checkpoints  # exactly once
    step = _checkpoint_step(checkpoints[0])
    assert step >= 1 and checkpoints[0].name == f"checkpoint-{step}"
    assert not list((tmp_path / "run1").glob("*.previous-*")) and not list((tmp_path / "run1").glob(".*partial*"))
    assert (tmp_path / "run1" / "adapter" / "adapter_model.safetensors").is_file()
    hint = re.search(r"continue with: (python -m gemmatune train .*)$", child.out, re.MULTILINE)
    assert hint and f"--resume-from run1/checkpoint-{step}" in hint.group(1), child.out[-2000:]

    resume = shlex.split(hint.group(1))[3:]  # the printed command, run for two more steps
    resume[resume.index("--steps") + 1] = str(step + 2)
    again = Child(python("-m", "gemmatune", *resume), cwd=tmp_path)
    assert again.wait() == 0, again.err[-2000:]
    assert f"done at step {step + 2}/{step + 2}" in again.out


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_second_signal_during_the_save_is_told_to_wait_and_the_save_completes(tmp_path, tiny_dir, first):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    child = Child(python(script, tmp_path / "out", "slow"), cwd=tmp_path)
    child.wait_for("step 1/")
    child.signal(first)
    child.wait_for("SAVING")
    child.signal(signal.SIGINT)  # a second Ctrl-C while the checkpoint is written
    child.wait_for("please wait", stream="stderr")
    child.signal(signal.SIGTERM)  # and a third signal
    assert child.wait() == 0, child.err[-2000:]
    result = _result(child)
    assert result["status"] == "interrupted" and result["stopped_by"] == signal.Signals(first).name
    checkpoint = tmp_path / "out" / f"checkpoint-{result['step']}"
    assert result["checkpoint"] == str(checkpoint)
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == [checkpoint.name]
    assert _checkpoint_step(checkpoint) == result["step"]
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "trainer_state.safetensors").is_file()
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert child.err.count("please wait") >= 2


def _send(number):
    os.kill(os.getpid(), number)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_signal_inside_a_critical_section_interrupts_right_after_it():
    with StopSignals() as signals:
        done = []
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            with signals.critical():
                _send(signal.SIGTERM)
                done.append("the update finished")
        assert done == ["the update finished"]
        assert signals.first == signal.SIGTERM


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_signals_during_a_final_save_never_interrupt_it(capsys):
    with StopSignals() as signals:
        with signals.saving("checkpoint-7", interrupt_after=False):
            _send(signal.SIGINT)
            _send(signal.SIGTERM)
            written = "all of it"
        assert written == "all of it" and len(signals.received) == 2
    assert capsys.readouterr().err.count("please wait") == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_a_signal_during_a_periodic_checkpoint_stops_after_it_without_writing_it_twice(tmp_path, tiny_dir,
                                                                                      monkeypatch):
    import gemmatune
    import gemmatune.training.saving as training_saving
    from tests.helpers import load_tiny

    real_save = training_saving.save_checkpoint

    def save_while_signalled(*args, **kwargs):
        _send(signal.SIGINT)  # Ctrl-C while checkpoint-2 is being written
        return real_save(*args, **kwargs)

    monkeypatch.setattr(training_saving, "save_checkpoint", save_while_signalled)
    monkeypatch.setenv("GEMMATUNE_KERNELS", "0")
    model, tokenizer = load_tiny()
    model = gemmatune.add_lora(model, r=8)
    dataset = gemmatune.prepare_dataset("bundled", tokenizer, max_seq_length=128)
    result = gemmatune.train(model, dataset, tokenizer, max_steps=10, save_every=2, batch_size=2, grad_accum=1,
                             dashboard="off", output_dir=str(tmp_path))
    assert result.status == "interrupted" and result.state.step == 2 and result.stopped_by == "SIGINT"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["adapter", "checkpoint-2"]
    assert result.checkpoint_dir == str(tmp_path / "checkpoint-2")
