"""The embedded tiny Gemma 4: a random-weight checkpoint and an offline tokenizer.

Why: tests, CI and laptops without a GPU or network need a model that has every E-series
feature switched on — per-layer embeddings (PLE), KV-shared layers with the double-wide MLP,
sliding and full layers with both RoPE kinds, the final-logit softcap, vision and audio
towers — and a tokenizer that speaks the real Gemma 4 chat format. Both are written to a
folder once, deterministically, and then loaded through the same `from_pretrained` path as
`google/gemma-4-E2B-it`, so the real loading code is what the tests exercise.

Sizes are multiples of 64: bitsandbytes' CPU 4-bit kernels refuse smaller odd sizes on some
CPUs. A training step takes milliseconds on one CPU thread.
"""
import json
import os
from pathlib import Path

import torch

from gemmatune.data.rows import bundled_dataset_path

TINY_MODEL_ID = "gemmatune/tiny-gemma4"
TINY_VOCAB_SIZE = 512
TINY_FORMAT_VERSION = 2  # bump when the tiny model or tokenizer changes

# Gemma 4's special tokens, in the order they get ids in the tiny vocabulary.
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>",
    "<|image|>", "<|image>", "<image|>",
    "<|audio|>", "<|audio>", "<audio|>",
    "<|video|>", "<|channel>", "<channel|>", "<|think|>",
]

# The Gemma 4 chat format: <bos><|turn>user\n...<turn|>\n<|turn>model\n...<turn|>\n
# Multimodal parts become placeholders that the processor expands.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] in ['assistant', 'model'] else message['role'] %}"
    "<|turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] | trim }}"
    "{% elif part['type'] == 'image' %}<|image|>"
    "{% elif part['type'] == 'audio' %}<|audio|>{% endif %}"
    "{% endfor %}{% endif %}"
    "<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def tiny_text_config_kwargs() -> dict:
    """Text tower: 4 layers (sliding, full, sliding, full); the last 2 reuse K/V."""
    return dict(
        vocab_size=TINY_VOCAB_SIZE,
        vocab_size_per_layer_input=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        global_head_dim=64,
        hidden_size_per_layer_input=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
        sliding_window=16,
        final_logit_softcapping=30.0,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
    )


def build_tiny_config():
    from transformers import (
        Gemma4AudioConfig,
        Gemma4Config,
        Gemma4TextConfig,
        Gemma4VisionConfig,
    )

    text = Gemma4TextConfig(**tiny_text_config_kwargs())
    vision = Gemma4VisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=32, patch_size=16, pooling_kernel_size=3,
        position_embedding_size=256,
    )
    audio = Gemma4AudioConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        subsampling_conv_channels=[32, 16], output_proj_dims=64,
    )
    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    return Gemma4Config(
        text_config=text, vision_config=vision, audio_config=audio,
        image_token_id=ids["<|image|>"], boi_token_id=ids["<|image>"], eoi_token_id=ids["<image|>"],
        audio_token_id=ids["<|audio|>"], boa_token_id=ids["<|audio>"], eoa_token_index=ids["<audio|>"],
        video_token_id=ids["<|video|>"],
        pad_token_id=0, eos_token_id=[1, ids["<turn|>"]], bos_token_id=2,
        tie_word_embeddings=True,
    )


def _tokenizer_corpus() -> list[str]:
    """Text the tiny BPE is trained on: the bundled dataset when present, else a fixed pangram."""

    lines = []
    path = bundled_dataset_path()
    if path.exists():
        for row in path.read_text(encoding="utf-8").splitlines():
            for turn in json.loads(row).get("messages", []):
                lines.append(turn["content"])
    return lines or ["The quick brown fox jumps over the lazy dog. 0123456789"]


def build_tiny_tokenizer():
    """A byte-level BPE with Gemma 4's special tokens and chat template, trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
        extra_special_tokens={
            "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
            "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
            "sot_token": "<|turn>", "eot_token": "<turn|>",
        },
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=4096,
    )


def build_tiny_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny multimodal checkpoint and its tokenizer to `path` (deterministic)."""
    from transformers import Gemma4ForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    if len(tokenizer) > TINY_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens > vocab {TINY_VOCAB_SIZE}")
    torch.manual_seed(seed)
    config = build_tiny_config()
    model = Gemma4ForConditionalGeneration(config).to(torch.float32)
    _spread_weights(model, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "gemmatune_tiny.json").write_text(json.dumps({"format": TINY_FORMAT_VERSION, "seed": seed}))
    return path


def _spread_weights(model, seed: int) -> None:
    """Make the random model behave more like a trained one where tests need it.

    Norm scales get random values around one, so a wrong norm formula (`1 + w`) shows.
    The tied embedding / LM head gets rows of norm ~2 instead of ~0.16 (std 0.02): the
    final norm bounds the hidden state, so with tiny rows no adapter could move the logits
    more than about one unit and the loss could barely fall.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
        embed = model.get_input_embeddings().weight
        embed.copy_(torch.randn(embed.shape, generator=gen) * (2.0 / embed.shape[1] ** 0.5))


def _corpus_digest() -> str:
    """The tokenizer is trained on the bundled data: a new dataset means a new tiny model."""
    import hashlib

    return hashlib.sha256("\n".join(_tokenizer_corpus()).encode()).hexdigest()[:10]


def tiny_model_dir() -> Path:
    """The cached tiny checkpoint, built on first use (GEMMATUNE_CACHE overrides the folder)."""
    cache = Path(os.environ.get("GEMMATUNE_CACHE", Path.home() / ".cache" / "gemmatune"))
    path = cache / f"tiny-gemma4-v{TINY_FORMAT_VERSION}-{_corpus_digest()}"
    if not (path / "gemmatune_tiny.json").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        build_tiny_checkpoint(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process built it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path
