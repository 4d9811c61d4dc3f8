"""The training stage: the loop and everything it needs.

    config.py       TrainConfig (one flat set of settings), TrainState (what resumes), TrainResult
    optimizer.py    8-bit AdamW without per-tensor syncs; warmup + linear/cosine schedule
    loss.py         next-token cross-entropy over label tokens, logits never materialised
    step.py         one micro-step (forward + loss + backward), replayed as a CUDA graph
    checkpoints.py  resumable checkpoints (adapter, optimizer, state, base model), no pickle
    saving.py       the room a run's saves need; its checkpoints and last save, also when the disk fills up
    run_lock.py     one run per output_dir
    stop_signals.py Ctrl-C, the stop button and SIGTERM stop a run between whole steps, never mid-save
    row_check.py    rows whose media fail to decode during training are skipped and counted
    distributed.py  several GPUs: DDP's two collectives, ranks that stop together
    dashboard.py    the live dashboard (widget, text or off)
    trainer.py      train(): reads top to bottom
    grpo_loss.py    the GRPO objective: group advantages, clipped surrogate, KL estimator, token-level sum
    rollouts.py     GRPO rollouts: sampled groups of completions, rewards, training micro-batches
    grpo.py         train_grpo(): reinforcement learning with reward functions, reads top to bottom

Beside the loop, for people who train elsewhere:

    preference.py   DPO: log-probabilities through the fused head, the reference = adapters disabled
    hf_trainer.py   pieces for transformers' Trainer and TRL's SFTTrainer / DPOTrainer (collator, loss
                    mixins, a callback saving portable adapters)
"""
from gemmatune.training.config import TrainConfig, TrainResult, TrainState
from gemmatune.training.dashboard import text_loading_bars
from gemmatune.training.grpo import GRPOConfig, GRPOResult, train_grpo
from gemmatune.training.hf_trainer import DataCollator, FusedDPOLoss, FusedLoss, SaveAdapter, as_hf_dataset, hand_back
from gemmatune.training.preference import dpo_loss
from gemmatune.training.saving import SaveError
from gemmatune.training.trainer import train

__all__ = ["DataCollator", "FusedDPOLoss", "FusedLoss", "GRPOConfig", "GRPOResult", "SaveAdapter", "SaveError",
           "TrainConfig", "TrainResult", "TrainState", "as_hf_dataset", "dpo_loss", "hand_back", "text_loading_bars",
           "train", "train_grpo"]
