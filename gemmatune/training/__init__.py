"""The training stage: the loop and everything it needs.

    config.py       TrainConfig (one flat set of settings), TrainState (what resumes), TrainResult
    optimizer.py    8-bit AdamW without per-tensor syncs; warmup + linear/cosine schedule
    loss.py         next-token cross-entropy over label tokens, logits never materialised
    step.py         one micro-step (forward + loss + backward), replayed as a CUDA graph
    checkpoints.py  resumable checkpoints (adapter, optimizer, state), no pickle
    distributed.py  several GPUs: DDP's two collectives, ranks that stop together
    dashboard.py    the live dashboard (widget, text or off)
    trainer.py      train(): reads top to bottom
    grpo_loss.py    the GRPO objective: group advantages, clipped surrogate, KL estimator, token-level sum
    rollouts.py     GRPO rollouts: sampled groups of completions, rewards, training micro-batches
    grpo.py         train_grpo(): reinforcement learning with reward functions, reads top to bottom
"""
from gemmatune.training.config import TrainConfig, TrainResult, TrainState
from gemmatune.training.grpo import GRPOConfig, GRPOResult, train_grpo
from gemmatune.training.trainer import train

__all__ = ["GRPOConfig", "GRPOResult", "TrainConfig", "TrainResult", "TrainState", "train", "train_grpo"]
