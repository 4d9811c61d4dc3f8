"""What this machine can run: the real model on a CUDA GPU, the embedded tiny one elsewhere."""
import torch

from gemmatune.tiny import TINY_MODEL_ID


def choose_model_and_data(model_id: str, dataset: str, force_tiny: bool = False) -> tuple[str, str]:
    """(model, dataset) to use here, saying plainly when it falls back to the tiny model.

    Without a CUDA GPU a real Gemma 4 would take hours per step, so the notebooks switch to
    the embedded tiny Gemma 4 (random weights, every architectural feature on) and the
    bundled dataset: the whole flow still runs, and nothing needs the network.
    """
    if model_id == TINY_MODEL_ID:
        return model_id, dataset
    if force_tiny or not torch.cuda.is_available():
        reason = "as requested" if force_tiny else "no CUDA GPU found"
        print(f"gemmatune: {reason} -> using the embedded tiny Gemma 4 ({TINY_MODEL_ID}, random weights) "
              f"and the bundled dataset instead of {model_id} / {dataset}.\n"
              "  Everything below runs the same way; on Colab pick Runtime > Change runtime type > GPU "
              "to fine-tune the real model.")
        if not torch.cuda.is_available():
            # The tiny model's matmuls are too small to share between threads: one thread is
            # faster, and far faster when another process is busy on a core (measured 5x).
            torch.set_num_threads(1)
        return TINY_MODEL_ID, "bundled"
    name = torch.cuda.get_device_name(0)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"gemmatune: {name} with {total:.1f} GiB -> fine-tuning {model_id} on {dataset}")
    return model_id, dataset
