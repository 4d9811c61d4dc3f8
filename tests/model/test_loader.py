"""The loader: the text-only model equals the full model's text path; 4-bit; PLE off the GPU."""
import bitsandbytes as bnb
import pytest
import torch
from transformers import Gemma4ForConditionalGeneration

import gemmatune.model.loader as model_loader
import gemmatune.model.ple as model_ple
from tests.helpers import load_tiny


def test_text_only_logits_equal_full_multimodal_model(tiny_dir):
    # A wrong key mapping would load random weights silently: compare logits, not "it loaded".
    model, _ = load_tiny(use_kernels=False)  # bit-equality needs transformers' own code path
    full = Gemma4ForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    ids = torch.randint(20, 300, (2, 37))
    with torch.no_grad():
        text_logits = model(input_ids=ids).logits
        full_logits = full(input_ids=ids).logits
    assert torch.equal(text_logits, full_logits)
    assert not any("vision" in n or "audio" in n for n, _ in model.named_parameters())


def test_random_language_model_would_be_caught(tiny_dir):
    # The same comparison fails for a model whose weights were not mapped: the test above can fail.
    from transformers import Gemma4ForCausalLM

    unmapped = Gemma4ForCausalLM.from_pretrained(tiny_dir, config=model_loader.AutoConfig.from_pretrained(tiny_dir)
                                                 .get_text_config(), dtype=torch.float32)
    full = Gemma4ForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    ids = torch.randint(20, 300, (1, 11))
    with torch.no_grad():
        assert not torch.allclose(unmapped(input_ids=ids).logits, full(input_ids=ids).logits)


def test_per_layer_embeddings_live_in_cpu_memory_and_match(tiny_dir):
    model, _ = load_tiny()
    host = model.model.embed_tokens_per_layer
    assert isinstance(host, model_ple.HostEmbedding)
    assert not any("embed_tokens_per_layer" in n for n, _ in model.named_parameters())
    full = Gemma4ForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    ids = torch.randint(0, 512, (3, 9))
    assert torch.equal(host(ids), full.model.language_model.embed_tokens_per_layer(ids))


def test_4bit_nf4_double_quant_on_language_model_only():
    model, _ = load_tiny(load_in_4bit=True)
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any("q_proj" in n for n in quantized) and any("down_proj" in n for n in quantized)
    assert not any("lm_head" in n or "embed" in n for n in quantized)
    layer = dict(model.named_modules())[quantized[0]]
    assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested


def test_4bit_model_stays_close_to_full_precision():
    full, _ = load_tiny()
    quant, _ = load_tiny(load_in_4bit=True)
    ids = torch.randint(20, 300, (2, 16))
    with torch.no_grad():
        a, b = full(input_ids=ids).logits, quant(input_ids=ids).logits
    # NF4 keeps ~3 significant bits per weight: logits agree in direction, not exactly.
    cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cosine > 0.9, cosine


def test_dtype_choice_on_cpu():
    dtype, why = model_loader.pick_dtype("auto", torch.device("cpu"))
    assert dtype == torch.float32 and "CPU" in why
    assert model_loader.pick_dtype("float16", torch.device("cpu"))[0] == torch.float16


def test_image_audio_need_a_multimodal_checkpoint(tmp_path, tiny_dir):
    model, tok = load_tiny()
    model.save_pretrained(tmp_path)  # a text-only checkpoint
    with pytest.raises(ValueError, match="multimodal"):
        model_loader.load_model(str(tmp_path), modalities=("text", "image"), load_in_4bit=False, verbose=False)
