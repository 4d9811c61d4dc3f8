"""Load gemmatune's saved adapters and merged checkpoints as a person without gemmatune would.

Run as `python tests/export/plain_transformers.py jobs.json` (tests/export/test_merge.py does): it imports only
torch, transformers, peft and safetensors, never gemmatune, and checks that itself. Each job loads one
model, runs the inputs of one safetensors file through it and writes the logits, the number of LoRA
modules found, whether every adapter tensor arrived unchanged, and every warning the libraries gave.
"""
import json
import logging
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def load(job: dict):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    dtype = getattr(torch, job.get("dtype", "float32"))
    if job["loader"] == "auto_peft":
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(job["adapter"], dtype=dtype)
    auto = {"image_text_to_text": AutoModelForImageTextToText, "causal_lm": AutoModelForCausalLM}[job["loader"]]
    model = auto.from_pretrained(job["model"], dtype=dtype)
    if job.get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, job["adapter"])
    return model


def lora_report(model, adapter: str | None) -> dict:
    if adapter is None:
        return {"lora_modules": 0, "adapter_tensors_loaded": True}
    from peft.tuners.lora import LoraLayer

    saved = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    loaded = [params.get(k[: -len(".weight")] + ".default.weight") for k in saved]
    same = all(p is not None and torch.equal(p.detach().cpu().to(v.dtype), v) for p, v in zip(loaded, saved.values()))
    return {"lora_modules": sum(isinstance(m, LoraLayer) for m in model.modules()), "adapter_tensors_loaded": same}


def run(job: dict) -> dict:
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    logging.getLogger("peft").addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load(job).eval()
    logging.getLogger("transformers").removeHandler(handler)
    logging.getLogger("peft").removeHandler(handler)
    messages += [str(w.message) for w in caught]
    inputs = load_file(job["inputs"])
    outputs = {}
    with torch.no_grad():
        for case in sorted({k.split(".", 1)[0] for k in inputs}):
            batch = {k.split(".", 1)[1]: v for k, v in inputs.items() if k.startswith(case + ".")}
            outputs[case] = model(**batch, use_cache=False).logits.float().contiguous()
    save_file(outputs, job["out"])
    return {"class": type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__,
            "warnings": messages, **lora_report(model, job.get("adapter"))}


def main() -> None:
    torch.set_num_threads(1)
    jobs = json.loads(Path(sys.argv[1]).read_text())
    reports = {name: run(job) for name, job in jobs.items()}
    reports["gemmatune_imported"] = any(m == "gemmatune" or m.startswith("gemmatune.") for m in sys.modules)
    Path(sys.argv[2]).write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
