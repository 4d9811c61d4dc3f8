"""NF4 dequantisation: Triton and the PyTorch reference must equal the format's definition bit for bit.

The oracle on the CPU is tests.kernels.helpers.nf4_oracle, computed from the NF4 code table and
the absmax alone: bitsandbytes' own CPU dequantisation is wrong on some CPUs (blocksize 128 on
AVX512-BF16 machines), so it cannot be the oracle there. On the GPU the kernel is compared with
both the oracle and bitsandbytes' CUDA dequantisation.

TRITON_INTERPRET is read when @triton.jit decorates a kernel (first import of the kernel
module), so it is set here before that import, and only where there is no GPU.
"""
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
import pytest  # noqa: E402

from gemmatune.kernels import nf4  # noqa: E402
from tests.kernels.helpers import nf4_oracle  # noqa: E402

# Shapes bnb quantises: power-of-two and awkward ones, one with an odd element count (7*9 = 63:
# the last byte holds a single value) and 333*200 (not a multiple of the blocksize).
SHAPES = [(128, 64), (192, 320), (7, 9), (333, 200)]


def _quantized(shape, dtype, blocksize, nested, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.05).to(device=device, dtype=dtype)
    return bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)


# --------------------------------------------------------------------------- CPU tests
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_triton_bit_exact(poison_empty, shape, dtype, blocksize, nested):
    packed, qs = _quantized(shape, dtype, blocksize, nested, seed=hash((shape, blocksize)) % 1000)
    expected = nf4_oracle(packed, qs)
    out = torch.full(shape, float("nan"), dtype=dtype)  # poisoned: every element must be written
    got = nf4.dequantize_nf4(packed, qs, out=out)
    assert got is out
    assert torch.equal(got, expected)
    assert torch.equal(nf4.dequantize_nf4_forward(packed, qs), expected)


@pytest.mark.parametrize("nested", [False, True])
def test_triton_odd_sized_large_row_count(nested):
    packed, qs = _quantized(SHAPES[3], torch.float32, 64, nested)
    assert torch.equal(nf4.dequantize_nf4_forward(packed, qs), nf4_oracle(packed, qs))


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape, blocksize, tile", [((33, 40), 32, 64), ((333, 200), 4096, 1024), ((33, 40), 64, 32)])
def test_triton_small_tiles(monkeypatch, shape, blocksize, tile, nested):
    """Tiles as a GPU runs them: many programs, rows of blocksize/2 bytes (blocksize 32: 16-byte
    rows), several programs inside one quantisation block (4096 with 1024-byte tiles), and a
    tile smaller than a half block (64 with 32)."""
    monkeypatch.setattr(nf4, "INTERPRETER_BYTES_PER_PROGRAM", tile)
    packed, qs = _quantized(shape, torch.float32, blocksize, nested, seed=blocksize)
    assert torch.equal(nf4.dequantize_nf4_forward(packed, qs), nf4_oracle(packed, qs))


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_bit_exact(shape, dtype, blocksize, nested):
    packed, qs = _quantized(shape, dtype, blocksize, nested)
    assert torch.equal(nf4.dequantize_nf4_reference(packed, qs), nf4_oracle(packed, qs))


def test_bf16_on_cpu_takes_reference():
    """The interpreter rounds fp32 -> bf16 differently from PyTorch, so bf16 on CPU must not use it."""
    packed, qs = _quantized((128, 64), torch.bfloat16, 64, True)
    assert torch.equal(nf4.dequantize_nf4(packed, qs), nf4_oracle(packed, qs))


def test_dtype_override_and_linear4bit_weight():
    """A bnb Linear4bit's own Params4bit/QuantState plug in; dequantise straight to another dtype."""
    layer = bnb.nn.Linear4bit(320, 192, bias=False, quant_type="nf4", compress_statistics=True,
                              compute_dtype=torch.float32)
    layer.weight.data.mul_(0.05)
    layer = layer.to("cpu")  # quantises on the move
    w, qs = layer.weight, layer.weight.quant_state
    assert w.dtype == torch.uint8 and qs.nested
    expected = nf4_oracle(w.data, qs)
    assert torch.equal(nf4.dequantize_nf4(w.data, qs), expected)
    got16 = nf4.dequantize_nf4(w.data, qs, dtype=torch.float16)
    assert torch.equal(got16, expected.to(torch.float16))  # one rounding either way from fp32


def test_oracle_reads_the_format_as_documented():
    """The oracle against hand-packed bytes: element 2k in the high nibble, 2k+1 in the low one,
    one absmax per block. Guards the oracle itself (a nibble-order bug shared with the kernel
    would otherwise pass every bit-exact test)."""
    from tests.kernels.helpers import NF4_LEVELS

    _, qs = _quantized((4, 32), torch.float32, 64, False)  # 2 blocks of 64 elements
    qs.absmax = torch.tensor([0.5, 2.0])
    nibbles = [(3 * i + 1) % 16 for i in range(128)]
    packed = torch.tensor([(nibbles[2 * k] << 4) | nibbles[2 * k + 1] for k in range(64)], dtype=torch.uint8)
    expected = torch.tensor([NF4_LEVELS[v] * (0.5 if i < 64 else 2.0) for i, v in enumerate(nibbles)],
                            dtype=torch.float32).view(4, 32)
    assert torch.equal(nf4_oracle(packed.view(-1, 1), qs), expected)
    assert torch.equal(nf4.dequantize_nf4_forward(packed.view(-1, 1), qs), expected)


def test_refuses_bad_input():
    packed, qs = _quantized((128, 64), torch.float32, 64, False)
    with pytest.raises(ValueError, match="bytes"):
        nf4.dequantize_nf4_forward(packed[:-1], qs)
    with pytest.raises(ValueError, match="out must be"):
        nf4.dequantize_nf4_forward(packed, qs, out=torch.empty(10))
    p4, qs4 = bnbF.quantize_4bit(torch.randn(128, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        nf4.dequantize_nf4_forward(p4, qs4)


# --------------------------------------------------------------------------- GPU tests
def _log(record):
    path = os.environ.get("GEMMATUNE_ERR_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


# E2B: hidden 1536, intermediate 6144, 8 q heads x 256 (sliding) / x 512 (full).
# E4B: hidden 2560, intermediate 10240, 8 q heads x 256 / x 512.
GPU_SHAPES = [(2048, 1536), (4096, 1536), (1536, 2048), (6144, 1536), (1536, 6144),
              (2048, 2560), (4096, 2560), (2560, 4096), (10240, 2560), (2560, 10240)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_bit_exact_vs_bnb_cuda(shape, dtype, blocksize, nested):
    packed, qs = _quantized(shape, dtype, blocksize, nested, device="cuda")
    expected = bnbF.dequantize_4bit(packed, qs)  # bitsandbytes' CUDA path: right, unlike some CPU paths
    out = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    got = nf4.dequantize_nf4(packed, qs, out=out)
    assert torch.equal(got.cpu(), nf4_oracle(packed, qs))
    mismatches = (got != expected).sum().item()
    _log(dict(test="dequantize_nf4", shape=list(shape), dtype=str(dtype), blocksize=blocksize, nested=nested,
              mismatches=mismatches, rel_err_kernel=0.0 if mismatches == 0 else
              ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()))
    assert mismatches == 0
