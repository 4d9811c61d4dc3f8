"""Generation at the GPU's pace: one prefill, then decode steps replayed as a CUDA graph.

Why: `model.generate` on a gemmatune model decodes a few tokens a second where the GPU's memory
bandwidth allows thousands (benchmarks/results/README.md has the figures). Each token waited for the host twice (the
per-layer-embedding rows were gathered on the CPU after copying the token id there, and the stop
check read the token), and the host issued every one of ~2,000 small kernels per token from
Python, slower than the GPU ran them.

How, for a batch of left-padded prompts (`generate`):
1. A static KV cache (`StaticKVCache`) sized prompt + max_new_tokens, rounded up to a multiple of
   LENGTH_BUCKET so that the next call of a similar size reuses it and its graph. Only the layers
   that compute K/V get buffers; the KV-shared layers read the buffers of the layer they share
   with, as transformers does.
2. Prefill: the model's own forward (transformers' code: images, audio and LoRA work as in
   training) with that cache, the masks and positions `model.generate` uses, and
   `logits_to_keep=1`: only the last position's logits are ever computed. A prompt's images and
   clips enter here only (their soft tokens land in the cache), so a media prompt decodes with
   the same steps and graphs as a text prompt of its length.
3. Decode: a step reads everything from device buffers (the current token, its cache index, each
   row's padding) and writes everything back (K/V, the next token, the stop flags, the index + 1),
   so the same kernels can run again with no host work. On CUDA the first step runs eagerly (it
   warms up Triton and cuBLAS), the second is captured as a CUDA graph, and every later step is
   one graph launch. The next token's per-layer-embedding row is read by the GPU straight from
   the pinned CPU table (gemmatune.kernels.row_gather): no step waits for the host.
4. The host reads the tokens every CHUNK steps (a non-blocking copy, with the next chunk already
   queued), hands them on (`stream_tokens` yields them; `generate` joins them and feeds a streamer)
   and stops once every row has emitted a stop token. A finished row gets pad tokens, as in
   `model.generate`; at most 2 * CHUNK steps run past the last stop. On a CPU the steps run
   eagerly and the host checks every step (there is nothing to overlap).
5. What a step runs on the patched model (gemmatune.model.patching): at batch 1 each 4-bit projection
   through the NF4 GEMV, which reads the packed weights once and adds the LoRA update in the same
   program, its LoRA down-projection in one small kernel (kernels/nf4_gemv.py), with the adapters'
   compute-dtype copies made once per call (`lora_weights_for_decoding`); the attention's
   query/key norm + RoPE in one kernel and the attention over the cache in two
   (`static_cache_attention`, kernels/decode_attention.py): about 32 launches per layer
   (benchmarks/profile_decode.py shows where a step's time goes).

Memory: the cache holds prompt + max_new_tokens positions (rounded up), not the model's maximum;
the prompt's logits are computed for its last position only; each kept state has its own graph
memory pool (a few MiB at batch 1).

Equal to `model.generate` (tests/generation/test_decoding.py, token for token on the tiny model): the same
positions (the attention mask's cumsum), masks (causal, the sliding window, left padding), greedy
argmax of the softcapped logits, stop tokens kept and pad after them. Where the fast path does
not apply (a model that is not Gemma 4, FlashAttention, bidirectional image attention) the stock
`model.generate` runs instead, with the same arguments.

Refused before the prefill: settings that mean nothing (`check_settings`), media tensors for a
model without that tower (gemmatune.model.towers.require_towers: they would be ignored), and a
second generation on a model whose first is still being read (they would share the buffers).
"""
import contextlib
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.gemma4 import modeling_gemma4 as hf_gemma4

from gemmatune.generation.sampling import Sampling, check_settings, choose_tokens
from gemmatune.kernels import lora_nf4_linear
from gemmatune.kernels.row_gather import can_gather_on_device, gather_rows
from gemmatune.model.patching import lora_weights_for_decoding
from gemmatune.model.ple import HostEmbedding
from gemmatune.model.towers import input_modalities, require_towers

CHUNK = 8              # decode steps between two reads of the generated tokens by the host
LENGTH_BUCKET = 256    # static cache lengths are rounded up to a multiple of this
MAX_STATES = 3         # cache + graph sets kept per model (batch size x length bucket)
MASK_KINDS = ("full_attention", "sliding_attention")
STOP_SLOTS = 8         # stop token ids a state holds (a device buffer, -1 for unused slots)


class StaticKVCache:
    """The K/V of every layer that computes them, in (B, heads, length, head_dim) buffers.

    transformers' attention calls `update(key, value, layer_idx)` with the new tokens' K/V and
    attends over what it returns: here the whole buffer, written at `write_at` (a device tensor
    of cache indices, so a CUDA graph replays with the index it holds). Positions not yet
    written are excluded by the masks. Buffers are created at the first update (the prefill)."""

    is_compileable = False  # transformers reads this; the masks are ours, not built from the cache
    is_gemmatune_static = True  # patching.KernelGemma4Attention takes its fused decode path for it

    def __init__(self, batch: int, length: int):
        self.batch, self.length = batch, length
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.write_at: torch.Tensor | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx not in self.keys:
            b, heads, _, dim = key_states.shape
            shape = (b, heads, self.length, dim)
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros((b, value_states.shape[1], self.length,
                                                             value_states.shape[-1]))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.write_at, key_states.to(keys.dtype))
        values.index_copy_(2, self.write_at, value_states.to(values.dtype))
        return keys, values

    def reset(self) -> None:
        for buffer in (*self.keys.values(), *self.values.values()):
            buffer.zero_()


@dataclass
class ModelParts:
    """What a decode step calls: the Gemma 4 text model inside any wrapper, the LM head, settings."""
    text_model: nn.Module
    lm_head: nn.Module
    softcap: float | None
    window: int
    attn_implementation: str
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, model: nn.Module) -> "ModelParts | None":
        text = next((m for m in model.modules() if isinstance(m, hf_gemma4.Gemma4TextModel)), None)
        if text is None:
            return None
        config = text.config
        weight = text.embed_tokens.weight
        return cls(text_model=text, lm_head=model.get_output_embeddings(), softcap=config.final_logit_softcapping,
                   window=config.sliding_window or 0, attn_implementation=config._attn_implementation,
                   dtype=weight.dtype, device=weight.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Softcapped logits, the same three rounded ops as Gemma4ForCausalLM.forward."""
        logits = self.lm_head(hidden)
        if self.softcap is not None:
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits

    def masks(self, full: torch.Tensor, sliding: torch.Tensor) -> dict:
        """(B, 1, Q, L) boolean masks (True = attend) as the attention implementation wants them:
        boolean for SDPA, additive for eager (0 or the dtype's minimum, as transformers builds it)."""
        if self.attn_implementation == "eager":
            low = torch.finfo(self.dtype).min
            full, sliding = (torch.where(m, 0.0, low).to(self.dtype) for m in (full, sliding))
        return {"full_attention": full, "sliding_attention": sliding}

    def per_layer_rows(self, ids: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor | None:
        """Token-identity per-layer embeddings of ids (B, 1): (B, 1, layers, width), or None."""
        text = self.text_model
        if not getattr(text, "hidden_size_per_layer_input", 0):
            return None
        table = text.embed_tokens_per_layer
        shape = (*ids.shape, text.config.num_hidden_layers, text.hidden_size_per_layer_input)
        if isinstance(table, HostEmbedding) and out is not None:
            rows = gather_rows(table.table, ids.reshape(-1), out)
            return (rows * table.scale).view(shape)  # the same rounded multiply as HostEmbedding.forward
        return table(ids).reshape(shape)


def why_not_fast(parts: ModelParts | None, model_inputs: dict) -> str | None:
    """Why `generate` must fall back to the stock `model.generate`, or None."""
    if parts is None:
        return "no Gemma 4 text model inside"
    if parts.attn_implementation not in ("sdpa", "eager"):
        return f"attention implementation {parts.attn_implementation!r} (sdpa and eager are supported)"
    kinds = set(parts.text_model.config.layer_types)
    if not kinds <= set(MASK_KINDS):
        return f"layer types {sorted(kinds - set(MASK_KINDS))}"
    if model_inputs.get("mm_token_type_ids") is not None and \
            getattr(parts.text_model.config, "use_bidirectional_attention", None) == "vision":
        return "bidirectional attention over image tokens"
    return None


def why_not_graphed(parts: ModelParts) -> str | None:
    """Why decode steps of this model run eagerly instead of as a CUDA graph, or None."""
    if parts.device.type != "cuda":
        return "not on a CUDA GPU"
    table = getattr(parts.text_model, "embed_tokens_per_layer", None)
    if isinstance(table, HostEmbedding) and not can_gather_on_device(table.table, parts.device):
        return "the per-layer-embedding table is not pinned (or the kernels are off): rows come through the host"
    return None


class DecodeState:
    """The device buffers of one batch size and cache length, and the CUDA graph of its step."""

    def __init__(self, parts: ModelParts, batch: int, length: int, stop_slots: int = STOP_SLOTS):
        device = parts.device
        self.batch, self.length = batch, length
        self.cache = StaticKVCache(batch, length)
        self.seq = torch.zeros((batch, length), dtype=torch.long, device=device)  # prompt + generated tokens
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=device)       # the token the next step reads
        self.t = torch.zeros((), dtype=torch.long, device=device)                 # its cache index
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)            # left padding of each row
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.pad_id = torch.zeros((), dtype=torch.long, device=device)
        self.stop_ids = torch.full((stop_slots,), -1, dtype=torch.long, device=device)
        self.kv_index = torch.arange(length, device=device)
        self.ple_out = None
        table = getattr(parts.text_model, "embed_tokens_per_layer", None)
        if isinstance(table, HostEmbedding) and can_gather_on_device(table.table, device):
            self.ple_out = torch.empty((batch, table.embedding_dim), dtype=table.table.dtype, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.keep_alive: list = []
        self.steps_seen = 0

    def start(self, input_ids, attention_mask, pad_id: int, stop_ids: list[int]) -> None:
        """Load a new batch of prompts (buffers are reused from call to call)."""
        prompt = input_ids.shape[1]
        self.stop_ids.fill_(-1)
        self.stop_ids[:len(stop_ids)] = torch.tensor(stop_ids, dtype=torch.long)
        self.cache.reset()
        self.seq.zero_()
        self.seq[:, :prompt].copy_(input_ids)
        self.pad.copy_(prompt - attention_mask.sum(dim=1))
        self.unfinished.fill_(True)
        self.pad_id.fill_(pad_id)
        self.t.fill_(prompt - 1)  # commit() moves it to the first generated token's index

    def commit(self, tokens: torch.Tensor) -> None:
        """Record the next tokens (B,) as model.generate does: pad after a row's stop token."""
        tokens = torch.where(self.unfinished, tokens, self.pad_id)
        self.unfinished &= ~(tokens[:, None] == self.stop_ids[None, :]).any(dim=1)
        self.t += 1
        self.seq.index_copy_(1, self.t.view(1), tokens[:, None])
        self.ids.copy_(tokens[:, None])


def prefill(model, parts: ModelParts, state: DecodeState, input_ids, attention_mask, sampling: Sampling,
            model_inputs: dict) -> None:
    """Run the prompt through the model's own forward into the static cache; commit the first token."""
    batch, prompt = input_ids.shape
    q = torch.arange(prompt, device=parts.device)[:, None]
    k = state.kv_index[None, :]
    causal = (k <= q)[None] & (k >= state.pad[:, None, None])
    full = causal | (k == q)[None]  # padding rows attend to themselves only: finite, never read
    sliding = full & (k > q - parts.window)[None]
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    state.cache.write_at = torch.arange(prompt, device=parts.device)
    out = model(input_ids=input_ids, attention_mask=parts.masks(full[:, None], sliding[:, None]),
                position_ids=positions, past_key_values=state.cache, use_cache=True, logits_to_keep=1,
                **model_inputs)
    state.cache.write_at = state.t.view(1)
    state.commit(choose_tokens(out.logits[:, -1].float(), sampling))


def decode_step(parts: ModelParts, state: DecodeState, sampling: Sampling) -> None:
    """One token for every row, from and into `state`'s buffers only (so it can be a CUDA graph)."""
    t, k = state.t, state.kv_index
    seen = (k[None, :] >= state.pad[:, None]) & (k[None, :] <= t)
    sliding = seen & (k[None, :] > t - parts.window)
    text = parts.text_model
    rows = parts.per_layer_rows(state.ids, state.ple_out)
    out = text(inputs_embeds=text.embed_tokens(state.ids), per_layer_inputs=rows,
               attention_mask=parts.masks(seen[:, None, None], sliding[:, None, None]),
               position_ids=(t - state.pad)[:, None], past_key_values=state.cache, use_cache=True)
    logits = parts.logits(out.last_hidden_state[:, -1:])
    state.commit(choose_tokens(logits[:, -1].float(), sampling))


class Decoder:
    """A model's decode states (cache buffers + CUDA graph per batch size and length bucket),
    kept between calls, dropped when the model changes (new parameters, adapters, classes)."""

    def __init__(self, signature):
        self.signature = signature
        self.states: dict[tuple, DecodeState] = {}
        self.graphs_off_because: str | None = None

    def state(self, parts: ModelParts, batch: int, length: int, n_stops: int, sampling: Sampling):
        slots = max(STOP_SLOTS, n_stops)
        key = (batch, length, slots, sampling)
        state = self.states.pop(key, None)
        if state is None:
            if len(self.states) >= MAX_STATES:
                self.states.pop(next(iter(self.states)))  # the least recently used
            state = DecodeState(parts, batch, length, slots)
        self.states[key] = state  # most recently used last
        return state

    def step(self, parts: ModelParts, state: DecodeState, sampling: Sampling, use_graph: bool) -> None:
        if state.graph is not None:
            state.graph.replay()
            return
        if not use_graph or self.graphs_off_because:
            decode_step(parts, state, sampling)
            return
        if state.steps_seen == 0:  # the first step of a state warms up (Triton, cuBLAS) and is checked
            state.steps_seen = 1
            self.warm_up(parts, state, sampling)
            return
        try:
            state.graph = capture(lambda: decode_step(parts, state, sampling))
            state.keep_alive = lora_nf4_linear.workspace_buffers()  # buffers the graph writes
        except Exception as error:  # never lose a reply to a capture problem: decode eagerly
            self.graphs_off_because = f"capture failed ({type(error).__name__}: {str(error)[:200]})"
            print(f"gemmatune: CUDA graphs off for generation, {self.graphs_off_because}")
            torch.cuda.synchronize()
            decode_step(parts, state, sampling)
            return
        state.graph.replay()  # a capture records the step without running it

    def warm_up(self, parts: ModelParts, state: DecodeState, sampling: Sampling) -> None:
        """An eager step in which any host synchronisation raises: a step that waits for the host
        cannot be captured, and a capture that fails part-way can leave CUDA unusable. If it
        raises, graphs go off and the step is run again normally: everything before commit()
        (the cache writes at index t) is repeated exactly, and commit() comes last."""
        torch.cuda.set_sync_debug_mode("error")
        try:
            decode_step(parts, state, sampling)
        except RuntimeError as error:
            self.graphs_off_because = f"a decode step waits for the host ({str(error)[:200]})"
            print(f"gemmatune: CUDA graphs off for generation, {self.graphs_off_because}")
        else:
            return
        finally:
            torch.cuda.set_sync_debug_mode("default")
        decode_step(parts, state, sampling)


def capture(step) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph, pool=torch.cuda.graph_pool_handle()):
        step()
    return graph


def model_signature(model: nn.Module, lora_copies=()) -> tuple:
    """Changes whenever a captured graph could be stale: parameters moved or replaced, modules
    swapped (patching, adapters added), adapters merged, switched or disabled, the decode copies
    of the adapter weights (patching.lora_weights_for_decoding) re-made."""
    params = tuple((p.data_ptr(), p.dtype) for p in model.parameters())
    modules = tuple(type(m) for m in model.modules())
    tables = tuple(m.table.data_ptr() for m in model.modules() if isinstance(m, HostEmbedding) and m.table is not None)
    adapters = tuple((getattr(m, "merged", None), str(getattr(m, "active_adapters", None)),
                      getattr(m, "disable_adapters", None))
                     for m in model.modules() if hasattr(m, "lora_A"))
    copies = tuple((a.data_ptr(), b.data_ptr()) for _, a, b in lora_copies)
    return params, modules, tables, adapters, copies


_DECODERS: "weakref.WeakKeyDictionary[nn.Module, Decoder]" = weakref.WeakKeyDictionary()


def decoder_of(model: nn.Module, parts: ModelParts, lora_copies=()) -> Decoder:
    """The decoder kept for this model's text model (the same object before and after add_lora,
    so a stale one is replaced, not left behind). Weakly keyed: it goes when the model goes."""
    signature = model_signature(model, lora_copies)
    decoder = _DECODERS.get(parts.text_model)
    if decoder is None or decoder.signature != signature:
        decoder = _DECODERS[parts.text_model] = Decoder(signature)
    return decoder


def describe(model: nn.Module) -> str:
    """How this model's generation ran: CUDA graphs on (and how many were captured) or why off."""
    parts = ModelParts.of(model)
    decoder = _DECODERS.get(parts.text_model) if parts is not None else None
    if decoder is None:
        return "no generation yet"
    if decoder.graphs_off_because or why_not_graphed(parts):
        return f"CUDA graphs: off ({decoder.graphs_off_because or why_not_graphed(parts)})"
    graphs = sum(state.graph is not None for state in decoder.states.values())
    return f"CUDA graphs: on ({graphs} of {len(decoder.states)} kept decode states captured)"


def release_decoders(model: nn.Module) -> None:
    """Free the cache buffers and CUDA graphs kept for this model's generation."""
    parts = ModelParts.of(model)
    if parts is not None:
        _DECODERS.pop(parts.text_model, None)


def left_padding(attention_mask: torch.Tensor) -> None:
    """Raise unless every row is [0, ..., 0, 1, ..., 1] (decoder-only generation pads on the left)."""
    mask = attention_mask.to("cpu", torch.long)
    if mask.numel() and not bool((mask[:, 1:] >= mask[:, :-1]).all() and mask[:, -1].all()):
        raise ValueError("generate needs left-padded prompts (attention_mask rows like 0 0 1 1 1): tokenize with "
                         "padding_side='left', or use gemmatune.generate_replies, which pads for you")


class _HostCopy:
    """The tokens of some steps, copied to the host without waiting (read with .wait())."""

    def __init__(self, tokens: torch.Tensor):
        if tokens.is_cuda:
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host, self.done = tokens.clone(), None

    def wait(self) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
        return self.host


def decode(decoder: Decoder, parts: ModelParts, state: DecodeState, prompt: int, max_new_tokens: int,
           sampling: Sampling, stop_ids: set[int], use_graph: bool) -> Iterator[torch.Tensor]:
    """Steps until every row stopped or max_new_tokens; yields the new tokens (B, k) on the CPU as the
    host reads them (the prefill's token, then a chunk at a time), none past the last row's stop."""
    pending, launched = deque([_HostCopy(state.seq[:, prompt:prompt + 1])]), 1  # the prefill's token
    open_rows = set(range(state.batch))
    chunk = CHUNK if parts.device.type == "cuda" else 1  # on a CPU every step waits anyway: no steps wasted

    def launch_chunk():
        nonlocal launched
        k = min(chunk, max_new_tokens - launched)
        for _ in range(k):
            decoder.step(parts, state, sampling, use_graph)
        pending.append(_HostCopy(state.seq[:, prompt + launched:prompt + launched + k]))
        launched += k

    try:
        while pending:
            copy = pending.popleft()
            if launched < max_new_tokens and parts.device.type == "cuda":
                launch_chunk()  # keeps the GPU busy while the host reads the previous chunk
            tokens, kept = copy.wait(), 0
            for i in range(tokens.shape[1]):  # the host's stop check, as model.generate's
                if not open_rows:
                    break
                kept += 1
                open_rows -= {row for row in open_rows if int(tokens[row, i]) in stop_ids}
            if kept:
                yield tokens[:, :kept]
            if not open_rows:
                break
            if launched < max_new_tokens and not pending:
                launch_chunk()
    finally:  # also when the reader stops early (a closed stream)
        if parts.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # steps queued past the last stop finish here


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 128, stop_token_ids=(), pad_token_id: int = 0, streamer=None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             cuda_graphs: bool = True, **model_inputs) -> torch.Tensor:
    """New tokens (B, n) for left-padded prompts, what `model.generate(...)[:, prompt_length:]`
    returns with the same settings (greedy when temperature is 0), n <= max_new_tokens.

    `model_inputs` (pixel_values, image_position_ids, input_features, input_features_mask,
    mm_token_type_ids, ...) go to the prefill, as model.generate passes them to its first step.
    `streamer` (batch 1): a transformers TextStreamer-like object (put / end). The tokens come from
    stream_tokens, which says what is checked and raised."""
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError("streaming works for one prompt at a time; pass streamer=None for a batch")
    chunks = stream_tokens(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                           stop_token_ids=stop_token_ids, pad_token_id=pad_token_id, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed, cuda_graphs=cuda_graphs, **model_inputs)
    tokens = []
    if streamer is not None:
        streamer.put(input_ids.cpu())
    with contextlib.closing(chunks):  # a streamer that raises must not leave the model mid-generation
        for chunk in chunks:
            tokens.append(chunk)
            for i in range(chunk.shape[1] if streamer is not None else 0):
                streamer.put(chunk[:, i])
    if streamer is not None:
        streamer.end()
    return torch.cat(tokens, dim=1) if tokens else input_ids.new_zeros((input_ids.shape[0], 0)).cpu()


@torch.no_grad()
def stream_tokens(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  max_new_tokens: int = 128, stop_token_ids=(), pad_token_id: int = 0, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int | None = None, cuda_graphs: bool = True,
                  **model_inputs) -> Iterator[torch.Tensor]:
    """generate's tokens as the host reads them: (B, k) CPU tensors, k >= 1 (each step on a CPU,
    CHUNK steps at a time on a GPU); joined along dim 1 they are generate's output. What a streamed
    reply is made of (gemmatune.generation.stream_reply). Stopping the iteration early stops the
    generation (the model is back in its mode once the iterator is closed or collected).

    Arguments as for generate; floating model_inputs (pixels, features) are cast to the model's
    compute dtype. Checked when the first chunk is asked for, before the prefill:

    Raises:
        ValueError: settings check_settings refuses; right-padded prompts.
        MissingTowerError: pixel_values or input_features for a model without that tower (they
            would be ignored).
        RuntimeError: the model is already generating (an unfinished iterator of it).
    """
    check_settings(max_new_tokens, temperature, top_k, top_p)
    require_towers(model, input_modalities(model_inputs), "the inputs")
    parts = ModelParts.of(model)
    device = parts.device if parts is not None else next(model.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    dtype = parts.dtype if parts is not None else torch.float32
    model_inputs = {k: _on(v, device, dtype if parts is not None else None) for k, v in model_inputs.items()}
    sampling = Sampling(temperature, top_k, top_p) if temperature > 0 else Sampling()
    stop_ids = [int(i) for i in stop_token_ids]
    if seed is not None:
        torch.manual_seed(seed)
    busy = parts.text_model if parts is not None else model
    with _generating(busy), _eval_mode(model), lora_weights_for_decoding(model, dtype) as lora_copies:
        if why_not_fast(parts, model_inputs) is not None:
            tokens = _stock_generate(model, input_ids, attention_mask, max_new_tokens, stop_ids, pad_token_id,
                                     sampling, model_inputs)
            if tokens.shape[1]:
                yield tokens
            return
        left_padding(attention_mask)
        if max_new_tokens < 1:
            return
        decoder = decoder_of(model, parts, lora_copies)
        prompt = input_ids.shape[1]
        length = -(-(prompt + max_new_tokens) // LENGTH_BUCKET) * LENGTH_BUCKET
        state = decoder.state(parts, input_ids.shape[0], length, len(stop_ids), sampling)
        state.start(input_ids, attention_mask, pad_token_id, stop_ids)
        prefill(model, parts, state, input_ids, attention_mask, sampling, model_inputs)
        use_graph = cuda_graphs and why_not_graphed(parts) is None
        yield from decode(decoder, parts, state, prompt, max_new_tokens, sampling, set(stop_ids), use_graph)


def _on(value, device, dtype):
    """A model input on the model's device; a floating tensor (pixels, mel features) in `dtype`."""
    if not torch.is_tensor(value):
        return value
    return value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)


def _stock_generate(model, input_ids, attention_mask, max_new_tokens, stop_ids, pad_token_id, sampling,
                    model_inputs) -> torch.Tensor:
    sample = dict(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k or None,
                  top_p=sampling.top_p) if not sampling.greedy else dict(do_sample=False)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         eos_token_id=stop_ids or None, pad_token_id=pad_token_id, use_cache=True,
                         **sample, **model_inputs)
    return out[:, input_ids.shape[1]:].cpu()


_GENERATING: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@contextlib.contextmanager
def _generating(model: nn.Module):
    """One generation at a time per model: two would share its cache buffers and CUDA graphs."""
    if model in _GENERATING:
        raise RuntimeError("this model is already generating (an unfinished stream_reply or stream_tokens "
                           "iterator?): read it to the end or close() it first; a web app serving several users "
                           "with one model should hold a lock around each reply")
    _GENERATING.add(model)
    try:
        yield
    finally:
        _GENERATING.discard(model)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
