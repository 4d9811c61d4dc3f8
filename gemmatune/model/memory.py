"""Predict the peak GPU memory of a gemmatune QLoRA training step before running it.

Why: an out-of-memory error after minutes of loading is the worst way to learn that a
sequence length does not fit. `load_model` and the notebooks call `check_fits` to warn
early and suggest a length that fits the GPU in hand.

The model, in bytes (T = batch x sequence tokens):

    static       4-bit weights (0.5 byte + 1/64 byte of double-quantised scale per weight),
                 the unquantised rest in the compute dtype (token embeddings/LM head, norms),
                 LoRA weights + gradients in fp32 and 8-bit AdamW states (10 bytes per LoRA
                 weight), one dequantisation workspace (the largest projection);
    per token    what one decoder layer holds while the backward recomputes it (its MLP and
                 attention activations and their gradients), the per-layer-embedding inputs
                 of all layers, the hidden states the loss keeps, and with checkpointing "on"
                 every layer's saved input; multiplied by ACTIVATION_SCALE, fitted once to
                 the H200 measurements (benchmarks/results/*-h200-memory.json);
    attention    the fp32 score matrix of math attention (full layers, short sequences);
    masks        only when transformers builds seq x seq attention masks (image/audio or
                 left-padded batches, and any batch on a GPU without FlashAttention-2's
                 window: CPU, T4): 4 bytes per token pair, fitted on session 2's H200 sweep,
                 which still built them;
    packed       packed micro-batches (gemmatune.data.packing, `packed=True`): cos/sin per buffer row
                 instead of one shared row, the full layers' block-diagonal mask (bool, B x L x L) and
                 its negation, and FlashAttention's variable-length backward workspace (128 rows per
                 document slot) where the sliding layers take it, else their own window mask and
                 SDPA's additive copy of it; transformers builds no masks for packed batches;
    loss         one chunk of logits of the fused cross-entropy (its memory budget);
    fp16         the overflow clamp on each layer's output keeps the unclamped output for its
                 backward: one hidden state per layer per token.

The per-layer-embedding table is not counted: it stays in CPU memory. tests/model/test_memory.py
checks the prediction against every committed GPU measurement (within 10%).

Images and audio (multimodal models; `images` per row at a `max_soft_tokens` budget,
`audio_seconds` per row): the soft tokens are language-model tokens and belong in `seq`;
on top come the towers' weights in the compute dtype (plus their projectors), and
    frozen tower   one layer's transient forward (no_grad frees the rest at once): per
                   patch/frame its MLP's three intermediate tensors and a few hidden states,
                   the vision attention's patch x patch padding mask, the pooler's one-hot
                   weights; audio: the first subsampling convolution's output;
    trained tower  with tower checkpointing ("on", gemmatune.model.patching): each layer's saved
                   input plus one layer's activations and their gradients while it is
                   recomputed, and the tower's LoRA weights and optimizer states.
The image processor pads every image to the budget's patch count (9 x max_soft_tokens), so
the vision tower's work depends on the budget, not on the image's size. Packed, a buffer holds as
many media rows as fit (at most seq // the row's media tokens each), all through the tower at once.
These terms come
from the tower architectures (media_architecture) scaled by TOWER_ACTIVATION_SCALE, which
is 1 until the multimodal H200 measurements are committed to fit it.
"""
import torch
from torch import nn

from gemmatune.data.packing import rows_per_buffer
from gemmatune.model import towers
from gemmatune.model.attention import MATH_SCORES_BUDGET, flash_varlen_available, flash_window_available

GIB = 2**30
ACTIVATION_SCALE = 0.7  # fitted on the H200 measurements, see the module docstring
MASK_BYTES_PER_TOKEN_PAIR = 4  # seq x seq masks, when built: fitted on an H200 sweep with masks
CE_BUDGET_MIB = 192     # gemmatune.kernels.fused_linear_ce default chunk budget
LORA_BYTES_PER_WEIGHT = 4 + 4 + 2  # fp32 weight, fp32 gradient, two 8-bit Adam states
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOWER_ACTIVATION_SCALE = 1.0  # see the module docstring
PATCHES_PER_SOFT_TOKEN = 9    # pooling 3 x 3
MEL_FRAMES_PER_SECOND = 100   # 10 ms hop
AUDIO_TOKENS_PER_SECOND = 25  # two stride-2 convolutions
FLASH_ROWS_PER_SLOT = 128     # FlashAttention-2's variable-length backward: dq workspace rows per document slot
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)


def text_config_of(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def architecture(model_or_config, lora_rank: int = 16) -> dict:
    """Weights by kind and the widest layer's sizes, read off a meta-device copy of the
    language model (no memory used, every per-layer variation of Gemma 4 included)."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ForCausalLM

    config = text_config_of(model_or_config)
    with torch.device("meta"):
        model = Gemma4ForCausalLM(config)
    arch = {"quantized": 0, "dense": 0, "lora": 0, "largest_linear": 0, "intermediate": 0, "q_dim": 0,
            "kv_dim": 0, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
            "ple_dim": config.hidden_size_per_layer_input or 0, "heads": config.num_attention_heads,
            "vocab": config.vocab_size, "head_dim": 0, "sliding_head_dim": 0}
    for layer in model.model.layers:
        attention = layer.self_attn
        arch["head_dim"] = max(arch["head_dim"], attention.head_dim)
        if attention.sliding_window:
            arch["sliding_head_dim"] = max(arch["sliding_head_dim"], attention.head_dim)
    seen = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or "lm_head" in name:
            continue
        seen.add(id(module.weight))
        arch["quantized"] += module.weight.numel()
        arch["largest_linear"] = max(arch["largest_linear"], module.weight.numel())
        kind = name.rsplit(".", 1)[-1]
        widest = {"gate_proj": "intermediate", "q_proj": "q_dim", "k_proj": "kv_dim"}.get(kind)
        if widest:
            arch[widest] = max(arch[widest], module.out_features)
        if kind in LORA_TARGETS and not (kind in ("k_proj", "v_proj") and _is_kv_shared(model, name)):
            arch["lora"] += lora_rank * (module.in_features + module.out_features)
    for name, param in model.named_parameters():
        if id(param) not in seen and "embed_tokens_per_layer" not in name:
            arch["dense"] += param.numel()
    return arch


def _is_kv_shared(model, linear_name: str) -> bool:
    attention = model.get_submodule(linear_name.rsplit(".", 1)[0])
    return bool(getattr(attention, "is_kv_shared_layer", False))


def bytes_per_token(arch: dict, checkpointing: str, dtype_bytes: int = 2) -> float:
    """Activation bytes per token at the peak (before ACTIVATION_SCALE)."""
    hidden, layers = arch["hidden"], arch["layers"]
    one_layer = 5 * arch["intermediate"] + 6 * arch["q_dim"] + 4 * arch["kv_dim"] + 14 * hidden
    per_layer_inputs = 3 * layers * arch["ple_dim"]
    loss_side = 4 * hidden
    saved_inputs = {"offload": 0, "on": layers * hidden, "off": layers * one_layer}[checkpointing]
    return dtype_bytes * (one_layer + per_layer_inputs + loss_side + saved_inputs)


def math_attention_bytes(arch: dict, seq: int, batch: int) -> int:
    """fp32 scores and their gradient in one full-attention call, when the math path runs
    (gemmatune.model.attention.use_math_attention)."""
    scores = batch * arch["heads"] * seq * seq * 4
    return 2 * scores if scores <= MATH_SCORES_BUDGET else 0


def packed_bytes(arch: dict, seq: int, batch: int, dtype_bytes: int = 2) -> float:
    """What a packed micro-batch of `batch` buffers x `seq` tokens adds (see the module docstring)."""
    tokens = seq * batch
    rope = 2 * 2 * tokens * arch["head_dim"] * dtype_bytes  # cos and sin of both layer kinds, per buffer row
    full_mask = 2 * batch * seq * seq                      # bool, and its negation in masked_fill
    if arch["sliding_head_dim"] and flash_varlen_available_here():
        slots = batch * (rows_per_buffer(seq) + 1)
        sliding = FLASH_ROWS_PER_SLOT * slots * arch["heads"] * arch["sliding_head_dim"] * 4
    else:
        sliding = batch * seq * seq * (1 + dtype_bytes)  # bool window mask, SDPA's additive copy
    return rope + full_mask + sliding


def predict_peak_bytes(model_or_config, seq: int, batch: int = 1, lora_rank: int = 16,
                       checkpointing: str = "offload", dtype_bytes: int = 2, arch: dict | None = None,
                       fp16: bool = False, masks: bool | None = None, images: int = 0, max_soft_tokens: int = 280,
                       audio_seconds: float = 0.0, media: dict | None = None, packed: bool = False) -> dict:
    """The predicted peak, by component (bytes); "total" is what to compare with the GPU.
    `masks`: transformers builds seq x seq attention masks, as it does for left-padded
    batches, and for all batches where the sliding layers cannot run without them (see
    masks_built_here, the default; never for packed batches). `images`/`audio_seconds` per row,
    `media` from media_architecture (default: the model's towers), `packed`: `batch` buffers of
    `seq` tokens, as many media rows in each as fit: see the module docstring."""
    arch = arch or architecture(model_or_config, lora_rank)
    media = media if media is not None else media_architecture(model_or_config, lora_rank)
    if masks is None:
        masks = masks_built_here() and not packed
    tokens = seq * batch
    rows = batch  # rows with images or clips in one micro-batch
    if packed and (images or audio_seconds):
        media_tokens = images * (max_soft_tokens + 2)  # each image: its soft tokens and two markers
        media_tokens += audio_seconds * AUDIO_TOKENS_PER_SECOND + 2 if audio_seconds else 0
        rows = batch * max(1, int(seq // media_tokens))  # as many as fit, as if the rows had no text
    parts = {
        "weights": arch["quantized"] * (0.5 + 1 / 64) + arch["dense"] * dtype_bytes,
        "lora_and_optimizer": arch["lora"] * LORA_BYTES_PER_WEIGHT,
        "dequant_workspace": arch["largest_linear"] * dtype_bytes,
        "activations": ACTIVATION_SCALE * tokens * bytes_per_token(arch, checkpointing, dtype_bytes),
        "attention": math_attention_bytes(arch, seq, batch),
        "masks": MASK_BYTES_PER_TOKEN_PAIR * batch * seq * seq if masks else 0,
        "packing": packed_bytes(arch, seq, batch, dtype_bytes) if packed else 0,
        "loss_chunk": min(CE_BUDGET_MIB * 2**20, tokens * arch["vocab"] * dtype_bytes),
        "fp16_clamps": tokens * arch["layers"] * arch["hidden"] * dtype_bytes if fp16 else 0,
        **tower_bytes(media, rows * images, max_soft_tokens, rows, audio_seconds, dtype_bytes),
    }
    parts["total"] = sum(parts.values())
    return parts


def predict_peak_gib(model_or_config, seq: int, batch: int = 1, lora_rank: int = 16,
                     checkpointing: str = "offload", dtype_bytes: int = 2, arch: dict | None = None,
                     fp16: bool | None = None, masks: bool | None = None, images: int = 0,
                     max_soft_tokens: int = 280, audio_seconds: float = 0.0, media: dict | None = None,
                     packed: bool = False) -> float:
    """Predict a training step's peak GPU memory (GiB) from the model's configuration alone.

    Args:
        model_or_config: a loaded model, or a Gemma 4 config.
        seq: tokens per row, image and audio soft tokens included. batch: rows per micro-batch.
        lora_rank: the adapters' rank. checkpointing: "offload", "on" or "off".
        dtype_bytes: 2 for bf16/fp16. arch: a precomputed architecture() (to save time in loops).
        fp16: whether the model computes in float16 (default: read from the model; a T4).
        masks: whether seq x seq attention masks are built (default: as on this machine's GPU).
        images, max_soft_tokens: images per row and their soft-token budget.
        audio_seconds: seconds of audio per row. media: a precomputed media_architecture().
        packed: `batch` packed buffers of `seq` tokens (train's default, gemmatune.data.packing),
            each holding as many rows with those images/clips as fit.

    Returns:
        The predicted peak allocated memory in GiB (tests/model/test_memory.py holds it within 10%
        of every committed GPU measurement). predict_peak_bytes gives it by component.
    """
    if fp16 is None:
        fp16 = _computes_in_fp16(model_or_config)
    parts = predict_peak_bytes(model_or_config, seq, batch, lora_rank, checkpointing, dtype_bytes, arch, fp16,
                               masks, images, max_soft_tokens, audio_seconds, media, packed)
    return parts["total"] / GIB


# ------------------------------------------------------------------ the towers
def media_architecture(model_or_config, lora_rank: int = 16, train_vision_tower: bool | None = None,
                       train_audio_tower: bool | None = None) -> dict:
    """{"image": {...}, "audio": {...}} for the towers a multimodal model (or Gemma4Config)
    has: parameters of tower + projector, widths, layers, LoRA weights if that tower trains
    (read off the model's adapters; for a config, the train_* flags)."""
    config = getattr(model_or_config, "config", model_or_config)
    if config is None or not hasattr(config, "vision_config"):
        return {}
    trained = {"image": train_vision_tower, "audio": train_audio_tower}
    if isinstance(model_or_config, nn.Module):
        built = towers.towers_of(model_or_config)
        trained = {m: trained[m] if trained[m] is not None else towers.is_trained(built.get(m)) for m in trained}
    media = {}
    for modality, field in towers.CONFIG_OF.items():
        sub = getattr(config, field, None)
        if sub is not None:
            media[modality] = _tower_architecture(modality, sub, config.get_text_config(), lora_rank,
                                                  bool(trained[modality]))
    return media


def _tower_architecture(modality: str, config, text_config, lora_rank: int, trained: bool) -> dict:
    from transformers.models.gemma4 import modeling_gemma4 as hf

    with torch.device("meta"):
        tower = hf.Gemma4VisionModel(config) if modality == "image" else hf.Gemma4AudioModel(config)
        projector = hf.Gemma4MultimodalEmbedder(config, text_config)
    lora = sum(lora_rank * (m.linear.in_features + m.linear.out_features) for name, m in tower.named_modules()
               if type(m).__name__ == "Gemma4ClippableLinear" and ".layers." in f".{name}")
    hidden = config.hidden_size
    return {"params": sum(p.numel() for p in [*tower.parameters(), *projector.parameters()]), "hidden": hidden,
            "intermediate": getattr(config, "intermediate_size", 4 * hidden), "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads, "lora": lora if trained else 0, "trained": trained,
            "conv_channels": list(getattr(config, "subsampling_conv_channels", [0, 0]))}


def tower_bytes(media: dict, images: int, max_soft_tokens: int, clips: int, audio_seconds: float,
                dtype_bytes: int = 2) -> dict:
    """Weights, activations and LoRA bytes of the towers for `images` images at a budget and
    `clips` clips of `audio_seconds` in one micro-batch (see the module docstring)."""
    weights = sum(t["params"] for t in media.values()) * dtype_bytes
    lora = sum(t["lora"] for t in media.values()) * LORA_BYTES_PER_WEIGHT
    activations = 0.0
    if "image" in media and images:
        activations = max(activations, _vision_activation_bytes(media["image"], images, max_soft_tokens, dtype_bytes))
    if "audio" in media and clips and audio_seconds:
        activations = max(activations, _audio_activation_bytes(media["audio"], clips, audio_seconds, dtype_bytes))
    return {"tower_weights": weights, "tower_lora_and_optimizer": lora,
            "tower_activations": TOWER_ACTIVATION_SCALE * activations}


def _vision_activation_bytes(t: dict, images: int, max_soft_tokens: int, dtype_bytes: int) -> float:
    patches = PATCHES_PER_SOFT_TOKEN * max_soft_tokens
    hidden, inter = t["hidden"], t["intermediate"]
    one_layer = images * patches * (3 * inter + 4 * hidden) * dtype_bytes
    fixed = images * (patches * patches + patches * max_soft_tokens * 4)  # bool padding mask, fp32 pooler one-hot
    if not t["trained"]:
        return one_layer + fixed
    saved_inputs = t["layers"] * images * patches * hidden * dtype_bytes
    return saved_inputs + 2 * images * patches * (6 * inter + 16 * hidden) * dtype_bytes + fixed


def _audio_activation_bytes(t: dict, clips: int, seconds: float, dtype_bytes: int) -> float:
    frames = MEL_FRAMES_PER_SECOND * seconds
    tokens = frames / 4
    hidden = t["hidden"]
    channels = t["conv_channels"][0]  # also the mel-bin count, halved by the stride
    first_conv = clips * (frames / 2) * (channels / 2) * channels * dtype_bytes * 3  # its output, norm, permute
    one_layer = clips * tokens * (3 * 4 * hidden + 4 * hidden) * dtype_bytes + clips * tokens * 6 * hidden * 4
    if not t["trained"]:
        return max(first_conv, one_layer)
    saved_inputs = t["layers"] * clips * tokens * hidden * dtype_bytes
    recompute = 2 * clips * tokens * (28 * hidden * dtype_bytes + 12 * hidden * 4)  # fp32 attention inside
    return max(first_conv, saved_inputs + recompute)


def masks_built_here() -> bool:
    """Whether text training on this machine builds seq x seq masks: yes, unless its GPU runs
    the sliding layers through FlashAttention-2's window (gemmatune.model.patching.builds_own_masks)."""
    if not torch.cuda.is_available():
        return True
    dtype = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    return not flash_window_available(torch.device("cuda"), dtype)


def flash_varlen_available_here() -> bool:
    """Whether packed batches' sliding layers run FlashAttention-2's variable-length window on this
    machine's GPU (gemmatune.model.attention.flash_varlen_works), so no window mask is built."""
    if not torch.cuda.is_available():
        return False
    dtype = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    return flash_varlen_available(torch.device("cuda"), dtype)


def _computes_in_fp16(model_or_config) -> bool:
    if not isinstance(model_or_config, nn.Module):
        return False
    return any(p.dtype == torch.float16 for p in model_or_config.parameters() if p.dtype.is_floating_point)


def longest_fitting_seq(model_or_config, budget_gib: float, batch: int = 1, lora_rank: int = 16,
                        checkpointing: str = "offload", multiple: int = 256, arch: dict | None = None,
                        media: dict | None = None, **media_rows) -> int:
    """The longest sequence (a multiple of `multiple`) predicted to fit in `budget_gib`;
    `media_rows`: images / max_soft_tokens / audio_seconds per row, as in predict_peak_gib."""
    arch = arch or architecture(model_or_config, lora_rank)
    media = media if media is not None else media_architecture(model_or_config, lora_rank)
    fp16 = _computes_in_fp16(model_or_config)
    low, high = 0, 1 << 20
    while high - low > multiple:
        mid = (low + high) // 2 // multiple * multiple
        need = predict_peak_gib(model_or_config, mid, batch, lora_rank, checkpointing, arch=arch, fp16=fp16,
                                media=media, **media_rows)
        fits = need <= budget_gib
        low, high = (mid, high) if fits else (low, mid)
    return low


def check_fits(model_or_config, seq: int, batch: int = 1, lora_rank: int = 16, checkpointing: str = "offload",
               free_gib: float | None = None, headroom: float = 0.9, arch: dict | None = None, images: int = 0,
               max_soft_tokens: int = 280, audio_seconds: float = 0.0, packed: bool = False) -> str | None:
    """A warning with a suggestion when the step is predicted not to fit, else None.
    `free_gib`: memory the training may use (default: this GPU's free memory plus what the
    model already holds). With images or audio the suggestion is a smaller soft-token budget
    or shorter clips where one fits, else a shorter sequence. `packed`: batch x seq are packed
    buffers (train's default)."""
    free_gib = usable_gib() if free_gib is None else free_gib
    if free_gib is None:
        return None
    arch = arch or architecture(model_or_config, lora_rank)
    media = media_architecture(model_or_config, lora_rank)
    rows = dict(images=images, max_soft_tokens=max_soft_tokens, audio_seconds=audio_seconds, packed=packed)

    def need(seq_=seq, **changes):
        return predict_peak_gib(model_or_config, seq_, batch, lora_rank, checkpointing, arch=arch, media=media,
                                **{**rows, **changes})

    budget = free_gib * headroom
    if need() <= budget:
        return None
    what = (f"{'packed ' if packed else ''}batch {batch} x {seq} tokens"
            + (f" with {images} image(s) per row at {max_soft_tokens} soft tokens" if images else "")
            + (f" with {audio_seconds:g} s of audio per row" if audio_seconds else ""))
    start = f"predicted peak {need():.1f} GiB for {what} does not fit the {free_gib:.1f} GiB this GPU has: "
    if images:
        smaller = [b for b in SOFT_TOKEN_BUDGETS if b < max_soft_tokens and need(max_soft_tokens=b) <= budget]
        if smaller:
            return start + f"use at most {smaller[-1]} soft tokens per image (MAX_SOFT_TOKENS), or a smaller batch"
    if audio_seconds:
        shorter = [s_ for s_ in (20, 15, 10, 5) if s_ < audio_seconds and need(audio_seconds=s_) <= budget]
        if shorter:
            return start + f"use clips of at most {shorter[0]} s (MAX_AUDIO_SECONDS), or a smaller batch"
    longest = longest_fitting_seq(model_or_config, budget, batch, lora_rank, checkpointing, arch=arch, media=media,
                                  **rows)
    return start + (f"use max_seq_length <= {longest} at batch {batch}, "
                    f"or a smaller batch with more gradient accumulation")


def usable_gib() -> float | None:
    """GPU memory training may use: free now plus what this process already holds."""
    if not torch.cuda.is_available():
        return None
    return (torch.cuda.mem_get_info()[0] + torch.cuda.memory_allocated()) / GIB


def choose_checkpointing(model, seq: int, batch: int = 1, lora_rank: int = 16, free_gib: float | None = None,
                         packed: bool = False) -> str:
    """"on" (saved layer inputs stay on the GPU: no copies, faster) when that is predicted to
    use at most 70% of the usable GPU memory, else "offload" (inputs in CPU memory)."""
    free_gib = usable_gib() if free_gib is None else free_gib
    if free_gib is None:
        return "offload"
    need = predict_peak_gib(model, seq, batch, lora_rank, checkpointing="on", packed=packed)
    return "on" if need <= 0.7 * free_gib else "offload"
