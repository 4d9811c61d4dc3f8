"""Kernel benchmark driver: every gemmatune kernel vs PyTorch eager, Liger and bitsandbytes.

    python benchmarks/kernels.py

Runs benchmarks/kernels_loss_norm.py (fused linear CE, RMSNorm, GeGLU) and
benchmarks/kernels_rope_nf4.py (QK-norm + RoPE, NF4 dequant, NF4 + LoRA linear) at E2B and
E4B sizes, prints a table and writes benchmarks/results/<date>-h200-kernels.json.
"""
import datetime
import json
import sys
from pathlib import Path

import torch

# The repo root replaces this script's folder on the path: transformers probes `import kernels`,
# which must not find benchmarks/kernels.py.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.versions import package_versions  # noqa: E402

from benchmarks import kernels_loss_norm, kernels_rope_nf4  # noqa: E402


def versions() -> dict:
    return package_versions(("torch", "triton", "transformers", "bitsandbytes", "liger_kernel"))


def main() -> None:
    gpu, command, info = torch.cuda.get_device_name(0), "python " + " ".join(sys.argv), versions()
    records = []

    def record(row: dict) -> None:
        row = dict(row, gpu=gpu, versions=info, command=command)
        records.append(row)
        gbps = f"{row['gbps']:7.0f} GB/s" if row.get("gbps") else " " * 12
        print(f"{row['kernel']:22} {row['impl']:13} {row['shape']:34} {row['dtype']:5} "
              f"{row['median_ms']:9.3f} ms {row['peak_extra_mib']:9.1f} MiB {gbps} rel_err {row['rel_err']:.2e}",
              flush=True)

    for module in (kernels_loss_norm, kernels_rope_nf4):
        try:
            module.run(record)
        except Exception as error:  # one broken benchmark must not lose the others' numbers
            print(f"{module.__name__} failed: {error!r}", flush=True)
    out = Path(__file__).parent / "results" / f"{datetime.date.today().isoformat()}-h200-kernels.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
