"""The settings of a run (TrainConfig), what a checkpoint resumes (TrainState), what `train` returns."""
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    max_steps: int = 60            # optimizer steps
    batch_size: int = 2            # rows per micro-batch (per process with several GPUs)
    grad_accum: int = 4            # micro-batches per optimizer step
    learning_rate: float = 2e-4
    lr_schedule: str = "linear"    # "linear" | "cosine" | "constant", after warmup
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0     # gradient clipping (0 = off)
    optimizer: str = "adamw_8bit"  # "adamw_8bit" (bitsandbytes) | "adamw" (torch)
    gradient_checkpointing: str = "auto"  # "auto" | "offload" (inputs to CPU) | "on" | "off"
    fused_loss: bool = True        # fused linear cross-entropy (never materialises logits)
    cuda_graphs: bool = True       # replay each batch shape's forward+backward as a CUDA graph
    pad_to_multiple_of: int = 64   # round batch lengths up: fewer distinct shapes to capture
    packing: bool | int = True     # rows back to back in batch_size buffers of max_seq_length tokens (at most twice
                                   # the longest row), each row attending to itself; an int: tokens per buffer;
                                   # False: pad each micro-batch to its longest row
    seed: int = 3407
    output_dir: str = "outputs"
    save_every: int = 0            # checkpoint every N steps (0: only when the run is stopped or fails)
    keep_checkpoints: int = 2      # of this run's checkpoints, the newest N are kept (0 = all)
    dashboard: str = "auto"        # "auto" | "widget" | "text" | "off"
    rank_timeout_s: float = 600.0  # several GPUs: how long a rank waits for the others before it stops


@dataclass
class TrainState:
    step: int = 0
    tokens_trained: int = 0
    losses: list = field(default_factory=list)
    processes: int = 1             # how many ranks trained it (the rows per step depend on it)
    batch_size: int = 0            # the batch geometry and data size it was trained with (0: not recorded),
    grad_accum: int = 0            # checked on resume: other values change the data order
    dataset_rows: int = 0


@dataclass
class TrainResult:
    status: str                    # "done" | "interrupted" (Ctrl-C, the stop button, SIGTERM)
    state: TrainState
    adapter_dir: str
    summary: object = None
    step_seconds: list = field(default_factory=list)  # wall time of each optimizer step of this call
    checkpoint_dir: str | None = None  # the newest resumable checkpoint (resume_from=...), if any
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped the run
    rows_skipped: dict = field(default_factory=dict)  # rows whose media failed to decode during training, by reason

    @property
    def losses(self) -> list:
        return self.state.losses

    def loss_fell(self, fraction: float = 0.1, window: int = 10) -> bool:
        """True when the mean of the last `window` losses is `fraction` below the first window's."""
        if len(self.losses) < 2 * window:
            window = max(1, len(self.losses) // 2)
        first = sum(self.losses[:window]) / window
        last = sum(self.losses[-window:]) / window
        return last < (1 - fraction) * first
