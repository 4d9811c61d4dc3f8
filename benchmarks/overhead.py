"""Host-side cost of one call: how many microseconds of Python/launch each op costs the CPU.

    python -m benchmarks.overhead

At batch 1 x 2048 tokens a Gemma 4 training step launches thousands of small kernels; when
the CPU needs longer to issue them than the GPU needs to run them, the GPU idles. This
times the *issue* cost (no synchronisation inside the loop) of gemmatune's kernel wrappers
next to plain ATen ops, and the GPU time of Gemma 4's attention through SDPA and through
gemmatune.model.attention: head_dim 512 (full layers) and the 512-token sliding window. A diagnostic: it prints,
writes nothing.
"""
import time

import torch


def issue_us(fn, n: int = 300) -> float:
    """Median CPU microseconds to issue fn() (the GPU may still be running it)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return sorted(times)[n // 2]


def gpu_ms(fn, n: int = 20) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main() -> None:
    import bitsandbytes as bnb

    from gemmatune.kernels import geglu, lora_nf4_linear, rms_norm

    dev = "cuda"
    x = torch.randn(2048, 1536, device=dev, dtype=torch.bfloat16)
    w = torch.ones(1536, device=dev, dtype=torch.bfloat16)
    xg = x.clone().requires_grad_(True)
    wg = w.clone().requires_grad_(True)
    layer = bnb.nn.Linear4bit(1536, 2048, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer = layer.to(dev)
    packed, qs = layer.weight, layer.weight.quant_state
    a = torch.randn(16, 1536, device=dev, requires_grad=True)
    b = torch.randn(2048, 16, device=dev, requires_grad=True)
    gate = torch.randn(2048, 6144, device=dev, dtype=torch.bfloat16)
    rows = {
        "aten add (x + 1)": lambda: x + 1,
        "aten empty": lambda: torch.empty(2048, 1536, device=dev, dtype=torch.bfloat16),
        "rms_norm reference (eager, 6 ops)": lambda: rms_norm.rms_norm_reference(x, w),
        "rms_norm kernel, no grad": lambda: rms_norm.rms_norm(x, w),
        "rms_norm kernel, autograd": lambda: rms_norm.rms_norm(xg, wg),
        "use_triton(x, w)": lambda: rms_norm.use_triton(x, w),
        "geglu kernel, no grad": lambda: geglu.geglu(gate, gate),
        "nf4 dequant kernel": lambda: lora_nf4_linear._dequantize(packed, qs, torch.bfloat16),
        "bnb dequantize_4bit": lambda: bnb.functional.dequantize_4bit(packed, qs),
        "lora_nf4_linear forward (autograd)": lambda: lora_nf4_linear.lora_nf4_linear(xg, packed, qs, a, b, 1.0),
        "bnb Linear4bit forward": lambda: layer(x),
        "aten mm": lambda: x @ w.new_ones(1536, 16),
    }
    print(f"{'op':40} {'issue us':>9}")
    for name, fn in rows.items():
        with torch.no_grad() if "autograd" not in name else torch.enable_grad():
            print(f"{name:40} {issue_us(fn):9.1f}")

    from torch.nn.functional import scaled_dot_product_attention as sdpa

    print("\nattention fwd+bwd, (1, 8, 2048, 512) causal, bf16")
    q, k, v = (torch.randn(1, 8, 2048, 512, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.ones(2048, 2048, device=dev, dtype=torch.bool).tril()

    def run(fn):
        out = fn()
        out.backward(torch.ones_like(out))

    print(f"  sdpa bool mask   {gpu_ms(lambda: run(lambda: sdpa(q, k, v, attn_mask=mask, scale=1.0))):7.2f} ms")
    print(f"  sdpa is_causal   {gpu_ms(lambda: run(lambda: sdpa(q, k, v, is_causal=True, scale=1.0))):7.2f} ms")
    try:
        from gemmatune.model.attention import attention_math

        print(f"  gemmatune math   {gpu_ms(lambda: run(lambda: attention_math(q, k, v, mask, 1.0))):7.2f} ms")
    except ImportError:
        pass

    print("\nsliding-window attention fwd+bwd, q (1, 8, 2048, 256), k/v 2 heads, window 512, bf16")
    q = torch.randn(1, 8, 2048, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 2, 2048, 256, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    pos = torch.arange(2048, device=dev)
    window_mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - 512)
    masked = gpu_ms(lambda: run(lambda: sdpa(q, k, v, attn_mask=window_mask, enable_gqa=True)))
    print(f"  sdpa sliding mask {masked:7.2f} ms")
    print(f"  sdpa is_causal    {gpu_ms(lambda: run(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True))):7.2f} ms")
    try:
        from gemmatune.model.attention import flash_window_works, sliding_window_attention, sliding_window_blocks

        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        print(f"  gemmatune blocks  {gpu_ms(lambda: run(lambda: sliding_window_blocks(q, k, v, 512, 1 / 16))):7.2f} ms")
        label = "flash window" if flash_window_works(qt) else "(no flash: blocks)"
        ms = gpu_ms(lambda: run(lambda: sliding_window_attention(qt, kt, vt, 512, 1 / 16)))
        print(f"  gemmatune {label:8} {ms:7.2f} ms")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
