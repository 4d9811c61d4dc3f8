"""fused_linear_cross_entropy: Triton (interpreter on CPU) and reference against an fp64 oracle,
transformers' own Gemma 4 loss, the normalizer contract, and full sizes on a GPU."""
import pytest
import torch
import torch.nn.functional as F

from gemmatune.kernels import fused_linear_ce as mod
from gemmatune.kernels._backend import use_triton
from tests.kernels.helpers import gpu, rel_err

IGNORE = -100


def make_case(n, hidden, vocab, dtype=torch.float32, device="cpu", seed=0, ignore_every=3, logit_std=4.0):
    """Random hidden states, an LM head whose logits have std `logit_std` (so the softcap at 30
    bends the tail), and labels with every `ignore_every`-th one ignored."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, device=device)
    w = torch.randn(vocab, hidden, generator=g, device=device) * (logit_std / hidden**0.5)
    labels = torch.randint(0, vocab, (n,), generator=g, device=device)
    if ignore_every:
        labels[1::ignore_every] = IGNORE
    return h.to(dtype), w.to(dtype), labels


def oracle(h, w, labels, softcap, normalizer=None):
    """fp64 per-row and total loss, written independently of the module's reference."""
    z = h.double() @ w.double().t()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = labels != IGNORE
    rows = torch.where(valid, torch.logsumexp(z, -1) - z.gather(1, labels.clamp_min(0)[:, None])[:, 0], 0.0)
    m = valid.sum().double() if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float64)
    return rows, (rows.sum() / m if m > 0 else rows.sum() * 0)


def run(fn, h, w, labels, **kw):
    """Loss and gradients of a loss function, on fresh leaves."""
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(kw.pop("weight_grad", True))
    loss = fn(h, w, labels, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def oracle_grads(h, w, labels, softcap, normalizer=None):
    return run(lambda h, w, y: oracle(h, w, y, softcap, normalizer)[1], h.double(), w.double(), labels)


@pytest.mark.parametrize("n,hidden,vocab,softcap,budget_mib", [
    (1, 64, 512, 30.0, 256),       # one row, power-of-two vocabulary
    (7, 96, 500, None, 256),       # no softcap, odd vocabulary
    (333, 64, 500, 30.0, 0.05),    # 0.05 MiB = 26 rows a chunk: 13 chunks, a short last one
    (7, 200, 9000, 30.0, 256),     # vocabulary larger than one block: the online logsumexp
])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_matches_fp64_oracle(kernel_path, poison_empty, n, hidden, vocab, softcap, budget_mib, weight_grad):
    h, w, labels = make_case(n, hidden, vocab, seed=n + vocab)
    assert use_triton(h, w, labels) == (kernel_path == "triton")
    kw = dict(softcap=softcap)
    if kernel_path == "triton":
        kw["memory_budget_mib"] = budget_mib
    loss, gh, gw = run(mod.fused_linear_cross_entropy, h, w, labels, weight_grad=weight_grad, **kw)
    ref_loss, ref_gh, ref_gw = oracle_grads(h, w, labels, softcap)
    for t in (loss, gh) + ((gw,) if weight_grad else ()):
        assert torch.isfinite(t).all()
    # fp32 inputs, fp32 logits and fp32 math: ~1e-6 relative from the matmuls and sums over V.
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert rel_err(gh, ref_gh) < 1e-5
    if weight_grad:
        assert rel_err(gw, ref_gw) < 1e-5
    else:
        assert gw is None


def test_batched_input_and_tensor_normalizer(kernel_path):
    h, w, labels = make_case(2 * 9, 64, 500, seed=3)
    loss3d, gh3d, _ = run(mod.fused_linear_cross_entropy, h.view(2, 9, 64), w, labels.view(2, 9),
                          normalizer=torch.tensor(11.0))
    loss2d, gh2d, _ = run(mod.fused_linear_cross_entropy, h, w, labels, normalizer=11.0)
    assert gh3d.shape == (2, 9, 64)
    # Same rows, same order, same code: identical up to the last bit.
    torch.testing.assert_close(loss3d, loss2d, rtol=0, atol=0)
    torch.testing.assert_close(gh3d.view(-1, 64), gh2d, rtol=0, atol=0)


def test_shared_normalizer_splits_a_batch(kernel_path, poison_empty):
    """Gradient accumulation: two halves divided by the full batch's label count add up to the
    full batch (loss, hidden grads side by side, weight grads summed)."""
    h, w, labels = make_case(40, 64, 500, seed=4, ignore_every=4)
    total = int((labels != IGNORE).sum())
    full = run(mod.fused_linear_cross_entropy, h, w, labels)
    a = run(mod.fused_linear_cross_entropy, h[:17], w, labels[:17], normalizer=total)
    b = run(mod.fused_linear_cross_entropy, h[17:], w, labels[17:], normalizer=torch.tensor(float(total)))
    # fp32: the halves sum in a different order: a few ulp.
    torch.testing.assert_close(a[0] + b[0], full[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.cat([a[1], b[1]]), full[1], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(a[2] + b[2], full[2], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("normalizer", [None, 0.0, 5.0])
def test_all_ignored_gives_zero_not_nan(kernel_path, poison_empty, normalizer):
    h, w, _ = make_case(7, 64, 500, seed=5)
    labels = torch.full((7,), IGNORE)
    loss, gh, gw = run(mod.fused_linear_cross_entropy, h, w, labels, normalizer=normalizer)
    assert loss.item() == 0.0
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


def test_zero_normalizer_with_labels_gives_zero(kernel_path):
    h, w, labels = make_case(7, 64, 500, seed=6)
    loss, gh, _ = run(mod.fused_linear_cross_entropy, h, w, labels, normalizer=0)
    assert loss.item() == 0.0 and not gh.any()


def test_matches_transformers_gemma4_loss(kernel_path):
    """Gemma4ForCausalLM's own loss (lm_head, final_logit_softcapping, shifted CE with -100):
    the fused loss on the hidden states entering lm_head, with labels shifted by hand."""
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ForCausalLM

    config = Gemma4TextConfig(
        vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, global_head_dim=32, hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=500, final_logit_softcapping=30.0, layer_types=["full_attention"] * 2,
    )
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # push logits past the softcap's linear range
    ids = torch.randint(0, 500, (2, 9))
    labels = ids.clone()
    labels[0, :3] = IGNORE
    seen = {}
    model.lm_head.register_forward_hook(lambda m, args, out: seen.update(h=args[0].detach()))
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    loss = mod.fused_linear_cross_entropy(seen["h"], model.lm_head.weight.detach(), shifted,
                                          softcap=config.final_logit_softcapping)
    # fp32 throughout; transformers materialises and reduces in another order: ~1e-6 relative.
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=0)


def test_chunks_are_few_at_gemma_sizes():
    rows = mod.chunk_rows_for(2048, 262144, torch.tensor([], dtype=torch.bfloat16).element_size(), 256)
    assert rows == 512  # 4 chunks of 256 MiB of bf16 logits for 2048 tokens
    assert mod.chunk_rows_for(3, 262144, 4, 256) == 3 and mod.chunk_rows_for(10, 10**9, 4, 1) == 1


def test_refuses_mismatched_inputs():
    h, w, labels = make_case(4, 64, 500)
    with pytest.raises(ValueError):
        mod.fused_linear_ce_forward(h, w.double(), labels, 30.0, IGNORE, None, 256, True, True)
    with pytest.raises(ValueError):
        mod.fused_linear_ce_forward(h, w[:, :32], labels, 30.0, IGNORE, None, 256, True, True)
    with pytest.raises(ValueError):
        mod.fused_linear_ce_forward(h, w, labels[:3], 30.0, IGNORE, None, 256, True, True)


# ---------------------------------------------------------------------------------------------
# Half precision: the kernel against fp64 must be within a small factor of eager PyTorch's own
# error in that dtype (logits materialised, softcap in the dtype, CE on fp32 logits, exactly
# what transformers does).

def eager_in_dtype(h, w, labels, softcap):
    z = h @ w.t()
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return F.cross_entropy(z.float(), labels, ignore_index=IGNORE, reduction="sum") / (labels != IGNORE).sum()


def eager_rows_in_dtype(h, w, labels, softcap):
    z = h @ w.t()
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return F.cross_entropy(z.float(), labels, ignore_index=IGNORE, reduction="none")


def check_against_eager(dtype, n, hidden, vocab, device, err_log, softcap=30.0):
    h, w, labels = make_case(n, hidden, vocab, dtype=dtype, device=device, seed=hidden, ignore_every=10)
    rows64, loss64 = oracle(h, w, labels, softcap)
    _, gh64, gw64 = oracle_grads(h, w, labels, softcap)
    loss_k, gh_k, gw_k = run(mod.fused_linear_cross_entropy, h, w, labels, softcap=softcap)
    _, gh_t, gw_t = run(eager_in_dtype, h, w, labels, softcap=softcap)
    m = (labels != IGNORE).sum().item()
    for t in (loss_k, gh_k, gw_k):
        assert torch.isfinite(t).all()
    # The scalar loss is a sum of n signed rounding errors, so its error is a random walk; the
    # scale to compare with is eager's per-row error norm / m (the walk's standard deviation).
    loss_scale_t = (eager_rows_in_dtype(h, w, labels, softcap).double() - rows64).norm().item() / m
    errs = dict(loss=(abs(loss_k.item() - loss64.item()), loss_scale_t),
                grad_hidden=(rel_err(gh_k, gh64), rel_err(gh_t, gh64)),
                grad_weight=(rel_err(gw_k, gw64), rel_err(gw_t, gw64)))
    for name, (err_k, err_t) in errs.items():
        err_log(kernel="fused_linear_ce", quantity=name, dtype=str(dtype), shape=f"N{n} H{hidden} V{vocab}",
                err_kernel=err_k, err_torch=err_t)
    # Loss: 5 standard deviations of eager's error walk. Gradients (norm-wise over many entries,
    # so concentrated): 2x eager. The kernel rounds logits and d logits to the dtype once each,
    # as eager does, but keeps softcap/softmax in fp32 where eager rounds several more times; the
    # factor covers the different summation orders (chunked d W, fp32 tree sums). 1e-6 is a
    # floor for fp32, where eager's error may be at the level of fp64 noise in the oracle.
    assert errs["loss"][0] <= 5 * errs["loss"][1] + 1e-6 * abs(loss64.item())
    for name in ("grad_hidden", "grad_weight"):
        err_k, err_t = errs[name]
        assert err_k <= 2 * err_t + 1e-6, (name, err_k, err_t)


def test_fp16_error_within_eager_cpu(err_log):
    check_against_eager(torch.float16, 64, 96, 2000, "cpu", err_log)


def test_fp16_large_normalizer_with_grad_scaler():
    """softmax / M with M = 1e5 (many micro-batches) is below fp16's subnormals. As with a
    GradScaler, the loss is multiplied by 2^16 before backward; the kernel stored d z times
    FP16_GRAD_SCALE and applies 2^16 / M in fp32, so the scaled gradients come out whole."""
    h, w, labels = make_case(16, 64, 2000, dtype=torch.float16, seed=8)
    h.requires_grad_(True)
    w.requires_grad_(True)
    (mod.fused_linear_cross_entropy(h, w, labels, normalizer=1e5) * 2**16).backward()
    _, gh64, gw64 = oracle_grads(h.detach(), w.detach(), labels, 30.0, normalizer=1e5)
    # fp16 rounding of d z, d h and of the products: ~1e-3 (without the scale: ~all lost).
    assert rel_err(h.grad, gh64 * 2**16) < 5e-3 and rel_err(w.grad, gw64 * 2**16) < 5e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hidden", [1536, 2560])  # E2B, E4B
@gpu
def test_gpu_full_size_error_within_eager(dtype, hidden, err_log):
    check_against_eager(dtype, 2048, hidden, 262144, "cuda", err_log)


@gpu
def test_gpu_never_materialises_logits():
    """2048 x 262144 bf16 logits are 1 GiB (and eager adds 2 GiB of fp32 copies); the fused
    loss with the default 256 MiB budget must stay well under that."""
    h, w, labels = make_case(2048, 1536, 262144, dtype=torch.bfloat16, device="cuda")
    h.requires_grad_(True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mod.fused_linear_cross_entropy(h, w, labels).backward()
    torch.cuda.synchronize()
    extra_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    assert extra_mib < 512, extra_mib  # 256 chunk + 6 grad_h + small change


# ------------------------------------------------------------------ per-token log-probabilities
def logprob_oracle(h, w, labels, softcap):
    """fp64 log p(label) per row, 0 for ignored rows, written independently of the module."""
    z = h.double() @ w.double().t()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = labels != IGNORE
    picked = z.gather(1, labels.clamp_min(0)[:, None])[:, 0] - torch.logsumexp(z, -1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def logprob_grads(fn, h, w, labels, upstream, **kw):
    """log-probs and the gradients of sum(upstream * logp), on fresh leaves."""
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    logp = fn(h, w, labels, **kw)
    (logp * upstream.to(logp.dtype)).sum().backward()
    return logp.detach(), h.grad, w.grad


@pytest.mark.parametrize("n,hidden,vocab,softcap,budget_mib", [
    (1, 64, 512, 30.0, 256),       # one row
    (7, 96, 500, None, 256),       # no softcap, odd vocabulary
    (333, 64, 500, 30.0, 0.05),    # 13 chunks, a short last one: the backward recomputes each
    (7, 200, 9000, 30.0, 256),     # vocabulary larger than one block
])
def test_logprobs_match_fp64_oracle(kernel_path, poison_empty, n, hidden, vocab, softcap, budget_mib):
    h, w, labels = make_case(n, hidden, vocab, seed=2 * n + vocab)
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(n))  # any per-row weights (DPO, GRPO)
    kw = dict(softcap=softcap, **({"memory_budget_mib": budget_mib} if kernel_path == "triton" else {}))
    logp, gh, gw = logprob_grads(mod.fused_linear_logprobs, h, w, labels, upstream, **kw)
    ref, ref_gh, ref_gw = logprob_grads(lambda h, w, y: logprob_oracle(h, w, y, softcap), h.double(), w.double(),
                                        labels, upstream.double())
    for t in (logp, gh, gw):
        assert torch.isfinite(t).all()
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    assert (logp[labels == IGNORE] == 0).all() and (logp[labels != IGNORE] < 0).all()
    # fp32 throughout, as for the loss: ~1e-6 relative.
    assert rel_err(logp, ref) < 1e-5
    assert rel_err(gh, ref_gh) < 1e-5 and rel_err(gw, ref_gw) < 1e-5


def test_logprobs_are_minus_the_per_row_loss(kernel_path):
    """The same kernel as the loss: sum of log-probs over the labels == -(summed cross-entropy)."""
    h, w, labels = make_case(40, 64, 700, seed=11)
    logp = mod.fused_linear_logprobs(h, w, labels.view(4, 10).view(-1), softcap=30.0)
    loss_sum = mod.fused_linear_cross_entropy(h, w, labels, softcap=30.0, normalizer=1.0)
    assert abs(logp.sum().item() + loss_sum.item()) <= 1e-5 * abs(loss_sum.item())


def test_logprobs_keep_a_batched_shape_and_take_no_grad_in_no_grad_mode(kernel_path):
    h, w, labels = make_case(2 * 9, 64, 500, seed=5)
    with torch.no_grad():
        batched = mod.fused_linear_logprobs(h.view(2, 9, 64), w, labels.view(2, 9))
    assert batched.shape == (2, 9) and not batched.requires_grad
    torch.testing.assert_close(batched.view(-1), mod.fused_linear_logprobs(h, w, labels).detach())


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logprobs_half_precision_on_gpu(dtype, err_log):
    """bf16/fp16 at an E2B-like vocabulary: within a small factor of plain PyTorch's own error in that
    dtype; fp16 with tiny per-row weights (1e-4) must not underflow to zero gradients."""
    h, w, labels = make_case(512, 1536, 262144, device="cuda", seed=7)
    upstream = torch.full((512,), 1e-4, device="cuda")
    ref, ref_gh, ref_gw = logprob_grads(lambda h, w, y: logprob_oracle(h, w, y, 30.0), h.double(), w.double(),
                                        labels, upstream.double())
    ours = logprob_grads(mod.fused_linear_logprobs, h.to(dtype), w.to(dtype), labels, upstream)
    plain = logprob_grads(mod.fused_linear_logprobs_reference, h.to(dtype), w.to(dtype), labels, upstream)
    for name, i, oracle_value in (("logp", 0, ref), ("grad_h", 1, ref_gh), ("grad_w", 2, ref_gw)):
        e_ours, e_plain = rel_err(ours[i], oracle_value), rel_err(plain[i], oracle_value)
        err_log(test="fused_linear_logprobs", dtype=str(dtype), value=name, ours=e_ours, pytorch=e_plain)
        assert torch.isfinite(ours[i]).all() and ours[i].abs().max() > 0
        assert e_ours <= 2 * e_plain + 1e-3, (name, e_ours, e_plain)
