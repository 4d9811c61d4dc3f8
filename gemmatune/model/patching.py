"""Where gemmatune's kernels go into a loaded Gemma 4 model object (the other changes: gemmatune.model).

How: a module of *this* model gets its class swapped for a subclass whose forward calls a
gemmatune kernel (`module.__class__ = KernelRMSNorm`); its parameters stay where they are,
so peft and state dicts see nothing new. Nothing happens at import time and nothing global
changes. `patch_model` is idempotent and returns what it swapped; `unpatch_model` restores
every original class. `GEMMATUNE_KERNELS=0` (or use_kernels=False) leaves the model stock.

What gets swapped (each kernel is exact against its PyTorch reference, see tests/kernels):
- Gemma4RMSNorm (all norms, including the per-head q/k norms and the weightless v_norm)
  -> Triton RMSNorm;
- Gemma4TextMLP -> gate/up projections, Triton GeGLU, down projection;
- Gemma4TextAttention (training forward) -> fused q/k RMSNorm + RoPE kernel, weightless
  v_norm kernel, math attention for head_dim 512 (SDPA's backward is slow there), and,
  when the caller passes no masks (builds_own_masks: sm80+ GPUs), sliding layers that
  compute only their window through FlashAttention-2's window; packed micro-batches (a
  PackedDocuments in place of the mask, each row attending only to itself): sliding layers
  through FlashAttention-2's variable-length window, full layers through math attention with
  a block-diagonal mask (gemmatune.model.attention);
- peft's LoRA-on-4-bit layers (after add_lora) -> NF4 dequant + matmul + LoRA in one
  autograd function that does not keep the dequantised weight alive for the backward;
- always, kernels on or off: every bitsandbytes Linear4bit -> NF4Linear4bit, gemmatune's own
  NF4 dequantisation + matmul (bitsandbytes' forward can rewrite the weight in place on some
  CPUs, see NF4Linear4bit);
- decoding (gemmatune.generation.decoding): both 4-bit layer kinds take the NF4 GEMV in no-grad forwards
  of at most 16 rows (kernels/nf4_gemv.py, the LoRA update in the same kernel, the adapters'
  compute-dtype copies from lora_weights_for_decoding), and KernelGemma4Attention fuses the
  query/key norm + RoPE when it gets gemmatune's static cache (static_cache_attention);
- float16 only: the residual stream and the MLP's product are clamped to the fp16 range
  (Gemma's activations can exceed 65504 on a T4, turning the loss into inf/NaN);
- always: the audio tower's layers -> CheckpointedAudioLayer, which can be gradient-
  checkpointed like the text and vision layers (transformers' audio layer cannot); it is,
  while the audio tower has adapters (enable_gradient_checkpointing).
The vision tower's and the embedders' norms are Gemma4RMSNorm too and take the kernel (the
same formula; compared with transformers + peft in tests/model/test_multimodal_model.py); the
towers' attention and MLPs stay stock. The audio tower stays stock entirely: its layers
modify norm outputs in place (`hidden_states *= scale`, `+= residual`), which the kernel's
autograd function forbids when the tower trains. No fp16 fix is needed in the audio tower:
its attention computes the scores and applies the -1e9 mask value in float32 (transformers
5.17 and 5.23; checked in fp16 with fully masked rows in tests/model/test_multimodal_model.py).
The loss is not a patch: gemmatune.training.loss calls the fused linear cross-entropy directly.
"""
import contextlib
import functools

import torch
from torch import nn
from transformers.models.gemma4 import modeling_gemma4 as hf_gemma4

from gemmatune.errors import GemmatuneError
from gemmatune.kernels._backend import kernels_enabled
from gemmatune.kernels.decode_attention import decode_attention_forward, decode_attention_supported
from gemmatune.kernels.geglu import geglu
from gemmatune.kernels.lora_nf4_linear import lora_nf4_linear, nf4_linear
from gemmatune.kernels.nf4_gemv import gemv_supported, nf4_gemv
from gemmatune.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_pair
from gemmatune.kernels.rms_norm import rms_norm
from gemmatune.model import towers
from gemmatune.model.activation_checkpointing import CheckpointedAudioLayer
from gemmatune.model.attention import (PackedDocuments, attention_math, flash_varlen_works, flash_window_available,
                                       packed_window_attention, sliding_window_attention, use_math_attention)

FP16_LIMIT = torch.finfo(torch.float16).max - 1000  # headroom so the next add stays finite


class KernelRMSNorm(hf_gemma4.Gemma4RMSNorm):
    """Gemma4RMSNorm through the Triton kernel: same `w * x_hat` (no `1 + w`), fp32 math."""

    def forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight if self.with_scale else None, self.eps)


class KernelGemma4MLP(hf_gemma4.Gemma4TextMLP):
    """Gemma4TextMLP with the gelu_tanh(gate) * up product in one Triton kernel."""

    def forward(self, x):
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


class KernelGemma4Attention(hf_gemma4.Gemma4TextAttention):
    """Gemma4TextAttention for training: q/k norm + RoPE in one kernel for both, and math
    attention (gemmatune.model.attention) where SDPA is slow (head_dim 512 on the full layers).
    With a KV cache (generation) it is the stock forward."""

    def forward(self, hidden_states, position_embeddings, attention_mask, shared_kv_states,
                past_key_values=None, **kwargs):
        if getattr(past_key_values, "is_gemmatune_static", False):
            return static_cache_attention(self, hidden_states, position_embeddings, attention_mask,
                                          shared_kv_states, past_key_values, **kwargs)
        if past_key_values is not None:
            return super().forward(hidden_states, position_embeddings, attention_mask, shared_kv_states,
                                   past_key_values, **kwargs)
        input_shape = hidden_states.shape[:-1]
        query, key, value = _query_key_value(self, hidden_states, position_embeddings, shared_kv_states)
        if self.store_full_length_kv:
            shared_kv_states[self.layer_type] = key, value
        if isinstance(attention_mask, PackedDocuments):  # several rows per buffer, each attending to itself
            documents = attention_mask
            if self.sliding_window is not None and flash_varlen_works(query.transpose(1, 2)):
                out = packed_window_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                              documents, self.sliding_window, self.scaling)
                return self.o_proj(out.reshape(*input_shape, -1).contiguous()), None
            eager = self.config._attn_implementation == "eager" and not use_math_attention(query, key)
            attention_mask = documents.mask(self.sliding_window, query.dtype if eager else None)
        if self.sliding_window is not None and attention_mask is None and key.shape[2] > self.sliding_window:
            # no mask built (see builds_own_masks): only the window's scores are computed
            out = sliding_window_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                           self.sliding_window, self.scaling)
        elif use_math_attention(query, key) and (attention_mask is None or attention_mask.dtype == torch.bool):
            if attention_mask is None:  # SDPA would have used is_causal
                attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool,
                                            device=query.device).tril_(key.shape[2] - query.shape[2])
            out = attention_math(query, key, value, attention_mask, self.scaling).transpose(1, 2)
        else:
            attend = hf_gemma4.ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, hf_gemma4.eager_attention_forward)
            out, _ = attend(self, query, key, value, attention_mask, scaling=self.scaling,
                            dropout=self.attention_dropout if self.training else 0.0,
                            sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), None


def static_cache_attention(self, hidden_states, position_embeddings, attention_mask, shared_kv_states,
                           past_key_values, **kwargs):
    """Gemma4TextAttention.forward with gemmatune's static cache (gemmatune.generation): the same
    steps in the same order, with the query and key norm + RoPE in one kernel launch and the
    weightless v_norm in another (per decode token and layer: 2 launches instead of about 12), and
    a decode step's attention (one query token, boolean mask) through kernels/decode_attention.py."""
    input_shape = hidden_states.shape[:-1]
    query, key, value = _query_key_value(self, hidden_states, position_embeddings, shared_kv_states)
    if not self.is_kv_shared_layer:
        key, value = past_key_values.update(key, value, self.layer_idx)
    if self.store_full_length_kv:
        shared_kv_states[self.layer_type] = key, value
    if decode_attention_supported(query, key, value, attention_mask):
        out = decode_attention_forward(query, key, value, attention_mask, self.scaling)
    else:
        attend = hf_gemma4.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                 hf_gemma4.eager_attention_forward)
        out, _ = attend(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling,
                        sliding_window=self.sliding_window, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), None


def _query_key_value(attention, hidden_states, position_embeddings, shared_kv_states):
    """(query, key, value) as (batch, heads, seq, head_dim), for training and the static cache
    alike: the query and key norm + RoPE of a layer in one kernel launch, the weightless v_norm
    in another; KV-shared layers take key and value from the layer they share them with."""
    hidden_shape = (*hidden_states.shape[:-1], -1, attention.head_dim)
    cos, sin = position_embeddings
    query = attention.q_proj(hidden_states).view(hidden_shape)
    if attention.is_kv_shared_layer:
        query = qk_norm_rope(query, attention.q_norm.weight, cos, sin, attention.q_norm.eps).transpose(1, 2)
        key, value = shared_kv_states[attention.layer_type]
        return query, key, value
    key_proj = attention.k_proj(hidden_states).view(hidden_shape)
    value = attention.v_proj(hidden_states).view(hidden_shape) if attention.v_proj is not None else key_proj
    query, key = qk_norm_rope_pair(query, attention.q_norm.weight, key_proj, attention.k_norm.weight, cos, sin,
                                   attention.q_norm.eps, attention.k_norm.eps)
    value = rms_norm(value, None, attention.v_norm.eps).transpose(1, 2)
    return query.transpose(1, 2), key.transpose(1, 2), value


def builds_own_masks(text_model: nn.Module) -> bool:
    """True when the caller may pass `attention_mask={"full_attention": None,
    "sliding_attention": None}` for an unpadded (or right-padded) batch, so that transformers
    builds no seq x seq masks: every attention layer of this Gemma4TextModel is
    KernelGemma4Attention (which applies causality and the window itself when it gets no
    mask) and its sliding layers can use FlashAttention-2's window on this GPU and dtype.
    Elsewhere (CPU, a T4) masks are built as transformers does: the block-by-block window is
    exact but has not been measured to be as fast as masked SDPA."""
    if not isinstance(text_model, hf_gemma4.Gemma4TextModel):
        return False
    weight = text_model.embed_tokens.weight
    if not flash_window_available(weight.device, weight.dtype):
        return False
    attention = [m for m in text_model.modules() if isinstance(m, hf_gemma4.Gemma4TextAttention)]
    flash_head = all(m.head_dim <= 256 and m.head_dim % 8 == 0 for m in attention if m.sliding_window)
    return bool(attention) and flash_head and all(type(m) is KernelGemma4Attention for m in attention)


def packed_attention_masks(text_model: nn.Module, documents: PackedDocuments) -> dict:
    """The `attention_mask` a Gemma4TextModel takes for a packed micro-batch (gemmatune.data.packing):
    `documents` itself for every layer kind where every attention layer is KernelGemma4Attention
    (which keeps rows apart without seq x seq masks where it can: gemmatune.model.attention), else
    block-diagonal masks in the form transformers' stock attention takes (kernels off).

    Raises:
        GemmatuneError: stock attention layers with an implementation other than sdpa or eager.
    """
    kinds = set(text_model.config.layer_types)
    attention = [m for m in text_model.modules() if isinstance(m, hf_gemma4.Gemma4TextAttention)]
    if attention and all(type(m) is KernelGemma4Attention for m in attention):
        return {kind: documents for kind in kinds}
    implementation = text_model.config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        raise GemmatuneError(f"packed batches need sdpa or eager attention, the model uses {implementation!r}: "
                             "train with packing=False, or load the model with attn_implementation='sdpa'")
    additive = text_model.embed_tokens.weight.dtype if implementation == "eager" else None
    window = text_model.config.sliding_window
    return {kind: documents.mask(window if kind == "sliding_attention" else None, additive) for kind in kinds}


def _lora_4bit_class():
    from peft.tuners.lora.bnb import Linear4bit

    class KernelLoRALinear4bit(Linear4bit):
        """peft LoRA on a bnb 4-bit layer, through gemmatune's NF4 + LoRA autograd function
        when the layer is in the plain training set-up (one adapter, no dropout/DoRA/merge)."""

        def forward(self, x, *args, **kwargs):
            if not _plain_lora(self, kwargs):
                return super().forward(x, *args, **kwargs)
            name = self.active_adapters[0]
            weight = self.base_layer.weight
            if not torch.is_grad_enabled() and gemv_supported(x, weight, weight.quant_state):
                lora_a, lora_b = _decode_lora_weights(self, name, x.dtype)
                return nf4_gemv(x, weight, weight.quant_state, self.base_layer.bias, lora_a, lora_b,
                                self.scaling[name])
            lora_a = self.lora_A[name].weight.to(x.dtype)
            lora_b = self.lora_B[name].weight.to(x.dtype)
            return lora_nf4_linear(x, weight, weight.quant_state, lora_a, lora_b, self.scaling[name],
                                   self.base_layer.bias)

    return Linear4bit, KernelLoRALinear4bit


@functools.cache
def _nf4_linear_classes():
    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    class NF4Linear4bit(bnb.nn.Linear4bit):
        """A frozen bitsandbytes NF4 Linear4bit computed by gemmatune's NF4 dequantisation and a
        matmul, in every mode and on every device; bitsandbytes' own forward never runs.

        Why: on a CPU with AVX512-BF16, bitsandbytes 0.50's forward, the first time it runs in
        eval mode on an input that needs no gradient (generation: chat()), repacks the weight in
        place into a CPU layout. From then on its forward is approximate and its backward has no
        autograd kernel, so a model that generated once trains with wrong gradients. Here the
        stored bytes are only ever read. Same math as bnb: x cast to the compute dtype, W
        dequantised exactly as bnb does (tests/kernels/test_nf4.py), the output cast back."""

        def forward(self, x):
            fix_4bit_weight_quant_state_from_module(self)
            quant_state = self.weight.quant_state
            if quant_state is None or quant_state.quant_type != "nf4":
                return super().forward(x)  # gemmatune loads NF4 only; anything else stays bnb's
            if getattr(quant_state, "packing_format_for_cpu", False):
                raise RuntimeError("this 4-bit layer's weight was repacked by bitsandbytes' CPU inference path "
                                   "before gemmatune patched it, which cannot be undone exactly: load the model "
                                   "again with gemmatune.load_model")
            dtype = self.compute_dtype or x.dtype
            x_c = x.to(dtype)
            if not torch.is_grad_enabled() and gemv_supported(x_c, self.weight, quant_state):
                return nf4_gemv(x_c, self.weight, quant_state, self.bias).to(x.dtype)  # decoding: few rows
            return nf4_linear(x_c, self.weight, quant_state, self.bias).to(x.dtype)

    return bnb.nn.Linear4bit, NF4Linear4bit


def _plain_lora(layer, kwargs) -> bool:
    name = layer.active_adapters[0] if len(layer.active_adapters) == 1 else None
    return (
        name is not None and not layer.merged and not layer.disable_adapters and not kwargs
        and name in layer.lora_A and not layer.use_dora.get(name, False)
        and isinstance(layer.lora_dropout[name], nn.Identity)
        and getattr(layer.base_layer.weight, "quant_state", None) is not None
        and layer.base_layer.weight.quant_state.quant_type == "nf4"
    )


def _swap_class(model, module, new_class) -> None:
    model.gemmatune_patches.append((module, type(module)))
    module.__class__ = new_class


def patch_model(model: nn.Module, use_kernels: bool = True) -> list[str]:
    """Swap this model's norms/MLPs (and fp16 clamps) for gemmatune's; returns a report."""
    if getattr(model, "gemmatune_patches", None) is None:
        model.gemmatune_patches, model.gemmatune_hooks = [], []
    report = []
    if use_kernels and kernels_enabled():
        swaps = {hf_gemma4.Gemma4RMSNorm: KernelRMSNorm, hf_gemma4.Gemma4TextMLP: KernelGemma4MLP,
                 hf_gemma4.Gemma4TextAttention: KernelGemma4Attention}
        counts = {}
        audio = towers.towers_of(model).get("audio")
        in_audio_tower = {id(m) for m in audio.modules()} if audio is not None else set()
        for module in model.modules():
            new_class = swaps.get(type(module)) if id(module) not in in_audio_tower else None
            if new_class is not None:
                _swap_class(model, module, new_class)
                counts[new_class.__name__] = counts.get(new_class.__name__, 0) + 1
        report += [f"{n} modules -> {name}" for name, n in counts.items()]
    n_4bit = _patch_4bit_layers(model)
    if n_4bit:
        report.append(f"{n_4bit} 4-bit layers -> gemmatune's NF4 path")
    audio_layers = [m for m in model.modules() if type(m) is hf_gemma4.Gemma4AudioLayer]
    for layer in audio_layers:
        _swap_class(model, layer, CheckpointedAudioLayer)
    if audio_layers:
        report.append(f"{len(audio_layers)} audio layers -> CheckpointedAudioLayer")
    if _compute_dtype(model) == torch.float16 and not model.gemmatune_hooks:
        report.append(f"{_add_fp16_clamps(model)} fp16 overflow clamps")
    return report


def _patch_4bit_layers(model: nn.Module) -> int:
    """Every plain bitsandbytes Linear4bit of this model -> NF4Linear4bit (not a speed choice:
    a correctness one, so it happens with the kernels off too). Returns how many."""
    if not any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        return 0  # no 4-bit layer: no need to import bitsandbytes
    bnb_class, nf4_class = _nf4_linear_classes()
    layers = [m for m in model.modules() if type(m) is bnb_class]
    for layer in layers:
        _swap_class(model, layer, nf4_class)
    return len(layers)


def patch_lora(model: nn.Module) -> list[str]:
    """After add_lora: route peft's LoRA-on-4-bit layers through the NF4 + LoRA kernel."""
    if not kernels_enabled():
        return []
    peft_class, kernel_class = _lora_4bit_class()
    layers = [m for m in model.modules() if type(m) is peft_class]
    if getattr(model, "gemmatune_patches", None) is None:
        model.gemmatune_patches, model.gemmatune_hooks = [], []
    for layer in layers:
        _swap_class(model, layer, kernel_class)
    return [f"{len(layers)} LoRA 4-bit layers -> NF4 + LoRA kernel"] if layers else []


def _decode_lora_weights(layer, name: str, dtype: torch.dtype):
    """LoRA A and B for a no-grad forward: the compute-dtype copies `lora_weights_for_decoding`
    made for this call when it is active, else the parameters (cast per call)."""
    cached = layer.__dict__.get("gemmatune_decode_lora") if layer.__dict__.get("gemmatune_decoding") else None
    if cached is not None and cached[0] == (name, dtype):
        return cached[1], cached[2]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


@contextlib.contextmanager
def lora_weights_for_decoding(model: nn.Module, dtype: torch.dtype):
    """While generating: every NF4 + LoRA layer reads compute-dtype copies of its adapter
    weights, refreshed once on entry, instead of casting the fp32 parameters in every step
    (two cast kernels per layer and token: about 400 launches per E2B token). The copies keep
    their memory from call to call, so a CUDA graph that read them stays valid. Training
    never sees them: they are used only inside this context."""
    layers = [m for m in model.modules() if type(m).__name__ == "KernelLoRALinear4bit" and _plain_lora(m, {})]
    for layer in layers:
        name = layer.active_adapters[0]
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        cached = layer.__dict__.get("gemmatune_decode_lora")
        if cached is None or cached[0] != (name, dtype) or cached[1].shape != a.shape or cached[2].shape != b.shape \
                or cached[1].device != a.device:
            layer.__dict__["gemmatune_decode_lora"] = ((name, dtype), a.detach().to(dtype, copy=True),
                                                       b.detach().to(dtype, copy=True))
        else:
            cached[1].copy_(a)
            cached[2].copy_(b)
        layer.__dict__["gemmatune_decoding"] = True
    try:
        yield [layer.__dict__["gemmatune_decode_lora"] for layer in layers]
    finally:
        for layer in layers:
            layer.__dict__["gemmatune_decoding"] = False


def unpatch_model(model: nn.Module) -> None:
    """Restore every class patch_model/patch_lora swapped and remove the fp16 clamps."""
    for module, original_class in reversed(getattr(model, "gemmatune_patches", None) or []):
        module.__class__ = original_class
    for handle in getattr(model, "gemmatune_hooks", None) or []:
        handle.remove()
    model.gemmatune_patches, model.gemmatune_hooks = [], []


def _compute_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


def _clamp_output(module, args, output):
    return output.clamp(-FP16_LIMIT, FP16_LIMIT) if output.dtype == torch.float16 else output


def _clamp_input(module, args):
    x = args[0]
    return (x.clamp(-FP16_LIMIT, FP16_LIMIT), *args[1:]) if x.dtype == torch.float16 else args


def _add_fp16_clamps(model: nn.Module) -> int:
    """Clamp each decoder layer's output and each MLP's gelu(gate)*up before down_proj."""
    for module in model.modules():
        if isinstance(module, hf_gemma4.Gemma4TextDecoderLayer):
            model.gemmatune_hooks.append(module.register_forward_hook(_clamp_output))
        elif isinstance(module, hf_gemma4.Gemma4TextMLP):
            model.gemmatune_hooks.append(module.down_proj.register_forward_pre_hook(_clamp_input))
    return len(model.gemmatune_hooks)
