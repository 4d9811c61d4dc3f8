"""What this machine can run: the real model on a CUDA GPU, the embedded tiny one elsewhere."""
import torch

from gemmatune.model.tiny import TINY_MODEL_ID


def choose_model_and_data(model_id: str, dataset: str, force_tiny: bool = False, keep_model: bool = False,
                          keep_data: bool = False) -> tuple[str, str]:
    """(model, dataset) to use here, saying plainly when it falls back to the tiny model.

    Without a CUDA GPU a real Gemma 4 would take hours per step, so the notebooks switch to
    the embedded tiny Gemma 4 (random weights, every architectural feature on) and the
    bundled dataset: the whole flow still runs, and nothing needs the network. What the user
    named explicitly (a command-line flag, a GEMMATUNE_* variable) is kept: keep_model /
    keep_data. force_tiny picks the tiny model even with a GPU.
    """
    if model_id == TINY_MODEL_ID:
        return model_id, dataset
    has_gpu = torch.cuda.is_available()
    if has_gpu and not force_tiny:
        name = torch.cuda.get_device_name(0)
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        print(f"gemmatune: {name} with {total:.1f} GiB -> fine-tuning {model_id} on {dataset}")
        return model_id, dataset
    if not has_gpu:
        # The tiny model's matmuls are too small to share between threads: one thread is
        # faster, and far faster when another process is busy on a core (measured 5x).
        torch.set_num_threads(1)
    reason = "as requested" if force_tiny else "no CUDA GPU found"
    if keep_model and not force_tiny:
        print(f"gemmatune: {reason}; keeping {model_id} as you asked: on a CPU a real Gemma 4 takes minutes to "
              "hours per training step")
        return model_id, dataset if keep_data else "bundled"
    chosen = dataset if keep_data else "bundled"
    print(f"gemmatune: {reason} -> using the embedded tiny Gemma 4 ({TINY_MODEL_ID}, random weights) "
          f"instead of {model_id}, on {'your dataset ' + repr(dataset) if keep_data else 'the bundled dataset'}.\n"
          "  Everything below runs the same way; on Colab pick Runtime > Change runtime type > GPU "
          "to fine-tune the real model.")
    return TINY_MODEL_ID, chosen
