"""GRPO (group relative policy optimisation) on the LoRA adapters: train_grpo(), top to bottom.

One step:
1. Take the next `prompts_per_step` prompts (a seeded shuffle, reshuffled each epoch).
2. Rollout: `group_size` completions of each, sampled at `temperature` from the current policy
   (adapters active) in one batched generate call: static cache, CUDA-graph decode steps
   (gemmatune.training.rollouts).
3. Score every completion with the reward functions (weighted sum); advantages are the rewards
   normalised within each prompt's group (gemmatune.training.grpo_loss.group_advantages).
4. Reference log-probabilities: the same model with its adapters disabled (peft's
   `disable_adapter()`; no second copy of the model in memory), under no_grad. Skipped when beta is 0.
5. `num_iterations` updates on this rollout: per micro-batch, the policy's per-token
   log-probabilities of the sampled tokens through the fused LM head (never the full logits:
   gemmatune.training.loss.token_logprobs), the clipped objective plus beta * KL, divided by the
   completion-token count of the whole step, backward; then clip the gradient norm, optimizer step.
6. The dashboard shows the mean reward (its curve), KL, completion length, the clip fraction
   and tokens/s of sampling and of training.

The training forward runs eagerly over right-padded prompt + completion rows (not packed, not
replayed as a CUDA graph); sampling is where the time goes (benchmarks/grpo_step.py).
The adapter is saved to output_dir/adapter however the run ends (done, Ctrl-C, an error).
"""
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers.models.gemma4 import modeling_gemma4 as hf_gemma4

from gemmatune.data.prompts import prepare_prompts
from gemmatune.errors import TrainingSetupError
from gemmatune.files import check_writable
from gemmatune.model.activation_checkpointing import enable_gradient_checkpointing
from gemmatune.model.adapters import save_adapter
from gemmatune.model.memory import GIB, check_fits, choose_checkpointing, predict_peak_gib, usable_gib
from gemmatune.training.dashboard import make_dashboard
from gemmatune.training.grpo_loss import group_advantages, grpo_loss
from gemmatune.training.loss import IGNORE_INDEX, shifted_labels, token_logprobs
from gemmatune.training.optimizer import learning_rate_at, make_optimizer
from gemmatune.training.rollouts import (
    pad_id,
    reward_name,
    sample_rollout,
    score_rollout,
    training_batches,
)

MEMORY_TARGET_GIB = 7.0  # what the automatic micro-batch size keeps a step within


@dataclass
class GRPOConfig:
    max_steps: int = 60              # optimizer steps, one rollout each
    prompts_per_step: int = 8        # distinct prompts per step
    group_size: int = 8              # completions per prompt (TRL: num_generations)
    max_new_tokens: int = 256        # longest completion (TRL: max_completion_length)
    max_prompt_length: int = 512     # longer prompts are refused before the first step
    temperature: float = 1.0         # sampling; the log-probabilities are the model's own (temperature 1)
    top_p: float = 1.0               # 1.0 and top_k 0: sample from the whole distribution (the policy)
    top_k: int = 0
    beta: float = 0.04               # KL coefficient (0: no reference forward, KL not shown)
    epsilon: float = 0.2             # clip range: ratio kept within [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # None: epsilon (DAPO uses 0.28)
    scale_rewards: bool = True       # divide advantages by the group's std (False: Dr. GRPO)
    num_iterations: int = 1          # updates per rollout (TRL's mu); above 1 the clip matters
    micro_batch_size: int = 0        # completions per forward/backward, a step accumulating them (0: auto)
    rollout_batch_size: int = 0      # completions per generate call (0: the whole step at once)
    reward_weights: list | None = None  # one per reward function (None: all 1.0)
    learning_rate: float = 2e-5
    lr_schedule: str = "constant"    # "linear" | "cosine" | "constant", after warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0       # gradient clipping (0 = off)
    optimizer: str = "adamw_8bit"    # "adamw_8bit" (bitsandbytes) | "adamw" (torch)
    gradient_checkpointing: str = "auto"  # "auto" | "offload" | "on" | "off"
    fused_loss: bool = True          # log-probabilities through the fused LM head (never full logits)
    cuda_graphs: bool = True         # decode steps of the rollouts replayed as CUDA graphs
    pad_to_multiple_of: int = 64     # training rows' length rounded up
    seed: int = 3407
    output_dir: str = "outputs"
    dashboard: str = "auto"          # "auto" | "widget" | "text" | "off"


@dataclass
class GRPOResult:
    status: str                      # "done" | "interrupted" | "failed"
    adapter_dir: str
    steps: list = field(default_factory=list)  # one dict per step (step_record)
    summary: object = None

    @property
    def rewards(self) -> list[float]:
        return [s["reward"] for s in self.steps]

    def reward_rose(self, margin: float = 0.0, window: int = 10) -> bool:
        """True when the mean reward of the last `window` steps exceeds the first window's by more
        than `margin` (windows shrink to half the steps on short runs)."""
        rewards = self.rewards
        window = min(window, max(1, len(rewards) // 2))
        if len(rewards) < 2:
            return False
        first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
        return last > first + margin


def train_grpo(model, tokenizer, prompts, reward_funcs, config: GRPOConfig | None = None,
               **overrides) -> GRPOResult:
    """Train the LoRA adapters of `model` with GRPO to raise the rewards of its completions.

    Args:
        model: the peft model add_lora (or load_adapter(..., trainable=True)) returned.
        tokenizer: the model's tokenizer; saved with the adapter.
        prompts: strings, or dicts with "prompt" (a string or messages ending with a user turn)
            and any other columns ("answer", ...), which the reward functions receive by name.
        reward_funcs: a function or a list of them, TRL's signature:
            func(prompts, completions, completion_ids, **columns) -> one float per completion
            (a list entry per completion; completions are the decoded texts). A reward function
            written for TRL's GRPOTrainer in its standard (not conversational) format works as is.
        config: a GRPOConfig; any of its fields can also be passed as keywords.

    Returns:
        A GRPOResult: status, where the adapter went (output_dir/adapter), per-step records
        (reward, per-function rewards, KL, completion length, tokens/s...), the dashboard summary.

    Raises:
        TrainingSetupError: before the first step, for settings that cannot work (see
            check_grpo_setup), a model without adapters, an output_dir that cannot be written.
        DatasetFormatError: a prompt row that cannot be used (gemmatune.data.prompts).
        Any error during training is raised after the adapter trained so far has been saved.
    """
    config = GRPOConfig(**{**asdict(config or GRPOConfig()), **overrides})
    reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    check_grpo_setup(model, reward_funcs, config)
    rows = prepare_prompts(prompts, tokenizer, config.max_prompt_length)
    if len(rows) < config.prompts_per_step:
        raise TrainingSetupError(f"{len(rows)} prompts for prompts_per_step={config.prompts_per_step}: "
                                 "give more prompts or lower prompts_per_step")
    check_writable(config.output_dir)
    torch.manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    weights = torch.tensor(config.reward_weights or [1.0] * len(reward_funcs), dtype=torch.float32)
    longest = max(len(r.input_ids) for r in rows) + config.max_new_tokens
    if not config.micro_batch_size:
        config.micro_batch_size = choose_micro_batch(model, longest, config)
    if config.gradient_checkpointing == "auto":
        config.gradient_checkpointing = choose_checkpointing(model, longest, config.micro_batch_size)
    warning = check_fits(model, longest, config.micro_batch_size, checkpointing=config.gradient_checkpointing)
    if warning:
        print(f"gemmatune: WARNING: {warning} (here: lower micro_batch_size)")
    enable_gradient_checkpointing(model, config.gradient_checkpointing)
    for param in model.parameters():
        param.grad = None
    print(describe_grpo_run(model, rows, reward_funcs, config))

    dash = make_dashboard(config.max_steps, title="gemmatune: GRPO", mode=config.dashboard, value_name="reward")
    status, records = "done", []
    try:
        for step, step_prompts in enumerate(prompt_batches(rows, config), start=1):
            lr = learning_rate_at(step - 1, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            record = grpo_step(model, tokenizer, optimizer, step_prompts, reward_funcs, weights, config,
                               seed=config.seed + step)
            record.update(step=step, lr=lr)
            records.append(record)
            dash.update(step, record["reward"], lr, record["completion_tokens"], record["grad_norm"],
                        extra=dashboard_values(record))
            if step >= config.max_steps:
                break
    except KeyboardInterrupt:
        status = "interrupted"
    except BaseException:
        status = "failed"
        raise
    finally:
        adapter_dir = save_adapter(model, tokenizer, Path(config.output_dir) / "adapter")
        dash.note(f"{status} at step {len(records)}/{config.max_steps}: adapter saved to {adapter_dir}")
        summary = dash.close(status)
        model.eval()
    return GRPOResult(status=status, adapter_dir=str(adapter_dir), steps=records, summary=summary)


def grpo_step(model, tokenizer, optimizer, prompts, reward_funcs, weights, config: GRPOConfig, seed: int) -> dict:
    """One rollout and its num_iterations updates; returns the step's record (read from the GPU once)."""
    started = time.perf_counter()
    rollout = sample_rollout(model, tokenizer, prompts, config.group_size, config.max_new_tokens,
                             config.temperature, config.top_p, config.top_k, seed, config.rollout_batch_size,
                             config.cuda_graphs)
    rewards = score_rollout(reward_funcs, rollout)
    total = rewards @ weights
    advantages = group_advantages(total, config.group_size, config.scale_rewards)
    batches = training_batches(rollout, advantages, config.micro_batch_size, pad_id(tokenizer),
                               config.pad_to_multiple_of)
    n_tokens = rollout.generated_tokens  # the token-level normaliser of the whole step

    trained_at = time.perf_counter()
    model.train()
    refs = [reference_logprobs(model, b, config.fused_loss) if config.beta else None for b in batches]
    olds: list = [None] * len(batches)
    sums = {}
    for iteration in range(config.num_iterations):
        for i, batch in enumerate(batches):
            loss, stats, logp = policy_micro_step(model, batch, n_tokens, refs[i], olds[i], config)
            if config.num_iterations > 1 and iteration == 0:
                olds[i] = logp  # the sampling policy's log-probabilities, for the later updates
            for key, value in (("loss", loss), *stats.items()):
                if iteration == 0 or key == "clipped":
                    sums[key] = sums.get(key, 0) + value
        grad_norm = clip_gradients(model, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    read = {key: float(value) for key, value in sums.items()}  # the GPU finishes the step here
    finished = time.perf_counter()
    train_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) + prompt_tokens(b) for b in batches)
    return step_record(rollout, rewards, total, reward_funcs, read, grad_norm, config,
                       train_tokens=train_tokens, train_seconds=finished - trained_at,
                       step_seconds=finished - started)


def policy_micro_step(model, batch: dict, normalizer: int, ref_logp, old_logp, config: GRPOConfig):
    """Forward + GRPO loss + backward of one micro-batch; gradients accumulate into .grad.
    Returns (loss, stats, the detached log-probabilities)."""
    device = next(p.device for p in model.parameters() if p.requires_grad)
    inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True),
              "labels": batch["labels"].to(device, non_blocking=True)}
    logp = token_logprobs(model, inputs, fused=config.fused_loss)
    mask = shifted_labels(inputs["labels"]) != IGNORE_INDEX
    epsilon_high = config.epsilon if config.epsilon_high is None else config.epsilon_high
    loss, stats = grpo_loss(logp, mask, batch["advantages"].to(device), max(normalizer, 1), old_logp=old_logp,
                            ref_logp=ref_logp, beta=config.beta, epsilon_low=config.epsilon, epsilon_high=epsilon_high)
    loss.backward()
    return loss.detach(), stats, logp.detach()


@torch.no_grad()
def reference_logprobs(model, batch: dict, fused: bool = True) -> torch.Tensor:
    """Per-token log-probabilities under the reference policy: this model with its adapters
    disabled (peft's disable_adapter; gemmatune's NF4 + LoRA layers then run their base layer)."""
    device = next(p.device for p in model.parameters() if p.requires_grad)
    inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True),
              "labels": batch["labels"].to(device, non_blocking=True)}
    with model.disable_adapter():
        return token_logprobs(model, inputs, fused=fused)


def prompt_tokens(batch: dict) -> int:
    """Prompt tokens of a training micro-batch: the tokens before each row's first label."""
    labelled = batch["labels"] != IGNORE_INDEX
    return int(labelled.int().argmax(dim=1).sum())


def clip_gradients(model, max_norm: float):
    if not max_norm:
        return None
    return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)


def prompt_batches(rows, config: GRPOConfig):
    """prompts_per_step prompts at a time, endlessly: a seeded shuffle per epoch."""
    epoch = 0
    while True:
        order = list(range(len(rows)))
        random.Random(config.seed + epoch).shuffle(order)
        for start in range(0, len(order) - config.prompts_per_step + 1, config.prompts_per_step):
            yield [rows[i] for i in order[start:start + config.prompts_per_step]]
        epoch += 1


def step_record(rollout, rewards, total, reward_funcs, read: dict, grad_norm, config: GRPOConfig,
                train_tokens: int, train_seconds: float, step_seconds: float) -> dict:
    """What the dashboard shows and GRPOResult.steps keeps about one step."""
    tokens = max(read["tokens"], 1.0)
    lengths = [len(ids) for ids in rollout.completion_ids]
    return {
        "reward": float(total.mean()),
        "rewards": {reward_name(f, j): float(rewards[:, j].mean()) for j, f in enumerate(reward_funcs)},
        "reward_std": float(total.view(-1, config.group_size).std(dim=1).mean()) if config.group_size > 1 else 0.0,
        "kl": read["kl"] / tokens if config.beta else None,
        "clip_fraction": read["clipped"] / (tokens * config.num_iterations),
        "loss": read["loss"],
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "completion_length": sum(lengths) / len(lengths),
        "truncated_fraction": sum(rollout.truncated) / len(rollout.truncated),
        "completion_tokens": rollout.generated_tokens,
        "rollout_s": rollout.seconds,
        "rollout_tokens_per_s": rollout.generated_tokens / max(rollout.seconds, 1e-9),
        "train_s": train_seconds,
        "train_tokens_per_s": train_tokens / max(train_seconds, 1e-9),
        "step_s": step_seconds,
        "sample_completion": rollout.completions[0],
    }


def dashboard_values(record: dict) -> dict:
    """The extra numbers the dashboard shows beside the reward curve."""
    values = {"KL": record["kl"], "length": record["completion_length"],
              "rollout tok/s": record["rollout_tokens_per_s"], "train tok/s": record["train_tokens_per_s"]}
    values.update(record["rewards"] if len(record["rewards"]) > 1 else {})
    return {k: v for k, v in values.items() if v is not None}


def check_grpo_setup(model, reward_funcs: list, config: GRPOConfig) -> None:
    """Refuse, before any work, what cannot train or would train on nothing."""
    if not hasattr(model, "disable_adapter") or not any(p.requires_grad for p in model.parameters()):
        raise TrainingSetupError("the model has no trainable adapters: call gemmatune.add_lora(model) first "
                                 "(GRPO's reference policy is the same model with them disabled)")
    if not reward_funcs or not all(callable(f) for f in reward_funcs):
        raise TrainingSetupError("reward_funcs must be a function or a list of functions "
                                 "func(prompts, completions, completion_ids, **columns) -> list of floats")
    if config.reward_weights is not None and len(config.reward_weights) != len(reward_funcs):
        raise TrainingSetupError(f"reward_weights has {len(config.reward_weights)} entries for "
                                 f"{len(reward_funcs)} reward functions: give one weight per function")
    for name in ("max_steps", "prompts_per_step", "group_size", "max_new_tokens", "num_iterations"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise TrainingSetupError(f"{name}={value!r}: must be a whole number of at least 1")
    if not isinstance(config.micro_batch_size, int) or config.micro_batch_size < 0:
        raise TrainingSetupError(f"micro_batch_size={config.micro_batch_size!r}: a whole number (0: chosen for you)")
    if config.group_size < 2:
        raise TrainingSetupError("group_size must be at least 2: GRPO compares the completions of one prompt")
    if not config.temperature > 0:
        raise TrainingSetupError(f"temperature={config.temperature}: GRPO samples, so it must be above 0 "
                                 "(1.0 samples the policy itself)")
    if config.beta < 0 or not math.isfinite(config.beta):
        raise TrainingSetupError(f"beta={config.beta}: the KL coefficient must be 0 or more")


def rollout_cache_gib(model, rows: int, length: int) -> float:
    """The static KV cache of a rollout: K and V of every layer that computes them, for `rows`
    completions of `length` positions (the decoder keeps it between steps)."""
    per_token = 0
    for attention in model.modules():
        if isinstance(attention, hf_gemma4.Gemma4TextAttention) and not attention.is_kv_shared_layer:
            per_token += 2 * attention.k_proj.out_features
    dtype_bytes = next(p.element_size() for p in model.parameters() if p.dtype.is_floating_point)
    return rows * length * per_token * dtype_bytes / GIB


def choose_micro_batch(model, longest: int, config: GRPOConfig) -> int:
    """The largest of 16, 8, 4, 2 completions per micro-batch (at most a step's) whose predicted training peak plus the
    rollout's KV cache stays within MEMORY_TARGET_GIB (an 8 GB card's usable memory) and 90% of this
    GPU's; else 1. Fewer, larger micro-batches are faster: the eager forward's cost is mostly
    launching kernels, whatever the batch."""
    completions = config.prompts_per_step * config.group_size
    rows = config.rollout_batch_size or completions
    cache = rollout_cache_gib(model, rows, -(-longest // 256) * 256)
    usable = usable_gib()
    budget = MEMORY_TARGET_GIB if usable is None else min(MEMORY_TARGET_GIB, 0.9 * usable)
    for size in (16, 8, 4, 2):
        size = min(size, completions)
        if predict_peak_gib(model, longest, size, checkpointing="on") + cache <= budget:
            return size
    return 1


def describe_grpo_run(model, rows, reward_funcs, config: GRPOConfig) -> str:
    """The derived numbers, printed before the first step."""
    completions = config.prompts_per_step * config.group_size
    micro = -(-completions // config.micro_batch_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    names = ", ".join(reward_name(f, j) for j, f in enumerate(reward_funcs))
    return "\n".join([
        f"gemmatune: GRPO on {trainable:,} LoRA parameters for {config.max_steps} steps",
        f"  {completions} completions per step = {config.prompts_per_step} prompts x {config.group_size}, "
        f"up to {config.max_new_tokens} new tokens, temperature {config.temperature:g}; {len(rows)} prompts = "
        f"{len(rows) / config.prompts_per_step:.1f} steps per epoch",
        f"  rewards: {names}; KL coefficient {config.beta:g}; clip {config.epsilon:g}; "
        f"{config.num_iterations} update(s) per rollout in {micro} micro-batch(es) of up to {config.micro_batch_size}",
        f"  lr {config.learning_rate:g} ({config.lr_schedule}); optimizer {config.optimizer}; "
        f"gradient checkpointing: {config.gradient_checkpointing}; adapter to {config.output_dir}/adapter",
    ])
