"""gemmatune's model in transformers' Trainer and TRL's SFTTrainer (gemmatune/training/hf_trainer.py), on the
tiny 4-bit model with TRL's defaults (bf16 autocast, activation checkpointing, LoRA cast to bf16).

- The gradients of one optimizer step (2 micro-batches) equal plain PyTorch's on the model's own logits,
  cross-entropy over the answer tokens only, divided by the whole step's answer tokens.
- The LM head module never runs and no tensor of (tokens x vocabulary) logits is created (the fused
  kernel's chunk is made 8 rows here, so a full-logits tensor would stand out).
- After the run: checkpoint-N/adapter and output_dir/adapter are in the released layout and load back;
  the model's forward and parameter dtypes are gemmatune's again; chat, merge_and_save and export_gguf work.
"""
import os

import pytest
import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Trainer, TrainerCallback, TrainingArguments

import gemmatune
from gemmatune.data.batches import collate
from gemmatune.kernels import fused_linear_ce
from gemmatune.model.activation_checkpointing import OffloadedCheckpoint, checkpoint_in_place
from gemmatune.training import hf_trainer
from gemmatune.training.loss import shifted_labels, unwrap
from tests.helpers import assert_rel_close, load_tiny, randomize_lora

trl = pytest.importorskip("trl")
MAX_CHUNK_ROWS = 8


def tiny_fine_tune(seed=1, **kwargs):
    model, tokenizer = load_tiny(load_in_4bit=True, **kwargs)
    model = gemmatune.add_lora(model, r=4, alpha=8)
    randomize_lora(model, seed)
    return model, tokenizer


def answer_rows(tokenizer, n=4, max_seq_length=80):
    prepared = gemmatune.prepare_dataset("bundled", tokenizer, max_seq_length=max_seq_length)
    prepared.examples, prepared.truncated = prepared.examples[:n], prepared.truncated[:n]
    return prepared


class GradsBeforeStep(TrainerCallback):
    """The LoRA gradients of each optimizer step, read just before the optimizer uses them."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def plain_pytorch_grads(model, rows, pad_token_id):
    """The model's own logits (transformers' forward), cross-entropy over the labelled (answer) tokens,
    summed and divided by their count: what one step over all `rows` should give."""
    batch = collate(list(rows), pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = shifted_labels(batch["labels"])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    (loss / (labels != -100).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


class LogitsWatch(TorchDispatchMode):
    """The most rows of logits any op made from the LM head's weight (an output whose last dimension
    is the vocabulary, computed from a tensor sharing the weight's storage)."""

    def __init__(self, weight):
        super().__init__()
        self.storage, self.vocab, self.most_rows = weight.untyped_storage().data_ptr(), weight.shape[0], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        uses_weight = any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == self.storage
                          for a in torch.utils._pytree.tree_leaves((args, kwargs)))
        is_logits = (isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[-1] == self.vocab
                     and out.untyped_storage().data_ptr() != self.storage)  # not a view of the weight
        if uses_weight and is_logits:
            self.most_rows = max(self.most_rows, out.numel() // self.vocab)
        return out


def small_logit_chunks(monkeypatch):
    real = fused_linear_ce.chunk_rows_for
    monkeypatch.setattr(fused_linear_ce, "chunk_rows_for",
                        lambda n_rows, *args: min(MAX_CHUNK_ROWS, real(n_rows, *args)))


def sft_trainer(model, tokenizer, rows, tmp_path, mixin=True, callbacks=(), **config):
    base = trl.SFTTrainer
    cls = type("Trainer", (hf_trainer.FusedLoss, base), {}) if mixin else base
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2, report_to=[], use_cpu=True, save_strategy="no",
                    remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, disable_tqdm=True,
                    max_grad_norm=0)  # the gradients are compared before clipping
    args = trl.SFTConfig(**{**settings, **config})  # TRL's defaults otherwise: bf16, checkpointing
    return cls(model=model, args=args, processing_class=tokenizer, train_dataset=hf_trainer.as_hf_dataset(rows),
               data_collator=hf_trainer.DataCollator(rows, tokenizer), callbacks=list(callbacks))


def hf_trainer_of(model, tokenizer, rows, tmp_path, callbacks=()):
    cls = type("Trainer", (hf_trainer.FusedLoss, Trainer), {})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, max_grad_norm=0)
    return cls(model=model, args=args, train_dataset=rows, data_collator=hf_trainer.DataCollator(rows, tokenizer),
               callbacks=list(callbacks))


@pytest.mark.parametrize("kind", ["trl-sft", "transformers"])
def test_one_step_trains_the_answers_with_the_fused_loss(kind, tmp_path, monkeypatch):
    model, tokenizer = tiny_fine_tune()
    rows = answer_rows(tokenizer)
    expected = plain_pytorch_grads(model, rows, tokenizer.pad_token_id)
    grads = GradsBeforeStep()
    make = sft_trainer if kind == "trl-sft" else hf_trainer_of
    trainer = make(model, tokenizer, rows, tmp_path, callbacks=[grads])

    small_logit_chunks(monkeypatch)
    lm_head_calls = []
    unwrap(model).lm_head.register_forward_hook(lambda *args: lm_head_calls.append(1))
    watch = LogitsWatch(unwrap(model).lm_head.weight)
    with watch:
        trainer.train()

    assert len(grads.steps) == 1
    for name, grad in expected.items():  # 4 rows in 2 micro-batches == all 4 at once, answers only
        assert_rel_close(grads.steps[0][name], grad, 1e-4, name)
    assert lm_head_calls == [] and 0 < watch.most_rows <= MAX_CHUNK_ROWS


def test_trls_checkpointing_and_bf16_cast_are_replaced_by_gemmatunes(tmp_path):
    model, tokenizer = tiny_fine_tune()
    trainer = sft_trainer(model, tokenizer, answer_rows(tokenizer), tmp_path)
    assert trainer.args.activation_checkpointing is False  # the trainer's would replace gemmatune's
    layers = unwrap(model).model.layers
    assert all(isinstance(layer._gradient_checkpointing_func, OffloadedCheckpoint)
               or layer._gradient_checkpointing_func is checkpoint_in_place for layer in layers)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # TRL casts them to bf16
    assert getattr(unwrap(model), "_require_grads_hook", None) is None


def test_after_the_run_saves_are_portable_and_chat_merge_and_gguf_work(tmp_path):
    model, tokenizer = tiny_fine_tune()
    trainer = sft_trainer(model, tokenizer, answer_rows(tokenizer), tmp_path, max_steps=2, save_strategy="steps",
                          save_steps=1, callbacks=[hf_trainer.SaveAdapter(tokenizer)])
    trainer.train()
    out = tmp_path / "out"
    for folder in (out / "checkpoint-1" / "adapter", out / "checkpoint-2" / "adapter", out / "adapter"):
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert keys and all(k.startswith("base_model.model.model.language_model.layers.") for k in keys), folder
    reloaded = gemmatune.load_adapter(load_tiny(load_in_4bit=True)[0], out / "adapter")
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert {n: p for n, p in reloaded.named_parameters() if "lora_" in n}.keys() == trained.keys()
    assert all(torch.equal(p, trained[n]) for n, p in reloaded.named_parameters() if "lora_" in n)

    assert "forward" not in vars(model) and "forward" not in vars(unwrap(model))  # accelerate's, TRL's
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert isinstance(gemmatune.chat(model, tokenizer, "Convert 5 km to miles.", max_new_tokens=4, stream=False), str)
    merged = gemmatune.merge_and_save(model, tmp_path / "merged", tokenizer=tokenizer, verbose=False)
    assert gemmatune.export_gguf(merged, tmp_path / "model.gguf", quantization="q8_0").stat().st_size > 0


def test_hand_back_removes_only_the_trainers_forwards():
    model, _ = tiny_fine_tune()
    model.forward = model.forward  # what accelerate and TRL do: an instance attribute over the class's
    unwrap(model).forward = unwrap(model).forward
    model._original_forward = model.forward
    base_name = type(unwrap(model)).__name__
    assert sorted(hf_trainer.hand_back(model)) == sorted([f"{base_name}.forward", "PeftModelForCausalLM.forward",
                                                          "PeftModelForCausalLM._original_forward"])
    assert hf_trainer.hand_back(model) == [] and not model.training


def test_images_reach_the_trainer_through_the_row_index(tmp_path):
    model, tokenizer = tiny_fine_tune(modalities=("text", "image"))
    rows = gemmatune.prepare_dataset(gemmatune.load_bundled_dataset("formulas")[:2], tokenizer, max_seq_length=256,
                                     formatting_func=gemmatune.image_to_text("Write the LaTeX."), max_soft_tokens=70)
    collator = hf_trainer.DataCollator(rows, tokenizer)
    batch = collator([{hf_trainer.ROW: 1}, {hf_trainer.ROW: 0}])
    assert batch["pixel_values"].shape[0] == 2 and batch["input_ids"].shape[1] % 64 == 0
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        collator([{"input_ids": rows[0]["input_ids"], "labels": rows[0]["labels"]}])
    grads = GradsBeforeStep()
    trainer = sft_trainer(model, tokenizer, rows, tmp_path, per_device_train_batch_size=1, callbacks=[grads])
    trainer.train()
    assert grads.steps and all(torch.isfinite(g).all() for g in grads.steps[0].values())
    assert any(g.abs().max() > 0 for g in grads.steps[0].values())


def test_a_model_name_is_refused(tmp_path):
    with pytest.raises(TypeError, match="gemmatune.add_lora"):
        type("Trainer", (hf_trainer.FusedLoss, Trainer), {})(model="google/gemma-4-E2B-it")


if os.environ.get("GEMMATUNE_KERNELS") == "0":  # the fused kernel is what these tests watch
    pytestmark = pytest.mark.skip("GEMMATUNE_KERNELS=0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replays_in_the_trainer_match_its_eager_steps(tmp_path):
    """On a GPU, FusedLoss's micro-steps are captured and replayed as CUDA graphs (4 micro-batches of one
    shape: eager, capture, replay, replay); the LoRA gradients of each optimizer step equal the eager run's."""
    from tests.helpers import assert_graphed_steps_match_eager

    results = {}
    for graphs in (False, True):
        model, tokenizer = load_tiny(load_in_4bit=True, dtype="bfloat16", device="cuda")
        model = gemmatune.add_lora(model, r=8)
        randomize_lora(model, 0)
        rows = answer_rows(tokenizer, n=8, max_seq_length=64)  # every batch (2, 64): one shape, replayed
        grads = GradsBeforeStep()
        trainer = type("Trainer", (hf_trainer.FusedLoss, trl.SFTTrainer), {"cuda_graphs": graphs})(
            model=model, processing_class=tokenizer, train_dataset=hf_trainer.as_hf_dataset(rows),
            data_collator=hf_trainer.DataCollator(rows, tokenizer), callbacks=[grads],
            args=trl.SFTConfig(output_dir=str(tmp_path / f"out-{graphs}"), max_steps=2, per_device_train_batch_size=2,
                               gradient_accumulation_steps=2, learning_rate=0.0, report_to=[], save_strategy="no",
                               remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                               disable_tqdm=True, max_grad_norm=0, seed=0))
        trainer.train()
        assert ("on" in trainer._micro_step.describe()) == graphs, trainer._micro_step.describe()
        results[graphs] = [torch.zeros(())] * len(grads.steps), grads.steps
    assert_graphed_steps_match_eager(results)
