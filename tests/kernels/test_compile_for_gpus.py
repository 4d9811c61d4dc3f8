"""Every Triton kernel compiles for a T4 (sm_75, fp16) and an H100/H200 (sm_90, bf16), with
the launch settings its host wrapper picks on a GPU: checked on a CPU, ahead of time
(tests/kernels/compile_for_gpus.py says how). The interpreter that runs the kernels in CI does
not do the compiler's checks, so without this a kernel can pass CI and fail to compile on
the first GPU it meets."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("compile_for_gpus.py")


def kernels_in_package() -> set[str]:
    """module.name of every `@triton.jit def ..._kernel(` in gemmatune/kernels."""
    found = set()
    for path in (ROOT / "gemmatune" / "kernels").glob("*.py"):
        for name in re.findall(r"@triton\.jit\ndef (\w+_kernel)\(", path.read_text()):
            found.add(f"gemmatune.kernels.{path.stem}.{name}")
    return found


@pytest.fixture(scope="module")
def compiled():
    """Both GPUs' compiles at once: one process each (Triton compiles on one core)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    runs = {gpu: subprocess.Popen([sys.executable, str(SCRIPT), gpu], cwd=ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for gpu in ("sm_75", "sm_90")}
    results = {}
    for gpu, run in runs.items():
        out, err = run.communicate(timeout=900)
        assert run.returncode == 0, f"{gpu}: the compile script failed:\n{err[-3000:]}"
        results[gpu] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return results


@pytest.mark.parametrize("gpu", ["sm_75", "sm_90"])
def test_every_kernel_compiles_for_the_gpu(compiled, gpu):
    records = compiled[gpu]
    failures = [f"{r['kernel']}: {r['error']}" for r in records if not r["ok"]]
    assert not failures, "\n\n".join(failures)
    assert kernels_in_package() <= {r["kernel"] for r in records}, "a kernel's launch was not recorded"
