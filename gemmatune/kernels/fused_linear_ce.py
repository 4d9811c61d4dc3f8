"""Fused LM head + final-logit softcap + cross-entropy that never materialises N x V logits.

Math, per token row h (length H) with label y, LM head W (V x H), softcap s, normalizer M:

    z   = W h                               raw logits, V of them
    c   = s * tanh(z / s)                   Gemma's final-logit softcap (c = z when s is None)
    lse = log sum_j exp(c_j)
    loss = (1 / M) * sum over rows with y != ignore_index of (lse - c_y)

    d loss / d c_j = (softmax(c)_j - [j == y]) / M           (0 for ignored rows)
    d loss / d z_j = d loss / d c_j * (1 - tanh(z_j / s)^2)
    d loss / d h   = (d loss / d z) W           d loss / d W = sum over rows of (d loss / d z)^T h

M is the number of label tokens across all gradient-accumulation micro-batches (passed by the
caller) or, by default, the non-ignored labels of this call; when M is 0 the loss and all
gradients are 0, never NaN.

Per-token log-probabilities (`fused_linear_logprobs`, for preference and policy-gradient losses):
logp = c_y - lse per row, 0 for ignored rows, with d logp / d z_j = -(d CE / d c_j as above, M = 1)
times (1 - tanh^2). Their upstream gradient g (one value per row) is known only after the forward
(it depends on the log-probabilities themselves), so the backward recomputes each chunk's logits
and runs the same kernel with a per-row scale -g (ROW_SCALE); the forward runs only its first pass
(WRITE_GRAD=False). It stores nothing of size V: the hidden states are kept for the backward.

How: tokens go in chunks whose logits fit `memory_budget_mib` (at V = 262144 in bf16, the
default 192 MiB is 384 rows: 6 chunks for 2048 tokens, so logits + d hidden stay under 256 MiB). Per chunk,
cuBLAS computes z = h W^T in the input
dtype into a reused buffer; one Triton kernel then makes two passes over V per row: an online
max/sum-exp for lse and the loss, then it overwrites the buffer in place with d loss / d z.
Two more matmuls give d h (and d W, only if W requires grad). Gradients are thus computed in
the forward, as Liger Kernel does; the backward only multiplies them by grad_output.

References: Wijmans et al. 2024, "Cut your losses in large-vocabulary language models"
(chunked/fused CE); Liger Kernel's fused_linear_cross_entropy and cross_entropy (gradient in
the forward, in place over the logits); Milakov & Gimelshein 2018 (online softmax);
transformers' Gemma4ForCausalLM.forward (softcap as tanh(z / s) * s, loss on fp32 logits).

Precision plan: the logits z and the gradient d loss / d z are stored in the input dtype
(the buffer cuBLAS writes; storing them in fp32 would double the memory of a chunk). Inside
the kernel everything is fp32: softcap, tanh (from exp: 1 - tanh^2 is computed as
4e/(1+e)^2, without cancellation), max, sum-exp, lse and the per-row loss; the loss is summed
over rows in fp32. softcap is recomputed in the second pass instead of stored. d W
accumulates in an fp32 (V x H) buffer across chunks (half dtypes form each chunk's product in
vocabulary slices of at most memory_budget_mib) and is kept in fp32 until the backward.
fp16: softmax / M at V = 262144 lies far below fp16's smallest normal number, so the kernel
stores d loss / d z times FP16_GRAD_SCALE instead of times 1 / M, and 1 / (M * FP16_GRAD_SCALE)
is applied in fp32 in the backward together with grad_output (eager PyTorch rounds softmax / M
to fp16 and loses those values unless a GradScaler is used). Labels outside [0, V) other than
ignore_index are not checked (that would cost a host sync).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import use_triton

MAX_BLOCK_V = 4096  # vocabulary slice per step of the loop over V
# fp16 only: d loss / d z is stored times this instead of times 1/M. |d loss / d z| <= 1, so the
# stored values stay below 256 and (d z) W below 512 * max|W|: no fp16 overflow for |W| < 128.
FP16_GRAD_SCALE = 256.0


@triton.jit
def _tanh_and_sech2(x):
    """(tanh(x), 1 - tanh(x)^2) from one exp, stable for any finite x."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t), 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _ce_loss_and_grad_kernel(
    logits_ptr, logits_row_stride, labels_ptr, loss_ptr, grad_scale_ptr, n_rows, n_cols, softcap, ignore_index,
    HAS_SOFTCAP: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr, ROW_SCALE: tl.constexpr = False,
    WRITE_GRAD: tl.constexpr = True,
):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    row_mask = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (labels != ignore_index)
    row_ptrs = logits_ptr + rows * logits_row_stride

    # Pass 1: online max and sum of exp over the softcapped logits -> lse.
    m = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_mask = cols < n_cols
        z = tl.load(row_ptrs[:, None] + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t, _ = _tanh_and_sech2(z / softcap)
            z = softcap * t
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(d)

    # The label's (softcapped) logit and the per-row loss.
    safe_labels = tl.where(valid, labels, 0)
    z_label = tl.load(row_ptrs + safe_labels, mask=valid, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        t_label, _ = _tanh_and_sech2(z_label / softcap)
        z_label = softcap * t_label
    tl.store(loss_ptr + rows, tl.where(valid, lse - z_label, 0.0), mask=row_mask)

    # Pass 2: overwrite the logits with d loss / d z = (softmax - onehot) * (1 - tanh^2) * grad_scale
    # (one scale for all rows, or one per row with ROW_SCALE).
    if WRITE_GRAD:
        if ROW_SCALE:
            scale = tl.load(grad_scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
        else:
            scale = tl.load(grad_scale_ptr)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = row_mask[:, None] & (cols[None, :] < n_cols)
            z = tl.load(row_ptrs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t, sech2 = _tanh_and_sech2(z / softcap)
                z = softcap * t
            grad = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
            if HAS_SOFTCAP:
                grad = grad * sech2
            grad = tl.where(valid[:, None], grad * scale, 0.0)
            tl.store(row_ptrs[:, None] + cols[None, :], grad.to(logits_ptr.dtype.element_ty), mask=mask)


def _check_inputs(hidden, weight, labels):
    if weight.ndim != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} does not match "
                         f"weight {tuple(weight.shape)} (expected (V, H))")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"fused_linear_cross_entropy: hidden {hidden.dtype} and weight {weight.dtype} must be "
                         "the same dtype, one of fp32/fp16/bf16")
    if labels.numel() != hidden.numel() // hidden.shape[-1] or labels.is_floating_point():
        raise ValueError(f"fused_linear_cross_entropy: need one integer label per row, got {tuple(labels.shape)}")


def _inverse_normalizer(labels, ignore_index, normalizer, device):
    """1 / M as a 0-dim fp32 tensor on the device (0 when M is 0), without a host sync."""
    if normalizer is None:
        norm = (labels != ignore_index).sum().to(torch.float32)
    else:
        norm = torch.as_tensor(normalizer, dtype=torch.float32, device=device)
    return torch.where(norm > 0, norm.reciprocal(), torch.zeros_like(norm))


def _add_grad_weight(grad_w, grad_logits, h_chunk, budget_bytes):
    """grad_w (fp32) += grad_logits^T h_chunk. Half dtypes go in vocabulary slices of bounded size:
    bf16 products are formed by cuBLAS in bf16 (fp32 accumulate); fp16 ones in fp32, since the
    fp16-scaled gradients times h could overflow fp16."""
    if grad_logits.dtype == torch.float32:
        grad_w.addmm_(grad_logits.t(), h_chunk)
        return
    vocab, hidden = grad_w.shape
    step = max(1, int(budget_bytes // (max(hidden, grad_logits.shape[0]) * 4)))
    h_f32 = h_chunk.float() if grad_logits.dtype == torch.float16 else None
    for v0 in range(0, vocab, step):
        g = grad_logits[:, v0:v0 + step]
        if h_f32 is None:
            grad_w[v0:v0 + step].add_(g.t() @ h_chunk)
        else:
            grad_w[v0:v0 + step].addmm_(g.t().float(), h_f32)


def _launch_settings(vocab: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_V, BLOCK_ROWS, num_warps). GPU: one row per program (a row is 0.5 MiB of bf16 logits at
    V = 262144). The interpreter pays per program, so there a program takes as many rows as fit 64Ki
    elements."""
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    block_rows = 1 if on_gpu else max(1, 65536 // block_v)
    return block_v, block_rows, 8 if block_v >= 2048 else 4


def chunk_rows_for(n_rows: int, vocab: int, element_size: int, memory_budget_mib: float) -> int:
    """Rows per chunk so that one chunk of logits fits the budget (at least 1, at most n_rows)."""
    return max(1, min(n_rows, int(memory_budget_mib * 2**20 // (vocab * element_size))))


def fused_linear_ce_forward(hidden, weight, labels, softcap, ignore_index, normalizer, memory_budget_mib,
                            need_grad_hidden, need_grad_weight):
    """Returns (loss fp32 0-dim, d hidden (in hidden.dtype) or None, d weight (fp32) or None, factor):
    the gradients are d loss / d input divided by `factor` (a 0-dim fp32 tensor, 1 except in fp16),
    which the backward multiplies back in fp32 together with grad_output."""
    _check_inputs(hidden, weight, labels)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).contiguous()  # the kernel indexes labels by row
    n_rows, vocab = h2.shape[0], weight.shape[0]
    budget_bytes = memory_budget_mib * 2**20
    chunk_rows = chunk_rows_for(n_rows, vocab, h2.element_size(), memory_budget_mib)
    block_v, block_rows, num_warps = _launch_settings(vocab, h2.is_cuda)

    inv_norm = _inverse_normalizer(labels, ignore_index, normalizer, h2.device)
    if h2.dtype == torch.float16:
        # softmax / M is mostly below fp16's smallest normal (6e-5) at V = 262144; store it
        # times FP16_GRAD_SCALE instead and divide by that in fp32 in the backward.
        grad_scale = torch.full((), FP16_GRAD_SCALE, dtype=torch.float32, device=h2.device)
        factor = inv_norm / FP16_GRAD_SCALE
    else:
        grad_scale, factor = inv_norm, torch.ones((), dtype=torch.float32, device=h2.device)
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=h2.device)
    logits_buf = torch.empty((chunk_rows, vocab), dtype=h2.dtype, device=h2.device)
    grad_h = torch.empty_like(h2) if need_grad_hidden else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h2.device) if need_grad_weight else None
    for start in range(0, n_rows, chunk_rows):
        end = min(n_rows, start + chunk_rows)
        h_chunk, logits = h2[start:end], logits_buf[: end - start]
        torch.mm(h_chunk, weight.t(), out=logits)
        _ce_loss_and_grad_kernel[(triton.cdiv(end - start, block_rows),)](
            logits, logits.stride(0), labels[start:end], loss_rows[start:end], grad_scale,
            end - start, vocab, 1.0 if softcap is None else float(softcap), ignore_index,
            HAS_SOFTCAP=softcap is not None, BLOCK_ROWS=block_rows, BLOCK_V=block_v, num_warps=num_warps,
        )
        grad_logits = logits  # overwritten in place by the kernel
        if need_grad_hidden:
            torch.mm(grad_logits, weight, out=grad_h[start:end])
        if need_grad_weight:
            _add_grad_weight(grad_w, grad_logits, h_chunk, budget_bytes)
    loss = loss_rows.sum() * inv_norm
    if grad_h is not None:
        grad_h = grad_h.view(hidden.shape)
    return loss, grad_h, grad_w, factor


def fused_linear_ce_backward(grad_output, grad_h, grad_w, factor, weight_dtype):
    """The gradients were computed in the forward: multiply by factor * grad_output in fp32 (a
    GradScaler's large grad_output thus reaches fp16 gradients before they are rounded)."""
    factor = factor * grad_output.to(torch.float32)
    if grad_h is not None:
        grad_h = (grad_h.float() * factor).to(grad_h.dtype)
    if grad_w is not None:
        grad_w = (grad_w * factor).to(weight_dtype)
    return grad_h, grad_w


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, ignore_index, normalizer, memory_budget_mib,
                need_grad_hidden, need_grad_weight):
        loss, grad_h, grad_w, factor = fused_linear_ce_forward(
            hidden, weight, labels, softcap, ignore_index, normalizer, memory_budget_mib,
            need_grad_hidden, need_grad_weight)
        # Neither inputs nor outputs: plain attributes are fine (and freed after the backward).
        ctx.grad_h, ctx.grad_w, ctx.factor, ctx.weight_dtype = grad_h, grad_w, factor, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = fused_linear_ce_backward(grad_output, ctx.grad_h, ctx.grad_w, ctx.factor,
                                                  ctx.weight_dtype)
        ctx.grad_h = ctx.grad_w = None
        return grad_h, grad_w, None, None, None, None, None, None, None


def fused_linear_logprobs_forward(hidden, weight, labels, softcap, ignore_index, memory_budget_mib):
    """log p(label) of each row in fp32 (0 for ignored rows): the kernel's first pass only."""
    _check_inputs(hidden, weight, labels)
    shape = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).contiguous()
    n_rows, vocab = h2.shape[0], weight.shape[0]
    chunk_rows = chunk_rows_for(n_rows, vocab, h2.element_size(), memory_budget_mib)
    block_v, block_rows, num_warps = _launch_settings(vocab, h2.is_cuda)
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=h2.device)
    logits_buf = torch.empty((chunk_rows, vocab), dtype=h2.dtype, device=h2.device)
    unused_scale = torch.zeros((), dtype=torch.float32, device=h2.device)
    for start in range(0, n_rows, chunk_rows):
        end = min(n_rows, start + chunk_rows)
        logits = logits_buf[: end - start]
        torch.mm(h2[start:end], weight.t(), out=logits)
        _ce_loss_and_grad_kernel[(triton.cdiv(end - start, block_rows),)](
            logits, logits.stride(0), labels[start:end], loss_rows[start:end], unused_scale,
            end - start, vocab, 1.0 if softcap is None else float(softcap), ignore_index,
            HAS_SOFTCAP=softcap is not None, BLOCK_ROWS=block_rows, BLOCK_V=block_v, WRITE_GRAD=False,
            num_warps=num_warps,
        )
    return (-loss_rows).view(shape)


def fused_linear_logprobs_backward(grad_rows, hidden, weight, labels, softcap, ignore_index, memory_budget_mib,
                                   need_grad_hidden, need_grad_weight):
    """(d hidden, d weight) for upstream gradients `grad_rows` (one per row): each chunk's logits are
    recomputed and turned into d logp / d z * g in place. fp16 stores them scaled so that the largest
    |g| maps to FP16_GRAD_SCALE (small g would underflow), undone in fp32 after the matmuls."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).contiguous()
    n_rows, vocab = h2.shape[0], weight.shape[0]
    chunk_rows = chunk_rows_for(n_rows, vocab, h2.element_size(), memory_budget_mib)
    block_v, block_rows, num_warps = _launch_settings(vocab, h2.is_cuda)
    g = grad_rows.reshape(-1).to(torch.float32)
    if h2.dtype == torch.float16:
        largest = g.abs().max().clamp_min(1e-30)
        row_scale, factor = (-g * (FP16_GRAD_SCALE / largest)).contiguous(), largest / FP16_GRAD_SCALE
    else:
        row_scale, factor = (-g).contiguous(), None
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=h2.device)
    logits_buf = torch.empty((chunk_rows, vocab), dtype=h2.dtype, device=h2.device)
    grad_h = torch.empty_like(h2) if need_grad_hidden and factor is None else None
    grad_h_chunks = []  # fp16: each chunk's d hidden, unscaled in fp32 before it is rounded
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h2.device) if need_grad_weight else None
    for start in range(0, n_rows, chunk_rows):
        end = min(n_rows, start + chunk_rows)
        h_chunk, logits = h2[start:end], logits_buf[: end - start]
        torch.mm(h_chunk, weight.t(), out=logits)
        _ce_loss_and_grad_kernel[(triton.cdiv(end - start, block_rows),)](
            logits, logits.stride(0), labels[start:end], loss_rows[start:end], row_scale[start:end],
            end - start, vocab, 1.0 if softcap is None else float(softcap), ignore_index,
            HAS_SOFTCAP=softcap is not None, BLOCK_ROWS=block_rows, BLOCK_V=block_v, ROW_SCALE=True,
            num_warps=num_warps,
        )
        if need_grad_hidden and factor is None:
            torch.mm(logits, weight, out=grad_h[start:end])
        elif need_grad_hidden:
            grad_h_chunks.append(((logits @ weight).float() * factor).to(h2.dtype))
        if need_grad_weight:
            _add_grad_weight(grad_w, logits, h_chunk, memory_budget_mib * 2**20)
    if grad_h_chunks:
        grad_h = torch.cat(grad_h_chunks)
    if grad_w is not None:
        grad_w = (grad_w if factor is None else grad_w * factor).to(weight.dtype)
    return (grad_h.view(hidden.shape) if grad_h is not None else None), grad_w


class FusedLinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, ignore_index, memory_budget_mib):
        ctx.save_for_backward(hidden, weight, labels)
        ctx.settings = (softcap, ignore_index, memory_budget_mib)
        return fused_linear_logprobs_forward(hidden, weight, labels, softcap, ignore_index, memory_budget_mib)

    @staticmethod
    def backward(ctx, grad_rows):
        hidden, weight, labels = ctx.saved_tensors
        grad_h, grad_w = fused_linear_logprobs_backward(grad_rows, hidden, weight, labels, *ctx.settings,
                                                        ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_h, grad_w, None, None, None, None


def fused_linear_cross_entropy_reference(hidden, weight, labels, softcap=30.0, ignore_index=-100, normalizer=None):
    """The plain computation: materialise the logits (matmul in the input dtype, then fp32), softcap,
    summed cross-entropy, divided by the normalizer (0 when it is 0)."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    logits = (h2 @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    labels = labels.reshape(-1)
    loss_sum = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return loss_sum * _inverse_normalizer(labels, ignore_index, normalizer, h2.device)


def fused_linear_cross_entropy(hidden, weight, labels, softcap=30.0, ignore_index=-100, normalizer=None,
                               memory_budget_mib=192):
    """sum over non-ignored rows of CE(softcap * tanh(hidden @ weight.T / softcap), label) / normalizer.

    hidden (N, H) or (B, S, H); weight the LM head (V, H); labels (N,) or (B, S), already shifted.
    normalizer: float or 0-dim tensor (label tokens across all micro-batches); default: the
    non-ignored labels here. softcap=None: no cap. Returns an fp32 scalar."""
    if use_triton(hidden, weight, labels):
        need_h = torch.is_grad_enabled() and hidden.requires_grad
        need_w = torch.is_grad_enabled() and weight.requires_grad
        return FusedLinearCrossEntropyFunction.apply(hidden, weight, labels, softcap, ignore_index, normalizer,
                                                     memory_budget_mib, need_h, need_w)
    return fused_linear_cross_entropy_reference(hidden, weight, labels, softcap, ignore_index, normalizer)


def fused_linear_logprobs_reference(hidden, weight, labels, softcap=30.0, ignore_index=-100):
    """The plain computation: materialise the logits (fp32), softcap, log-softmax, the label's entry."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat = labels.reshape(-1)
    valid = flat != ignore_index
    picked = logits.log_softmax(-1).gather(1, torch.where(valid, flat, 0)[:, None])[:, 0]
    return torch.where(valid, picked, torch.zeros_like(picked)).view(labels.shape)


def fused_linear_logprobs(hidden, weight, labels, softcap=30.0, ignore_index=-100, memory_budget_mib=192):
    """log p(label) under softcap * tanh(hidden @ weight.T / softcap), one fp32 value per row.

    hidden (N, H) or (B, S, H); weight the LM head (V, H); labels (N,) or (B, S), already shifted;
    ignored rows give 0. Differentiable in hidden and weight; the logits are never materialised
    (a chunk at a time, recomputed in the backward). Returns a tensor of labels' shape."""
    if use_triton(hidden, weight, labels):
        return FusedLinearLogprobsFunction.apply(hidden, weight, labels, softcap, ignore_index, memory_budget_mib)
    return fused_linear_logprobs_reference(hidden, weight, labels, softcap, ignore_index)
