"""Attention for packed micro-batches (gemmatune.model.attention.PackedDocuments and FlashAttention's
variable-length window) and what packing adds to the memory prediction.

CPU: the documents' masks against their definition, one query and key at a time; the oracle the
GPU probe compares FlashAttention with, against autograd; transformers' no-op slice. GPU (`pytest -m
gpu`): the variable-length window against the masks in bf16 at Gemma 4's sliding-layer sizes, and
the patched attention layer taking it.
"""
import pytest
import torch

from benchmarks.gemma4_configs import CONFIGS
from gemmatune.data.packing import collate_packed
from gemmatune.model.attention import (
    PackedDocuments,
    _reference_packed_window,
    attention_math,
    flash_varlen_works,
    packed_window_attention,
)
from gemmatune.model.memory import architecture, predict_peak_bytes, predict_peak_gib
from tests.helpers import assert_rel_close


def documents(lengths_per_buffer, length, device="cpu"):
    """The PackedDocuments of buffers holding rows of these lengths (gemmatune.data.packing)."""
    buffers = [[{"input_ids": [20] * n, "labels": [20] * n} for n in lengths] for lengths in lengths_per_buffer]
    batch = collate_packed(buffers, 0, length)
    return PackedDocuments(batch["document_ids"].to(device), batch["cu_seq_lens"].to(device))


@pytest.mark.parametrize("window", [None, 3])
def test_masks_follow_their_definition(window):
    docs = documents([[4, 7, 2], [13], []], 13)
    mask = docs.mask(window)
    assert mask.shape == (3, 1, 13, 13)
    ids = docs.document_ids
    for b in range(3):
        for q in range(13):
            for k in range(13):
                allowed = ids[b, q] == ids[b, k] and k <= q and (window is None or q - k < window)
                assert bool(mask[b, 0, q, k]) == bool(allowed), (b, q, k)
    assert docs.mask(window) is mask  # built once per forward
    additive = docs.mask(window, torch.float32)
    assert torch.equal(additive == 0, mask) and (additive[~mask] == torch.finfo(torch.float32).min).all()


def test_transformers_full_slice_is_the_documents_themselves():
    docs = documents([[3, 2]], 8)
    assert docs[:, :, slice(0, None), :] is docs
    with pytest.raises(NotImplementedError):
        docs[:, :, slice(-1, None), :]


def test_the_probes_oracle_is_attentions_gradient():
    """_reference_packed_window (what the GPU probe holds FlashAttention to) against autograd."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 12, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 12, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    d_out = torch.randn(2, 12, 4, 8, generator=gen, dtype=torch.float64)
    mask = documents([[5, 7], [12]], 12).mask(4)
    out = attention_math(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, 0.5).transpose(1, 2)
    out.backward(d_out)
    expected = [out.detach(), q.grad, k.grad, v.grad]
    got = _reference_packed_window(q.detach(), k.detach(), v.detach(), d_out, mask, 0.5)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        assert_rel_close(a.double(), b, 1e-6, name)


def test_no_variable_length_flash_attention_on_a_cpu():
    assert not flash_varlen_works(torch.zeros(1, 8, 2, 64))


def test_packing_adds_its_masks_and_workspace_to_the_prediction():
    arch = architecture(CONFIGS["e2b"]())
    padded = predict_peak_bytes(None, 2048, 2, arch=arch, masks=False, media={})
    packed = predict_peak_bytes(None, 2048, 2, arch=arch, masks=False, media={}, packed=True)
    assert padded["packing"] == 0 < packed["packing"] < 2**30 and packed["masks"] == 0
    assert packed["total"] - packed["packing"] == padded["total"]


def test_packed_buffers_hold_several_media_rows_in_the_prediction():
    from benchmarks.gemma4_configs import multimodal_config
    from gemmatune.model.memory import media_architecture

    config = multimodal_config("e4b")
    media = media_architecture(config)
    arch = architecture(config)
    one = predict_peak_bytes(None, 1024, 2, arch=arch, media=media, images=1, masks=False)
    packed = predict_peak_bytes(None, 1024, 2, arch=arch, media=media, images=1, masks=False, packed=True)
    assert packed["tower_activations"] == pytest.approx(3 * one["tower_activations"])  # 1024 // 282 images a buffer
    assert predict_peak_gib(None, 1024, 2, arch=arch, media=media, images=1, packed=True) > predict_peak_gib(
        None, 1024, 2, arch=arch, media=media, images=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_variable_length_window_equals_the_masks_on_a_gpu(dtype):
    """Gemma 4's sliding layers (8 query heads, 1-2 key heads, head_dim 256, window 512) over two
    buffers of 2048 tokens holding rows shorter and longer than the window, a full buffer, padding."""
    if not flash_varlen_works(torch.zeros(1, 8, 2, 256, device="cuda", dtype=dtype)):
        pytest.skip("no FlashAttention-2 variable-length window on this GPU")
    docs = documents([[700, 30, 1200], [2048]], 2048, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for kv_heads in (1, 2):
        q = torch.randn(2, 2048, 8, 256, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
        k, v = (torch.randn(2, 2048, kv_heads, 256, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
                for _ in range(2))
        d_out = torch.randn(2, 2048, 8, 256, device="cuda", dtype=dtype, generator=gen)
        out = packed_window_attention(q, k, v, docs, 512, 1.0)
        out.backward(d_out)
        got = [out, q.grad, k.grad, v.grad]
        expected = _reference_packed_window(*(t.detach().float().cpu() for t in (q, k, v, d_out)),
                                            docs.mask(512).cpu(), 1.0)
        reference_error = [(e.to(dtype).float() - e).abs().max() for e in expected]  # the dtype's own rounding
        for name, g, e, floor in zip(("out", "dq", "dk", "dv"), got, expected, reference_error):
            assert torch.isfinite(g).all(), name
            error = (g.float().cpu() - e).abs().max()
            assert error <= 8 * floor + 1e-3 * e.abs().max(), (name, kv_heads, float(error), float(floor))
