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
TINY_FORMAT_VERSION = 3  # bump when the tiny model or tokenizer changes

# Gemma 4's special tokens, in the order they get ids in the tiny vocabulary: 5-16 are the turn,
# media and thinking tokens; the tool tokens (17-23) were appended later, so earlier ids stay.
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>",
    "<|image|>", "<|image>", "<image|>",
    "<|audio|>", "<|audio>", "<audio|>",
    "<|video|>", "<|channel>", "<channel|>", "<|think|>",
    "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>',
]

# Gemma 4's chat format as a Jinja chat template, written for gemmatune from the renderer
# gemmatune.data.chat_format (whose docstring is the format): the tiny tokenizer's
# apply_chat_template must give format_chat's text for every shape (tests/data/test_chat_format.py).
# One line, every output inside {{ }}, so no template whitespace leaks into the text.
_VALUE_MACROS = (
    "{% macro value(v, quote_keys=true) %}"
    "{% if v is none %}{{ 'null' }}"
    "{% elif v is string %}{{ '<|\"|>' ~ v ~ '<|\"|>' }}"
    "{% elif v is boolean %}{{ 'true' if v else 'false' }}"
    "{% elif v is mapping %}{{ '{' }}{% for k, x in v | dictsort %}{{ '' if loop.first else ',' }}"
    "{{ ('<|\"|>' ~ k ~ '<|\"|>') if quote_keys else k }}{{ ':' ~ value(x, quote_keys) }}{% endfor %}{{ '}' }}"
    "{% elif v is sequence %}{{ '[' }}{% for x in v %}{{ '' if loop.first else ',' }}{{ value(x, quote_keys) }}"
    "{% endfor %}{{ ']' }}"
    "{% else %}{{ v }}{% endif %}{% endmacro %}"
    "{% macro fields(m) %}{% for k, x in m | dictsort %}{{ '' if loop.first else ',' }}{{ k ~ ':' ~ value(x, false) }}"
    "{% endfor %}{% endmacro %}"
    "{% macro call(f) %}{{ '<|tool_call>call:' ~ f['name'] ~ '{' ~ fields(f['arguments'] or {}) ~ '}<tool_call|>' }}"
    "{% endmacro %}"
    "{% macro response(name, r) %}{{ '<|tool_response>response:' ~ name ~ '{' }}"
    "{% if r is mapping %}{{ fields(r) }}{% else %}{{ 'value:' ~ value(r, false) }}{% endif %}"
    "{{ '}<tool_response|>' }}{% endmacro %}"
    "{% macro clean(text) %}{% set ns = namespace(s='') %}{% for part in text.split('<channel|>') %}"
    "{% set ns.s = ns.s ~ part.split('<|channel>')[0] %}{% endfor %}{{ ns.s | trim }}{% endmacro %}"
)
_SCHEMA_MACROS = (
    "{% macro quoted(items) %}{% set ns = namespace(out=[]) %}{% for i in items %}"
    "{% set ns.out = ns.out + ['<|\"|>' ~ i ~ '<|\"|>'] %}{% endfor %}{{ '[' ~ ns.out | join(',') ~ ']' }}"
    "{% endmacro %}"
    "{% macro props(p, filter=false) %}{% set ns = namespace(out=[]) %}{% for k, v in p | dictsort %}"
    "{% if not filter or k not in ['description', 'type', 'properties', 'required', 'nullable'] %}"
    "{% set ns.out = ns.out + [k ~ ':{' ~ prop(v) ~ '}'] %}{% endif %}{% endfor %}{{ ns.out | join(',') }}"
    "{% endmacro %}"
    "{% macro items(it) %}{% set ns = namespace(out=[]) %}{% for k, x in it | dictsort %}{% if x is not none %}"
    "{% if k == 'properties' %}{% set ns.out = ns.out + ['properties:{' ~ (props(x) if x is mapping else '') ~ '}'] %}"
    "{% elif k == 'required' %}{% set ns.out = ns.out + ['required:' ~ quoted(x)] %}"
    "{% elif k == 'type' %}"
    "{% set ns.out = ns.out + ['type:' ~ value(x | upper if x is string else x | map('upper') | list)] %}"
    "{% else %}{% set ns.out = ns.out + [k ~ ':' ~ value(x)] %}{% endif %}{% endif %}{% endfor %}"
    "{{ ns.out | join(',') }}{% endmacro %}"
    "{% macro prop(v) %}{% set kind = v['type'] | upper %}{% set ns = namespace(out=[]) %}"
    "{% if v['description'] %}{% set ns.out = ns.out + ['description:<|\"|>' ~ v['description'] ~ '<|\"|>'] %}"
    "{% endif %}"
    "{% if kind == 'STRING' and v['enum'] %}{% set ns.out = ns.out + ['enum:' ~ value(v['enum'])] %}{% endif %}"
    "{% if kind == 'ARRAY' and v['items'] is mapping and v['items'] %}"
    "{% set ns.out = ns.out + ['items:{' ~ items(v['items']) ~ '}'] %}{% endif %}"
    "{% if v['nullable'] %}{% set ns.out = ns.out + ['nullable:true'] %}{% endif %}"
    "{% if kind == 'OBJECT' %}"
    "{% if v['properties'] is mapping %}{% set ns.out = ns.out + ['properties:{' ~ props(v['properties']) ~ '}'] %}"
    "{% elif v is mapping %}{% set ns.out = ns.out + ['properties:{' ~ props(v, true) ~ '}'] %}{% endif %}"
    "{% if v['required'] %}{% set ns.out = ns.out + ['required:' ~ quoted(v['required'])] %}{% endif %}"
    "{% endif %}{{ (ns.out + ['type:<|\"|>' ~ kind ~ '<|\"|>']) | join(',') }}{% endmacro %}"
    "{% macro declaration(t) %}{% set f = t['function'] %}{% set p = f['parameters'] %}"
    "{{ 'declaration:' ~ f['name'] ~ '{description:<|\"|>' ~ f['description'] ~ '<|\"|>' }}"
    "{% if p %}{{ ',parameters:{' }}"
    "{% if p['properties'] %}{{ 'properties:{' ~ props(p['properties']) ~ '},' }}{% endif %}"
    "{% if p['required'] %}{{ 'required:' ~ quoted(p['required']) ~ ',' }}{% endif %}"
    "{% if p['type'] %}{{ 'type:<|\"|>' ~ p['type'] | upper ~ '<|\"|>}' }}{% endif %}{% endif %}"
    "{% if f is mapping and 'response' in f %}{{ ',response:{' }}"
    "{% if f['response']['description'] %}{{ 'description:<|\"|>' ~ f['response']['description'] ~ '<|\"|>,' }}"
    "{% endif %}{% if f['response']['type'] | upper == 'OBJECT' %}{{ 'type:<|\"|>OBJECT<|\"|>}' }}{% endif %}"
    "{% endif %}{{ '}' }}{% endmacro %}"
)
_SYSTEM_TURN = (
    "{{ bos_token }}"
    "{% set first_system = messages | length > 0 and messages[0]['role'] in ['system', 'developer'] %}"
    "{% set loop_messages = messages[1:] if first_system else messages %}"
    "{% if enable_thinking or tools or first_system %}"
    "{{ '<|turn>system\\n' ~ ('<|think|>\\n' if enable_thinking else '') }}"
    "{% if first_system %}{% set c = messages[0]['content'] %}"
    "{% if c is string %}{{ c | trim }}{% elif c is sequence %}{% for p in c %}{{ (p['text'] | trim) ~ ' ' }}"
    "{% endfor %}{% endif %}{% endif %}"
    "{% for t in tools or [] %}{{ '<|tool>' ~ declaration(t) ~ '<tool|>' }}{% endfor %}"
    "{{ '<turn|>\\n' }}{% endif %}"
)
_MESSAGES = (
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in loop_messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}"
    "{% endfor %}"
    "{% for m in loop_messages %}{% if m['role'] != 'tool' %}{% set i = loop.index0 %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{% set nb = namespace(prev=none, next=none) %}"
    "{% for j in range(i) %}{% if loop_messages[j]['role'] != 'tool' %}{% set nb.prev = loop_messages[j]['role'] %}"
    "{% endif %}{% endfor %}"
    "{% for j in range(i + 1, loop_messages | length) %}"
    "{% if nb.next is none and loop_messages[j]['role'] != 'tool' %}{% set nb.next = loop_messages[j]['role'] %}"
    "{% endif %}{% endfor %}"
    "{% if not (role == 'model' and nb.prev == 'assistant') %}{{ '<|turn>' ~ role ~ '\\n' }}{% endif %}"
    "{% set thought = m['reasoning'] or m['reasoning_content'] or m['thinking'] %}"
    "{% if thought and i > ns.last_user %}{{ '<|channel>thought\\n' ~ thought ~ '\\n<channel|>' }}{% endif %}"
    "{% set calls = m['tool_calls'] or [] %}{% for c in calls %}{{ call(c['function']) }}{% endfor %}"
    "{% set rs = namespace(n=0, scan=true) %}"
    "{% if m['tool_responses'] %}{% for r in m['tool_responses'] %}"
    "{{ response(r['name'] or 'unknown', r['response']) }}{% set rs.n = rs.n + 1 %}{% endfor %}"
    "{% elif calls %}{% for j in range(i + 1, loop_messages | length) %}{% set t = loop_messages[j] %}"
    "{% if rs.scan and t['role'] == 'tool' %}{% set tn = namespace(name=t['name'] or 'unknown') %}"
    "{% for c in calls %}{% if c['id'] == t['tool_call_id'] %}{% set tn.name = c['function']['name'] %}{% endif %}"
    "{% endfor %}{% set body = namespace(v=t['content'], s='') %}"
    "{% if body.v is sequence and body.v is not string and body.v is not mapping %}{% for p in body.v %}"
    "{% if p['type'] == 'text' %}{% set body.s = body.s ~ p['text'] %}{% endif %}{% endfor %}"
    "{% set body.v = body.s %}{% endif %}{{ response(tn.name, body.v) }}{% set rs.n = rs.n + 1 %}"
    "{% else %}{% set rs.scan = false %}{% endif %}{% endfor %}{% endif %}"
    "{% set cc = namespace(s='') %}{% set c = m['content'] %}"
    "{% if c is string %}{% set cc.s = clean(c) if role == 'model' else c | trim %}"
    "{% elif c is sequence %}{% for p in c %}"
    "{% set kind = {'image_url': 'image', 'input_audio': 'audio'}.get(p['type'], p['type']) %}"
    "{% if kind == 'text' %}{% set cc.s = cc.s ~ (clean(p['text']) if role == 'model' else p['text'] | trim) %}"
    "{% elif kind in ['image', 'audio', 'video'] %}{% set cc.s = cc.s ~ '<|' ~ kind ~ '|>' %}{% endif %}"
    "{% endfor %}{% endif %}{{ cc.s }}"
    "{% if calls and rs.n == 0 %}{{ '<|tool_response>' }}"
    "{% elif role == 'model' and nb.next == 'assistant' and (not calls or rs.n > 0) %}"
    "{% elif not (rs.n > 0 and cc.s | trim == '' and nb.next is none) %}{{ '<turn|>\\n' }}{% endif %}"
    "{% endif %}{% endfor %}"
)
_GENERATION_PROMPT = (
    "{% if add_generation_prompt %}{% set last = namespace(i=-1, state=none) %}"
    "{% for m in loop_messages %}{% if m['role'] != 'tool' %}{% set last.i = loop.index0 %}{% endif %}{% endfor %}"
    "{% if last.i >= 0 %}{% set lm = loop_messages[last.i] %}"
    "{% if lm['tool_responses'] or (lm['tool_calls'] and last.i + 1 < loop_messages | length) %}"
    "{% set last.state = 'tool_response' %}{% elif lm['tool_calls'] %}{% set last.state = 'tool_call' %}{% endif %}"
    "{% endif %}"
    "{% if last.state is none %}{{ '<|turn>model\\n' }}"
    "{% elif last.state == 'tool_response' and enable_thinking %}{{ '<|channel>thought\\n' }}{% endif %}{% endif %}"
)
CHAT_TEMPLATE = _VALUE_MACROS + _SCHEMA_MACROS + _SYSTEM_TURN + _MESSAGES + _GENERATION_PROMPT


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
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

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
    """Text the tiny BPE is trained on: every string of the bundled dataset's rows (contents,
    thoughts, tool names and arguments), else a fixed pangram."""

    lines = []
    path = bundled_dataset_path()
    if path.exists():
        for row in path.read_text(encoding="utf-8").splitlines():
            lines += _strings(json.loads(row))
    return lines or ["The quick brown fox jumps over the lazy dog. 0123456789"]


def _strings(value) -> list[str]:
    """The strings inside a JSON value, special tokens taken out (the BPE learns ordinary text)."""
    if isinstance(value, str):
        for token in SPECIAL_TOKENS:
            value = value.replace(token, "\n")
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [text for item in value for text in _strings(item)] if isinstance(value, list) else []


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
