"""An image that only decoding shows to be broken is skipped and counted during training, not a stop."""
import io

import numpy as np
import pytest
from PIL import Image

import gemmatune
from tests.helpers import load_tiny


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("GEMMATUNE_KERNELS", "0")


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("packing", [True, False])
def test_a_cut_off_image_found_during_training_is_skipped_and_counted(tmp_path, tiny_dir, capsys, packing):
    rows = []
    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(_png(i))
        rows.append({"image": str(tmp_path / f"{i}.png"), "text": f"picture {i}"})
    model, tokenizer = load_tiny(modalities=("text", "image"))
    model = gemmatune.add_lora(model, r=4)
    dataset = gemmatune.prepare_dataset(rows, tokenizer, max_seq_length=256, max_soft_tokens=70,
                                        formatting_func=gemmatune.image_to_text("Describe."))
    assert dataset.rows == 6 and not dataset.media_verified  # only the headers were read
    data = (tmp_path / "3.png").read_bytes()
    (tmp_path / "3.png").write_bytes(data[:len(data) // 2])  # cut off after the dataset was prepared
    result = gemmatune.train(model, dataset, tokenizer, max_steps=4, batch_size=2, grad_accum=1, dashboard="text",
                             output_dir=str(tmp_path / "out"), packing=packing)
    assert result.status == "done" and result.state.step == 4
    assert result.rows_skipped == {"corrupt image": 1}
    out = capsys.readouterr().out
    assert "skipped a row whose media does not decode: row 4: image 1: the image cannot be decoded" in out
    assert "skipped 1 row(s) whose media did not decode: 1 corrupt image" in out
