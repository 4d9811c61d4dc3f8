"""Helpers shared by the tests: the tiny model, LoRA set-ups, comparisons, a fake clock.

Test modules import from here, never from each other or from conftest.py (which holds fixtures only).
"""
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import gemmatune
from gemmatune.model import adapter_names
from gemmatune.model.lora import add_lora, language_model_targets
from gemmatune.training.dashboard import make_dashboard

REPO = Path(__file__).resolve().parents[1]


def load_tiny(load_in_4bit=False, dtype="float32", **kwargs):
    """The tiny model through gemmatune.load_model, quietly."""
    return gemmatune.load_model(gemmatune.TINY_MODEL_ID, load_in_4bit=load_in_4bit, dtype=dtype, verbose=False,
                                **kwargs)


def lora_model(seed=0):
    model, tok = load_tiny()
    model = add_lora(model, r=8)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peft starts B at zero, which would make every A-gradient zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model, tok


def random_rows(n, seed=0, min_len=5, max_len=40):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len, (1,), generator=gen))
        ids = torch.randint(20, 300, (length,), generator=gen).tolist()
        labels = [-100 if i < length // 3 else t for i, t in enumerate(ids)]  # prompt part not trained
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def assert_rel_close(actual, expected, tol, name=""):
    """max |a - e| <= tol * max |e|: fp32 sums in another order differ by ~1e-7 relative,
    which an elementwise rtol would flag on near-zero entries."""
    assert torch.isfinite(actual).all(), f"{name}: NaN/inf"
    err = (actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def assert_graphed_steps_match_eager(results):
    """results[graphs] = (losses, LoRA gradients per step) of the same steps with CUDA graphs on
    (True) and off (False): the replayed steps give the eager losses and gradients."""
    (eager_losses, eager_grads), (graph_losses, graph_grads) = results[False], results[True]
    for i, (a, b) in enumerate(zip(graph_losses, eager_losses)):
        assert_rel_close(a.float(), b.float(), 1e-2, f"loss {i}")
    for i, grads in enumerate(eager_grads):
        for name in grads:
            assert_rel_close(graph_grads[i][name], grads[name], 5e-2, f"step {i} {name}")


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class FakeHandle:
    def __init__(self):
        self.updates = []

    def update(self, obj, **kwargs):
        self.updates.append((obj, kwargs))


def widget_dashboard(clock, total=30):
    shown, handle = [], FakeHandle()

    def display(obj, display_id=None, raw=False):
        shown.append(obj)
        return handle if display_id else None

    return make_dashboard(total, mode="widget", clock=clock, display=display), shown, handle


def randomize_lora(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))


def tower_targets(model) -> list[str]:
    """The inner nn.Linear of some vision- and audio-tower projections (Gemma4ClippableLinear.linear)."""
    return [n for n, _ in model.named_modules()
            if ("vision_tower" in n or "audio_tower" in n) and n.endswith((".q_proj.linear", ".v_proj.linear"))]


def fine_tuned(load_in_4bit: bool, modalities=("text",), towers=False, seed=5, model_id=None):
    """A tiny model with random nonzero LoRA: like a trained one for every check here."""
    if model_id is None:
        model, tokenizer = load_tiny(load_in_4bit=load_in_4bit, modalities=modalities)
    else:
        model, tokenizer = gemmatune.load_model(model_id, load_in_4bit=load_in_4bit, modalities=modalities,
                                                dtype="float32", verbose=False)
    if towers:  # LoRA on the towers too, by hand (as a multimodal fine-tune would have it)
        names = language_model_targets(model) + tower_targets(model)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=adapter_names.exact_names_regex(names),
                            task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    else:
        model = gemmatune.add_lora(model, r=4, alpha=8)
    randomize_lora(model, seed)
    return model.eval(), tokenizer


def picture(seed: int = 0, height: int = 48, width: int = 96):
    """A random RGB PIL image: two seeds give two different images of the same size."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def tone(seconds: float = 0.5, hertz: float = 330.0, rate: int = 16000):
    """A sine tone as a float32 array at `rate` Hz: two pitches give two different clips."""
    import numpy as np

    return (0.3 * np.sin(2 * np.pi * hertz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)
