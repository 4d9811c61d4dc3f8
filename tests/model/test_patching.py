"""patch_model: kernels swapped in on this model only, same loss and gradients, reversible."""
import pytest
import torch
from transformers.models.gemma4 import modeling_gemma4 as hf_gemma4

import gemmatune.model.patching as model_patching
from gemmatune.data.batches import collate
from gemmatune.model.loader import pick_device
from gemmatune.model.lora import add_lora
from gemmatune.training.loss import causal_lm_loss, count_label_tokens
from gemmatune.training.trainer import train
from tests.helpers import assert_rel_close, load_tiny, lora_grads, random_rows


def loss_and_grads(use_kernels, load_in_4bit=True):
    model, _ = load_tiny(load_in_4bit=load_in_4bit, use_kernels=use_kernels)
    model = add_lora(model, r=8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    batch = {k: v.to(model.device) for k, v in collate(random_rows(3, seed=3), pad_token_id=0).items()}
    assert batch["input_ids"].shape[1] > model.config.get_text_config().sliding_window  # windows really slide
    loss = causal_lm_loss(model, batch, normalizer=count_label_tokens([batch]), fused=use_kernels)
    loss.backward()
    return model, loss.detach(), lora_grads(model)


def test_patched_model_gives_the_same_loss_and_gradients():
    stock, stock_loss, stock_grads = loss_and_grads(use_kernels=False)
    patched, loss, grads = loss_and_grads(use_kernels=True)
    kinds = {type(m).__name__ for m in patched.modules()}
    assert {"KernelRMSNorm", "KernelGemma4MLP", "KernelGemma4Attention", "KernelLoRALinear4bit"} <= kinds
    assert not kinds & {"KernelRMSNorm", "KernelLoRALinear4bit"} & {type(m).__name__ for m in stock.modules()}
    # fp32 kernels sum in another order than PyTorch: ~1e-6 relative, far below any real bug.
    assert_rel_close(loss, stock_loss, 1e-5, "loss")
    for name, grad in stock_grads.items():
        assert_rel_close(grads[name], grad, 1e-4, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_patched_model_on_the_gpu_gives_the_same_loss_and_gradients():
    """The same comparison on CUDA (fp32, 4-bit base): the Triton kernels compiled for the GPU,
    not run by the interpreter, inside the model with its own strides and shapes."""
    assert pick_device().type == "cuda"  # load_model puts the tiny model there
    test_patched_model_gives_the_same_loss_and_gradients()


def test_mask_free_attention_equals_the_masked_model():
    """The causal window applied inside KernelGemma4Attention when it gets no masks (what
    builds_own_masks opens on sm80+ GPUs; here, on the CPU, the block-by-block window) gives
    the hidden states and gradients transformers' masks give."""
    model, _ = load_tiny(load_in_4bit=False, use_kernels=True)
    text = model.model
    assert not model_patching.builds_own_masks(text)  # no FlashAttention-2 window on a CPU: masks are built
    window = model.config.get_text_config().sliding_window
    ids = torch.randint(3, 200, (2, 2 * window + 7), generator=torch.Generator().manual_seed(5))
    no_masks = {kind: None for kind in set(model.config.get_text_config().layer_types)}

    def hidden_and_grads(attention_mask):
        model.zero_grad(set_to_none=True)
        hidden = text(input_ids=ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden.square().mean().backward()
        return hidden.detach(), {n: p.grad.clone() for n, p in text.named_parameters() if "q_proj" in n}

    want, want_grads = hidden_and_grads(None)
    got, grads = hidden_and_grads(no_masks)
    assert_rel_close(got, want, 1e-5, "hidden states")
    for name, grad in want_grads.items():
        assert_rel_close(grads[name], grad, 1e-4, name)


def test_patch_is_idempotent_reversible_and_local():
    model, _ = load_tiny(use_kernels=True)
    other, _ = load_tiny(use_kernels=False)
    n_swapped = len(model.gemmatune_patches)
    assert model_patching.patch_model(model) == [] or len(model.gemmatune_patches) == n_swapped
    assert len(model.gemmatune_patches) == n_swapped
    assert all(type(m) is hf_gemma4.Gemma4RMSNorm for m in other.modules() if isinstance(m, hf_gemma4.Gemma4RMSNorm))
    model_patching.unpatch_model(model)
    assert not any(type(m).__name__.startswith("Kernel") for m in model.modules())


def test_fp16_clamps_keep_the_loss_finite():
    # Push activations past the fp16 range (65504), as Gemma's can on a T4.
    def loss_in_fp16(clamp):
        model, _ = load_tiny(dtype="float16", use_kernels=False)
        if not clamp:
            model_patching.unpatch_model(model)
        for layer in model.model.layers:
            layer.layer_scalar.fill_(4000.0)
        batch = collate(random_rows(2, seed=4), pad_token_id=0)
        with torch.no_grad():
            return causal_lm_loss(model, batch, normalizer=count_label_tokens([batch]), fused=False)

    assert not torch.isfinite(loss_in_fp16(clamp=False)), "the overflow did not happen: test proves nothing"
    assert torch.isfinite(loss_in_fp16(clamp=True))


def test_thirty_steps_with_and_without_kernels_agree(tmp_path):
    # The convergence test: same seed, same data; loss curves and final LoRA weights agree.
    from gemmatune.data.dataset import prepare_dataset

    runs = {}
    for use_kernels in (False, True):
        model, tok = load_tiny(load_in_4bit=True, use_kernels=use_kernels)
        model = add_lora(model, r=8)
        data = prepare_dataset("bundled", tok, max_seq_length=64)
        result = train(model, data, tok, max_steps=30, batch_size=2, grad_accum=1, learning_rate=2e-3,
                       optimizer="adamw", fused_loss=use_kernels, output_dir=str(tmp_path / str(use_kernels)))
        runs[use_kernels] = (result.losses, {n: p.detach().clone() for n, p in model.named_parameters()
                                             if p.requires_grad})
    (stock_losses, stock_weights), (losses, weights) = runs[False], runs[True]
    assert losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(stock_losses), rtol=1e-3, atol=1e-4)
    for name, weight in stock_weights.items():
        assert_rel_close(weights[name], weight, 1e-3, name)
