"""Conversations with images and audio: placeholder runs, labels, truncation, batches, hub layouts,
the bundled datasets, and the tiny Gemma4ForConditionalGeneration reading the batches."""
import importlib.util
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import gemmatune.data.audio as data_audio
import gemmatune.data.batches as data_batches
import gemmatune.data.chat_format as data_chat_format
import gemmatune.data.dataset as data_dataset
import gemmatune.data.images as data_images
import gemmatune.data.media as data_media
import gemmatune.data.messages as data_messages
import gemmatune.data.rows as data_rows
from gemmatune.data.rows import DatasetFormatError
from gemmatune.data.tokens import IGNORE_INDEX
from tests.helpers import REPO

ROOT = REPO
TINY_MEL_BINS = 32  # the tiny audio tower's first subsampling conv takes 32 mel bins (the released one 128)


def picture(height=48, width=96, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def tone(seconds=0.5, rate=16000):
    return (0.3 * np.sin(2 * np.pi * 330 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def image_part(image=None, **kwargs):
    return {"type": "image", "image": picture(**kwargs) if image is None else image}


def audio_part(seconds=0.5):
    return {"type": "audio", "audio": tone(seconds), "sampling_rate": 16000}


def row(*user_parts, answer="A cat. 🐈"):
    return {"messages": [{"role": "user", "content": list(user_parts)}, {"role": "assistant", "content": answer}]}


def prepare(rows, tokenizer, **kwargs):
    kwargs = {"max_seq_length": 1024, "max_soft_tokens": 70, "mel_bins": TINY_MEL_BINS, **kwargs}
    return data_dataset.prepare_dataset(rows, tokenizer, **kwargs)


def expanded(text: str, refs) -> str:
    """format_chat's placeholders expanded as Gemma4Processor does (its own replace_* methods)."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    ns = SimpleNamespace(boi_token="<|image>", image_token="<|image|>", eoi_token="<image|>",
                         boa_token="<|audio>", audio_token="<|audio|>", eoa_token="<audio|>")
    pieces = text.replace("<|audio|>", "<|image|>").split("<|image|>")  # the parts' order is the refs' order
    out = pieces[0]
    for ref, piece in zip(refs, pieces[1:]):
        if isinstance(ref, data_images.ImageRef):
            out += Gemma4Processor.replace_image_token(ns, {"num_soft_tokens_per_image": [ref.tokens]}, 0)
        else:
            features = Gemma4AudioFeatureExtractor(feature_size=ref.mel_bins)([data_audio.load_audio(ref)])
            out += Gemma4Processor.replace_audio_token(ns, features, 0)
        out += piece
    return out


# ------------------------------------------------------------------ tokens and labels
def test_ids_equal_the_processors_expansion_and_exactly_the_answers_are_trained(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [image_part(), {"type": "text", "text": "What is this? "}, audio_part(),
                                     {"type": "text", "text": " And "}, {"type": "text", "text": "this?"}]},
        {"role": "assistant", "content": "A cat and a meow."},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": [{"type": "text", "text": "You are welcome."}]},
    ]
    prepared = prepare([{"messages": messages}], tok)
    example = prepared[0]
    refs = example["media"]
    assert [type(r).__name__ for r in refs] == ["ImageRef", "AudioRef"]
    assert refs[0].tokens == data_images.image_soft_tokens(48, 96, 70)
    assert refs[1].tokens == data_audio.audio_tokens(8000) == 13

    rendered = data_chat_format.format_chat(data_messages.to_messages({"messages": messages}))
    assert example["input_ids"] == tok(expanded(rendered, refs), add_special_tokens=False)["input_ids"]

    # Build the expected row piece by piece; only the two answers and their <turn|> are trained.
    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    ids = data_media.media_token_ids(tok)
    image_run = [ids["<|image>"]] + [ids["<|image|>"]] * refs[0].tokens + [ids["<image|>"]]
    audio_run = [ids["<|audio>"]] + [ids["<|audio|>"]] * 13 + [ids["<audio|>"]]
    pieces = [([tok.bos_token_id], False), (enc("<|turn>system\n"), False), (enc("Be brief."), False),
              (enc("<turn|>\n"), False), (enc("<|turn>user\n"), False), (image_run, False),
              (enc("What is this?"), False), (audio_run, False), (enc("Andthis?"), False), (enc("<turn|>\n"), False),
              (enc("<|turn>model\n"), False), (enc("A cat and a meow.<turn|>"), True), (enc("\n"), False),
              (enc("<|turn>user\nThanks.<turn|>\n<|turn>model\n"), False), (enc("You are welcome.<turn|>"), True),
              (enc("\n"), False)]
    expected_ids, trained_positions = [], []
    for piece, trained in pieces:
        trained_positions += list(range(len(expected_ids), len(expected_ids) + len(piece))) if trained else []
        expected_ids += piece
    assert example["input_ids"] == expected_ids
    assert [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX] == trained_positions
    assert all(example["labels"][i] == example["input_ids"][i] for i in trained_positions)
    trained = tok.decode([example["input_ids"][i] for i in trained_positions])
    assert trained == "A cat and a meow.<turn|>You are welcome.<turn|>"


def test_media_runs_never_carry_loss_even_in_answers_or_with_train_on_inputs(tiny_tokenizer):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Draw a cat."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Here:"}, image_part()]}]
    ids = set(data_media.media_token_ids(tiny_tokenizer).values())
    for train_on_inputs in (False, True):
        example = prepare([{"messages": messages}], tiny_tokenizer, train_on_inputs=train_on_inputs)[0]
        media_positions = [i for i, t in enumerate(example["input_ids"]) if t in ids]
        assert len(media_positions) == example["media"][0].tokens + 2
        assert all(example["labels"][i] == IGNORE_INDEX for i in media_positions)
        assert any(label != IGNORE_INDEX for label in example["labels"])


def test_a_media_token_typed_in_text_is_a_bad_row(tiny_tokenizer):
    bad = row(image_part(), {"type": "text", "text": "see <|image|> here"})
    with pytest.raises(DatasetFormatError, match=r"row 1: the text contains the media token\(s\) <\|image\|>"):
        prepare([bad], tiny_tokenizer)


# ------------------------------------------------------------------ truncation
def test_a_row_cut_inside_a_media_run_is_dropped_and_counted(tiny_tokenizer):
    rows = [row(image_part(), {"type": "text", "text": "What is this?"}),
            row({"type": "text", "text": "Hi"}, answer="Hello")]
    full = len(prepare(rows[:1], tiny_tokenizer)[0]["input_ids"])
    prepared = prepare(rows, tiny_tokenizer, max_seq_length=20)  # inside the image's 34 tokens
    assert prepared.rows == 1 and prepared.rows_dropped_media_cut == 1 and prepared.rows_dropped == 1
    assert prepared.media_cut_length == full
    assert f"1 that max_seq_length would cut inside an image or audio clip (max_seq_length={full} keeps them)" \
        in prepared.report()
    assert prepare(rows, tiny_tokenizer, max_seq_length=full).rows == 2
    with_drop_long = prepare(rows, tiny_tokenizer, max_seq_length=20, drop_long=True)
    assert with_drop_long.rows_dropped_long == 1 and with_drop_long.rows_dropped_media_cut == 0


def test_truncation_before_or_after_a_run_keeps_the_row(tiny_tokenizer):
    later_image = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                                {"role": "user", "content": [image_part()]},
                                {"role": "assistant", "content": "A cat."}]}
    tokens = prepare([later_image], tiny_tokenizer)[0]
    start = tokens["input_ids"].index(data_media.media_token_ids(tiny_tokenizer)["<|image>"])
    before = prepare([later_image], tiny_tokenizer, max_seq_length=start)
    assert before.rows == 1 and before.truncated == [True] and "media" not in before[0]
    assert set(data_batches.collate(before.examples, 0)) == {"input_ids", "labels", "attention_mask"}
    after = prepare([later_image], tiny_tokenizer, max_seq_length=start + tokens["media"][0].tokens + 2 + 3)
    assert after.rows == 1 and after.truncated == [True] and len(after[0]["media"]) == 1


# ------------------------------------------------------------------ batches
def test_collate_shapes_positions_and_order(tiny_tokenizer):
    images = [picture(48, 96, seed=1), picture(300, 100, seed=2), picture(20, 20, seed=3)]
    rows = [row({"type": "text", "text": "No image."}), row(image_part(images[0])),
            row(image_part(images[1]), {"type": "text", "text": "and"}, image_part(images[2])),
            row(audio_part(0.5), audio_part(1.0))]
    prepared = prepare(rows, tiny_tokenizer)
    batch = data_batches.collate(prepared.examples, tiny_tokenizer.pad_token_id, pad_to_multiple_of=8)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "pixel_values", "image_position_ids",
                          "input_features", "input_features_mask", "mm_token_type_ids"}
    counts = [len(data_images.image_patches(im, 70)[0]) for im in images]
    assert batch["pixel_values"].shape == (3, max(counts), 768) and batch["pixel_values"].dtype == torch.float32
    assert batch["image_position_ids"].shape == (3, max(counts), 2) and batch["input_ids"].shape[1] % 8 == 0
    for i, (image, n) in enumerate(zip(images, counts)):
        patches, positions = data_images.image_patches(image, 70)
        torch.testing.assert_close(batch["pixel_values"][i, :n], torch.from_numpy(patches), rtol=0, atol=0)
        assert batch["image_position_ids"][i, :n].tolist() == positions.tolist()
        assert (batch["image_position_ids"][i, n:] == -1).all() and (batch["pixel_values"][i, n:] == 0).all()
    frames = [len(data_audio.audio_features(tone(s), TINY_MEL_BINS)[0]) for s in (0.5, 1.0)]
    assert batch["input_features"].shape == (2, max(frames), TINY_MEL_BINS)
    assert batch["input_features_mask"].dtype == torch.bool
    assert batch["input_features_mask"].sum(dim=1).tolist() == [7999 // 160, 15999 // 160]
    ids = data_media.media_token_ids(tiny_tokenizer)
    mm = batch["mm_token_type_ids"]
    assert ((mm == 1) == (batch["input_ids"] == ids["<|image|>"])).all()
    assert ((mm == 3) == (batch["input_ids"] == ids["<|audio|>"])).all() and int((mm == 3).sum()) == 13 + 25
    assert int((mm == 1).sum()) == sum(n // 9 for n in counts) and (mm[0] == 0).all()


def test_a_text_only_batch_is_exactly_what_it_was(tiny_tokenizer):
    rows = [row({"type": "text", "text": "Hi"}, answer="Hello"), {"instruction": "Say hi.", "output": "Hi"}]
    prepared = prepare(rows, tiny_tokenizer)
    assert all(set(ex) == {"input_ids", "labels"} for ex in prepared.examples)
    batch = data_batches.collate(prepared.examples, 0)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}


def test_prompt_batch_ends_where_the_answer_starts(tiny_tokenizer):
    messages = [{"role": "user", "content": [image_part(), {"type": "text", "text": "What is this?"}]}]
    inputs = data_batches.prompt_batch(tiny_tokenizer, [messages], max_soft_tokens=70)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "image_position_ids", "mm_token_type_ids"}
    trained = prepare([row(*messages[0]["content"])], tiny_tokenizer)[0]["input_ids"]
    assert trained[:inputs["input_ids"].shape[1]] == inputs["input_ids"][0].tolist()
    header = tiny_tokenizer("<|turn>model\n", add_special_tokens=False)["input_ids"]
    assert inputs["input_ids"][0, -len(header):].tolist() == header


# ------------------------------------------------------------------ bad rows, sources, layouts
def test_media_errors_are_skipped_and_counted_by_reason(tiny_tokenizer, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows = [row(image_part()), row({"type": "image", "image": str(tmp_path / "gone.png")}),
            row({"type": "image", "url": "https://example.com/cat.png"}), row({"type": "image", "path": str(broken)}),
            row(audio_part(31.0)), row({"type": "audio", "audio": b"RIFFjunk"}), row(audio_part(0.005))]
    with pytest.raises(DatasetFormatError, match=r"^row 2: image 1: image file not found: .*skip_bad_rows=True"):
        prepare(rows, tiny_tokenizer)
    prepared = prepare(rows, tiny_tokenizer, skip_bad_rows=True)
    assert prepared.rows == 1
    assert prepared.rows_skipped == {"missing image": 1, "remote image": 1, "corrupt image": 1, "audio too long": 1,
                                     "corrupt audio": 1, "audio too short": 1}
    assert "first skipped: row 2: image 1: image file not found" in prepared.report()


def test_a_cut_off_file_is_found_at_prepare_time_with_verify_media(tiny_tokenizer):
    data_bytes = png(picture(200, 200))
    rows = [row(image_part()), row({"type": "image", "image": data_bytes[:len(data_bytes) // 2]})]
    lazy = prepare(rows, tiny_tokenizer)
    assert lazy.rows == 2
    with pytest.raises(DatasetFormatError, match="row 2: image 1: the image cannot be decoded"):
        data_batches.collate(lazy.examples, 0)
    verified = prepare(rows, tiny_tokenizer, verify_media=True, skip_bad_rows=True)
    assert verified.rows == 1 and verified.rows_skipped == {"corrupt image": 1}


def test_relative_paths_are_read_from_the_data_files_folder(tiny_tokenizer, tmp_path, monkeypatch):
    (tmp_path / "pics").mkdir()
    picture().save(tmp_path / "pics" / "a.png")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row({"type": "image", "image": "pics/a.png"}, {"type": "text", "text": "?"})) + "\n")
    monkeypatch.chdir(ROOT)  # somewhere else
    prepared = data_dataset.prepare_dataset(path, tiny_tokenizer, max_soft_tokens=70)
    assert prepared[0]["media"][0].source == tmp_path / "pics" / "a.png"


def test_hub_layouts_latex_ocr_librispeech_and_trl(tiny_tokenizer):
    datasets = pytest.importorskip("datasets")
    import soundfile

    images = datasets.Dataset.from_dict({"image": [{"bytes": png(picture(seed=i)), "path": None} for i in range(3)],
                                         "text": ["x^{2}", "\\frac{a}{b}", "\\sqrt{2}"]})
    images = images.cast_column("image", datasets.Image())  # as unsloth/LaTeX_OCR stores it
    prepared = prepare(images, tiny_tokenizer, formatting_func=data_messages.image_to_text("Write the LaTeX."))
    assert prepared.rows == 3 and prepared.media_counts == (3, 0)
    assert "\\frac{a}{b}<turn|>" in data_dataset.show_example(prepared, tiny_tokenizer, 1)

    def flac(seconds):
        buffer = io.BytesIO()
        soundfile.write(buffer, tone(seconds, 16000), 16000, format="FLAC")
        return {"bytes": buffer.getvalue(), "path": None}

    speech = datasets.Dataset.from_dict({  # the columns of openslr/librispeech_asr
        "file": ["a.flac", "b.flac"], "audio": [flac(0.5), flac(1.2)], "text": ["HELLO THERE", "GOOD MORNING"],
        "speaker_id": [1, 2], "chapter_id": [3, 4], "id": ["1-3-0", "2-4-0"]})
    speech = speech.cast_column("audio", datasets.Audio(sampling_rate=16000))  # decoding would need torchcodec
    prepared = prepare(speech, tiny_tokenizer, formatting_func=data_messages.audio_to_text("Transcribe."))
    assert [ex["media"][0].tokens for ex in prepared.examples] == [13, 30]
    with pytest.raises(DatasetFormatError, match="row 1: no 'sentence' column .*text_column="):
        format_row = data_messages.audio_to_text("Transcribe.", text_column="sentence")
        prepare(speech, tiny_tokenizer, formatting_func=format_row)

    trl = [{"messages": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Q?"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "A."}]}],
            "images": [picture(seed=7)]}]
    assert prepare(trl, tiny_tokenizer).media_counts == (1, 0)


# ------------------------------------------------------------------ the tiny model reads the batches
@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    from transformers import Gemma4ForConditionalGeneration

    model = Gemma4ForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    assert model.config.audio_config.subsampling_conv_channels[0] == TINY_MEL_BINS
    return model.eval()


@pytest.mark.parametrize("kind", ["image", "audio", "both"])
def test_the_tiny_model_accepts_collated_batches_with_a_finite_loss(tiny_tokenizer, tiny_model, kind):
    parts = {"image": [[image_part(seed=1)], [image_part(seed=2, height=200, width=50), image_part(seed=3)], []],
             "audio": [[audio_part(0.5)], [audio_part(1.3), audio_part(0.2)], []],
             "both": [[image_part(seed=4), audio_part(0.7)], [audio_part(0.4)], [image_part(seed=5)]]}[kind]
    rows = [row(*p, {"type": "text", "text": "Describe."}) for p in parts]
    batch = data_batches.collate(prepare(rows, tiny_tokenizer).examples, tiny_tokenizer.pad_token_id)
    out = tiny_model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    tiny_model.zero_grad(set_to_none=True)


def test_audio_token_count_equals_the_tiny_audio_towers_output(tiny_model):
    lengths = [161, 800, 1601, 8000, 16000, 23999, 40000]
    encoded = [data_audio.audio_features(tone(n / 16000)[:n], TINY_MEL_BINS) for n in lengths]
    longest = max(len(f) for f, _ in encoded)
    features = torch.zeros(len(lengths), longest, TINY_MEL_BINS)
    mask = torch.zeros(len(lengths), longest, dtype=torch.bool)
    for i, (f, m) in enumerate(encoded):
        features[i, :len(f)], mask[i, :len(m)] = torch.from_numpy(f), torch.from_numpy(m)
    with torch.no_grad():
        out = tiny_model.model.audio_tower(features, mask, return_dict=True)
    assert out.attention_mask.sum(dim=1).tolist() == [data_audio.audio_tokens(n) for n in lengths]


def test_padding_patches_to_the_batch_not_the_budget_changes_no_image_feature(tiny_model):
    patches, positions = data_images.image_patches(picture(100, 300, seed=9), 280)
    for length in (len(patches), 280 * 9):  # ours, and the processor's padding to the whole budget
        pixel_values = torch.zeros(1, length, 768)
        position_ids = torch.full((1, length, 2), -1)
        pixel_values[0, :len(patches)] = torch.from_numpy(patches)
        position_ids[0, :len(patches)] = torch.from_numpy(positions)
        with torch.no_grad():
            features = tiny_model.model.get_image_features(pixel_values, position_ids, return_dict=True).pooler_output
        if length == len(patches):
            ours = torch.cat(features)
    # Same values; only the sizes of the masked matmuls differ (fp32 rounding, ~1e-7 relative).
    torch.testing.assert_close(torch.cat(features), ours, rtol=1e-5, atol=1e-5)
    assert ours.shape[0] == len(patches) // 9


# ------------------------------------------------------------------ the bundled datasets
def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped_rows(name, split):
    lines = (data_rows.BUNDLED_MEDIA[name] / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_bundled_formulas_match_their_generator():
    import matplotlib

    script = load_script("make_formula_dataset")
    rows = script.build_formulas()
    for split in ("train", "test"):
        assert shipped_rows("formulas", split) == script.rows_for_split(rows, split)
    folder = data_rows.BUNDLED_MEDIA["formulas"]
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(r["image"] for r in rows)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 600_000
    if json.loads((folder / "meta.json").read_text())["matplotlib"] != matplotlib.__version__:
        pytest.skip("the pixels depend on matplotlib's version; the rows above match")
    for r in rows[::24]:  # a sample: rendering all 240 takes seconds
        shipped = np.asarray(Image.open(folder / r["image"]))
        np.testing.assert_array_equal(np.asarray(script.render(r["text"], r["fontset"], r["size"])), shipped)


def test_bundled_speech_matches_its_generator_and_every_clip_decodes():
    import soundfile

    script = load_script("make_speech_dataset")
    rows = script.build_rows()
    for split in ("train", "test"):
        assert shipped_rows("speech", split) == script.rows_for_split(rows, split)
    folder = data_rows.BUNDLED_MEDIA["speech"]
    assert sorted(p.name for p in folder.glob("*.ogg")) == sorted(r["audio"] for r in rows)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 3_000_000
    for r in rows:
        info = soundfile.info(folder / r["audio"])
        assert info.samplerate == 16000 and info.channels == 1 and 1.0 < info.duration < 6.0, r


@pytest.mark.parametrize("name, formatting",
                         [("formulas", data_messages.image_to_text("Write the LaTeX for this formula.")),
                          ("speech", data_messages.audio_to_text("Transcribe this clip."))])
def test_bundled_media_datasets_prepare_and_split(tiny_tokenizer, name, formatting):
    train, test = data_rows.load_bundled_dataset(name, "train"), data_rows.load_bundled_dataset(name, "test")
    assert len(train) > 100 and len(test) >= 30
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    prepared = prepare(train[:8] + test[:2], tiny_tokenizer, formatting_func=formatting, verify_media=True)
    assert prepared.rows == 10 and prepared.rows_dropped == 0
    assert sum(prepared.media_counts) == 10
    batch = data_batches.collate(prepared.examples[:4], tiny_tokenizer.pad_token_id)
    assert ("pixel_values" in batch) == (name == "formulas") and ("input_features" in batch) == (name == "speech")
