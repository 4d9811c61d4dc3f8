"""geglu: Triton (interpreter on CPU) and reference against fp64 and transformers'
gelu_pytorch_tanh; full sizes on a GPU against eager PyTorch's own error."""
import pytest
import torch
from transformers.activations import ACT2FN

from gemmatune.kernels import geglu as mod
from gemmatune.kernels._backend import use_triton
from tests.kernels.helpers import gpu, rel_err


def make_case(shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    # gate spread to +-12 so tanh saturates on both sides; up and d out plain normal
    gate = (torch.randn(shape, generator=g, device=device) * 3).to(dtype)
    up = torch.randn(shape, generator=g, device=device).to(dtype)
    d_out = torch.randn(shape, generator=g, device=device).to(dtype)
    return gate, up, d_out


def run(fn, gate, up, d_out):
    gate = gate.detach().clone().requires_grad_(True)
    up = up.detach().clone().requires_grad_(True)
    out = fn(gate, up)
    out.backward(d_out)
    return out.detach(), gate.grad, up.grad


def eager_in_dtype(gate, up):
    """What the Gemma MLP does in eager mode: the activation, then the product, both in the dtype."""
    return ACT2FN["gelu_pytorch_tanh"](gate) * up


@pytest.mark.parametrize("shape", [(1, 64), (7, 200), (333, 96), (3, 5, 7)])
def test_matches_fp64(kernel_path, poison_empty, shape):
    gate, up, d_out = make_case(shape, seed=shape[0])
    assert use_triton(gate, up) == (kernel_path == "triton")
    got = run(mod.geglu, gate, up, d_out)
    ref = run(eager_in_dtype, gate.double(), up.double(), d_out.double())
    for name, k, r in zip(("out", "grad_gate", "grad_up"), got, ref):
        assert k.shape == gate.shape and torch.isfinite(k).all()
        # fp32 math; tanh from exp differs from libm's by a few ulp: ~1e-7 norm-wise.
        assert rel_err(k, r) < 2e-6, name


def test_strided_halves_of_a_fused_projection(kernel_path, poison_empty):
    """gate and up as the two halves of one (rows, 2I) tensor: row-strided views, no copy needed."""
    gate_up = torch.randn(5, 9, 2 * 96) * 3
    d_out = torch.randn(5, 9, 96)
    leaf = gate_up.clone().requires_grad_(True)
    out = mod.geglu(*leaf.chunk(2, dim=-1))
    out.backward(d_out)
    ref_leaf = gate_up.double().requires_grad_(True)
    ref = eager_in_dtype(*ref_leaf.chunk(2, dim=-1))
    ref.backward(d_out.double())
    assert rel_err(out, ref) < 2e-6 and rel_err(leaf.grad, ref_leaf.grad) < 2e-6  # fp32, as above


def test_fp16_error_within_eager_cpu(err_log):
    check_against_eager(torch.float16, (333, 200), "cpu", err_log)


def test_refuses_mismatched_inputs():
    with pytest.raises(ValueError):
        mod.geglu_forward(torch.randn(3, 8), torch.randn(3, 9))


def check_against_eager(dtype, shape, device, err_log):
    gate, up, d_out = make_case(shape, dtype=dtype, device=device, seed=shape[-1])
    ref = run(eager_in_dtype, gate.double(), up.double(), d_out.double())
    ker = run(mod.geglu, gate, up, d_out)
    eager = run(eager_in_dtype, gate, up, d_out)
    for name, k, e, r in zip(("out", "grad_gate", "grad_up"), ker, eager, ref):
        assert torch.isfinite(k).all()
        err_k, err_t = rel_err(k, r), rel_err(e, r)
        err_log(kernel="geglu", quantity=name, dtype=str(dtype), shape=str(shape), err_kernel=err_k,
                err_torch=err_t)
        # 2x eager: the kernel rounds once to the dtype, eager rounds after gelu and after the
        # product (and several times in its backward); the factor covers fp32 tanh-from-exp
        # differences. 1e-6 is a floor for fp32.
        assert err_k <= 2 * err_t + 1e-6, (name, err_k, err_t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2048, 6144), (2048, 10240)])  # E2B, E4B intermediate sizes
@gpu
def test_gpu_error_within_eager(dtype, shape, err_log):
    check_against_eager(dtype, shape, "cuda", err_log)
