"""The optimizer and the learning-rate schedule."""
import math

import torch

from gemmatune.training.config import TrainConfig


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warmup, then linear/cosine decay to zero (or constant)."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    if config.lr_schedule == "cosine":
        return config.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))
    if config.lr_schedule == "linear":
        return config.learning_rate * (1 - progress)
    return config.learning_rate


def make_optimizer(model, config: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: call gemmatune.add_lora(model) first")
    if config.optimizer == "adamw_8bit":
        return adamw_8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer {config.optimizer!r}: use 'adamw_8bit' or 'adamw'")


def adamw_8bit(params, **kwargs):
    """bitsandbytes' 8-bit AdamW, minus its `torch.cuda.synchronize()` after every parameter.

    bnb's step synchronises once per tensor (for its paged variants). With ~400 LoRA tensors
    that stalls the CPU ~400 times per step and the GPU idles between the tiny updates
    (benchmarks/profile_step.py). The update itself,
    bnb's `update_step`, is unchanged; stream order keeps it correct without the syncs.
    """
    import bitsandbytes as bnb

    class AdamW8bit(bnb.optim.AdamW8bit):
        @torch.no_grad()
        def step(self, closure=None):
            if self.is_paged:
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            return loss

    return AdamW8bit(params, **kwargs)
