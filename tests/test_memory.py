"""gemmatune.memory: the peak-VRAM prediction against every H200 measurement committed in
benchmarks/results (within 10%), and the warning it gives before an out-of-memory error."""
import json
from pathlib import Path

import pytest

from benchmarks.gemma4_configs import CONFIGS
from gemmatune.memory import (architecture, check_fits, choose_checkpointing, longest_fitting_seq, masks_built_here,
                              predict_peak_gib)

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def measured_records():
    records = []
    for path in sorted(RESULTS.glob("*-h200-memory.json")) + sorted(RESULTS.glob("*-h200-train-step*.json")):
        for r in json.loads(path.read_text()):
            if r.get("stack", "gemmatune") == "gemmatune" and not r.get("error") and "peak_allocated_gib" in r:
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
