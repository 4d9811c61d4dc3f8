"""Command line: run a notebook headless, or the same fine-tune as a script.

    python -m gemmatune notebook notebooks/Gemma4_E2B_Text.ipynb   # -> runs/Gemma4_E2B_Text.executed.ipynb
    python -m gemmatune train --model google/gemma-4-E2B-it --data mlabonne/FineTome-100k --steps 60
    torchrun --nproc-per-node 2 -m gemmatune train ...      # the same on 2 GPUs (README: "Several GPUs")

Notebook parameters can be changed through the environment, e.g. GEMMATUNE_MAX_STEPS=20.

This module imports only the standard library at the top: torch, transformers and the rest take
seconds to import, so the first line is printed before they load. `train` reads and checks the
data before the model loads (a bad row costs a second, not a minute), loads the towers the data
needs (images, audio), and, when stopped (Ctrl-C, SIGTERM), prints the command that resumes it.
"""
import argparse
import contextlib
import io
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

CELL_TIMEOUT_S = 1200  # per cell: a real 60-step fine-tune on a T4 fits with room to spare
TINY_LEARNING_RATE = 2e-3  # the tiny model has random weights: 2e-4 barely moves its loss in 60 steps
DEFAULT_MODEL, DEFAULT_DATA = "google/gemma-4-E2B-it", "mlabonne/FineTome-100k"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # gemmatune.data.readers reads these
MODALITIES = ("text", "image", "audio")


def run_notebook(path, out=None, timeout: int = CELL_TIMEOUT_S) -> Path:
    """Execute `path` in this Python's kernel (cwd = the notebook's folder, as in Jupyter) and
    write the executed copy to `out` (default runs/<name>.executed.ipynb). An existing file
    there is kept as <name>.previous.ipynb. Raises nbclient's CellExecutionError if a cell fails,
    after writing the partly executed copy so the error can be read in it.

    The kernel talks over local sockets (IPC) where the system has them: over TCP, ipykernel warns
    on every run that its traffic is unencrypted."""
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    out = Path(out) if out else Path("runs") / f"{path.stem}.executed.ipynb"
    if out.resolve() == path.resolve():
        raise SystemExit(f"--out {out} is the notebook itself; pick another file")
    nb = nbformat.read(path, as_version=4)
    sockets = Path(tempfile.mkdtemp(prefix="gemmatune-kernel-"))
    # "python3" is ipykernel's native kernelspec: the kernel runs in this interpreter (sys.executable).
    km = (KernelManager(kernel_name="python3", transport="ipc", ip=str(sockets / "kernel")) if os.name == "posix"
          else None)
    client = NotebookClient(nb, km=km, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    print(f"gemmatune: running {path} (cells time out after {timeout} s) ...", flush=True)
    start, error = time.monotonic(), None
    try:
        client.execute()
    except CellExecutionError as exc:
        error = exc
    finally:
        if km is not None and km.has_kernel:  # a kernel manager we passed in is ours to shut down
            km.shutdown_kernel()
        shutil.rmtree(sockets, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.replace(out.with_name(f"{out.stem}.previous{out.suffix}"))
        nbformat.write(nb, out)
    print(f"gemmatune: {'FAILED' if error else 'done'} in {time.monotonic() - start:.0f} s; "
          f"executed notebook written to {out}")
    if error:
        raise error
    return out


def is_local_data(data: str) -> bool:
    """A file or folder here (or a name that can only be one), not a hub dataset id."""
    return data == "bundled" or Path(data).exists() or data.lower().endswith(DATA_SUFFIXES)


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
    rows, modalities = read_data(data, args, say)  # before minutes of loading
    lr = args.learning_rate or (TINY_LEARNING_RATE if model_id == gemmatune.TINY_MODEL_ID else 2e-4)
    model, tokenizer = gemmatune.load_model(model_id, max_seq_length=args.max_seq_length, modalities=modalities)
    model = gemmatune.add_lora(model, r=args.lora_rank)
    say(gemmatune.trainable_parameters(model))
    dataset = gemmatune.prepare_dataset(rows, tokenizer, max_seq_length=args.max_seq_length,
                                        skip_bad_rows=args.skip_bad_rows, max_soft_tokens=args.max_soft_tokens)
    say(dataset.report())
    result = gemmatune.train(model, dataset, tokenizer, max_steps=args.steps, learning_rate=lr,
                             batch_size=args.batch_size, grad_accum=args.grad_accum,
                             output_dir=args.output_dir, dashboard="text", resume_from=args.resume_from,
                             save_every=args.save_every)
    say(f"{result.status}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; adapter in {result.adapter_dir}"
        if result.losses else f"{result.status}: no step finished")
    if result.status == "done":
        return 0
    if result.checkpoint_dir:
        say(f"gemmatune: stopped at step {result.state.step}/{args.steps}; continue with: "
            f"{resume_command(result.checkpoint_dir)}")
    else:
        say("gemmatune: stopped before the first step finished: nothing to resume; run the same command again")
    return 128 + signal.Signals[result.stopped_by] if result.stopped_by else 1


def read_data(data: str, args, say) -> tuple[object, tuple[str, ...]]:
    """(rows for prepare_dataset, the modalities to load): the data is read and every row checked
    (scan_rows) before any model loads; the towers are those its media need, unless --modalities."""
    from gemmatune.data import load_hub_dataset, scan_rows
    from gemmatune.errors import TrainingSetupError

    if is_local_data(data):
        if data != "bundled" and not Path(data).exists():
            raise FileNotFoundError(f"--data {data}: no such file or folder (relative paths start from {Path.cwd()})")
        rows = data
    else:
        rows = load_hub_dataset(data, split=f"train[:{args.rows}]")
    scan = scan_rows(rows, skip_bad_rows=args.skip_bad_rows, max_soft_tokens=args.max_soft_tokens)
    say(f"gemmatune: data checked: {scan.report()}")
    if args.modalities:
        modalities = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown:
            raise TrainingSetupError(f"--modalities {args.modalities}: unknown {', '.join(unknown)}; use some of "
                             f"{','.join(MODALITIES)}")
        missing = scan.media_kinds - set(modalities)
        if missing:
            raise TrainingSetupError(f"--modalities {args.modalities}: the data has {' and '.join(sorted(missing))} "
                                     f"parts; add {','.join(sorted(missing))} (or leave --modalities out to load "
                                     "what the data needs)")
        modalities = ("text", *[m for m in MODALITIES[1:] if m in modalities])
    else:
        modalities = ("text", *[m for m in MODALITIES[1:] if m in scan.media_kinds])
    towers = [f"the {'vision' if m == 'image' else 'audio'} tower" for m in modalities[1:]]
    say(f"gemmatune: loading the language model{' with ' + ' and '.join(towers) if towers else ' only (text)'} "
        f"(--modalities {','.join(modalities)})")
    return rows, modalities


def resume_command(checkpoint: str) -> str:
    """This command line again, resuming from `checkpoint`."""
    argv, out, skip = sys.argv[1:], [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume-from":
            skip = True
        elif not arg.startswith("--resume-from="):
            out.append(arg)
    return shlex.join(["python", "-m", "gemmatune", *out, "--resume-from", checkpoint])


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="gemmatune", description=__doc__.splitlines()[0], formatter_class=formatter)
    sub = parser.add_subparsers(dest="command", required=True)
    nb = sub.add_parser("notebook", help="execute a notebook headless and save the executed copy",
                        formatter_class=formatter)
    nb.add_argument("path", nargs="?", default="notebooks/Gemma4_E2B_Text.ipynb", help="the notebook to run")
    nb.add_argument("--out", help="where to write it (default runs/<name>.executed.ipynb)")
    nb.add_argument("--timeout", type=int, default=CELL_TIMEOUT_S, help="seconds per cell")
    tr = sub.add_parser("train", help="fine-tune with LoRA/QLoRA from the command line", formatter_class=formatter)
    tr.add_argument("--model", help=f"hub id or local folder (default {DEFAULT_MODEL}; without a GPU the "
                                    "embedded tiny model, unless you name one)")
    tr.add_argument("--data", help=f"hub dataset, a {'/'.join(DATA_SUFFIXES)} file, a folder of them, or 'bundled' "
                                   f"(default {DEFAULT_DATA}; without a GPU the bundled dataset, unless you name one)")
    tr.add_argument("--modalities", help="towers to load, e.g. text,image (default: what the data's rows hold)")
    tr.add_argument("--rows", type=int, default=2000, help="first N rows of a hub dataset's train split")
    tr.add_argument("--skip-bad-rows", action="store_true", help="skip rows that cannot be read, and count them")
    tr.add_argument("--steps", type=int, default=60, help="optimizer steps")
    tr.add_argument("--learning-rate", type=float, help="default 2e-4 (2e-3 for the tiny model)")
    tr.add_argument("--batch-size", type=int, default=2, help="rows per micro-batch (per GPU)")
    tr.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    tr.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r")
    tr.add_argument("--max-seq-length", type=int, default=2048, help="longer rows are truncated")
    tr.add_argument("--max-soft-tokens", type=int, default=280, help="soft tokens per image (70, 140, 280, 560, 1120)")
    tr.add_argument("--output-dir", default="outputs/gemma4-e2b-text", help="adapter and checkpoints go here")
    tr.add_argument("--save-every", type=int, default=20,
                    help="write a resumable checkpoint every N steps (0: only when stopped)")
    tr.add_argument("--resume-from", help="a checkpoint-N folder to continue from")
    tr.add_argument("--force-tiny", action="store_true", help="use the embedded tiny model even with a GPU")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":  # at once: the imports below take seconds
        print("gemmatune: train: loading PyTorch and transformers (a few seconds) ...", flush=True)
        _sigterm_as_interrupt()
    from gemmatune.errors import GemmatuneError

    try:
        if args.command == "notebook":
            return run_notebook_command(args)
        return run_training(args)
    except (GemmatuneError, FileNotFoundError) as exc:  # the user's mistake: one line, not a traceback
        print(f"gemmatune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started (while loading): nothing was trained
        print("gemmatune: stopped before training started; nothing was trained, nothing to save", file=sys.stderr)
        return 130


def _sigterm_as_interrupt() -> None:
    """Until train() takes over (gemmatune.training.stop_signals), SIGTERM stops like Ctrl-C: with a
    line that says nothing was trained yet, instead of a silent exit."""
    def interrupt(number, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)


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
