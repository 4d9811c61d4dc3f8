"""gemmatune.memory: the peak-VRAM prediction against every H200 measurement committed in
benchmarks/results (within 10%), and the warning it gives before an out-of-memory error."""
import json

import pytest

from benchmarks.gemma4_configs import CONFIGS, multimodal_config
from gemmatune.model.memory import (GIB, architecture, check_fits, choose_checkpointing, longest_fitting_seq,
                                    masks_built_here, media_architecture, predict_peak_gib)
from tests.helpers import REPO

RESULTS = REPO / "benchmarks" / "results"


def measured_records():
    records = []
    for path in sorted(RESULTS.glob("*-h200-memory.json")) + sorted(RESULTS.glob("*-h200-train-step*.json")):
        for r in json.loads(path.read_text()):
            if (r.get("stack", "gemmatune") == "gemmatune" and not r.get("error") and "peak_allocated_gib" in r
                    and "mode" not in r):  # image/audio runs: test_multimodal_prediction_within_10_percent
                records.append((path.name, r))
    return records


def multimodal_records():
    records = []
    for path in sorted(RESULTS.glob("*-h200-train-step-multimodal*.json")):
        for r in json.loads(path.read_text()):
            if r.get("stack") == "gemmatune" and not r.get("error") and "peak_allocated_gib" in r:
                records.append((path.name, r))
    return records


@pytest.fixture(scope="module")
def archs():
    return {name: architecture(make()) for name, make in CONFIGS.items()}


def test_there_are_measurements_to_check():
    names = {r["model"] for _, r in measured_records()}
    assert {"e2b", "e4b"} <= names


def record_id(x):
    return x if isinstance(x, str) else f"{x['model']}-{x.get('checkpointing', 'offload')}-{x['seq']}-{x['dtype']}"


@pytest.mark.parametrize("source,record", measured_records(), ids=record_id)
def test_prediction_within_10_percent(source, record, archs):
    mode = record.get("checkpointing", "offload")
    fp16 = record["dtype"] in ("fp16", "float16")  # both are 2 bytes; fp16 adds the overflow clamps
    # the H200 ran the sliding layers through FlashAttention-2's window: no masks
    predicted = predict_peak_gib(None, record["seq"], record["batch"], checkpointing=mode, arch=archs[record["model"]],
                                 fp16=fp16, masks=False)
    measured = record["peak_allocated_gib"]
    assert abs(predicted / measured - 1) <= 0.10, f"{source}: predicted {predicted:.2f} GiB, measured {measured:.2f}"


def test_longest_fitting_seq_is_consistent(archs):
    arch = archs["e2b"]
    longest = longest_fitting_seq(None, 8.0, arch=arch)
    assert predict_peak_gib(None, longest, arch=arch) <= 8.0 < predict_peak_gib(None, longest + 256, arch=arch)
    assert longest_fitting_seq(None, 8.0, arch=archs["e4b"]) < longest  # the bigger model fits less


def test_check_fits_warns_with_a_suggestion(archs):
    assert check_fits(None, 2048, free_gib=16.0, arch=archs["e2b"]) is None
    message = check_fits(None, 32768, free_gib=8.0, arch=archs["e2b"])
    assert message is not None and "max_seq_length <=" in message
    suggested = int(message.split("max_seq_length <= ")[1].split()[0])
    assert 0 < suggested < 32768
    assert check_fits(None, suggested, free_gib=8.0, arch=archs["e2b"]) is None


def test_auto_checkpointing_keeps_inputs_on_the_gpu_only_when_they_fit():
    e2b = CONFIGS["e2b"]()
    assert choose_checkpointing(e2b, 2048, free_gib=80.0) == "on"       # an H200: plenty of room
    assert choose_checkpointing(e2b, 16384, free_gib=8.0) == "offload"  # an 8 GB card at 16k tokens


def test_masks_count_only_when_transformers_builds_them(archs):
    without = predict_peak_gib(None, 8192, arch=archs["e2b"], masks=False)
    with_masks = predict_peak_gib(None, 8192, arch=archs["e2b"], masks=True)
    assert with_masks - without == pytest.approx(4 * 8192 * 8192 / 2**30)
    default = with_masks if masks_built_here() else without  # masks unless an sm80+ GPU is here
    assert predict_peak_gib(None, 8192, arch=archs["e2b"]) == default


# ------------------------------------------------------------------ images and audio
@pytest.fixture(scope="module")
def e4b_media():
    config = multimodal_config("e4b")
    return config, architecture(config), media_architecture(config)


def test_towers_add_their_weights_in_the_compute_dtype(e4b_media):
    config, arch, media = e4b_media
    assert 150e6 < media["image"]["params"] < 200e6 and 280e6 < media["audio"]["params"] < 340e6
    text_only = predict_peak_gib(None, 1024, arch=arch, masks=False, media={})
    vision = predict_peak_gib(None, 1024, arch=arch, masks=False, media={"image": media["image"]})
    assert vision - text_only == pytest.approx(media["image"]["params"] * 2 / GIB)


def test_media_activations_grow_with_the_budget_and_the_clip(e4b_media):
    config, arch, media = e4b_media
    vision = {"image": media["image"]}

    def gib(**rows):
        return predict_peak_gib(None, 1024, arch=arch, masks=False, media=vision, **rows)

    assert gib() < gib(images=1, max_soft_tokens=280) < gib(images=1, max_soft_tokens=1120)
    assert gib(images=1, max_soft_tokens=280) < gib(images=2, max_soft_tokens=280)
    audio = {"audio": media["audio"]}
    short, long = (predict_peak_gib(None, 1024, arch=arch, masks=False, media=audio, audio_seconds=s) for s in (5, 30))
    assert short < long
    trained = media_architecture(config, train_audio_tower=True)["audio"]
    assert trained["lora"] > 0 and media["audio"]["lora"] == 0
    assert predict_peak_gib(None, 1024, arch=arch, masks=False, media={"audio": trained}, audio_seconds=30) > long


def test_check_fits_suggests_a_soft_token_budget_that_fits():
    import gemmatune.model.memory as model_memory

    config = multimodal_config("e4b")
    config.audio_config = None  # a vision fine-tune loads the vision tower only
    need_280 = predict_peak_gib(config, 1536, images=1, max_soft_tokens=280, masks=model_memory.masks_built_here())
    free = need_280 / 0.9 + 0.01  # room for 280 soft tokens per image, not for 1120
    assert check_fits(config, 1536, images=1, max_soft_tokens=280, free_gib=free) is None
    message = check_fits(config, 1536, images=1, max_soft_tokens=1120, free_gib=free)
    assert message is not None and "at most 280 soft tokens" in message


def multimodal_record_id(x):
    return x if isinstance(x, str) else f"{x['model']}-{x['workload']}-{x['dtype']}"


@pytest.mark.parametrize("source,record", multimodal_records(), ids=multimodal_record_id)
def test_multimodal_prediction_within_10_percent(source, record):
    """The image/audio runs of benchmarks/train_step_multimodal.py, with the towers that run loaded."""
    config = multimodal_config(record["model"])
    trained = {"image": record.get("tower_lora") == "vision", "audio": record.get("tower_lora") == "audio"}
    media = {m: t for m, t in media_architecture(config, train_vision_tower=trained["image"],
                                                 train_audio_tower=trained["audio"]).items()
             if m in record["modalities"]}
    rows = record["batch"]
    per_row = (dict(images=1, max_soft_tokens=record["soft_tokens"] // rows) if record["mode"] == "image"
               else dict(audio_seconds=record["audio_s"] / rows))
    predicted = predict_peak_gib(None, record["seq"], rows, checkpointing=record["checkpointing"],
                                 arch=architecture(config), fp16=record["dtype"] == "fp16", masks=False, media=media,
                                 **per_row)
    measured = record["peak_allocated_gib"]
    assert abs(predicted / measured - 1) <= 0.10, f"{source}: predicted {predicted:.2f} GiB, measured {measured:.2f}"
