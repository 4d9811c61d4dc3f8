"""The training loop: reads top to bottom, nanoGPT style.

One optimizer step = `grad_accum` micro-batches. All micro-batches of a step are fetched
first so the loss can be divided by the label-token count of the whole step (see gemmatune.training.loss):
then batch 4 and batch 1 x 4 accumulation give the same gradients.

Everything needed to resume lives in `TrainState` (saved with each checkpoint). Ctrl-C, the
notebook's stop button and SIGTERM (gemmatune.training.stop_signals) stop the run between two
whole steps; it then saves a resumable checkpoint and the adapter (gemmatune.training.saving), and
a second signal is told to wait for the save: training is never lost. Before the first step the
output folder is locked for this run (gemmatune.training.run_lock) and its free space is checked
against every save the run will make.

Under torchrun / accelerate launch every rank runs this same loop on its own share of each
step's rows; gemmatune.training.distributed says what the ranks exchange and how they stop together.
Only rank 0 prints, draws the dashboard and writes files.
"""
import random
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch

from gemmatune.data.batches import collate
from gemmatune.data.packing import pack_length, packed_micro_batches, token_counts
from gemmatune.data.prefetch import prefetched
from gemmatune.errors import TrainingSetupError
from gemmatune.files import check_writable, remove_partials
from gemmatune.model.activation_checkpointing import enable_gradient_checkpointing
from gemmatune.model.memory import check_fits, choose_checkpointing
from gemmatune.model.towers import require_towers_for_examples
from gemmatune.training import distributed
from gemmatune.training.checkpoints import geometry_changes, load_checkpoint
from gemmatune.training.config import TrainConfig, TrainResult, TrainState
from gemmatune.training.dashboard import make_dashboard, silent_dashboard
from gemmatune.training.loss import count_label_tokens
from gemmatune.training.optimizer import learning_rate_at, make_optimizer
from gemmatune.training.row_check import DecodableRows, needs_decode_check
from gemmatune.training.run_lock import RunLock
from gemmatune.training.saving import RunSaves, check_space
from gemmatune.training.step import MicroStep
from gemmatune.training.stop_signals import StopSignals, signal_name


def micro_batches(dataset, config: TrainConfig, pad_token_id: int, epoch_seed: int, rank: int = 0, world: int = 1):
    """Endless shuffled micro-batches; each epoch reshuffles with its own seed.

    Packed (config.packing, the default): `batch_size` buffers of pack_length tokens each, rows
    back to back (gemmatune.data.packing). Padded: `batch_size` rows, each micro-batch padded to its
    longest row. With several processes every rank walks the same order in global micro-batches of
    `world * batch_size` rows (buffers) and collates only its own `batch_size` of them (rank r takes
    r*b to r*b+b-1): together the ranks see what one process with batch `world * batch_size`
    sees, in the same order, no row twice in an epoch. A rank whose share of an epoch's short
    last padded micro-batch is empty gets None for it. The next two steps' micro-batches are
    collated on a background thread while the current ones train (gemmatune.data.prefetch)."""
    if len(dataset) == 0:
        raise TrainingSetupError("the dataset is empty: there is nothing to train on")
    if config.packing:
        length = pack_length(dataset, config.packing, config.pad_to_multiple_of)
        batches = packed_micro_batches(dataset, config.batch_size, length, pad_token_id, epoch_seed, rank, world)
    else:
        batches = padded_micro_batches(dataset, config, pad_token_id, epoch_seed, rank, world)
    yield from prefetched(batches, depth=2 * config.grad_accum)


def padded_micro_batches(dataset, config: TrainConfig, pad_token_id: int, epoch_seed: int, rank: int, world: int):
    """micro_batches without packing: `batch_size` rows each, padded to the longest."""
    epoch, size = 0, config.batch_size * world
    while True:
        order = list(range(len(dataset)))
        random.Random(epoch_seed + epoch).shuffle(order)
        for i in range(0, len(order), size):
            mine = order[i:i + size][rank * config.batch_size:(rank + 1) * config.batch_size]
            yield collate([dataset[j] for j in mine], pad_token_id,
                          pad_to_multiple_of=config.pad_to_multiple_of) if mine else None
        epoch += 1


def train(model, dataset, tokenizer=None, config: TrainConfig | None = None, resume_from: str | None = None,
          **overrides) -> TrainResult:
    """Fine-tune the LoRA adapters of `model` on `dataset`; the adapter is saved however the run ends.

    Args:
        model: the peft model add_lora (or load_adapter(..., trainable=True)) returned.
        dataset: a PreparedDataset from prepare_dataset (or a list of its rows).
        tokenizer: saved with the adapter and checkpoints; its pad id pads the batches.
        config: a TrainConfig; any of its fields can also be passed as keywords (max_steps=60,
            learning_rate=2e-4, batch_size=2, grad_accum=4, output_dir=..., save_every=...).
        resume_from: a checkpoint-N folder of an earlier run to continue exactly where it stopped.

    Returns:
        A TrainResult: status "done" or "interrupted" (Ctrl-C, the notebook's stop button, SIGTERM:
        a resumable checkpoint is saved, `checkpoint_dir`), the losses, where the adapter went
        (output_dir/adapter), a summary of time and memory. Under torchrun every rank calls
        train() alike and rank 0 writes the files.

    Raises:
        TrainingSetupError: before the first step, for an empty dataset, max_steps below 1, an
            output_dir that cannot be written or has too little free space for this run's saves,
            another run using the same output_dir, a model without adapters.
        CheckpointError: resume_from is not a readable checkpoint of this model (or of another
            base model).
        MissingTowerError: image or audio rows for a model loaded without that tower, before the first step.
        SaveError: a save failed during the run (a full disk); the message says where the last
            good checkpoint is and where the weights were saved instead.
        Any error during training is raised after a checkpoint and the adapter trained so far
        have been saved.
    """
    config = config or TrainConfig()
    config = TrainConfig(**{**asdict(config), **overrides})
    device = next((p.device for p in model.parameters() if p.requires_grad), torch.device("cpu"))
    ranks = distributed.join(device, config.rank_timeout_s)
    try:
        with StopSignals() as signals:
            return _train(model, dataset, tokenizer, config, resume_from, ranks, device, signals)
    except BaseException as error:
        ranks.stop(error)  # the other ranks stop waiting for this one
        raise
    finally:
        ranks.close()


def _train(model, dataset, tokenizer, config: TrainConfig, resume_from, ranks, device, signals) -> TrainResult:
    check_before_training(dataset, config, writes=ranks.is_main)
    require_towers_for_examples(model, dataset)  # images/audio the model has no tower for: refused, not ignored
    say = print if ranks.is_main else _silent
    with ExitStack() as held:
        if ranks.is_main:  # one run per output_dir; what a dead run half-wrote there goes
            held.enter_context(RunLock(config.output_dir, say))
            for stale in remove_partials(config.output_dir):
                say(f"gemmatune: removed {stale}, a save an earlier run did not finish")
        return _run(model, dataset, tokenizer, config, resume_from, ranks, device, signals, say)


def _run(model, dataset, tokenizer, config: TrainConfig, resume_from, ranks, device, signals, say) -> TrainResult:
    torch.manual_seed(config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
    optimizer = make_optimizer(model, config)
    state = load_checkpoint(resume_from, model, optimizer, say) if resume_from else TrainState(processes=ranks.world)
    if state.step >= config.max_steps:
        raise TrainingSetupError(f"the checkpoint {resume_from} is at step {state.step} and max_steps is "
                                 f"{config.max_steps}: nothing is left to train; raise max_steps to continue")
    changes = geometry_changes(state, config.batch_size, config.grad_accum, ranks.world, len(dataset))
    if resume_from and changes:
        say(f"gemmatune: WARNING: the checkpoint's run took other rows per step ({'; '.join(changes)}): the data "
            "order now differs from an uninterrupted run")
    state.processes, state.batch_size, state.grad_accum = ranks.world, config.batch_size, config.grad_accum
    state.dataset_rows = len(dataset)
    if ranks.is_main:
        check_space(model, tokenizer, config, state.step)
    for param in model.parameters():  # a backward run before train() must not leak into step 1
        param.grad = None
    rows = DecodableRows(dataset, say, replace=not config.packing) if needs_decode_check(dataset) else dataset
    batches = micro_batches(rows, config, pad_id, config.seed, ranks.rank, ranks.world)
    for _ in range(state.step * config.grad_accum):  # replay the data order when resuming
        next(batches)
    longest = getattr(model, "gemmatune_max_seq_length", None) or 2048  # prepare_dataset's limit
    if config.packing:  # every micro-batch has this shape
        longest = pack_length(dataset, config.packing, config.pad_to_multiple_of)
    if config.gradient_checkpointing == "auto":  # "on" when it comfortably fits, else "offload"
        config.gradient_checkpointing = choose_checkpointing(model, longest, config.batch_size,
                                                             packed=bool(config.packing))
    warning = check_fits(model, longest, config.batch_size, checkpointing=config.gradient_checkpointing,
                         packed=bool(config.packing))
    if warning:
        say(f"gemmatune: WARNING: {warning}")
    enable_gradient_checkpointing(model, config.gradient_checkpointing)
    model.train()
    micro_step = MicroStep(model, fused=config.fused_loss, cuda_graphs=config.cuda_graphs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ranks.broadcast_from_main(trainable)  # the same starting weights on every rank
    say(describe_run(model, dataset, config, device, ranks))
    say("  " + micro_step.describe())

    title = "gemmatune: fine-tuning"
    dash = (make_dashboard(config.max_steps, title=title, mode=config.dashboard) if ranks.is_main
            else silent_dashboard(config.max_steps, title=title))
    saves = RunSaves(model, tokenizer, optimizer, state, config, signals, resume_from, say)
    status, failure, step_seconds = "done", None, []
    try:
        while state.step < config.max_steps:
            started = time.perf_counter()
            lr = learning_rate_at(state.step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_batches = [b for b in (next(batches) for _ in range(config.grad_accum)) if b is not None]
            local_tokens = count_label_tokens(step_batches)
            counts = [token_counts(b) for b in step_batches]  # (tokens of rows, tokens computed)
            useful = ranks.sum_count(sum(rows for rows, _ in counts))  # the rest of the computed tokens is padding
            computed = ranks.sum_count(sum(tokens for _, tokens in counts))
            n_tokens = ranks.sum_count(local_tokens)  # the label tokens of the whole step, all ranks
            loss_sum = torch.zeros((), device=device)
            for batch in step_batches:
                loss_sum += micro_step(batch, normalizer=max(n_tokens, 1))
            totals = ranks.all_reduce_grads(trainable, loss_sum, local_tokens)  # once per optimizer step
            grad_norm = _clip(model, config.max_grad_norm)
            with signals.critical():  # the update and its step count, whole: a stop waits for both
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)  # graphed steps accumulate into these .grad tensors
                state.step += 1
                state.tokens_trained += n_tokens
                loss, per_rank = ranks.read_totals(totals)  # the GPU finishes the step here
                state.losses.append(loss)
            step_seconds.append(time.perf_counter() - started)
            grad_norm = float(grad_norm) if grad_norm is not None else None
            dash.update(state.step, loss, lr, n_tokens, grad_norm, ranks=per_rank, useful_tokens=useful,
                        computed_tokens=computed)
            if (ranks.is_main and config.save_every and state.step % config.save_every == 0
                    and state.step < config.max_steps):
                dash.note(f"checkpoint saved to {saves.checkpoint()}")
    except KeyboardInterrupt as error:
        status = "interrupted"
        ranks.stop(error)
    except BaseException as error:  # out of memory, a bad batch...: keep what was trained, then re-raise
        status, failure = "failed", error
        ranks.stop(error)  # before saving: the other ranks may be waiting for this one
        raise
    finally:
        with signals.saving(f"the last save in {config.output_dir}", interrupt_after=False):
            try:
                adapter_dir = _last_save(saves, status, failure, ranks)
                resumable = f"checkpoint {saves.last_good} and " if status != "done" and saves.last_good else ""
                dash.note(f"{status} at step {state.step}/{config.max_steps}: {resumable}adapter saved to "
                          f"{adapter_dir}")
            finally:
                summary = dash.close(status)
                if getattr(rows, "rows_skipped", None):
                    say(f"gemmatune: skipped {sum(rows.rows_skipped.values())} row(s) whose media did not decode: "
                        + ", ".join(f"{n} {why}" for why, n in sorted(rows.rows_skipped.items())))
                model.eval()
    return TrainResult(status=status, state=state, adapter_dir=str(adapter_dir), summary=summary,
                       step_seconds=step_seconds, checkpoint_dir=str(saves.last_good) if saves.last_good else None,
                       stopped_by=signal_name(signals.first), rows_skipped=dict(getattr(rows, "rows_skipped", {})))


def _last_save(saves: RunSaves, status: str, failure, ranks) -> Path:
    """Rank 0 saves (a checkpoint if stopped or failed, then the adapter); the other ranks wait for it."""
    if not ranks.is_main:
        ranks.wait_for_main_save()
        return Path(saves.config.output_dir) / "adapter"
    try:
        return saves.final(status, failure)
    finally:
        ranks.main_saved()


def _silent(*args, **kwargs) -> None:
    """print() on the ranks other than 0."""


def check_before_training(dataset, config: TrainConfig, writes: bool = True) -> None:
    """Refuse, before the first step, what would make training loop forever, do nothing, or fail
    only at its end: an empty dataset, no steps, an output folder that cannot be written (checked
    where files will be written: `writes` is False on the ranks other than 0)."""
    if not isinstance(config.max_steps, int) or config.max_steps < 1:
        raise TrainingSetupError(f"max_steps={config.max_steps!r}: train at least one step (max_steps=1 or more); "
                                 "nothing was trained and nothing was saved")
    for name in ("batch_size", "grad_accum"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            raise TrainingSetupError(f"{name}={getattr(config, name)!r}: must be a whole number of at least 1")
    if len(dataset) == 0:
        report = dataset.report() if hasattr(dataset, "report") else "no rows"
        raise TrainingSetupError(f"the dataset has no rows to train on: {report}. Check the data, and "
                                 "max_seq_length: rows with no answer token left after truncation are dropped")
    if writes:
        check_writable(config.output_dir)


def _clip(model, max_norm: float) -> torch.Tensor | None:
    """Clip in place; returns the norm as a device tensor (reading it now would stall the CPU)."""
    if not max_norm:
        return None
    params = [p for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def describe_run(model, dataset, config: TrainConfig, device, ranks=None) -> str:
    """The derived numbers, printed before the first step."""
    world = ranks.world if ranks is not None else 1
    rows_per_step = config.batch_size * config.grad_accum * world
    per_rank = f"{world} processes x " if world > 1 else ""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_step = (f"{rows_per_step} rows per step = {per_rank}batch {config.batch_size} x {config.grad_accum} "
                f"accumulation; {len(dataset)} rows = {len(dataset) / rows_per_step:.1f} steps per epoch")
    if config.packing:
        length = pack_length(dataset, config.packing, config.pad_to_multiple_of)
        tokens = sum(len(example["input_ids"]) for example in dataset)
        per_step = (f"{rows_per_step} packed buffers of {length} tokens per step = {per_rank}batch "
                    f"{config.batch_size} x {config.grad_accum} accumulation; {len(dataset)} rows of {tokens:,} "
                    f"tokens = about {tokens / (rows_per_step * length):.1f} steps per epoch")
    return "\n".join([
        f"gemmatune: training {trainable:,} LoRA parameters on {device} for {config.max_steps} steps",
        *([f"  {ranks.describe()}"] if world > 1 else []),
        f"  {per_step}",
        f"  lr {config.learning_rate:g}, {config.warmup_steps} warmup steps then {config.lr_schedule}; "
        f"optimizer {config.optimizer}; clip {config.max_grad_norm}",
        f"  gradient checkpointing: {config.gradient_checkpointing}; fused loss: {config.fused_loss}; "
        f"checkpoints in {config.output_dir}",
    ])
