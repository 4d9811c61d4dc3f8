"""The model side of image and audio fine-tuning, on the tiny multimodal Gemma 4 (CPU, fp32).

Loading only the towers asked for; LoRA on exactly the modules each setting names; the
split step (towers, then the language model: gemmatune.model.towers) against the stock
Gemma4ForConditionalGeneration forward; loss and LoRA gradients against plain transformers +
peft; frozen towers keep no activations; tower checkpointing; fp16 stays finite; the audio
tower's adapters really train. Batches are built by hand in the shapes the model's forward
takes (pixel_values pre-patched, -1 positions for padding patches, T/4 audio placeholders).
"""
import pytest
import torch
from transformers import Gemma4ForConditionalGeneration

import gemmatune.data.dataset as data_dataset
import gemmatune.data.messages as data_messages
import gemmatune.data.rows as data_rows
import gemmatune.model.loader as model_loader
import gemmatune.model.towers as model_towers
from gemmatune.model.activation_checkpointing import enable_gradient_checkpointing
from gemmatune.model.lora import add_lora, lora_targets, tower_targets, trainable_parameters
from gemmatune.model.tiny import SPECIAL_TOKENS, TINY_MODEL_ID
from gemmatune.training.loss import IGNORE_INDEX, causal_lm_loss, count_label_tokens
from tests.helpers import assert_graphed_steps_match_eager, assert_rel_close, lora_grads

TOKEN = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
PATCH_PIXELS = 3 * 16 * 16
POOL = 3  # the tiny vision tower's pooling kernel: one soft token per 3 x 3 patches


def load_mm(modalities=("text", "image", "audio"), dtype="float32", **kwargs):
    return model_loader.load_model(TINY_MODEL_ID, modalities=modalities, load_in_4bit=kwargs.pop("load_in_4bit", False),
                             dtype=dtype, verbose=False, **kwargs)


def image_inputs(grids, max_soft_tokens, seed=0):
    """pixel_values (images, max_patches, 768) and image_position_ids (images, max_patches, 2)
    for images of `grids` = [(rows, cols) in patches, multiples of 3], padded as the image
    processor pads (zero patches, position -1); returns them and each image's soft-token count."""
    gen = torch.Generator().manual_seed(seed)
    max_patches = max_soft_tokens * POOL * POOL
    pixels = torch.zeros(len(grids), max_patches, PATCH_PIXELS)
    positions = torch.full((len(grids), max_patches, 2), -1, dtype=torch.long)
    for i, (rows, cols) in enumerate(grids):
        n = rows * cols
        pixels[i, :n] = torch.rand(n, PATCH_PIXELS, generator=gen)
        x, y = torch.meshgrid(torch.arange(cols), torch.arange(rows), indexing="xy")
        positions[i, :n] = torch.stack([x, y], dim=-1).reshape(n, 2)
    return pixels, positions, [rows * cols // POOL**2 for rows, cols in grids]


def audio_inputs(frames, n_mel=32, seed=0):
    """input_features (clips, T, n_mel) and input_features_mask (clips, T): clips of `frames`
    mel frames each (multiples of 4), zero-padded to the longest; each clip's token count."""
    gen = torch.Generator().manual_seed(seed)
    longest = max(frames)
    features = torch.zeros(len(frames), longest, n_mel)
    mask = torch.zeros(len(frames), longest, dtype=torch.bool)
    for i, t in enumerate(frames):
        features[i, :t] = torch.randn(t, n_mel, generator=gen)
        mask[i, :t] = True
    return features, mask, [t // 4 for t in frames]


def media_tokens(kind, n):
    begin, middle, end = {"image": ("<|image>", "<|image|>", "<image|>"),
                          "audio": ("<|audio>", "<|audio|>", "<audio|>")}[kind]
    return [TOKEN[begin]] + [TOKEN[middle]] * n + [TOKEN[end]]


def media_batch(kind, counts, seed=0, answer_len=12):
    """A right-padded batch, one medium per row: <bos> prompt, the medium's tokens, an answer
    that carries labels (placeholders, prompt and padding never do)."""
    gen = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for i, n in enumerate(counts):
        prompt = [TOKEN["<bos>"]] + torch.randint(20, 300, (3 + i,), generator=gen).tolist()
        answer = torch.randint(20, 300, (answer_len + 2 * i,), generator=gen).tolist() + [TOKEN["<turn|>"]]
        ids = prompt + media_tokens(kind, n) + answer
        rows.append(ids)
        labels.append([IGNORE_INDEX] * (len(ids) - len(answer)) + answer)
    length = max(map(len, rows))
    batch = {
        "input_ids": torch.tensor([r + [0] * (length - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
        "labels": torch.tensor([r + [IGNORE_INDEX] * (length - len(r)) for r in labels]),
    }
    return batch


def image_batch(seed=0):
    pixels, positions, counts = image_inputs([(3, 6), (6, 3)], max_soft_tokens=3, seed=seed)  # 2 soft tokens each
    return {**media_batch("image", counts, seed), "pixel_values": pixels, "image_position_ids": positions}


def audio_batch(seed=0, frames=(200, 16)):
    # 50 and 4 tokens: the short clip's padding is longer than the tower's attention context
    # (12 + 12 frames after subsampling), so some of its rows have every key masked.
    features, mask, counts = audio_inputs(list(frames), seed=seed)
    return {**media_batch("audio", counts, seed), "input_features": features, "input_features_mask": mask}


def stock_model(tiny_dir, dtype=torch.float32):
    return Gemma4ForConditionalGeneration.from_pretrained(tiny_dir, dtype=dtype)


# ------------------------------------------------------------------ loading
@pytest.mark.parametrize("asked,dropped", [("image", "audio"), ("audio", "image")])
def test_only_the_towers_asked_for_are_built_and_their_weights_load(tiny_dir, asked, dropped, capsys):
    model, tokenizer = load_mm(("text", asked))
    assert list(model_towers.towers_of(model)) == [asked]
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(f"model.{module}.") for module in model_towers.TOWERS[dropped] for n in names)
    assert all(any(n.startswith(f"model.{module}.") for n in names) for module in model_towers.TOWERS[asked])
    stock = stock_model(tiny_dir).state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, stock[name]), name  # every built weight is the checkpoint's
    assert "unexpected" not in capsys.readouterr().err.lower()
    assert tokenizer.convert_tokens_to_ids("<|image|>") == TOKEN["<|image|>"]
    # with audio the tokenizer carries the feature extractor of the tower's input width
    assert (getattr(tokenizer, "feature_extractor", None) is not None) == (asked == "audio")
    if asked == "audio":
        assert tokenizer.feature_extractor.feature_size == model.model.audio_tower.config.subsampling_conv_channels[0]
        features, mask, _ = audio_inputs([40], n_mel=tokenizer.feature_extractor.feature_size)
        model.model.audio_tower(features, mask)  # the tower takes that width


def test_unknown_modality_is_refused():
    with pytest.raises(ValueError, match="modalities"):
        load_mm(("text", "video"))


def test_towers_stay_in_the_compute_dtype_and_the_language_model_in_4bit():
    import bitsandbytes as bnb

    model, _ = load_mm(load_in_4bit=True)
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all("language_model" in n for n in quantized)
    for tower in model_towers.towers_of(model).values():
        assert {p.dtype for p in tower.parameters()} == {torch.float32}


# ------------------------------------------------------------------ the split step
@pytest.mark.parametrize("make_batch", [image_batch, audio_batch], ids=["image", "audio"])
def test_split_step_equals_the_stock_forward(tiny_dir, make_batch):
    """model_towers.embed_inputs + the language model on the embeddings == Gemma4Model.forward
    (same checkpoint, no kernels: bit-for-bit code paths except the split itself)."""
    model, _ = load_mm(use_kernels=False)
    stock = stock_model(tiny_dir)
    batch = make_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        want = stock.model(**inputs).last_hidden_state
        embeds = model_towers.embed_inputs(model.model, inputs)
        text_ids = model_towers.text_token_ids(batch["input_ids"], model.config)
        text_model = model.model.language_model
        got = text_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                         per_layer_inputs=text_model.get_per_layer_inputs(text_ids, None)).last_hidden_state
    real = batch["attention_mask"].bool()
    assert_rel_close(got[real], want[real], 1e-5, "hidden states")


def test_placeholder_count_mismatch_names_the_fix():
    model, _ = load_mm()
    batch = image_batch()
    batch["input_ids"][0, batch["input_ids"][0].tolist().index(TOKEN["<|image|>"])] = 50  # one placeholder short
    with pytest.raises(Exception, match="placeholder tokens"):
        causal_lm_loss(model, batch, normalizer=1)


def test_a_medium_without_its_tower_is_refused():
    model, _ = load_mm(("text", "image"))
    with pytest.raises(Exception, match="modalities=\\('text', 'audio'\\)"):
        causal_lm_loss(model, audio_batch(), normalizer=1)


# ------------------------------------------------------------------ LoRA targets
LANGUAGE_MODEL = [f"model.language_model.layers.{i}.{p}" for i in range(4) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") if not (i >= 2 and p in ("self_attn.k_proj", "self_attn.v_proj"))]
VISION_TOWER = [f"model.vision_tower.encoder.layers.{i}.{p}.linear" for i in range(2) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
AUDIO_TOWER = [f"model.audio_tower.layers.{i}.{p}.linear" for i in range(2) for p in (
    "feed_forward1.ffw_layer_1", "feed_forward1.ffw_layer_2", "feed_forward2.ffw_layer_1",
    "feed_forward2.ffw_layer_2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.post",
    "lconv1d.linear_start", "lconv1d.linear_end")]
PROJECTORS = ["model.embed_vision.embedding_projection", "model.embed_audio.embedding_projection"]


def adapted_modules(peft_model):
    return sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A"))


@pytest.mark.parametrize("switches,expected", [
    ({}, LANGUAGE_MODEL),
    ({"train_vision_tower": True}, LANGUAGE_MODEL + VISION_TOWER),
    ({"train_audio_tower": True}, LANGUAGE_MODEL + AUDIO_TOWER),
    ({"train_projectors": True}, LANGUAGE_MODEL + PROJECTORS),
    ({"train_vision_tower": True, "train_audio_tower": True}, LANGUAGE_MODEL + VISION_TOWER + AUDIO_TOWER),
], ids=["default", "vision", "audio", "projectors", "both"])
def test_lora_goes_exactly_where_each_switch_says(switches, expected, capsys):
    model, _ = load_mm()
    peft_model = add_lora(model, r=4, **switches)
    assert adapted_modules(peft_model) == sorted(expected)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    report = trainable_parameters(peft_model)
    if switches.get("train_audio_tower"):
        assert "audio tower" in report
    if not switches:
        assert "tower" not in report


def test_a_tower_switch_without_that_tower_is_refused():
    model, _ = load_mm(("text", "image"))
    with pytest.raises(ValueError, match="modalities=\\('text', 'audio'\\)"):
        add_lora(model, train_audio_tower=True)
    assert tower_targets(model, "image") == VISION_TOWER


# ------------------------------------------------------------------ against transformers + peft
def with_random_lora_b(peft_model, seed=0):
    """peft starts B at zero, which makes every A-gradient zero: give B values to compare."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return peft_model


def stock_peft_loss_and_grads(tiny_dir, ours, batch, targets):
    """Plain Gemma4ForConditionalGeneration + peft on the same targets and adapter weights:
    its own loss (mean over the shifted labels; the labels mask the same positions)."""
    from peft import LoraConfig, get_peft_model

    stock = get_peft_model(stock_model(tiny_dir), LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    ours_lora = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, param in stock.named_parameters():
            if ".lora_" in name:
                param.copy_(ours_lora[name])
    assert sorted(n for n, p in stock.named_parameters() if p.requires_grad) == sorted(ours_lora)
    loss = stock(**batch).loss
    loss.backward()
    return loss.detach(), lora_grads(stock)


@pytest.mark.parametrize("kind,switches", [("image", {}), ("image", {"train_vision_tower": True}),
                                           ("audio", {"train_audio_tower": True})],
                         ids=["image", "image+vision-tower", "audio+audio-tower"])
def test_loss_and_lora_gradients_equal_transformers_and_peft(tiny_dir, kind, switches):
    model, _ = load_mm()
    model = with_random_lora_b(add_lora(model, r=4, **switches))
    enable_gradient_checkpointing(model, "offload")  # language model offloaded; a trained tower "on"
    model.train()
    batch = image_batch(seed=1) if kind == "image" else audio_batch(seed=1)
    loss = causal_lm_loss(model, batch, normalizer=count_label_tokens([batch]))
    loss.backward()
    grads = lora_grads(model)
    targets = lora_targets(unwrap_base(model), **switches)
    want_loss, want_grads = stock_peft_loss_and_grads(tiny_dir, model, batch, targets)
    # fp32 kernels and the fused loss sum in another order: ~1e-6 relative, far below any real bug
    assert_rel_close(loss, want_loss, 1e-5, "loss")
    assert set(grads) == set(want_grads)
    tower_grads = [n for n in grads if "_tower" in n]
    assert bool(tower_grads) == bool(switches)
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0, name  # every adapter really gets a gradient
        assert_rel_close(grads[name], grad, 1e-4, name)


def unwrap_base(peft_model):
    return peft_model.get_base_model()


# ------------------------------------------------------------------ frozen towers keep nothing
def saved_tensor_count(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = fn()
    return out, len(saved)


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_a_frozen_tower_keeps_no_activations(kind):
    model, _ = load_mm()
    model = add_lora(model, r=4)
    model.train()
    batch = image_batch() if kind == "image" else audio_batch()
    embeds, n_saved = saved_tensor_count(lambda: model_towers.embed_inputs(model.get_base_model().model, batch))
    assert n_saved == 0 and not embeds.requires_grad  # a leaf for the language model

    trained, _ = load_mm()
    trained = add_lora(trained, r=4, **{f"train_{'vision' if kind == 'image' else 'audio'}_tower": True})
    trained.train()
    embeds, n_saved = saved_tensor_count(lambda: model_towers.embed_inputs(trained.get_base_model().model, batch))
    assert n_saved > 0 and embeds.requires_grad  # the same check sees a trained tower's activations


def test_tower_layers_are_checkpointed_only_while_trained():
    model, _ = load_mm()
    model = add_lora(model, r=4, train_audio_tower=True)
    enable_gradient_checkpointing(model, "offload")
    inner = model.get_base_model().model
    assert all(layer.gradient_checkpointing for layer in inner.audio_tower.layers)
    assert not any(layer.gradient_checkpointing for layer in inner.vision_tower.encoder.layers)
    assert all(layer.gradient_checkpointing for layer in inner.language_model.layers)
    enable_gradient_checkpointing(model, "off")
    assert not any(layer.gradient_checkpointing for layer in inner.audio_tower.layers)


# ------------------------------------------------------------------ fp16 (a T4)
@pytest.mark.parametrize("kind", ["image", "audio"])
def test_fp16_forward_and_backward_stay_finite(kind):
    """fp16 through the towers (adapters on, so their backward runs too) and the language
    model. The audio batch has a clip whose padding is longer than the tower's attention
    context: those rows have every key masked, which a -1e9 mask in fp16 (-inf) would turn
    into NaN; the tower computes its scores in float32, where -1e9 is safe."""
    model, _ = load_mm(dtype="float16")
    switch = {"train_vision_tower": True} if kind == "image" else {"train_audio_tower": True}
    model = with_random_lora_b(add_lora(model, r=4, **switch))
    model.train()
    batch = image_batch() if kind == "image" else audio_batch()
    batch = {k: v.half() if v.is_floating_point() else v for k, v in batch.items()}
    loss = causal_lm_loss(model, batch, normalizer=count_label_tokens([batch]))
    loss.backward()
    assert torch.isfinite(loss)
    grads = lora_grads(model)
    assert any("_tower" in n for n in grads)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name


# ------------------------------------------------------------------ training through gemmatune.train
def bundled(name, tokenizer, rows=16):
    """The first rows of a bundled media dataset, prepared as the notebooks prepare them."""

    kind = "image" if name == "formulas" else "audio"
    prompt = "Write the LaTeX." if kind == "image" else "Transcribe this audio."
    format_row = getattr(data_messages, f"{kind}_to_text")(prompt)
    dataset = data_dataset.prepare_dataset(data_rows.load_bundled_dataset(name, "train")[:rows], tokenizer,
                                   max_seq_length=512, formatting_func=format_row, max_soft_tokens=70)
    return dataset


def test_audio_tower_adapters_change_during_training(tmp_path):
    """The switch really trains the tower: after gemmatune.train every adapter matrix in the
    audio tower has moved (peft starts B at zero; A moves once B is not zero)."""
    from gemmatune import train

    model, tokenizer = load_mm(("text", "audio"))
    model = add_lora(model, r=4, train_audio_tower=True)
    tower = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "audio_tower" in n}
    assert len(tower) == 2 * len(AUDIO_TOWER)
    result = train(model, bundled("speech", tokenizer), tokenizer, max_steps=3, batch_size=2, grad_accum=1,
                   learning_rate=1e-2, warmup_steps=0, output_dir=str(tmp_path), dashboard="off")
    after = dict(model.named_parameters())
    unchanged = [n for n, before in tower.items() if torch.equal(after[n].detach(), before)]
    assert not unchanged, unchanged
    assert result.status == "done" and all(torch.isfinite(torch.tensor(result.losses)))


def test_vision_fine_tune_trains_only_the_language_model_by_default(tmp_path):
    from gemmatune import train

    model, tokenizer = load_mm(("text", "image"))
    model = add_lora(model, r=4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "vision" in n}
    result = train(model, bundled("formulas", tokenizer), tokenizer, max_steps=4, batch_size=2, grad_accum=1,
                   learning_rate=5e-3, warmup_steps=0, output_dir=str(tmp_path), dashboard="off")
    assert result.status == "done" and result.losses[-1] < result.losses[0]
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n].detach(), value) for n, value in frozen.items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["image", "audio"])
def test_media_graph_replays_match_the_eager_step(kind):
    """The towers eagerly in front, the language model as a CUDA graph: the same losses and
    LoRA gradients as the all-eager step, over replays with different images/clips."""
    from gemmatune.training.step import MicroStep

    results = {}
    for graphs in (False, True):
        model, _ = load_mm(("text", kind), dtype="bfloat16", load_in_4bit=True, device="cuda")
        model = with_random_lora_b(add_lora(model, r=8, seed=0))
        enable_gradient_checkpointing(model, "offload")
        model.train()
        step = MicroStep(model, cuda_graphs=graphs)
        losses, grads = [], []
        for seed in range(4):  # same token shape: eager, capture + replay, replay, replay
            batch = image_batch(seed) if kind == "image" else audio_batch(seed)
            losses.append(step(batch, normalizer=count_label_tokens([batch])))
            grads.append(lora_grads(model))
            model.zero_grad(set_to_none=False)
        assert ("1 captured" in step.describe()) == graphs, step.describe()
        results[graphs] = losses, grads
    assert_graphed_steps_match_eager(results)


def test_benchmark_batches_hold_as_many_placeholders_as_the_towers_give():
    """benchmarks/train_step_multimodal.py runs only on the GPU machine: its hand-built batches
    must match the full-size towers' arithmetic (9 patches per soft token, 4 mel frames per
    audio token) or every run there fails."""
    from benchmarks import train_step_multimodal as bench

    for name, (mode, rows, amount, text) in bench.WORKLOADS.items():
        batch = bench.workload_batch(mode, rows, amount, text)
        ids = batch["input_ids"]
        if mode == "image":
            valid = (batch["image_position_ids"] != -1).all(-1).sum()
            assert (ids == bench.IMAGE).sum() == valid // 9 == rows * amount, name
        else:
            assert (ids == bench.AUDIO).sum() == batch["input_features_mask"].sum() // 4 == rows * amount * 25, name
        assert int(batch["attention_mask"].sum()) == rows * (text + (amount if mode == "image" else amount * 25))
        assert (batch["labels"][torch.isin(ids, torch.tensor([bench.IMAGE, bench.AUDIO]))] == IGNORE_INDEX).all()
