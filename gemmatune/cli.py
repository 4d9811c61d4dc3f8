"""Command line: run a notebook headless, or the same fine-tune as a script.

    python -m gemmatune notebook notebooks/Gemma4_E2B_Text.ipynb   # -> runs/Gemma4_E2B_Text.executed.ipynb
    python -m gemmatune train --model google/gemma-4-E2B-it --data mlabonne/FineTome-100k --steps 60
    torchrun --nproc-per-node 2 -m gemmatune train ...      # the same on 2 GPUs (README: "Several GPUs")

Notebook parameters can be changed through the environment, e.g. GEMMATUNE_MAX_STEPS=20.
"""
import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

CELL_TIMEOUT_S = 1200  # per cell: a real 60-step fine-tune on a T4 fits with room to spare
TINY_LEARNING_RATE = 2e-3  # the tiny model has random weights: 2e-4 barely moves its loss in 60 steps


def run_notebook(path, out=None, timeout: int = CELL_TIMEOUT_S) -> Path:
    """Execute `path` in this Python's kernel (cwd = the notebook's folder, as in Jupyter) and
    write the executed copy to `out` (default runs/<name>.executed.ipynb). An existing file
    there is kept as <name>.previous.ipynb. Raises nbclient's CellExecutionError if a cell fails,
    after writing the partly executed copy so the error can be read in it."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    out = Path(out) if out else Path("runs") / f"{path.stem}.executed.ipynb"
    if out.resolve() == path.resolve():
        raise SystemExit(f"--out {out} is the notebook itself; pick another file")
    nb = nbformat.read(path, as_version=4)
    # "python3" is ipykernel's native kernelspec: the kernel runs in this interpreter (sys.executable).
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    print(f"gemmatune: running {path} (cells time out after {timeout} s) ...", flush=True)
    start, error = time.monotonic(), None
    try:
        client.execute()
    except CellExecutionError as exc:
        error = exc
    finally:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.replace(out.with_name(f"{out.stem}.previous{out.suffix}"))
        nbformat.write(nb, out)
    print(f"gemmatune: {'FAILED' if error else 'done'} in {time.monotonic() - start:.0f} s; "
          f"executed notebook written to {out}")
    if error:
        raise error
    return out


DEFAULT_MODEL, DEFAULT_DATA = "google/gemma-4-E2B-it", "mlabonne/FineTome-100k"


def run_training(args) -> int:
    """The notebook's flow as a script, with the text dashboard. Under torchrun every rank runs it;
    rank 0 alone prints (see gemmatune/training/distributed.py)."""
    import gemmatune
    from gemmatune.model.device import is_main_process

    say = print if is_main_process() else (lambda *args: None)
    if not is_main_process():  # the other ranks' output would repeat rank 0's, line for line
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with contextlib.redirect_stdout(sys.stdout if is_main_process() else io.StringIO()):
        model_id, data = gemmatune.choose_model_and_data(
            args.model or DEFAULT_MODEL, args.data or DEFAULT_DATA, force_tiny=args.force_tiny,
            keep_model=args.model is not None, keep_data=args.data is not None)
    if data.endswith((".json", ".jsonl")) and not Path(data).is_file():  # before minutes of loading
        raise FileNotFoundError(f"--data {data}: no such file (relative paths start from {Path.cwd()})")
    lr = args.learning_rate or (TINY_LEARNING_RATE if model_id == gemmatune.TINY_MODEL_ID else 2e-4)
    model, tokenizer = gemmatune.load_model(model_id, max_seq_length=args.max_seq_length)
    model = gemmatune.add_lora(model, r=args.lora_rank)
    say(gemmatune.trainable_parameters(model))
    rows = data if data == "bundled" or Path(data).is_file() else gemmatune.load_hub_dataset(
        data, split=f"train[:{args.rows}]")
    dataset = gemmatune.prepare_dataset(rows, tokenizer, max_seq_length=args.max_seq_length,
                                        skip_bad_rows=args.skip_bad_rows)
    say(dataset.report())
    result = gemmatune.train(model, dataset, tokenizer, max_steps=args.steps, learning_rate=lr,
                             batch_size=args.batch_size, grad_accum=args.grad_accum,
                             output_dir=args.output_dir, dashboard="text", resume_from=args.resume_from,
                             save_every=args.save_every)
    say(f"{result.status}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; adapter in {result.adapter_dir}"
        if result.losses else f"{result.status}: no step finished")
    return 0 if result.status == "done" else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gemmatune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    nb = sub.add_parser("notebook", help="execute a notebook headless and save the executed copy")
    nb.add_argument("path", nargs="?", default="notebooks/Gemma4_E2B_Text.ipynb")
    nb.add_argument("--out", help="where to write it (default runs/<name>.executed.ipynb)")
    nb.add_argument("--timeout", type=int, default=CELL_TIMEOUT_S, help="seconds per cell")
    tr = sub.add_parser("train", help="fine-tune with LoRA/QLoRA from the command line")
    tr.add_argument("--model", help=f"hub id or local folder (default {DEFAULT_MODEL}; without a GPU the "
                                    "embedded tiny model, unless you name one)")
    tr.add_argument("--data", help=f"hub dataset, .json/.jsonl file or 'bundled' (default {DEFAULT_DATA}; "
                                   "without a GPU the bundled dataset, unless you name one)")
    tr.add_argument("--rows", type=int, default=2000, help="first N rows of a hub dataset's train split")
    tr.add_argument("--skip-bad-rows", action="store_true", help="skip rows that cannot be read, and count them")
    tr.add_argument("--steps", type=int, default=60)
    tr.add_argument("--learning-rate", type=float, help="default 2e-4 (2e-3 for the tiny model)")
    tr.add_argument("--batch-size", type=int, default=2)
    tr.add_argument("--grad-accum", type=int, default=4)
    tr.add_argument("--lora-rank", type=int, default=16)
    tr.add_argument("--max-seq-length", type=int, default=2048)
    tr.add_argument("--output-dir", default="outputs/gemma4-e2b-text")
    tr.add_argument("--save-every", type=int, default=0, help="write a resumable checkpoint every N steps")
    tr.add_argument("--resume-from", help="a checkpoint-N folder to continue from")
    tr.add_argument("--force-tiny", action="store_true", help="use the embedded tiny model even with a GPU")
    args = parser.parse_args(argv)
    from gemmatune.errors import GemmatuneError

    try:
        if args.command == "notebook":
            return run_notebook_command(args)
        return run_training(args)
    except (GemmatuneError, FileNotFoundError) as exc:  # the user's mistake: one line, not a traceback
        print(f"gemmatune: error: {exc}", file=sys.stderr)
        return 2


def run_notebook_command(args) -> int:
    from nbclient.exceptions import CellExecutionError

    try:
        run_notebook(args.path, args.out, args.timeout)
    except CellExecutionError as exc:
        print(f"gemmatune: a cell failed:\n{exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
