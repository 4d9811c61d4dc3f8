"""Several processes on the CPU (gloo, 2 ranks, the tiny model), as torchrun or accelerate runs them.

One launch of two spawned processes (`two_ranks`) runs four trainings in a row, each through
train()'s own process-group set-up from torchrun's environment variables (RANK, WORLD_SIZE,
MASTER_ADDR...): 2 ranks x batch 2 with checkpoints, a resume from its checkpoint, a run in which
rank 1 raises at step 2, and one in which rank 0 gets SIGTERM (what torchrun sends when it stops
a job) at step 2. The tests read what each rank recorded. Every process pays seconds of imports,
so the scenarios share processes; the command-line tests start torchrun and accelerate launch.

Float32 on the reference kernels (GEMMATUNE_KERNELS=0) with torch's AdamW and no clipping (Adam
and clipping would both hide a gradient off by a constant factor, such as a per-rank normaliser):
the comparisons with one process are exact up to float32 summation order (the ranks' gradients
are added in another order, and each rank pads its own rows to another length).
"""
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

import gemmatune
from gemmatune.training.loss import unwrap
from tests.helpers import REPO, load_tiny

ROOT = REPO
ROWS = 10  # global micro-batches of 4 rows: 4, 4, 2 per epoch, so rank 1 has no row in every third
TRAIN = dict(batch_size=2, grad_accum=2, max_steps=4, learning_rate=1e-3, warmup_steps=1, optimizer="adamw",
             max_grad_norm=0.0, pad_to_multiple_of=1, dashboard="off", save_every=2)
LAUNCH_TIMEOUT_S = 180  # a hang detector only: a healthy launch takes seconds
FAILURE_TIMEOUT_S = 120  # rank_timeout_s of the failure run: rank 0 must stop long before it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_dataset(tokenizer):
    rows = gemmatune.data.rows.bundled_dataset_path().read_text(encoding="utf-8").splitlines()[:ROWS]
    return gemmatune.prepare_dataset([json.loads(row) for row in rows], tokenizer, max_seq_length=96)


def lora_model(**load_kwargs):
    """The tiny model with an adapter that starts as if already trained (lora_B random, not zero):
    from zero, lora_A's first gradients are nearly zero, and Adam's g / sqrt(v) turns their float32
    rounding into updates of the full learning rate, of either sign."""
    model, tokenizer = load_tiny(**load_kwargs)
    model = gemmatune.add_lora(model, r=8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator).to(param.device))
    return model, tokenizer


def adapter_weights(model) -> dict:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def record_gradients(steps: list):
    """Append the gradients each optimizer step is given (after the all-reduce) to `steps`."""
    def record(optimizer, args, kwargs):
        steps.append([p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"]])
    return register_optimizer_step_pre_hook(record)


# ------------------------------------------------------------------ what each spawned rank runs
def _rank_main(rank: int, ports: list[int], folder: str) -> None:
    """One rank of the launch: torchrun's variables, then the three trainings; results to rank<r>.pt."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      GEMMATUNE_KERNELS="0")
    torch.set_num_threads(1)
    folder = Path(folder)
    record = {}

    def run(name: str, port: int, train) -> None:
        os.environ["MASTER_PORT"] = str(port)
        model, tokenizer = lora_model()
        try:
            result = train(model, tokenizer)
            record[name] = {"status": result.status, "losses": result.losses, "step": result.state.step}
        except BaseException as error:
            record[name] = {"error": f"{type(error).__name__}: {error}", "ended": time.time()}
        record[name]["weights"] = adapter_weights(model)
        torch.save(record, folder / f"rank{rank}.pt")

    def full(model, tokenizer):
        hook = record_gradients(record.setdefault("gradients", []))
        try:
            return gemmatune.train(model, tiny_dataset(tokenizer), tokenizer,
                                   output_dir=str(folder / f"full-{rank}"), **TRAIN)
        finally:
            hook.remove()

    def resumed(model, tokenizer):
        return gemmatune.train(model, tiny_dataset(tokenizer), tokenizer, output_dir=str(folder / f"resumed-{rank}"),
                               resume_from=str(folder / "full-0" / "checkpoint-2"), **TRAIN)

    def failing(model, tokenizer):
        if rank == 1:
            calls = []

            def raise_at_step_2(module, args):  # one embedding call per micro-step (no checkpointing)
                calls.append(1)
                if len(calls) == 2:
                    record["rank 1 raised at"] = time.time()
                    raise RuntimeError("rank 1 fails at step 2")

            unwrap(model).model.embed_tokens.register_forward_pre_hook(raise_at_step_2)
        config = {**TRAIN, "grad_accum": 1, "max_steps": 6, "save_every": 0}
        return gemmatune.train(model, tiny_dataset(tokenizer), tokenizer, output_dir=str(folder / f"failing-{rank}"),
                               gradient_checkpointing="off", rank_timeout_s=FAILURE_TIMEOUT_S, **config)

    def terminated(model, tokenizer):
        if rank == 0:
            calls = []

            def sigterm_at_step_2(module, args):
                calls.append(1)
                if len(calls) == 2:
                    os.kill(os.getpid(), signal.SIGTERM)

            unwrap(model).model.embed_tokens.register_forward_pre_hook(sigterm_at_step_2)
        config = {**TRAIN, "grad_accum": 1, "max_steps": 6, "save_every": 0}
        return gemmatune.train(model, tiny_dataset(tokenizer), tokenizer, output_dir=str(folder / f"terminated-{rank}"),
                               gradient_checkpointing="off", rank_timeout_s=FAILURE_TIMEOUT_S, **config)

    run("full", ports[0], full)
    run("resumed", ports[1], resumed)
    run("failing", ports[2], failing)
    run("terminated", ports[3], terminated)
    os._exit(0)  # the records are on disk: skip the interpreter's seconds of teardown


@pytest.fixture(scope="module")
def two_ranks(tiny_dir, tmp_path_factory):
    """{rank: record} of one launch of two spawned ranks, plus the launch's folder."""
    folder = tmp_path_factory.mktemp("two-ranks")
    context = multiprocessing.get_context("spawn")
    ports = [free_port() for _ in range(4)]
    processes = [context.Process(target=_rank_main, args=(rank, ports, str(folder))) for rank in range(2)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    for process in processes:
        process.join(max(1.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
    assert not hung, f"ranks {hung} still running after {LAUNCH_TIMEOUT_S} s"
    assert [process.exitcode for process in processes] == [0, 0]  # each rank caught and recorded its errors
    records = {rank: torch.load(folder / f"rank{rank}.pt") for rank in range(2)}
    return records, folder


@pytest.fixture(scope="module")
def one_process(tiny_dir, tmp_path_factory):
    """The reference: one process, batch 4 (= 2 ranks x batch 2), everything else the same."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GEMMATUNE_KERNELS", "0")
        model, tokenizer = lora_model()
        config = {**TRAIN, "batch_size": 2 * TRAIN["batch_size"], "save_every": 0}
        gradients = []
        hook = record_gradients(gradients)
        try:
            result = gemmatune.train(model, tiny_dataset(tokenizer), tokenizer,
                                     output_dir=str(tmp_path_factory.mktemp("one-process")), **config)
        finally:
            hook.remove()
    return result, gradients, adapter_weights(model)


def relative_distance(actual: list, expected: list) -> float:
    """|actual - expected| / |expected|, the tensors taken together as one vector."""
    actual, expected = (torch.cat([t.flatten() for t in ts]) for ts in (actual, expected))
    return float((actual - expected).norm() / expected.norm())


def assert_same_weights(actual: dict, expected: dict, **tolerance) -> None:
    assert actual.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **tolerance, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------ the tests
def test_each_rank_collates_its_own_part_of_every_micro_batch_one_process_would_use():
    from gemmatune.training.trainer import TrainConfig, micro_batches

    rows = [{"input_ids": [100 + i] * (1 + i % 3), "labels": [100 + i] * (1 + i % 3)} for i in range(9)]
    config = TrainConfig(batch_size=2, pad_to_multiple_of=1, packing=False)  # rows (packed: test_packing.py)

    def first_tokens(batch):
        return [] if batch is None else batch["input_ids"][:, 0].tolist()

    one = micro_batches(rows, TrainConfig(batch_size=4, pad_to_multiple_of=1, packing=False), 0, epoch_seed=7)
    ranks = [micro_batches(rows, config, 0, epoch_seed=7, rank=r, world=2) for r in (0, 1)]
    seen = []
    for _ in range(6):  # two epochs of 9 rows: micro-batches of 4, 4 and 1 (rank 1 has none of the last)
        parts = [first_tokens(next(batches)) for batches in ranks]
        assert parts[0] + parts[1] == first_tokens(next(one)) and len(parts[0]) <= 2 and len(parts[1]) <= 2
        seen += parts[0] + parts[1]
    assert sorted(seen[:9]) == sorted(seen[9:]) == [100 + i for i in range(9)]  # every row once an epoch
    assert seen[:9] != seen[9:]  # and each epoch reshuffled


def test_two_ranks_equal_one_process_with_the_same_global_batch(two_ranks, one_process):
    records, initial = two_ranks[0], adapter_weights(lora_model()[0])
    reference, reference_gradients, reference_weights = one_process
    for rank in (0, 1):
        run = records[rank]["full"]
        assert run.get("status") == "done", run.get("error")
        # the sum of the ranks' losses: the loss of the whole global step, as one process computes it
        assert run["losses"] == pytest.approx(reference.losses, rel=1e-5)
        # the summed gradients of the first step, element by element against each tensor's scale:
        # float32 rounding of the other summation order and padding is ~1e-6 of it
        gradients = records[rank]["gradients"]
        assert len(gradients) == len(reference_gradients) == TRAIN["max_steps"]
        for i, (actual, expected) in enumerate(zip(gradients[0], reference_gradients[0])):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()),
                                       msg=lambda m: f"gradient {i} of step 1: {m}")
        # later steps and the weights, as whole vectors: from step 2 on, Adam's g / sqrt(v) has
        # magnified that rounding in near-zero gradient elements. Measured on the 373-row bundled set's
        # tokenizer: 1.0e-4 of the gradients at step 4 and 3.4e-5 of the adapter's update; one process
        # whose padding alone changes drifts further (4.7e-4 at step 4). A missing all-reduce or a
        # wrong row is off by >1e-2.
        for step, (actual, expected) in enumerate(zip(gradients, reference_gradients), 1):
            assert relative_distance(actual, expected) < 5e-4, f"step {step}"
        change = [run["weights"][k] - initial[k] for k in initial]
        assert relative_distance(change, [reference_weights[k] - initial[k] for k in initial]) < 2e-4
    # the ranks hold the very same weights: the same summed gradients, the same optimizer steps
    assert_same_weights(records[1]["full"]["weights"], records[0]["full"]["weights"], rtol=0, atol=0)


def released_names(weights: dict) -> dict:
    """A rank's adapter tensors under the names save_adapter writes (the released checkpoint's layout)."""
    from gemmatune.model.adapter_names import adapter_key, canonical_name, split_adapter_key

    return {adapter_key(canonical_name(module), rest): value
            for (module, rest), value in ((split_adapter_key(k), v) for k, v in weights.items())}


def test_resume_under_two_ranks_continues_exactly(two_ranks):
    records, folder = two_ranks
    for rank in (0, 1):
        full, resumed = records[rank]["full"], records[rank]["resumed"]
        assert resumed.get("status") == "done", resumed.get("error")
        assert resumed["step"] == 4 and resumed["losses"][:2] == full["losses"][:2]
        assert resumed["losses"][2:] == pytest.approx(full["losses"][2:], rel=1e-6)
        assert_same_weights(resumed["weights"], full["weights"], rtol=1e-6, atol=1e-7)
    saved = load_file(folder / "resumed-0" / "adapter" / "adapter_model.safetensors")
    assert_same_weights(saved, released_names(records[0]["resumed"]["weights"]), rtol=0, atol=0)


def test_only_rank_0_writes_files(two_ranks):
    _, folder = two_ranks
    assert sorted(p.name for p in (folder / "full-0").iterdir()) == ["adapter", "checkpoint-2"]
    assert (folder / "resumed-0" / "adapter" / "adapter_model.safetensors").is_file()
    for run in ("full", "resumed", "failing", "terminated"):
        assert not (folder / f"{run}-1").exists(), f"rank 1 wrote into its output_dir in the {run!r} run"


def test_a_raising_rank_stops_the_others_and_the_adapter_is_saved(two_ranks):
    records, folder = two_ranks
    failed, stopped = records[1]["failing"], records[0]["failing"]
    assert failed["error"] == "RuntimeError: rank 1 fails at step 2"
    assert stopped["error"].startswith("RankStopped: rank 1 failed (RuntimeError: rank 1 fails at step 2)")
    # rank 0 was waiting for rank 1's gradients; it stopped far sooner than its own 120 s deadline
    assert stopped["ended"] - records[1]["rank 1 raised at"] < FAILURE_TIMEOUT_S / 4
    saved = load_file(folder / "failing-0" / "adapter" / "adapter_model.safetensors")
    assert_same_weights(saved, released_names(stopped["weights"]), rtol=0, atol=0)
    assert any(w.abs().sum() > 0 for n, w in saved.items() if "lora_B" in n)  # step 1 was trained and kept


def test_sigterm_on_one_rank_interrupts_all_and_the_adapter_is_saved(two_ranks):
    records, folder = two_ranks
    for rank in (0, 1):  # rank 0 got the signal; rank 1 heard of it while waiting for rank 0
        run = records[rank]["terminated"]
        assert (run.get("status"), run.get("step")) == ("interrupted", 1), run.get("error")
    saved = load_file(folder / "terminated-0" / "adapter" / "adapter_model.safetensors")
    assert_same_weights(saved, released_names(records[0]["terminated"]["weights"]), rtol=0, atol=0)


def test_rank_0s_dashboard_shows_every_ranks_throughput_and_memory(monkeypatch):
    import io

    import gemmatune.training.dashboard as training_dashboard
    from tests.helpers import FakeClock, widget_dashboard

    monkeypatch.delenv("GEMMATUNE_DASHBOARD", raising=False)
    line = "0: 400 tok/s 3.4 GiB · 1: 200 tok/s 3.0 GiB"
    clock, out = FakeClock(), io.StringIO()
    text = training_dashboard.make_dashboard(4, mode="text", clock=clock, stream=out)
    widget, _, _ = widget_dashboard(clock, total=4)
    for step in range(1, 5):  # 0.5 s a step; rank 1 had half of rank 0's tokens
        clock.t += 0.5
        for dash in (text, widget):
            dash.update(step, 2.0, 1e-4, 300, ranks=[(200, 3.4), (100, 3.0)])
    assert text.rank_rates() == [(400.0, 3.4), (200.0, 3.0)]
    assert out.getvalue().splitlines()[-1].endswith("ranks " + line)
    assert "2 processes" in widget.view.cards.value and "1: 200 tok/s 3.0 GiB" in widget.view.cards.value
    assert ("per rank", line) in text.close().rows()
    monkeypatch.setenv("GEMMATUNE_DASHBOARD", "text")  # the other ranks show nothing, whatever it says
    silent = training_dashboard.silent_dashboard(4)
    assert isinstance(silent.view, training_dashboard._NullView)


# ------------------------------------------------------------------ the command line under the launchers
LAUNCHERS = {  # what the README shows; `python -m` runs the launchers of this venv
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-port", str(port)],
    "accelerate launch": lambda port: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                       "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                                       "--dynamo_backend", "no", "--main_process_port", str(port)],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_the_command_line_runs_unchanged_under_a_launcher(launcher, tiny_dir, tmp_path):
    """`python -m gemmatune train` on 2 ranks (the tiny model in 4 bits, 8-bit AdamW): it trains,
    checkpoints and saves, and the output is rank 0's alone, with every rank's throughput."""
    command = LAUNCHERS[launcher](free_port()) + [
        "-m", "gemmatune", "train", "--data", "bundled", "--steps", "2", "--batch-size", "1", "--grad-accum", "1",
        "--max-seq-length", "64", "--save-every", "1", "--output-dir", str(tmp_path / "out")]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                        "GEMMATUNE_KERNELS": "0", "GEMMATUNE_DASHBOARD": "text", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for line in ("gemmatune: training ", "  2 processes (gloo)", "trainable: ", "done: loss "):
        assert out.count(line) == 1, f"{line!r} printed {out.count(line)} times:\n{out}"
    assert "ranks 0: " in out and " · 1: " in out  # the text dashboard shows both ranks
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoint-1" / "trainer_state.json").is_file()


# ------------------------------------------------------------------ on a GPU: graphed micro-steps
def _graphed_rank_main(rank: int, port: int, folder: str) -> None:
    """One of two ranks sharing one GPU through gloo (NCCL refuses two ranks on one GPU): the
    micro-steps are replayed as CUDA graphs and the gradients are all-reduced outside them."""
    import torch.distributed as dist

    import gemmatune.training.step as training_step

    replays = []
    replay = training_step.MicroStep._replay

    def counted_replay(self, *args, **kwargs):
        replays.append(1)
        return replay(self, *args, **kwargs)

    training_step.MicroStep._replay = counted_replay  # this child process only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    record = {}
    try:
        model, tokenizer = lora_model(device="cuda")
        hook = record_gradients(record.setdefault("gradients", []))
        result = gemmatune.train(model, tiny_dataset(tokenizer), tokenizer, output_dir=str(Path(folder) / f"{rank}"),
                                 **{**TRAIN, "pad_to_multiple_of": 64, "save_every": 0})
        hook.remove()
        record.update(status=result.status, losses=result.losses, weights=adapter_weights(model), replays=len(replays))
    except BaseException as error:
        record["error"] = f"{type(error).__name__}: {error}"
    torch.save({k: v for k, v in record.items()}, Path(folder) / f"rank{rank}.pt")
    os._exit(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_ranks_with_cuda_graphs_equal_one_process(tiny_dir, tmp_path):
    from tests.helpers import assert_rel_close

    port = free_port()
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_graphed_rank_main, args=(rank, port, str(tmp_path))) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(LAUNCH_TIMEOUT_S)
    assert not any(process.is_alive() for process in processes), "a rank hung"
    records = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    model, tokenizer = lora_model(device="cuda")
    reference_gradients = []
    hook = record_gradients(reference_gradients)
    reference = gemmatune.train(model, tiny_dataset(tokenizer), tokenizer, output_dir=str(tmp_path / "one"),
                                **{**TRAIN, "batch_size": 4, "pad_to_multiple_of": 64, "save_every": 0})
    hook.remove()
    for record in records:
        assert record.get("status") == "done", record.get("error")
        assert record["replays"] > 0  # the micro-steps ran as CUDA graphs
        assert record["losses"] == pytest.approx(reference.losses, rel=1e-5)
        for i, (actual, expected) in enumerate(zip(record["gradients"][0], reference_gradients[0])):
            assert_rel_close(actual.cpu(), expected.cpu(), 1e-4, f"gradient {i} of step 1")
        for step, (actual, expected) in enumerate(zip(record["gradients"], reference_gradients), 1):
            assert relative_distance([a.cpu() for a in actual], [e.cpu() for e in expected]) < 1e-4, f"step {step}"
    assert_same_weights(records[1]["weights"], records[0]["weights"], rtol=0, atol=0)
