"""Attention where SDPA is slow or wasteful for Gemma 4 training.

Full-attention layers (head_dim 512): PyTorch's flash and cuDNN attention kernels stop at
head_dim 256, so SDPA runs them through its memory-efficient kernel, whose backward is slow
at that width (benchmarks/overhead.py; the figures are in benchmarks/results/README.md).
At training lengths the score matrix is small (8 heads x 2048 x 2048 in fp32 is
128 MiB), so "math" attention, two matmuls and a softmax, is several times faster.
`attention_math` computes what transformers' `eager_attention_forward` does, with the
precision of SDPA's fused kernels: scores and their gradient come out of the matmul in
fp32 (eager rounds them to bf16, many times SDPA's error at head_dim 512),
softmax in fp32, probabilities cast to the input dtype for the P @ V matmul. It is an
autograd function that saves only the probabilities for the backward.
`use_math_attention` says when the scores are small enough to materialise.

Sliding-window layers (window 512): transformers hands SDPA a seq x seq mask, so every
score is computed and most are thrown away, and the mask itself costs seq^2 bytes.
`sliding_window_attention` computes only the window: through FlashAttention-2's window
arguments where PyTorch ships it (CUDA, sm80+, fp16/bf16), otherwise block by block. The
FlashAttention path is as fast as masked SDPA at training lengths and saves the masks; the block
path is not known to be fast, so training uses it only where no mask can be built for it.

Packed micro-batches (gemmatune.data.packing: several rows back to back in one buffer, each row
attending only to itself): the caller hands the attention layers a `PackedDocuments` in place of
a mask. Sliding layers run FlashAttention-2's variable-length kernel with the same window
(`packed_window_attention`: each document is its own sequence, the window stays inside it, work
is that of the documents' windows only, no mask). Full layers keep math attention with a
block-diagonal causal mask built once per forward from the document ids (`PackedDocuments.mask`):
the same scores, matmuls and softmax as an unpacked causal row of the same length, so the
head_dim-512 layers cost what they cost before at equal tokens. Where FlashAttention's varlen
kernel is unavailable (CPU, a T4, a PyTorch whose private op changed) the sliding layers take the
block-diagonal mask with their window instead: exact, and as fast as masked SDPA.

Math-attention backward, P = softmax(S), O = P @ V, dO the upstream gradient:

    dV = P^T @ dO
    dP = dO @ V^T
    dS = P * (dP - rowsum(dO * O))          (rowsum(dP * P) == rowsum(dO * O))
    dQ = scale * dS @ K,   dK = scale * dS^T @ Q
"""
import functools

import torch
import torch.nn.functional as F

MATH_SCORES_BUDGET = 256 * 2**20  # bytes of fp32 scores one call may hold


def use_math_attention(query: torch.Tensor, key: torch.Tensor, min_head_dim: int = 257) -> bool:
    """Math attention where SDPA has no fast kernel and the scores fit the budget."""
    batch, heads, q_len, head_dim = query.shape
    return head_dim >= min_head_dim and batch * heads * q_len * key.shape[-2] * 4 <= MATH_SCORES_BUDGET


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with the result in fp32 (fp64 for fp64 inputs). Scores and their gradients must
    not be rounded to bf16/fp16: Gemma 4 attends with scale 1 after q/k norms, so at head_dim
    512 scores reach the hundreds, where bf16's step is 1 or more (what SDPA's kernels avoid).
    On CUDA the matmul writes fp32 directly from half inputs (no upcast copies)."""
    f32 = _softmax_dtype(a.dtype)
    if a.dtype == f32:
        return torch.matmul(a, b)
    if a.is_cuda and _bmm_writes_fp32(a.device, a.dtype):  # same leading (batch, head) dims
        out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=f32)
        return out.view(*a.shape[:-2], a.shape[-2], b.shape[-1])
    return torch.matmul(a.to(f32), b.to(f32))


@functools.cache
def _bmm_writes_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """torch.bmm(..., out_dtype=torch.float32) exists for these half inputs (PyTorch >= 2.8 on CUDA)."""
    try:
        with torch.no_grad():
            x = torch.ones(1, 2, 2, device=device, dtype=dtype)
            return torch.bmm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def _scores_and_probs(q, k, mask, scale):
    scores = _matmul_fp32(q, k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        scores = scores.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else scores.add_(mask)
    return torch.softmax(scores, dim=-1).to(q.dtype)


class MathAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        probs = _scores_and_probs(q, k, mask, scale)
        out = torch.matmul(probs, v)
        ctx.save_for_backward(q, k, v, probs, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, probs, out = ctx.saved_tensors
        d_out = d_out.contiguous()
        f32 = _softmax_dtype(q.dtype)
        delta = (d_out.to(f32) * out.to(f32)).sum(-1, keepdim=True)
        d_probs = _matmul_fp32(d_out, v.transpose(-1, -2))
        d_scores = (probs.to(f32) * (d_probs.to(f32) - delta)).mul_(ctx.scale).to(q.dtype)
        dq = torch.matmul(d_scores, k)
        dk = torch.matmul(d_scores.transpose(-1, -2), q)
        dv = torch.matmul(probs.transpose(-1, -2), d_out)
        return dq, dk, dv, None, None


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv*groups, L, D); autograd sums the heads' gradients back."""
    if groups == 1:
        return t
    b, hkv, length, dim = t.shape
    return t[:, :, None].expand(b, hkv, groups, length, dim).reshape(b, hkv * groups, length, dim)


def sliding_window_attention(query, key, value, window: int, scale: float) -> torch.Tensor:
    """Causal attention where query i sees keys (i - window, i] (transformers' sliding window).

    query (B, L, H, D), key/value (B, L, Hkv, D) with H a multiple of Hkv; returns (B, L, H, D).
    Work and memory grow with seq x window instead of seq^2, and no seq x seq mask is built.
    """
    if flash_window_works(query):
        return FlashWindowAttention.apply(query, key, value, window, scale)
    out = sliding_window_blocks(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), window, scale)
    return out.transpose(1, 2)


def sliding_window_blocks(query, key, value, window: int, scale: float) -> torch.Tensor:
    """The sliding window with plain SDPA, one block of `window` queries at a time against
    the keys it can see (at most 2 * window - 1). (B, H, L, D) layout; K/V may have fewer heads."""
    groups = query.shape[1] // key.shape[1]
    key, value = _expand_kv(key, groups), _expand_kv(value, groups)
    length = query.shape[2]
    blocks = []
    for start in range(0, length, window):
        end = min(length, start + window)
        first = max(0, start - window)  # one key more than the window needs: 2 * window keys
        # keep the shapes aligned for SDPA's fused kernels; the mask excludes that key
        q_pos = torch.arange(start, end, device=query.device)[:, None]
        k_pos = torch.arange(first, end, device=query.device)[None, :]
        mask = (k_pos <= q_pos) & (k_pos > q_pos - window)
        blocks.append(F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, first:end],
                                                     value[:, :, first:end], attn_mask=mask, scale=scale))
    return torch.cat(blocks, dim=2)


def _flash_forward(query, key, value, window, scale):
    # Private ATen op (what SDPA's flash path calls), used for its window arguments: query i
    # sees keys [i - (window - 1), i]. (B, L, H, D) layout, grouped-query heads supported.
    out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
        query, key, value, None, None, query.shape[1], key.shape[1], 0.0, True, False,
        scale=scale, window_size_left=window - 1, window_size_right=0)
    return out, lse, rng_state, unused


class FlashWindowAttention(torch.autograd.Function):
    """FlashAttention-2 with a causal window: tiles outside the window are skipped."""

    @staticmethod
    def forward(ctx, query, key, value, window, scale):
        out, lse, rng_state, unused = _flash_forward(query, key, value, window, scale)
        ctx.save_for_backward(query, key, value, out, lse, rng_state, unused)
        ctx.window, ctx.scale = window, scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        query, key, value, out, lse, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            d_out.contiguous(), query, key, value, out, lse, None, None, query.shape[1], key.shape[1],
            0.0, True, rng_state, unused, scale=ctx.scale, window_size_left=ctx.window - 1, window_size_right=0)
        return dq, dk, dv, None, None


def flash_window_works(query: torch.Tensor) -> bool:
    """FlashAttention-2 with a window is usable for this (B, L, H, D) query: head_dim <= 256
    and a multiple of 8, and flash_window_available for its device and dtype."""
    head_dim = query.shape[-1]
    return head_dim <= 256 and head_dim % 8 == 0 and flash_window_available(query.device, query.dtype)


def flash_window_available(device: torch.device, dtype: torch.dtype) -> bool:
    """A CUDA sm80+ GPU, fp16/bf16, and this PyTorch build's private flash op takes window
    arguments and runs (checked once per device and dtype on a tiny input, so a changed
    private API falls back to masks instead of failing a training run)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _flash_window_probe(device, dtype)


@functools.cache
def _flash_window_probe(device: torch.device, dtype: torch.dtype) -> bool:
    # The ops are called directly, not through autograd: this may run inside a checkpointed
    # layer's forward, whose saved-tensor hooks must not see the probe's tensors.
    if torch.cuda.get_device_capability(device)[0] < 8:
        return False
    try:
        with torch.no_grad():
            q = torch.randn(1, 2, 8, 8, device=device, dtype=dtype)
            out, lse, rng_state, unused = _flash_forward(q, q, q, 2, 1.0)
            grads = torch.ops.aten._flash_attention_backward(
                torch.ones_like(out), q, q, q, out, lse, None, None, 2, 2, 0.0, True, rng_state, unused,
                scale=1.0, window_size_left=1, window_size_right=0)
        return bool(torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads))
    except (RuntimeError, TypeError, AttributeError):
        return False


def attention_math(query, key, value, mask, scale: float) -> torch.Tensor:
    """softmax(scale * Q K^T + mask) V; K/V may have fewer heads than Q (grouped-query).

    query (B, H, Lq, D), key/value (B, Hkv, Lk, D) with H a multiple of Hkv, mask bool
    (True = attend) or additive, broadcastable to (B, H, Lq, Lk), or None.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = _expand_kv(key, groups), _expand_kv(value, groups)
    return MathAttentionFunction.apply(query, key, value, mask, scale)


# ------------------------------------------------------------------ packed micro-batches
class PackedDocuments:
    """Which tokens of a packed micro-batch may attend to which: each document (a row, or a
    buffer's padding) causally to itself only. gemmatune.training.loss passes it to the attention
    layers in place of a mask (KernelGemma4Attention reads it; for stock layers it builds masks).

    document_ids (B, L): the document's index within its buffer (-1 on the padding, one more
    document); cu_seq_lens (slots + 1,) int32: document starts in the flattened B * L tokens, unused
    slots repeating the total (gemmatune.data.packing). Masks are built once per forward and kept
    here, so the recompute of a checkpointed layer and the other layers of the kind reuse them.
    """

    def __init__(self, document_ids: torch.Tensor, cu_seq_lens: torch.Tensor):
        self.document_ids = document_ids
        self.cu_seq_lens = cu_seq_lens
        self.max_length = document_ids.shape[1]  # no document is longer than a buffer
        self._masks: dict = {}

    def mask(self, window: int | None = None, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, 1, L, L), True where a query may attend a key: the same document, the key not after
        the query and, with a window, fewer than `window` positions before it (transformers'
        sliding window). With `additive_dtype`: 0 / the dtype's minimum, for eager attention."""
        key = (window, additive_dtype)
        if key not in self._masks:
            docs = self.document_ids
            pos = torch.arange(docs.shape[1], device=docs.device)
            allowed = pos[None, :] <= pos[:, None]
            if window:
                allowed = allowed & (pos[None, :] > pos[:, None] - window)
            mask = (docs[:, None, :, None] == docs[:, None, None, :]) & allowed
            if additive_dtype is not None:
                mask = torch.zeros(mask.shape, dtype=additive_dtype, device=mask.device).masked_fill_(
                    ~mask, torch.finfo(additive_dtype).min)
            self._masks[key] = mask
        return self._masks[key]

    def __getitem__(self, index):
        """transformers' Gemma4TextModel slices every mask with [:, :, slice(0, None), :] before its
        KV-shared layers when all positions are kept (training): that is this object itself. A slice
        that drops queries (generation's logits_to_keep) is not something a packed batch does."""
        full = (slice(None), slice(0, None), slice(None, None, 1), slice(0, None, 1))
        if isinstance(index, tuple) and all(part in full for part in index):
            return self
        raise NotImplementedError(f"a packed micro-batch's attention cannot be sliced with {index!r}")


def packed_window_attention(query, key, value, documents: PackedDocuments, window: int, scale: float):
    """Causal sliding-window attention inside each document of a packed micro-batch, through
    FlashAttention-2's variable-length kernel: every document is a sequence of its own, so no
    query sees another row and tiles outside the documents' windows are never computed.

    query (B, L, H, D), key/value (B, L, Hkv, D); returns (B, L, H, D). Needs flash_varlen_works.
    """
    return FlashVarlenWindowAttention.apply(query, key, value, documents.cu_seq_lens, documents.max_length,
                                            window, scale)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) -> (B * L, H, D): a view for the layouts attention produces (tokens outermost)."""
    return t.reshape(t.shape[0] * t.shape[1], t.shape[2], t.shape[3])


def _flash_varlen_forward(q, k, v, cu_seq_lens, max_length, window, scale):
    # Private ATen op, its variable-length form (what nested-tensor SDPA calls): q/k/v are
    # (tokens, heads, head_dim), cu_seq_lens int32 document starts, max_length an upper bound.
    out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, 0.0, True, False,
        scale=scale, window_size_left=window - 1, window_size_right=0)
    return out, lse, rng_state, unused


def _flash_varlen_backward(d_out, q, k, v, out, lse, cu_seq_lens, max_length, rng_state, unused, window, scale):
    return torch.ops.aten._flash_attention_backward(
        d_out, q, k, v, out, lse, cu_seq_lens, cu_seq_lens, max_length, max_length, 0.0, True, rng_state, unused,
        scale=scale, window_size_left=window - 1, window_size_right=0)


class FlashVarlenWindowAttention(torch.autograd.Function):
    """FlashAttention-2, variable-length, causal with a window: one launch for all documents."""

    @staticmethod
    def forward(ctx, query, key, value, cu_seq_lens, max_length, window, scale):
        q, k, v = _flat(query), _flat(key), _flat(value)
        out, lse, rng_state, unused = _flash_varlen_forward(q, k, v, cu_seq_lens, max_length, window, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seq_lens, rng_state, unused)
        ctx.shapes = query.shape, key.shape
        ctx.max_length, ctx.window, ctx.scale = max_length, window, scale
        return out.view(query.shape)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, cu_seq_lens, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = _flash_varlen_backward(_flat(d_out).contiguous(), q, k, v, out, lse, cu_seq_lens, ctx.max_length,
                                            rng_state, unused, ctx.window, ctx.scale)
        query_shape, key_shape = ctx.shapes
        return dq.view(query_shape), dk.view(key_shape), dv.view(key_shape), None, None, None, None


def flash_varlen_works(query: torch.Tensor) -> bool:
    """FlashAttention-2's variable-length kernel with a window is usable for this (B, L, H, D)
    query: head_dim <= 256 and a multiple of 8, and flash_varlen_available."""
    head_dim = query.shape[-1]
    return head_dim <= 256 and head_dim % 8 == 0 and flash_varlen_available(query.device, query.dtype)


def flash_varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """flash_window_available, and a probe on this device and dtype computes what the block-diagonal
    mask computes, forward and backward (a changed private API falls back to the masks)."""
    if not flash_window_available(device, dtype):
        return False
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _flash_varlen_probe(device, dtype)


@functools.cache
def _flash_varlen_probe(device: torch.device, dtype: torch.dtype) -> bool:
    # Two buffers of 12 tokens: documents of 5 and 7, then 12; an empty slot and a repeated total
    # at the end, as gemmatune.data.packing writes them; window 4, so documents outrun the window.
    # Plain ops only, no autograd (this may run inside a checkpointed layer's forward).
    try:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(2, 12, 2, 16, generator=gen)
        k, v, d_out = (torch.randn(2, 12, n, 16, generator=gen) for n in (1, 1, 2))
        docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
        cu = torch.tensor([0, 5, 12, 24, 24, 24], dtype=torch.int32)
        expected = _reference_packed_window(q, k, v, d_out, PackedDocuments(docs, cu).mask(4), 0.5)
        with torch.no_grad():
            q_, k_, v_, d_ = (_flat(t).to(device, dtype) for t in (q, k, v, d_out))
            cu_ = cu.to(device)
            out, lse, rng_state, unused = _flash_varlen_forward(q_, k_, v_, cu_, 12, 4, 0.5)
            grads = _flash_varlen_backward(d_, q_, k_, v_, out, lse, cu_, 12, rng_state, unused, 4, 0.5)
        got = [out.view(2, 12, 2, 16)] + [g.view(e.shape) for g, e in zip(grads, expected[1:])]
        return all(bool(((g.float().cpu() - e).abs().max() <= 0.05 * e.abs().max()).item())
                   for g, e in zip(got, expected))
    except (RuntimeError, TypeError, AttributeError, ValueError):
        return False


def _reference_packed_window(q, k, v, d_out, mask, scale):
    """fp32 (out, dq, dk, dv) of masked attention by the formulas of the module docstring; q (B, L, H, D),
    k/v (B, L, Hkv, D), mask (B, 1, L, L) bool. The probe's oracle."""
    groups = q.shape[2] // k.shape[2]
    qh, d_o = q.transpose(1, 2).double(), d_out.transpose(1, 2).double()
    kh, vh = (_expand_kv(t.transpose(1, 2).double(), groups) for t in (k, v))
    probs = torch.softmax((qh @ kh.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")), dim=-1)
    out = probs @ vh
    d_scores = probs * (d_o @ vh.transpose(-1, -2) - (d_o * out).sum(-1, keepdim=True)) * scale
    dq, dk, dv = d_scores @ kh, d_scores.transpose(-1, -2) @ qh, probs.transpose(-1, -2) @ d_o

    def heads_back(t):  # (B, H, L, D) -> (B, L, Hkv, D), summing each group's heads
        b, _, length, dim = t.shape
        return t.view(b, -1, groups, length, dim).sum(2).transpose(1, 2).float()

    return [out.transpose(1, 2).float(), dq.transpose(1, 2).float(), heads_back(dk), heads_back(dv)]
