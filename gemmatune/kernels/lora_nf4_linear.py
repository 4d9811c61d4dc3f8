"""QLoRA linear: frozen NF4 base weight plus a trainable low-rank update, in one autograd node.

Forward, x (N, in), packed NF4 weight W (out, in), A (r, in), B (out, r), scale = alpha / r:

    t = x @ A^T                                   (N, r), saved for backward
    y = x @ W^T + bias + scale * t @ B^T          (N, out)

Backward, g = dL/dy (N, out); W is frozen, so it gets no gradient:

    u      = scale * (g @ B)                      (N, r)
    dx     = g @ W + u @ A                         W dequantised again, not saved
    dA     = u^T @ x                               (r, in)
    dB     = scale * g^T @ t                       (out, r)
    dbias  = sum over rows of g

What it does differently from bitsandbytes' Linear4bit plus a separate peft LoRA branch:
- The dequantised W never lives between forward and backward: only the packed bytes and the
  QuantState are referenced; backward dequantises again (bnb does the same). W is written into one
  reusable workspace per (device, dtype) by the Triton NF4 kernel (gemmatune.kernels.nf4), so
  every layer's transient W reuses the same memory.
- The LoRA term is folded into the base output by an in-place `addmm_` (beta=1, alpha=scale):
  no separate (N, out) tensors for B(A(x)), for its scaled copy and for the sum. In backward,
  u @ A is accumulated into dx the same way, and scale is applied to the small (N, r) tensor.
- bias is folded into the base GEMM with torch.addmm.

Reference: Hu et al. 2021 (LoRA); Dettmers et al. 2023 (QLoRA); bitsandbytes
autograd/_functions.py (MatMul4Bit: dequantise in forward and again in backward); peft
tuners/lora/bnb.py (Linear4bit.forward: base result + lora_B(lora_A(dropout(x))) * scaling).

Precision plan: the GEMMs run in x's dtype through cuBLAS/ATen with fp32 accumulation (bf16/fp16)
as in the eager path. W is dequantised exactly as bitsandbytes does (fp32 math, one rounding to
the compute dtype; when the quantised dtype is narrower than x's dtype, W is first rounded to
the quantised dtype, as bnb does). LoRA weights are cast to x's dtype for the GEMMs (as peft does
when it casts the input) and their gradients are returned in their own dtype. Memory: saved for
backward are x (shared with the caller), t (N x r), and references to A, B, bias and the packed W.
No dropout on the LoRA input (lora_dropout=0, the QLoRA default for these models).
"""
import torch
import torch.nn.functional as F

from ._backend import use_triton
from .nf4 import dequantize_nf4, dequantize_nf4_reference

_WORKSPACE: dict = {}


def release_workspace():
    """Free the dequantisation workspaces (they are re-created on the next call)."""
    _WORKSPACE.clear()


def workspace_buffers() -> list:
    """The dequantisation workspaces alive now: a CUDA graph that wrote into them must keep them."""
    return list(_WORKSPACE.values())


def _workspace(numel, dtype, device):
    key = (device, dtype)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACE.pop(key, None)  # free the smaller one first
        buf = _WORKSPACE[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _dequantize(packed, quant_state, dtype):
    """W (out, in) in `dtype`, bit-identical to bnb's dequantize_4bit(...).to(dtype)."""
    out_features, in_features = quant_state.shape
    if quant_state.dtype in (dtype, torch.float32):  # one rounding from fp32 either way: write directly
        buf = _workspace(out_features * in_features, dtype, packed.device).view(out_features, in_features)
        return dequantize_nf4(packed, quant_state, out=buf)
    return dequantize_nf4(packed, quant_state).to(dtype)  # bnb rounds to quant_state.dtype first


def _check(x, quant_state, lora_A, lora_B, bias):
    if len(quant_state.shape) != 2:
        raise ValueError(f"expected a 2-D quantised weight, got shape {tuple(quant_state.shape)}")
    out_features, in_features = quant_state.shape
    r = lora_A.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    if lora_A.shape != (r, in_features) or lora_B.shape != (out_features, r):
        raise ValueError(f"lora_A must be ({r}, {in_features}) and lora_B ({out_features}, {r}), "
                         f"got {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported compute dtype {x.dtype}")


def lora_nf4_linear_forward(x2, packed, quant_state, A, B, scale, bias):
    """x2 (N, in) in the compute dtype, A/B/bias already in it. Returns y (N, out) and t (N, r)."""
    W = _dequantize(packed, quant_state, x2.dtype)
    t = x2 @ A.t()
    y = torch.addmm(bias, x2, W.t()) if bias is not None else x2 @ W.t()
    y.addmm_(t, B.t(), alpha=scale)
    return y, t


def lora_nf4_linear_backward(g2, x2, packed, quant_state, A, B, t, scale, needs):
    """g2 (N, out). needs = (dx, dA, dB, dbias) flags. Returns the four gradients (or None)."""
    need_dx, need_dA, need_dB, need_dbias = needs
    dx = dA = dB = dbias = None
    if need_dx or need_dA:
        u = (g2 @ B).mul_(scale)
        if need_dx:
            dx = g2 @ _dequantize(packed, quant_state, g2.dtype)
            dx.addmm_(u, A)
        if need_dA:
            dA = u.t() @ x2
    if need_dB:
        dB = (g2.t() @ t).mul_(scale)
    if need_dbias:
        dbias = g2.sum(0)
    return dx, dA, dB, dbias


class LoRANF4LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, quant_state, lora_A, lora_B, scale, bias):
        x2 = x.reshape(-1, x.shape[-1])
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        b = bias.to(x.dtype) if bias is not None else None
        y, t = lora_nf4_linear_forward(x2, packed, quant_state, A, B, scale, b)
        ctx.save_for_backward(x2, packed, lora_A, lora_B, t)
        ctx.quant_state, ctx.scale = quant_state, scale
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, packed, lora_A, lora_B, t = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).to(x2.dtype)
        need = ctx.needs_input_grad
        dx, dA, dB, dbias = lora_nf4_linear_backward(
            g2, x2, packed, ctx.quant_state, lora_A.to(x2.dtype), lora_B.to(x2.dtype), t, ctx.scale,
            (need[0], need[3], need[4], need[6]))
        dx = dx.view(ctx.x_shape) if dx is not None else None
        dA = dA.to(lora_A.dtype) if dA is not None else None
        dB = dB.to(lora_B.dtype) if dB is not None else None
        dbias = dbias.to(ctx.bias_dtype) if dbias is not None else None
        return dx, None, None, dA, dB, None, dbias


class NF4LinearFunction(torch.autograd.Function):
    """y = x @ dequant(W)^T + bias with W frozen and no adapter: the same memory plan as the LoRA
    function (W dequantised into the workspace in forward and again in backward, never saved)."""

    @staticmethod
    def forward(ctx, x, packed, quant_state, bias):
        x2 = x.reshape(-1, x.shape[-1])
        W = _dequantize(packed, quant_state, x.dtype)
        y = torch.addmm(bias.to(x.dtype), x2, W.t()) if bias is not None else x2 @ W.t()
        ctx.save_for_backward(packed)
        ctx.quant_state, ctx.x_shape = quant_state, x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        (packed,) = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = (g2 @ _dequantize(packed, ctx.quant_state, g2.dtype)).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            dbias = g2.sum(0).to(ctx.bias_dtype)
        return dx, None, None, dbias


def nf4_linear_reference(x, weight4bit, quant_state, bias=None):
    """Eager PyTorch: dequantise (gemmatune's reference), then F.linear."""
    W = dequantize_nf4_reference(weight4bit, quant_state).to(x.dtype)
    return F.linear(x, W, bias.to(x.dtype) if bias is not None else None)


def nf4_linear(x, weight4bit, quant_state, bias=None):
    """y = x @ dequant(W)^T + bias for a frozen NF4 bnb Params4bit W (a 4-bit layer without LoRA)."""
    out_features, in_features = quant_state.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported compute dtype {x.dtype}")
    if use_triton(x, weight4bit):
        return NF4LinearFunction.apply(x, weight4bit, quant_state, bias)
    return nf4_linear_reference(x, weight4bit, quant_state, bias)


def lora_nf4_linear_reference(x, weight4bit, quant_state, lora_A, lora_B, scale, bias=None):
    """Eager PyTorch: bnb Linear4bit's math (dequantise, then F.linear) + peft's separate LoRA branch.

    Unlike the Function, autograd keeps the dequantised W alive until backward."""
    _check(x, quant_state, lora_A, lora_B, bias)
    W = dequantize_nf4_reference(weight4bit, quant_state).to(x.dtype)
    y = F.linear(x, W, bias.to(x.dtype) if bias is not None else None)
    return y + F.linear(F.linear(x, lora_A.to(x.dtype)), lora_B.to(x.dtype)) * scale


def lora_nf4_linear(x, weight4bit, quant_state, lora_A, lora_B, scale, bias=None):
    """y = x @ dequant(W)^T + bias + scale * (x @ A^T) @ B^T with an NF4 bnb Params4bit W."""
    _check(x, quant_state, lora_A, lora_B, bias)
    if use_triton(x, weight4bit):
        return LoRANF4LinearFunction.apply(x, weight4bit, quant_state, lora_A, lora_B, float(scale), bias)
    return lora_nf4_linear_reference(x, weight4bit, quant_state, lora_A, lora_B, scale, bias)
