"""The GGUF export, read back and checked against what llama.cpp's Gemma 4 loader takes.

Always (CI): the file is read back with gguf's reader; its tensors are exactly the ones llama.cpp's
loader creates for this config (src/models/gemma4.cpp, llama_model_gemma4::load_arch_tensors, in the
llama.cpp that llama-cpp-python 0.3.36 vendors), with the loader's shapes; every key its
load_arch_hparams reads is there with the config's value; the weights equal the merged model's
(BF16: exactly; Q8_0: within one quantisation step of each 32-value block).

Where llama.cpp is at hand (set GEMMATUNE_LLAMA_CPP_PYTHON to a Python with llama-cpp-python, and
GEMMATUNE_LLAMA_CPP_SRC to a llama.cpp source tree): llama.cpp's logits on our file match transformers'
on the merged model, a GGUF with two tensors swapped does not, and our file is byte-for-byte the
tensors and metadata of llama.cpp's own convert_hf_to_gguf.py output for the same folder.
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import gemmatune
import gemmatune.export.gguf as exporter
from gemmatune.export.gguf import export_gguf

gguf = pytest.importorskip("gguf")
LLAMA_PYTHON = os.environ.get("GEMMATUNE_LLAMA_CPP_PYTHON")
LLAMA_SRC = os.environ.get("GEMMATUNE_LLAMA_CPP_SRC")
needs_llama_cpp = pytest.mark.skipif(not LLAMA_PYTHON, reason="GEMMATUNE_LLAMA_CPP_PYTHON not set")
needs_converter = pytest.mark.skipif(not LLAMA_SRC, reason="GEMMATUNE_LLAMA_CPP_SRC not set")


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_dir):
    """A 4-bit tiny fine-tune with random nonzero LoRA, merged in bf16; its GGUFs in BF16 and Q8_0."""
    from tests.helpers import fine_tuned

    saved = os.environ.get("GEMMATUNE_KERNELS")
    os.environ["GEMMATUNE_KERNELS"] = "0"
    try:
        model, tokenizer = fine_tuned(load_in_4bit=True)
        out = tmp_path_factory.mktemp("gguf")
        folder = gemmatune.merge_and_save(model, out / "merged", tokenizer=tokenizer, verbose=False)
    finally:
        os.environ.pop("GEMMATUNE_KERNELS") if saved is None else os.environ.__setitem__("GEMMATUNE_KERNELS", saved)
    files = {q: export_gguf(folder, out / f"model-{q}.gguf", quantization=q) for q in ("bf16", "q8_0")}
    return {"dir": folder, "out": out, "files": files}


def reader(merged, q):
    return gguf.GGUFReader(str(merged["files"][q]))


def field(r, key):
    return r.fields[key].contents()


class Config:
    """The text config's values as plain attributes (transformers 5.23 refuses per-layer ones)."""

    def __init__(self, folder):
        from transformers import AutoConfig

        self.__dict__.update(AutoConfig.from_pretrained(folder).to_dict()["text_config"])
        full = [v for i, v in (self.per_layer_config or {}).items() if self.layer_types[int(i)] == "full_attention"]
        self.global_head_dim = getattr(self, "global_head_dim", None) or full[0]["head_dim"]


def loader_tensors(t: Config) -> dict:
    """name -> ggml shape (ne) of every tensor llama_model_gemma4::load_arch_tensors creates."""
    n_embd, n_vocab, n_layer, n_pl = t.hidden_size, t.vocab_size, t.num_hidden_layers, t.hidden_size_per_layer_input
    head_full = t.global_head_dim
    expected = {"token_embd.weight": [n_embd, n_vocab], "per_layer_token_embd.weight": [n_pl * n_layer, n_vocab],
                "per_layer_model_proj.weight": [n_embd, n_pl * n_layer], "per_layer_proj_norm.weight": [n_pl],
                "output_norm.weight": [n_embd], "rope_freqs.weight": [head_full // 2]}
    first_shared = n_layer - t.num_kv_shared_layers
    for i, kind in enumerate(t.layer_types):
        head = t.head_dim if kind == "sliding_attention" else head_full
        n_ff = t.intermediate_size * (2 if t.use_double_wide_mlp and i >= first_shared else 1)
        blk = {"attn_norm": [n_embd], "attn_q": [n_embd, head * t.num_attention_heads],
               "attn_output": [head * t.num_attention_heads, n_embd], "attn_q_norm": [head],
               "post_attention_norm": [n_embd], "layer_output_scale": [1], "ffn_norm": [n_embd],
               "ffn_gate": [n_embd, n_ff], "ffn_up": [n_embd, n_ff], "ffn_down": [n_ff, n_embd],
               "post_ffw_norm": [n_embd], "inp_gate": [n_embd, n_pl], "proj": [n_pl, n_embd], "post_norm": [n_embd]}
        if i < first_shared:  # has_kv(i): the KV-shared layers have no K/V (TENSOR_NOT_REQUIRED there)
            blk |= {"attn_k": [n_embd, head * t.num_key_value_heads], "attn_v": [n_embd, head * t.num_key_value_heads],
                    "attn_k_norm": [head]}
        expected |= {f"blk.{i}.{k}.weight": v for k, v in blk.items()}
    return expected


@pytest.mark.parametrize("q", ["bf16", "q8_0"])
def test_tensors_are_exactly_what_the_gemma4_loader_creates(merged, q):
    expected = loader_tensors(Config(merged["dir"]))
    got = {t.name: [int(n) for n in t.shape] for t in reader(merged, q).tensors}
    assert got == expected
    types = {t.name: t.tensor_type.name for t in reader(merged, q).tensors}
    matrix = "BF16" if q == "bf16" else "Q8_0"
    assert all(types[n] == ("F32" if len(s) == 1 else matrix) for n, s in expected.items()), types


def test_every_key_the_loader_reads_has_the_configs_value(merged):
    t = Config(merged["dir"])
    r = reader(merged, "bf16")
    rope = t.rope_parameters
    want = {
        "general.architecture": "gemma4", "gemma4.block_count": t.num_hidden_layers,
        "gemma4.context_length": t.max_position_embeddings, "gemma4.embedding_length": t.hidden_size,
        "gemma4.attention.head_count": t.num_attention_heads, "gemma4.attention.head_count_kv": t.num_key_value_heads,
        "gemma4.attention.layer_norm_rms_epsilon": pytest.approx(t.rms_norm_eps),
        "gemma4.attention.sliding_window": t.sliding_window,
        "gemma4.attention.shared_kv_layers": t.num_kv_shared_layers,
        "gemma4.attention.sliding_window_pattern": [k == "sliding_attention" for k in t.layer_types],
        "gemma4.attention.key_length_swa": t.head_dim, "gemma4.attention.value_length_swa": t.head_dim,
        "gemma4.attention.key_length": t.global_head_dim, "gemma4.attention.value_length": t.global_head_dim,
        "gemma4.embedding_length_per_layer_input": t.hidden_size_per_layer_input,
        "gemma4.final_logit_softcapping": pytest.approx(t.final_logit_softcapping),
        "gemma4.rope.freq_base": pytest.approx(rope["full_attention"]["rope_theta"]),
        "gemma4.rope.freq_base_swa": pytest.approx(rope["sliding_attention"]["rope_theta"]),
        "gemma4.rope.dimension_count": t.global_head_dim, "gemma4.rope.dimension_count_swa": t.head_dim,
        "gemma4.feed_forward_length": [128, 128, 256, 256],  # double-wide MLP on the 2 KV-shared layers
        "general.file_type": 32, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.padding_token_id": 0,
    }
    assert {k: field(r, k) for k in want} == want
    assert len(field(r, "tokenizer.ggml.tokens")) == t.vocab_size and field(r, "tokenizer.chat_template")
    rope_freqs = next(x for x in r.tensors if x.name == "rope_freqs.weight")
    n_rotated = int(t.global_head_dim * rope["full_attention"]["partial_rotary_factor"] / 2)
    expected = [1.0] * n_rotated + [1e30] * (t.global_head_dim // 2 - n_rotated)
    assert 0 < n_rotated < t.global_head_dim // 2
    assert np.array_equal(np.asarray(rope_freqs.data), np.array(expected, dtype=np.float32))


def merged_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, 4)
    out = {}
    for key, value in tensors.items():
        if "language_model" not in key:
            continue
        name = key.replace("language_model.", "") + (".weight" if key.endswith("layer_scalar") else "")
        out[name_map.get_name(name, try_suffixes=(".weight",))] = value.float().numpy()
    return out


def test_bf16_weights_are_the_merged_weights_exactly(merged):
    weights = merged_tensors(merged["dir"])
    for t in reader(merged, "bf16").tensors:
        if t.name == "rope_freqs.weight":
            continue
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(weights[t.name].shape)
        assert np.array_equal(values, weights[t.name]), t.name


def test_q8_0_weights_are_within_one_step_of_each_block(merged):
    weights = merged_tensors(merged["dir"])
    checked = 0
    for t in reader(merged, "q8_0").tensors:
        if t.tensor_type.name != "Q8_0":
            continue
        want = weights[t.name]
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
        blocks = want.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127  # Q8_0: int8 codes times a per-block scale
        error = np.abs(values.reshape(-1, 32) - blocks)
        # half a step from rounding to the nearest code, plus the scale's own fp16 rounding (2^-11
        # relative) times up to 127 codes: 0.562 steps; 0.537 seen
        assert (error <= step * (0.5 + 127 * 2.0**-11) + 1e-9).all(), t.name
        assert error.max() > 0  # it really is quantised
        checked += 1
    assert checked == 3 + 4 * 7 + 2 * 2  # 3 embeddings/projections; q, o, gate, up, down, inp_gate, proj; K/V twice


def test_writing_a_few_rows_at_a_time_gives_the_same_file(merged, monkeypatch):
    """The exporter quantises large tensors in chunks of rows (memory); 7 rows here, so every tiny
    tensor is split, and the file must not change by a byte."""

    monkeypatch.setattr(exporter, "ROWS_PER_CHUNK", 7)
    chunked = export_gguf(merged["dir"], merged["out"] / "chunked.gguf", quantization="q8_0")
    assert chunked.read_bytes() == merged["files"]["q8_0"].read_bytes()


def test_exporting_again_keeps_the_earlier_file(merged, tmp_path):
    first = export_gguf(merged["dir"], tmp_path / "model.gguf", quantization="bf16")
    before = first.read_bytes()
    export_gguf(merged["dir"], tmp_path / "model.gguf", quantization="q8_0")
    assert (tmp_path / "model.gguf.previous-1").read_bytes() == before
    assert (tmp_path / "model.gguf").read_bytes() == merged["files"]["q8_0"].read_bytes()
    assert not list(tmp_path.glob(".*partial*"))


def test_the_towers_are_left_out(merged):
    names = [t.name for t in reader(merged, "q8_0").tensors]
    assert not [n for n in names if n.startswith(("v.", "a.", "mm.")) or "vision" in n or "audio" in n]


# ------------------------------------------------------------------ with llama.cpp (local)
def llama_cpp_logits(model: Path, ids: list[int], tmp_path: Path, text: str | None = None):
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    script = Path(__file__).with_name("llama_cpp_logits.py")
    args = [LLAMA_PYTHON, str(script), str(model), str(tmp_path / "ids.json"), str(tmp_path / "llama.npy")]
    run = subprocess.run(args + ([text] if text else []), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return np.load(tmp_path / "llama.npy"), (json.loads(run.stdout.strip().splitlines()[-1]) if text else None)


def transformers_logits(folder: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


IDS = [2] + list(range(30, 60))  # 31 tokens: past the tiny sliding window of 16


def with_gguf_weights(merged, q: str, folder: Path) -> Path:
    """The merged folder with its language-model weights replaced by the GGUF's own (dequantised):
    transformers then computes with exactly the numbers llama.cpp has."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(merged["dir"], folder)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, 4)
    stored = {t.name: t for t in reader(merged, q).tensors}
    tensors = load_file(folder / "model.safetensors")
    for key, value in tensors.items():
        if "language_model" in key:
            name = key.replace("language_model.", "") + (".weight" if key.endswith("layer_scalar") else "")
            t = stored[name_map.get_name(name, try_suffixes=(".weight",))]
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            tensors[key] = torch.from_numpy(values.reshape(value.shape).copy())
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text((folder / "config.json").read_text().replace('"bfloat16"', '"float32"'))
    return folder


# Mean absolute logit difference llama.cpp vs transformers on the same weights: llama.cpp rounds the
# activations to BF16 / quantises them to Q8_0 for its matmuls and approximates GELU. Seen: 0.013
# (BF16) and 0.046 (Q8_0) on logits up to ~12; two swapped tensors: 0.28.
LLAMA_CPP_TOLERANCE = {"bf16": 0.03, "q8_0": 0.1}


@needs_llama_cpp
@pytest.mark.parametrize("q", ["bf16", "q8_0"])
def test_llama_cpp_gives_the_merged_models_logits(merged, tmp_path, q):
    """Against transformers on the file's own weights (BF16: the merged ones; Q8_0: dequantised)."""
    ours, _ = llama_cpp_logits(merged["files"][q], IDS, tmp_path)
    reference = transformers_logits(with_gguf_weights(merged, q, tmp_path / "weights"), IDS)
    assert np.abs(ours - reference).mean() < LLAMA_CPP_TOLERANCE[q]
    assert (ours.argmax(-1) == reference.argmax(-1)).mean() >= 0.9


@needs_llama_cpp
def test_a_gguf_with_two_tensors_swapped_is_caught(merged, tmp_path):
    broken = tmp_path / "swapped.gguf"
    r = reader(merged, "bf16")
    writer = gguf.GGUFWriter(str(broken), "gemma4")
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value_type = f.types[0]
        sub_type = f.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), value_type, sub_type=sub_type)
    swap = {"blk.1.ffn_gate.weight": "blk.1.ffn_up.weight", "blk.1.ffn_up.weight": "blk.1.ffn_gate.weight"}
    tensors = {t.name: t for t in r.tensors}
    for t in r.tensors:
        source = tensors[swap.get(t.name, t.name)]
        writer.add_tensor(t.name, np.asarray(source.data), raw_shape=np.asarray(source.data).shape,
                          raw_dtype=source.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    wrong, _ = llama_cpp_logits(broken, IDS, tmp_path)
    assert np.abs(wrong - transformers_logits(merged["dir"], IDS)).mean() > 4 * LLAMA_CPP_TOLERANCE["bf16"]


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_the_tiny_tokenizer(merged, tmp_path, tiny_tokenizer):
    text = "<|turn>user\nConvert 5 km to miles, please!<turn|>\n<|turn>model\n"
    _, tokens = llama_cpp_logits(merged["files"]["q8_0"], IDS, tmp_path, text=text)
    assert tokens == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


@needs_converter
@pytest.mark.parametrize("q", ["bf16", "q8_0"])
def test_our_file_is_what_llama_cpps_converter_writes(merged, tmp_path, q):
    """convert_hf_to_gguf.py on the same merged folder. It cannot name the tiny byte-level BPE's
    pre-tokenizer (it knows tokenizers by a hash of their output), so it is told: gpt-2."""
    theirs = run_converter(merged["dir"], q, tmp_path / f"converter-{q}.gguf", "--gpt2-vocab")
    assert_same_gguf(reader(merged, q), theirs)


def run_converter(folder: Path, q: str, out: Path, *flags):
    script = Path(__file__).with_name("run_llama_cpp_converter.py")
    run = subprocess.run([os.sys.executable, str(script), LLAMA_SRC, str(folder), "--outtype", q,
                          "--outfile", str(out), *flags], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return gguf.GGUFReader(str(out))


def assert_same_gguf(ours, theirs) -> None:
    skip = ("general.name", "general.size_label")
    keys = [k for k in ours.fields if not k.startswith("GGUF.") and k not in skip]
    assert sorted(keys) == sorted(k for k in theirs.fields if not k.startswith("GGUF.") and k not in skip)
    assert [k for k in keys if field(ours, k) != field(theirs, k)] == []
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape), a.name
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name


# ------------------------------------------------------------------ Gemma 4's kind of tokenizer
def gemma_style_tokenizer(vocab_size: int = 512):
    """A SentencePiece-style BPE of the kind Gemma 4 ships (spaces become U+2581 in the normalizer,
    no pre-tokenizer, byte fallback through <0xNN> tokens, decoded by Replace + ByteFallback + Fuse),
    trained on the bundled data and padded to the tiny model's 512 tokens. Not Gemma 4's own
    tokenizer (that one lives on the hub): what exercises the exporter's "gemma4" path."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gemmatune.model.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, _tokenizer_corpus

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.normalizer = normalizers.Replace(" ", "\u2581")
    draft.train_from_iterator(_tokenizer_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size - len(byte_tokens), special_tokens=SPECIAL_TOKENS, limit_alphabet=64,
        show_progress=False))
    trained = json.loads(draft.to_str())["model"]
    learned = [t for t, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]) if t not in SPECIAL_TOKENS]
    tokens = SPECIAL_TOKENS + byte_tokens + learned
    tokens = (tokens + [f"<unused{i}>" for i in range(vocab_size)])[:vocab_size]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m) for m in trained["merges"]]
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    bpe.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    bpe.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>", chat_template=CHAT_TEMPLATE,
                                   extra_special_tokens=SPECIAL_TOKENS[5:])  # <|turn> ...: special


@pytest.fixture(scope="module")
def gemma_style(merged):
    """The merged tiny model with a Gemma-style tokenizer in place of its byte-level one."""
    import shutil

    folder = merged["out"] / "merged-gemma-style-tokenizer"
    shutil.copytree(merged["dir"], folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    tokenizer = gemma_style_tokenizer()
    tokenizer.save_pretrained(folder)
    return {"dir": folder, "tokenizer": tokenizer,
            "file": export_gguf(folder, merged["out"] / "gemma-style-q8_0.gguf", quantization="q8_0")}


def test_a_gemma_style_tokenizer_is_written_as_llama_cpps_gemma4_tokenizer(gemma_style):
    r = gguf.GGUFReader(str(gemma_style["file"]))
    assert field(r, "tokenizer.ggml.model") == "gemma4" and field(r, "tokenizer.ggml.add_bos_token") is True
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == 512 == len(field(r, "tokenizer.ggml.scores"))
    assert tokens[:3] == ["<pad>", "<eos>", "<bos>"] and types[:3] == [gguf.TokenType.CONTROL] * 3
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE
    assert types[tokens.index("<|turn>")] == gguf.TokenType.CONTROL
    assert field(r, "tokenizer.ggml.merges") and field(r, "tokenizer.ggml.bos_token_id") == 2


@needs_converter
def test_the_gemma4_tokenizer_is_what_llama_cpps_converter_writes(gemma_style, tmp_path):
    """No patch this time: the converter reads this tokenizer with Gemma4Model.set_vocab itself."""
    theirs = run_converter(gemma_style["dir"], "q8_0", tmp_path / "converter.gguf")
    assert_same_gguf(gguf.GGUFReader(str(gemma_style["file"])), theirs)


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_the_gemma_style_tokenizer(gemma_style, tmp_path):
    tokenizer = gemma_style["tokenizer"]
    for text in ["Convert 5 km to miles, please!", "<|turn>user\nHi there<turn|>\n<|turn>model\n",
                 "ünïcode ✓ and   three spaces"]:
        _, tokens = llama_cpp_logits(gemma_style["file"], IDS, tmp_path, text=text)
        assert tokens == tokenizer(text, add_special_tokens=False)["input_ids"], text
