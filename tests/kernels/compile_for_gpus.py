"""Compile every gemmatune Triton kernel for real GPUs, on a machine without one.

Why: CI runs the kernels in Triton's interpreter, which executes them as NumPy code and skips
the compiler's checks. A kernel can pass there and still fail to compile on a GPU (it
happened: a variable bound to tensors of two shapes in the two branches of an `if`). Triton
compiles ahead of time for a named target with its bundled ptxas, no GPU needed.

How: each kernel's own host wrapper is called on small CPU tensors while Triton's launch is
replaced by a recorder, so the argument types, constexprs and num_warps are exactly those the
wrapper passes. Each distinct recorded launch is then compiled for one GPU: a T4 (sm_75) in
fp16, or an H100/H200 (sm_90) in bf16. Prints one JSON line per compiled launch.

Run without TRITON_INTERPRET (tests/kernels/test_compile_for_gpus.py starts it that way):
    python tests/kernels/compile_for_gpus.py sm_75      # or sm_90
"""
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TARGETS = {"sm_75": (75, torch.float16), "sm_90": (90, torch.bfloat16)}  # a T4 has no bf16
POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
                 torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.bool: "i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")

launches = []


def _record(self, *args, grid, warmup, **kwargs):
    """Stands in for JITFunction.run: remember the launch instead of making it."""
    launches.append((self, args, kwargs))


def _type_of(value):
    if isinstance(value, torch.Tensor):
        return "*" + POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type argument {value!r}")


def _compile(kernel, args, kwargs, capability):
    params = kernel.params
    values = dict(zip([p.name for p in params], args)) | {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
    signature, constexprs = {}, {}
    for index, param in enumerate(params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(index,)] = values[param.name] if param.name in values else param.default
        else:
            signature[param.name] = _type_of(values[param.name])
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


_getitem = torch.Tensor.__getitem__


def _slice_as_narrow(tensor, index):
    """t[a:b] as t.narrow: a CPU-only PyTorch cannot slice fake CUDA tensors with [], but narrows them."""
    if isinstance(index, slice) and index.step in (None, 1):
        start, stop, _ = index.indices(tensor.shape[0])
        return tensor.narrow(0, start, max(0, stop - start))
    return _getitem(tensor, index)


def _launch_every_kernel(dtype):
    """Calls each host wrapper (both backward modes where there are two) at Gemma 4's sizes on
    fake CUDA tensors (no memory, no GPU), so the wrappers pick their GPU launch settings."""
    import bitsandbytes.functional as bnbF

    from gemmatune.kernels import (decode_attention, fused_linear_ce, geglu, nf4, nf4_gemv, qk_norm_rope, rms_norm,
                                   row_gather)

    packed, quant_state = bnbF.quantize_4bit(torch.randn(2048, 1536).to(dtype), quant_type="nf4",
                                             compress_statistics=True)  # quantised for real, on the CPU
    torch.cuda.get_device_properties = lambda device: SimpleNamespace(multi_processor_count=132)  # an H200's
    torch.Tensor.__getitem__ = _slice_as_narrow
    with FakeTensorMode(allow_non_fake_inputs=True):
        def rand(*shape):
            return torch.empty(*shape, device="cuda", dtype=dtype)

        def like(t):
            return torch.empty(t.shape, dtype=t.dtype, device="cuda")

        # fake CUDA copies of the packed weight and its statistics: the wrapper then picks its GPU tile
        qs, qs2 = quant_state, quant_state.state2
        qs.absmax, qs.code, qs.offset = like(qs.absmax), like(qs.code), like(qs.offset)
        qs2.absmax, qs2.code = like(qs2.absmax), like(qs2.code)
        nf4.dequantize_nf4_forward(like(packed), quant_state, dtype=dtype)
        for rows in (1, 16):  # decoding: one row (chat) and a batch, with and without LoRA
            x = rand(rows, 1536)
            nf4_gemv.nf4_gemv_forward(x, like(packed), quant_state)
            nf4_gemv.nf4_gemv_forward(x, like(packed), quant_state, rand(2048), (rand(rows, 16), rand(2048, 16), 2.0))
        for k in (1536, 12288):
            nf4_gemv.lora_down(rand(1, k), rand(16, k))  # the LoRA down-projection of a decode step
        for heads, kv_heads, head_dim in ((8, 1, 256), (8, 2, 512)):  # a decode step's attention, sliding and full
            q, kv = rand(1, heads, 1, head_dim), rand(1, kv_heads, 512, head_dim)
            mask = torch.ones(1, 1, 1, 512, dtype=torch.bool, device="cuda")
            decode_attention.decode_attention_forward(q, kv, kv, mask, 1.0)
        table = torch.empty(262144, 8960, dtype=dtype, device="cuda")  # the PLE table (pinned, read by the GPU)
        row_gather.gather_rows_forward(table, torch.zeros(1, dtype=torch.int64, device="cuda"), rand(1, 8960))
        x, w = rand(2048, 1536), rand(1536)
        _, x2, rstd = rms_norm.rms_norm_forward(x, w, 1e-6)
        for compute_dw in (True, False):
            rms_norm.rms_norm_backward(x, x2, w, rstd, compute_dw)
            rms_norm.rms_norm_backward(x, x2, None, rstd, compute_dw)  # v_norm: no weight
        rms_norm.rms_norm_forward(x, None, 1e-6)
        for heads, head_dim in ((8, 256), (1, 256), (8, 512), (2, 512)):
            q, wq, cos = rand(1, 2048, heads, head_dim), rand(head_dim), rand(1, 2048, head_dim)
            _, rstd_q = qk_norm_rope.qk_norm_rope_forward(q, wq, cos, cos, 1e-6)
            for compute_dw in (True, False):
                qk_norm_rope.qk_norm_rope_backward(q, q, wq, cos, cos, rstd_q, compute_dw)
        for heads_q, heads_k, head_dim in ((8, 1, 256), (8, 2, 512)):  # a layer's query and key, one launch
            q, k = rand(1, 2048, heads_q, head_dim), rand(1, 2048, heads_k, head_dim)
            wq, cos = rand(head_dim), rand(1, 2048, head_dim)
            _, rstd_q, _, rstd_k = qk_norm_rope.qk_norm_rope_pair_forward(q, wq, 1e-6, k, wq, 1e-6, cos, cos)
            qk_norm_rope.qk_norm_rope_pair_backward(q, q, wq, rstd_q, k, k, wq, rstd_k, cos, cos)
        gate = rand(2048, 6144)
        geglu.geglu_forward(gate, gate)
        geglu.geglu_backward(gate, gate, gate)
        hidden, head = rand(2048, 1536), rand(262144, 1536)
        labels = torch.zeros(2048, dtype=torch.int64, device="cuda")
        fused_linear_ce.fused_linear_ce_forward(hidden, head, labels, 30.0, -100, None, 256, True, False)
        fused_linear_ce.fused_linear_logprobs_forward(hidden, head, labels, 30.0, -100, 256)
        fused_linear_ce.fused_linear_logprobs_backward(labels.float(), hidden, head, labels, 30.0, -100, 256, True,
                                                       False)


def main(gpu):
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET: it compiles for GPUs"
    capability, dtype = TARGETS[gpu]
    JITFunction.run = _record
    _launch_every_kernel(dtype)
    seen = set()
    for kernel, args, kwargs in launches:
        key = (kernel, tuple(_type_of(a) if not isinstance(a, (bool, int)) or isinstance(a, bool) else "int"
                             for a in args), tuple(sorted(kwargs.items())))
        if key in seen:
            continue
        seen.add(key)
        try:
            _compile(kernel, args, kwargs, capability)
            result = {"ok": True}
        except Exception as error:  # reported, not raised: the test lists every failure
            result = {"ok": False, "error": f"{type(error).__name__}: {str(error)[-600:]}"}
        print(json.dumps({"kernel": f"{kernel.__module__}.{kernel.__name__}", "gpu": gpu, "dtype": str(dtype),
                          **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
