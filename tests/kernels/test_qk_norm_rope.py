"""qk_norm_rope: Triton (interpreter on CPU, real on GPU) against transformers' own modules.

TRITON_INTERPRET is read when @triton.jit decorates a kernel, i.e. when the kernel module is
first imported, so it is set here before that import (only where there is no GPU).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig  # noqa: E402
from transformers.models.gemma4.modeling_gemma4 import (  # noqa: E402
    Gemma4RMSNorm,
    Gemma4TextRotaryEmbedding,
    apply_rotary_pos_emb,
)

from gemmatune.kernels import qk_norm_rope as mod  # noqa: E402
from gemmatune.kernels._backend import use_triton  # noqa: E402
from tests.kernels.helpers import log_error, rel_max_err  # noqa: E402

LAYER_KINDS = ["sliding_attention", "full_attention"]  # default RoPE / proportional partial RoPE


def _rope_and_norm(head_dim, global_head_dim, layer_type, S, dtype, device="cpu", seed=0):
    """cos/sin exactly as Gemma4TextRotaryEmbedding makes them, and a Gemma4RMSNorm with random weight."""
    config = Gemma4TextConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
                              global_head_dim=global_head_dim, num_hidden_layers=2, intermediate_size=64,
                              vocab_size=128, layer_types=LAYER_KINDS)
    rope = Gemma4TextRotaryEmbedding(config, device=device)
    D = head_dim if layer_type == "sliding_attention" else global_head_dim
    pos = torch.arange(S, device=device)[None] * 37  # spread positions so large angles occur too
    cos, sin = rope(torch.zeros(1, dtype=dtype, device=device), pos, layer_type)
    norm = Gemma4RMSNorm(D, eps=config.rms_norm_eps).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=g) * 1.5 + 0.25)
    return cos, sin, norm


def _transformers_path(x, norm, cos, sin):
    return apply_rotary_pos_emb(norm(x), cos, sin, unsqueeze_dim=2)


def _ulp_close(y, y_ref, h_ref, cos, sin, ulps):
    """|y - y_ref| <= ulps * eps(dtype) * (|h*cos| + |rotate_half(h)*sin|), h the reference normed head.

    Measured against the size of the two RoPE terms, not of y: y = a + b can cancel, and then a
    one-ulp change of a or b is a large relative change of y.
    """
    cos, sin, h = cos.unsqueeze(2).double(), sin.unsqueeze(2).double(), h_ref.double()
    mag = (h * cos).abs() + (mod.rotate_half(h) * sin).abs()
    eps = torch.finfo(y.dtype).eps
    return bool(((y.double() - y_ref.double()).abs() <= ulps * eps * mag).all())


# --------------------------------------------------------------------------- CPU tests
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layer_type,head_dim,global_head_dim,S,H", [
    ("sliding_attention", 64, 128, 7, 3),      # tiny config
    ("full_attention", 64, 128, 7, 3),         # tiny partial RoPE (cos=1, sin=0 on 3/4 of dims)
    ("sliding_attention", 256, 512, 3, 8),     # real E2B/E4B sliding head dim
    ("full_attention", 256, 512, 3, 8),        # real full-layer head dim, proportional RoPE
    ("sliding_attention", 96, 200, 1, 1),      # non-power-of-two head dim, one token
    ("full_attention", 96, 200, 2, 5),
    ("sliding_attention", 64, 128, 37, 8),     # 74 tokens: tiles cross the batch boundary; 2 backward programs
])
def test_matches_transformers(poison_empty, dtype, layer_type, head_dim, global_head_dim, S, H):
    cos, sin, norm = _rope_and_norm(head_dim, global_head_dim, layer_type, S, dtype)
    D = cos.shape[-1]
    torch.manual_seed(S * H + D)
    x = torch.randn(2 if S > 1 else 1, S, H, D).mul(3).to(dtype).requires_grad_()
    cos = cos.expand(x.shape[0], S, D)
    assert use_triton(x, norm.weight, cos, sin)
    y = mod.qk_norm_rope(x, norm.weight, cos, sin, eps=norm.eps)
    y_ref = _transformers_path(x, norm, cos, sin)
    assert torch.isfinite(y).all()
    h_ref = norm(x).detach()
    if dtype == torch.float16:
        # Same roundings as transformers. The fp32 r can differ by an ulp (sum order of mean(x^2)),
        # which very rarely flips the fp16 rounding of h; measured: bit-identical on these seeds.
        assert _ulp_close(y, y_ref, h_ref, cos, sin, 2)
        assert (y == y_ref).float().mean() > 0.99
    else:
        # fp32: mean(x^2) is summed in another order than torch's vectorised CPU sum, so r differs
        # by an ulp on some rows and 15-20% of outputs move by a few ulps. Measured max: 3.2 ulps
        # of the RoPE-term magnitude; allowed: 6.
        assert _ulp_close(y, y_ref, h_ref, cos, sin, 6)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, norm.weight), g)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, norm.weight), g)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
    # transformers rounds dh to the dtype before the norm backward and sums dw in another order;
    # the kernel keeps dh in fp32. Tolerance: a few ulps of the dtype relative to the largest value.
    tol = {torch.float32: 1e-5, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(dx, dx_ref, atol=tol * dx_ref.abs().max().item(), rtol=tol)
    torch.testing.assert_close(dw, dw_ref, atol=tol * dw_ref.abs().max().item(), rtol=tol)


def test_bf16_on_cpu_uses_reference_and_matches_transformers():
    """The interpreter computes bf16 wrongly, so bf16 on CPU must take the reference path."""
    cos, sin, norm = _rope_and_norm(256, 512, "full_attention", 4, torch.bfloat16)
    x = torch.randn(1, 4, 2, 512, dtype=torch.bfloat16)
    assert not use_triton(x, norm.weight, cos, sin)
    assert torch.equal(mod.qk_norm_rope(x, norm.weight, cos, sin), _transformers_path(x, norm, cos, sin))


def test_frozen_weight_and_strided_grad():
    """Frozen weight (LoRA): no dw; upstream grad non-contiguous (comes back through a transpose)."""
    cos, sin, norm = _rope_and_norm(64, 128, "sliding_attention", 5, torch.float32)
    norm.weight.requires_grad_(False)
    x = torch.randn(2, 5, 4, 64, requires_grad=True)
    y = mod.qk_norm_rope(x, norm.weight, cos, sin)
    g = torch.randn(2, 4, 5, 64).transpose(1, 2)
    (dx,) = torch.autograd.grad(y, x, g)
    (dx_ref,) = torch.autograd.grad(_transformers_path(x, norm, cos, sin), x, g)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)  # fp32 reduction order only


def test_weight_grad_is_deterministic(poison_empty):
    """dw is summed over 74 tokens by two backward programs and a partial-sum kernel in a fixed
    order: a second backward over the same graph gives the same bits."""
    cos, sin, norm = _rope_and_norm(64, 128, "sliding_attention", 37, torch.float32)
    x = torch.randn(2, 37, 8, 64, requires_grad=True)
    g = torch.randn(2, 37, 8, 64)
    (dw_ref,) = torch.autograd.grad(_transformers_path(x, norm, cos, sin), norm.weight, g)
    y = mod.qk_norm_rope(x, norm.weight, cos, sin)
    first = torch.autograd.grad(y, norm.weight, g, retain_graph=True)[0]
    second = torch.autograd.grad(y, norm.weight, g)[0]
    assert torch.equal(first, second)
    torch.testing.assert_close(first, dw_ref, atol=1e-5 * dw_ref.abs().max().item(), rtol=1e-5)


def test_head_groups_in_small_tiles(monkeypatch):
    """With a tile smaller than a token's heads (as head dim 512 on a GPU), a program takes a
    group of heads: 5 heads of 64 in tiles of 128 elements make 2 head groups of 4 (the second
    one masked) per token, and the backward still sums dw over every tile."""
    monkeypatch.setattr(mod, "MAX_TILE", 128)
    cos, sin, norm = _rope_and_norm(64, 128, "sliding_attention", 6, torch.float32)
    x = torch.randn(2, 6, 5, 64, requires_grad=True)
    g = torch.randn(2, 6, 5, 64)
    y = mod.qk_norm_rope(x, norm.weight, cos, sin)
    y_ref = _transformers_path(x, norm, cos, sin)
    dx, dw = torch.autograd.grad(y, (x, norm.weight), g)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, norm.weight), g)
    assert _ulp_close(y, y_ref, norm(x).detach(), cos, sin, 6)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5 * dx_ref.abs().max().item(), rtol=1e-5)
    torch.testing.assert_close(dw, dw_ref, atol=1e-5 * dw_ref.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("layer_type,Hq,Hk,S", [("sliding_attention", 8, 1, 37), ("full_attention", 3, 2, 5)])
def test_pair_equals_two_single_calls(poison_empty, monkeypatch, frozen, layer_type, Hq, Hk, S):
    """qk_norm_rope_pair (query and key in one launch each way) gives what two qk_norm_rope calls
    give: the same bits forward, and backward too with frozen weights (its own kernel); with
    trained weights it runs the single backwards. Small tiles make several tiles per tensor."""
    monkeypatch.setattr(mod, "MAX_TILE", 256)
    cos, sin, q_norm = _rope_and_norm(64, 128, layer_type, S, torch.float32, seed=1)
    k_norm = _rope_and_norm(64, 128, layer_type, S, torch.float32, seed=2)[2]
    D = cos.shape[-1]
    for norm in (q_norm, k_norm):
        norm.weight.requires_grad_(not frozen)
    q = torch.randn(2, S, Hq, D, requires_grad=True)
    k = torch.randn(2, S, Hk, D, requires_grad=True)
    gq, gk = torch.randn(2, S, Hq, D), torch.randn(2, S, Hk, D)
    params = [q, k] + ([] if frozen else [q_norm.weight, k_norm.weight])

    def outputs_and_grads(y_q, y_k):
        return [y_q.detach(), y_k.detach(), *torch.autograd.grad((y_q, y_k), params, (gq, gk))]

    pair = outputs_and_grads(*mod.qk_norm_rope_pair(q, q_norm.weight, k, k_norm.weight, cos, sin, 1e-6, 1e-5))
    single = outputs_and_grads(mod.qk_norm_rope(q, q_norm.weight, cos, sin, 1e-6),
                               mod.qk_norm_rope(k, k_norm.weight, cos, sin, 1e-5))
    for got, want in zip(pair, single):
        assert torch.isfinite(got).all()
        assert torch.equal(got, want)


def test_pair_refuses_mismatched_tensors():
    cos, sin = torch.ones(1, 2, 64), torch.ones(1, 2, 64)
    with pytest.raises(ValueError, match="same B, S, D"):
        mod.qk_norm_rope_pair_forward(torch.randn(1, 2, 2, 64), torch.ones(64), 1e-6,
                                      torch.randn(1, 3, 1, 64), torch.ones(64), 1e-6, cos, sin)


def test_refuses_bad_shapes():
    x = torch.randn(1, 2, 2, 63)
    with pytest.raises(ValueError, match="even head dim"):
        mod.qk_norm_rope_forward(x, torch.ones(63), torch.ones(1, 2, 63), torch.ones(1, 2, 63), 1e-6)
    x = torch.randn(1, 2, 2, 64)
    with pytest.raises(ValueError, match="dtype"):
        mod.qk_norm_rope_forward(x, torch.ones(64), torch.ones(1, 2, 64).half(), torch.ones(1, 2, 64).half(), 1e-6)


# --------------------------------------------------------------------------- GPU tests
# The kernel does the eager roundings in the forward and keeps more in fp32 in the backward, so
# its error against fp64 should match plain PyTorch's; factor 2 absorbs reduction-order noise
# (a different sum order can land on the other side of a rounding boundary). The floor of
# 4 eps covers the case where PyTorch happens to be exact.
FACTOR = 2.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layer_type,H", [("sliding_attention", 8), ("full_attention", 8), ("sliding_attention", 1),
                                          ("full_attention", 2)])
def test_gpu_error_vs_fp64(dtype, layer_type, H):
    S = 2048  # E2B/E4B: 8 query heads, 1 (E2B) or 2 (E4B) kv heads; head dim 256 sliding, 512 full
    cos, sin, norm = _rope_and_norm(256, 512, layer_type, S, torch.float32, device="cuda")
    D = cos.shape[-1]
    x64 = torch.randn(1, S, H, D, device="cuda", dtype=torch.float64) * 3
    w64, cos64, sin64 = norm.weight.detach().double(), cos.double(), sin.double()
    g64 = torch.randn_like(x64)
    x64.requires_grad_()
    w64.requires_grad_()
    y64 = mod.qk_norm_rope_reference(x64, w64, cos64, sin64)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), g64)

    def run(fn):
        x = x64.detach().to(dtype).requires_grad_()
        w = w64.detach().to(dtype).requires_grad_()
        y = fn(x, w, cos.to(dtype), sin.to(dtype))
        dx, dw = torch.autograd.grad(y, (x, w), g64.to(dtype))
        return y, dx, dw

    ours = run(lambda x, w, c, s: mod.QKNormRoPEFunction.apply(x, w, c, s, 1e-6))
    theirs = run(mod.qk_norm_rope_reference)
    eps = torch.finfo(dtype).eps
    for name, a, b, ref in zip(("y", "dx", "dw"), ours, theirs, (y64, dx64, dw64)):
        assert torch.isfinite(a).all()
        e_k, e_t = rel_max_err(a, ref), rel_max_err(b, ref)
        log_error(dict(test="qk_norm_rope", layer=layer_type, heads=H, dtype=str(dtype), tensor=name,
                  rel_err_kernel=e_k, rel_err_torch=e_t))
        assert e_k <= FACTOR * e_t + 4 * eps, (name, e_k, e_t)
    if dtype != torch.float32:  # forward roundings are the eager ones: nearly all elements identical
        same = (ours[0] == theirs[0]).float().mean().item()
        assert same > 0.99, same


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer_type,Hq,Hk", [("sliding_attention", 8, 1), ("full_attention", 8, 2)])
def test_gpu_pair_equals_two_single_calls(dtype, layer_type, Hq, Hk):
    """At E2B/E4B sizes, compiled: the pair kernels give the single kernels' results (frozen
    weights, as LoRA trains; the single kernels' errors against fp64 are checked above). Equal
    bits where both launches use the same warps per program; a different warp count may change
    a sum's order, so up to 2 ulps on under 1% of elements are allowed."""
    S = 2048
    cos, sin, q_norm = _rope_and_norm(256, 512, layer_type, S, dtype, device="cuda", seed=1)
    k_norm = _rope_and_norm(256, 512, layer_type, S, dtype, device="cuda", seed=2)[2]
    q_norm.weight.requires_grad_(False)
    k_norm.weight.requires_grad_(False)
    D = cos.shape[-1]
    q = (torch.randn(1, S, Hq, D, device="cuda") * 3).to(dtype).requires_grad_()
    k = (torch.randn(1, S, Hk, D, device="cuda") * 3).to(dtype).requires_grad_()
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def run(y_q, y_k):
        return [y_q.detach(), y_k.detach(), *torch.autograd.grad((y_q, y_k), (q, k), (gq, gk))]

    pair = run(*mod.qk_norm_rope_pair(q, q_norm.weight, k, k_norm.weight, cos, sin))
    single = run(mod.qk_norm_rope(q, q_norm.weight, cos, sin), mod.qk_norm_rope(k, k_norm.weight, cos, sin))
    eps = torch.finfo(dtype).eps
    for got, want in zip(pair, single):
        assert torch.isfinite(got).all()
        assert rel_max_err(got, want.double()) <= 2 * eps and (got == want).float().mean() > 0.99
