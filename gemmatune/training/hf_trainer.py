"""gemmatune's model in transformers' Trainer and TRL's trainers: the pieces to wire in yourself.

    from trl import SFTConfig, SFTTrainer
    from gemmatune.training import hf_trainer

    class Trainer(hf_trainer.FusedLoss, SFTTrainer):   # gemmatune's loss and micro-step in TRL's loop
        pass

    trainer = Trainer(model=model, processing_class=tokenizer,
                      args=SFTConfig(output_dir="outputs/trl", max_steps=60, remove_unused_columns=False,
                                     dataset_kwargs={"skip_prepare_dataset": True}),
                      train_dataset=hf_trainer.as_hf_dataset(dataset),      # prepare_dataset's rows
                      data_collator=hf_trainer.DataCollator(dataset, tokenizer),
                      callbacks=[hf_trainer.SaveAdapter(tokenizer)])
    trainer.train()   # then chat / merge_and_save / export_gguf as after gemmatune.train

What each piece keeps of gemmatune.train, and why it is needed:

- `as_hf_dataset` + `DataCollator`: prepare_dataset's rows (labels on the answers only) padded by
  gemmatune's collate (images and audio decoded per batch). TRL's own preparation trains every
  token of a conversation, and `assistant_only_loss` fails on Gemma 4's template (no generation
  markers). TRL wants a `datasets.Dataset`; media rows cannot live in one, so it holds each row's
  index and the collator reads the row (with its media) from the PreparedDataset.
- `FusedLoss` (a mixin, first in the bases): the loss is gemmatune.training.loss's fused LM head +
  softcap + cross-entropy (the logits are never materialised), divided by the label tokens of the
  whole optimizer step, and each micro-step is gemmatune.training.step.MicroStep, replayed as a CUDA
  graph. It also undoes what the trainers do to a model that is not theirs, before the first step:
  TRL casts trainable parameters of a 4-bit model to bf16 (gemmatune keeps LoRA in fp32, and its
  kernels want the dtypes it chose), and the trainers' activation checkpointing would replace
  gemmatune's (offloaded, chosen for the GPU): gemmatune's is enabled instead.
- `FusedDPOLoss` (a mixin for TRL's DPOTrainer): the DPO loss from gemmatune.training.preference,
  log-probabilities through the fused kernel; the reference is the same model with its adapters
  disabled, never a second copy.
- `SaveAdapter` (a callback): the adapter in the released checkpoint's layout (gemmatune.model.adapters,
  which plain peft loads onto google/gemma-4-*) as `checkpoint-N/adapter` beside each of the
  Trainer's checkpoints and as `output_dir/adapter` at the end. The Trainer's own adapter files use
  the text-only model's names, which peft refuses on the released checkpoint; they stay for
  `resume_from_checkpoint`. At the end it also hands the model back: accelerate wraps
  `model.forward` in an autocast (bf16 by default in TRL, also on a CPU) and TRL replaces the base
  model's forward; both are removed, so chat, merge_and_save and export_gguf see the model as
  gemmatune left it.

What is lost next to gemmatune.train (README, "Using the adapter elsewhere"; benchmarks/trainer_route.py
measures speed and memory):
one process only (the fused loss calls the model's parts, which DistributedDataParallel would not
see: use gemmatune.train under torchrun), the dashboard, and the resumable checkpoints' exact data
order; the Trainer's optimizer and schedule are its own (AdamW unless `optim` says otherwise).
"""
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from gemmatune.data.batches import collate
from gemmatune.model.activation_checkpointing import enable_gradient_checkpointing
from gemmatune.model.adapters import save_adapter
from gemmatune.model.memory import choose_checkpointing
from gemmatune.training.loss import IGNORE_INDEX, causal_lm_loss, shifted_labels
from gemmatune.training.preference import dpo_loss, preference_batch, reference_logprobs, sequence_logprobs
from gemmatune.training.step import MicroStep

ROW = "gemmatune_row"  # the column holding a row's index into the PreparedDataset


# ------------------------------------------------------------------ data
def as_hf_dataset(dataset):
    """prepare_dataset's rows as a `datasets.Dataset` (what TRL's trainers require).

    Args:
        dataset: a PreparedDataset (or a list of its rows).

    Returns:
        A datasets.Dataset with columns input_ids, labels and gemmatune_row (the row's index, through
        which DataCollator finds the row's images and audio). Pass `remove_unused_columns=False` to the
        trainer's config so the index column reaches the collator (media rows need it).
    """
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [row["input_ids"] for row in dataset],
                              "labels": [row["labels"] for row in dataset],
                              ROW: list(range(len(dataset)))})


class DataCollator:
    """Features -> gemmatune's padded batch: input_ids, labels (-100 outside the answers), attention_mask,
    and for rows with images or audio their pixels and features (decoded now, for this batch only).

    Args:
        dataset: the PreparedDataset as_hf_dataset was made from (its rows carry the media); None for
            text rows given as {"input_ids", "labels"} features.
        tokenizer: its pad id pads the batch.
        pad_to_multiple_of: lengths are rounded up to this, so batch shapes repeat and each shape's
            CUDA graph is captured once (64, as gemmatune.train).
    """

    def __init__(self, dataset, tokenizer, pad_to_multiple_of: int = 64):
        self.dataset = dataset
        self.pad_token_id = tokenizer.pad_token_id if tokenizer is not None else 0
        self.pad_to_multiple_of = pad_to_multiple_of
        self.has_media = dataset is not None and any("media" in row for row in dataset)

    def __call__(self, features: list[dict]) -> dict:
        return collate([self._row(f) for f in features], self.pad_token_id, self.pad_to_multiple_of)

    def _row(self, feature: dict) -> dict:
        """The prepared row behind a feature: by its index (as_hf_dataset), or the feature itself (a
        PreparedDataset handed to transformers' Trainer directly yields its rows)."""
        if ROW in feature and self.dataset is not None:
            return self.dataset[int(feature[ROW])]
        if self.has_media and "media" not in feature:
            raise ValueError(f"the features reaching the collator have no {ROW!r} column, and the dataset holds "
                             "images or audio: pass remove_unused_columns=False in the trainer's config")
        return feature


# ------------------------------------------------------------------ the trainers' side
class _GemmatuneModel:
    """What both mixins do when the trainer is built: give the model back its parameter dtypes and
    gemmatune's activation checkpointing, and refuse what the fused loss cannot serve."""

    rows_per_example = 1  # sequences the model runs per dataset example (a DPO pair: 2)

    def __init__(self, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if not isinstance(model, nn.Module):
            raise TypeError("pass the model gemmatune.add_lora (or load_adapter(..., trainable=True)) returned, "
                            "not a name: the trainer would load a model without gemmatune's kernels")
        trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        super().__init__(*args, **kwargs)
        _restore_trainable(model, trainable)
        if self.accelerator.num_processes > 1:
            raise RuntimeError("gemmatune's loss in a Trainer runs in one process only (DistributedDataParallel would "
                               "not see it); for several GPUs use gemmatune.train under torchrun")
        self._use_gemmatune_checkpointing(model)

    def _use_gemmatune_checkpointing(self, model: nn.Module) -> None:
        """The trainers' activation checkpointing (on by default in TRL) would replace gemmatune's
        offloading one when training starts: switch theirs off and, if it was asked for, turn
        gemmatune's on (chosen for this GPU, as gemmatune.train does)."""
        names = [n for n in ("activation_checkpointing", "gradient_checkpointing") if hasattr(self.args, n)]
        if not any(getattr(self.args, n) for n in names):  # older transformers: the second name only
            return
        for name in names:
            setattr(self.args, name, False)
        hook = getattr(model.get_base_model() if hasattr(model, "get_base_model") else model,
                       "_require_grads_hook", None)
        if hook is not None:  # TRL's enable_input_require_grads: only reentrant checkpointing needs it
            model.disable_input_require_grads()
        longest = getattr(model, "gemmatune_max_seq_length", None) or 2048
        mode = choose_checkpointing(model, longest, self.args.per_device_train_batch_size * self.rows_per_example)
        enable_gradient_checkpointing(model, mode)
        print(f"gemmatune: activation checkpointing is gemmatune's ({mode!r}), not the trainer's")


class FusedLoss(_GemmatuneModel):
    """A mixin for transformers.Trainer and TRL's SFTTrainer: `class T(FusedLoss, SFTTrainer): pass`.

    The loss is gemmatune.training.loss.causal_lm_loss (fused LM head, the logits never materialised)
    over the answer tokens, divided by the label tokens of the whole optimizer step (the trainer
    counts them: `num_items_in_batch`); each training micro-step runs through
    gemmatune.training.step.MicroStep, which replays it as a CUDA graph where it can. With fp16
    mixed precision (a GradScaler) the step runs eagerly through the trainer's own backward.
    The trainers' own metrics that need logits (TRL's entropy, token accuracy) are not logged.
    """

    loss_is_scaled_for_ga = True  # divided by the whole step's label tokens already
    cuda_graphs = True  # False: every micro-step eager (a subclass may set it)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Gemma 4 says it takes no loss kwargs; this loss does: the trainer then counts the step's tokens
        self.model_accepts_loss_kwargs = True
        self._micro_step = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        normalizer = num_items_in_batch if num_items_in_batch is not None else _label_tokens(inputs)
        with torch.autocast(inputs["input_ids"].device.type, enabled=False):  # gemmatune picked the dtypes
            loss = causal_lm_loss(model, inputs, normalizer=normalizer)
        return (loss, {"loss": loss}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.accelerator.scaler is not None:  # fp16 mixed precision: the scaler must see the backward
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if self._micro_step is None:
            self._micro_step = MicroStep(self.model, cuda_graphs=self.cuda_graphs)
        batch = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        normalizer = num_items_in_batch if num_items_in_batch is not None else _label_tokens(batch)
        return self._micro_step(batch, normalizer=max(int(normalizer), 1))


class FusedDPOLoss(_GemmatuneModel):
    """A mixin for TRL's DPOTrainer: `class T(FusedDPOLoss, DPOTrainer): pass`.

    The sigmoid DPO loss (gemmatune.training.preference.dpo_loss, with the trainer's `beta`) of
    log-probabilities summed over each completion, both from gemmatune's fused kernel
    (gemmatune.training.loss.token_logprobs); the reference log-probabilities come from the same model
    with its adapters disabled, under no_grad. Only `loss_type="sigmoid"` (DPO's own) is served; the
    trainer's reward metrics are logged, its logit metrics are not (there are no logits).
    """

    rows_per_example = 2  # the chosen and the rejected sequence

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        unsupported = {"loss_type": list(self.loss_types) != ["sigmoid"],
                       "f_divergence_type": str(getattr(self.f_divergence_type, "value", self.f_divergence_type))
                       != "reverse_kl",
                       "ld_alpha": self.ld_alpha is not None, "use_weighting": bool(self.use_weighting)}
        if any(unsupported.values()):
            raise ValueError(f"FusedDPOLoss computes DPO's own loss (loss_type='sigmoid', reverse KL): unset "
                             f"{[name for name, bad in unsupported.items() if bad]} in the DPOConfig")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = preference_batch(inputs)
        with torch.autocast(batch["input_ids"].device.type, enabled=False):  # gemmatune picked the dtypes
            if "ref_chosen_logps" in inputs:  # precompute_ref_log_probs=True
                reference = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:  # first: its activations are gone before the policy's forward keeps its own
                reference = reference_logprobs(model, batch).chunk(2)
            policy = sequence_logprobs(model, batch).chunk(2)
            loss, chosen_rewards, rejected_rewards = dpo_loss(*policy, *reference, beta=self.beta)
        metrics = self._metrics["train" if model.training else "eval"]
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        return (loss, {"loss": loss}) if return_outputs else loss

    def compute_ref_log_probs(self, model, inputs):
        """precompute_ref_log_probs=True: the reference's summed log-probabilities, (chosen, rejected)."""
        batch = preference_batch(inputs)
        with torch.autocast(batch["input_ids"].device.type, enabled=False):
            return reference_logprobs(model, batch).chunk(2)


def _label_tokens(batch: dict) -> int:
    return int((shifted_labels(batch["labels"]) != IGNORE_INDEX).sum())


def _restore_trainable(model: nn.Module, saved: dict) -> None:
    """Trainable parameters back to what they were (TRL casts a 4-bit model's to bf16, which also
    rounds their values: casting back to fp32 would not undo that)."""
    for name, param in model.named_parameters():
        if name in saved and param.dtype != saved[name].dtype:
            param.data = saved[name]


# ------------------------------------------------------------------ saving and handing back
class SaveAdapter(TrainerCallback):
    """A TrainerCallback: the adapter in the released checkpoint's layout, which plain peft and vLLM load.

    Writes `checkpoint-N/adapter` whenever the trainer saves checkpoint-N, and `output_dir/adapter`
    when training ends (gemmatune.save_adapter: a folder already there is kept as .previous-K). At
    the end the model is handed back (hand_back): ready for chat, merge_and_save and export_gguf.

    Args:
        tokenizer: saved beside the adapter (default: the trainer's processing_class).
    """

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "adapter"
            save_adapter(model, self.tokenizer or processing_class, folder)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.is_world_process_zero:
            save_adapter(model, self.tokenizer or processing_class, Path(args.output_dir) / "adapter")
        hand_back(model)


def hand_back(model: nn.Module) -> list[str]:
    """Undo what the trainers did to the model object's forward: accelerate's autocast wrapper on the
    peft model (its mixed precision) and TRL's fused-LM-head forward on the base model. Then
    model.forward is the class's again, with the dtypes gemmatune chose. Returns what was removed."""
    removed = []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for part in dict.fromkeys([model, base]):
        for attribute in ("forward", "_original_forward"):
            if attribute in vars(part):
                del vars(part)[attribute]
                removed.append(f"{type(part).__name__}.{attribute}")
    model.eval()
    return removed
