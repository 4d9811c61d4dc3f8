"""Full-size Gemma 4 E2B/E4B text configs for random-weight benchmarks (no hub access).

Built from the published architecture facts (see the developers' guide): E2B hidden 1536,
35 layers, last 20 KV-shared with a double-wide MLP; E4B hidden 2560, 42 layers, last 18
KV-shared, no double-wide MLP (with it the count would be 8.88 B, not the measured 7.46 B); vocab 262144,
PLE 256 per layer, sliding window 512, softcap 30, head_dim 256 on
sliding layers and 512 on full layers. Parameter counts are checked against the counts
measured on the real checkpoints' text models (4.63 B and 7.46 B with PLE).
"""
from transformers import Gemma4TextConfig

COMMON = dict(
    vocab_size=262144, vocab_size_per_layer_input=262144, hidden_size_per_layer_input=256,
    num_attention_heads=8, head_dim=256, global_head_dim=512, sliding_window=512,
    final_logit_softcapping=30.0, tie_word_embeddings=True,
    max_position_embeddings=131072, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)


def _layer_types(n_layers: int, period: int) -> list[str]:
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)]


def e2b_text_config() -> Gemma4TextConfig:
    return Gemma4TextConfig(**COMMON, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35,
                            num_key_value_heads=1, num_kv_shared_layers=20, use_double_wide_mlp=True,
                            layer_types=_layer_types(35, 5))


def e4b_text_config() -> Gemma4TextConfig:
    return Gemma4TextConfig(**COMMON, hidden_size=2560, intermediate_size=10240, num_hidden_layers=42,
                            num_key_value_heads=2, num_kv_shared_layers=18, use_double_wide_mlp=False,
                            layer_types=_layer_types(42, 6))


CONFIGS = {"e2b": e2b_text_config, "e4b": e4b_text_config}


def multimodal_config(name: str):
    """The full Gemma4Config (text + vision + audio towers) of E2B/E4B: the released tower
    configs are transformers' Gemma4VisionConfig/Gemma4AudioConfig defaults (documented against
    google/gemma-4-e2b-it; E2B and E4B share the towers) with clipped linears on, and the
    released token ids (transformers' Gemma4Config defaults)."""
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4VisionConfig

    return Gemma4Config(text_config=CONFIGS[name](), vision_config=Gemma4VisionConfig(use_clipped_linears=True),
                        audio_config=Gemma4AudioConfig(), tie_word_embeddings=True)
