"""The 4-bit model on a CPU: generating with it never changes how it trains.

bitsandbytes 0.50 repacks a Linear4bit's weight in place into a CPU layout the first time the
layer runs in eval mode on an input that needs no gradient, if the CPU has AVX512-BF16. After
that the layer's forward is approximate and its backward has no autograd kernel: a model that
ran chat() once trains with wrong gradients. gemmatune computes every 4-bit layer itself
(patching.NF4Linear4bit), so bitsandbytes' forward never runs.

CI runs on whatever CPU a session has, so these tests do not wait for an AVX512-BF16 machine:
`repacking_cpu` sets bitsandbytes' own per-layer switch (`support_avx512bf16_for_cpu`, read in
its forward) on every 4-bit layer, which makes bitsandbytes take the repacking path on any CPU.
With gemmatune's NF4 path removed these tests fail on every machine.
"""
import json

import pytest
import torch

import gemmatune
from gemmatune.data.batches import collate
from gemmatune.training.loss import causal_lm_loss, count_label_tokens
from tests.helpers import load_tiny, lora_grads, random_rows

TRAIN = dict(batch_size=4, grad_accum=1, learning_rate=5e-3, warmup_steps=2, dashboard="off")


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("GEMMATUNE_KERNELS", "0")  # as on a user's CPU (no Triton interpreter)


def repacking_cpu(model):
    """Make every bitsandbytes 4-bit layer behave as on a CPU with AVX512-BF16."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "no 4-bit layer: the test would prove nothing"
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    return layers


def packed_bytes(layers):
    return [layer.weight.data.clone() for layer in layers]


def lora_model_4bit(chat_first=False, chat_before_lora=False):
    model, tokenizer = load_tiny(load_in_4bit=True)
    layers = repacking_cpu(model)
    if chat_before_lora:
        gemmatune.chat(model, tokenizer, "Hello there", max_new_tokens=4, stream=False)
    model = gemmatune.add_lora(model, r=8)
    with torch.no_grad():  # nonzero B, so every A gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    if chat_first:
        gemmatune.chat(model, tokenizer, "Hello there", max_new_tokens=4, stream=False)
    return model, tokenizer, layers


@pytest.fixture(scope="module")
def dataset(tiny_dir, tiny_tokenizer):
    rows = gemmatune.data.rows.bundled_dataset_path().read_text(encoding="utf-8").splitlines()[:16]
    return gemmatune.prepare_dataset([json.loads(row) for row in rows], tiny_tokenizer, max_seq_length=256)


def gradients(model):
    model.train()
    batch = collate(random_rows(3, seed=3), pad_token_id=0)
    causal_lm_loss(model, batch, normalizer=count_label_tokens([batch]), fused=False).backward()
    return lora_grads(model)


def test_every_4bit_layer_runs_gemmatunes_nf4_path():
    model, tokenizer = load_tiny(load_in_4bit=True)
    kinds = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Linear4bit")}
    assert kinds == {"NF4Linear4bit"}, kinds
    names = [n for n, m in model.named_modules() if type(m).__name__ == "NF4Linear4bit"]
    assert any("per_layer_input_gate" in n for n in names) and any("per_layer_model_projection" in n for n in names)


def test_generation_leaves_the_4bit_weights_untouched():
    model, tokenizer, layers = lora_model_4bit()
    before = packed_bytes(layers)
    gemmatune.chat(model, tokenizer, "Hello there", max_new_tokens=4, stream=False)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    assert all(torch.equal(a, layer.weight.data) for a, layer in zip(before, layers))


@pytest.mark.parametrize("when", ["after add_lora", "before add_lora"])
def test_chat_then_train_gives_the_same_gradients_and_losses(dataset, tmp_path, when):
    plain, tokenizer, _ = lora_model_4bit()
    chatted, _, _ = lora_model_4bit(chat_first=when == "after add_lora", chat_before_lora=when == "before add_lora")
    expected, got = gradients(plain), gradients(chatted)
    assert expected.keys() == got.keys() and len(expected) > 0
    for name, grad in expected.items():
        assert torch.equal(got[name], grad), name
    for model in (plain, chatted):
        model.zero_grad(set_to_none=True)
    runs = [gemmatune.train(m, dataset, tokenizer, max_steps=4, output_dir=str(tmp_path / str(i)), **TRAIN)
            for i, m in enumerate((plain, chatted))]
    assert runs[0].losses == runs[1].losses
    for (name, a), b in zip(plain.named_parameters(), chatted.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name


def test_notebook_flow_chat_train_save_reload_chat_gives_the_same_reply(dataset, tmp_path):
    """The notebook's order: chat before training, train, save, load a fresh model + the adapter."""
    model, tokenizer, _ = lora_model_4bit()
    prompt = "Convert 5 kilometres to miles."
    gemmatune.chat(model, tokenizer, prompt, max_new_tokens=8, stream=False)
    gemmatune.train(model, dataset, tokenizer, max_steps=3, output_dir=str(tmp_path), **TRAIN)
    reply = gemmatune.chat(model, tokenizer, prompt, max_new_tokens=8, stream=False)
    saved = gemmatune.save_adapter(model, tokenizer, tmp_path / "my-adapter")

    base, base_tokenizer = load_tiny(load_in_4bit=True)
    repacking_cpu(base)
    reloaded = gemmatune.load_adapter(base, saved)
    assert gemmatune.chat(reloaded, base_tokenizer, prompt, max_new_tokens=8, stream=False) == reply
    ids = torch.randint(20, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
