"""Kernel benchmark driver: every gemmatune kernel vs PyTorch eager, Liger and bitsandbytes.

    python -m benchmarks.kernel_suite

Runs benchmarks/kernels_loss_norm.py (fused linear CE, RMSNorm, GeGLU) and
benchmarks/kernels_rope_nf4.py (QK-norm + RoPE, NF4 dequant, NF4 + LoRA linear) at E2B and
E4B sizes, prints a table and writes benchmarks/results/<date>-<gpu>-kernels.json.
"""
import json

import torch

from benchmarks import kernels_loss_norm, kernels_rope_nf4
from benchmarks.records import command_line, package_versions, results_file


def versions() -> dict:
    return package_versions(("torch", "triton", "transformers", "bitsandbytes", "liger_kernel"))


def main() -> None:
    gpu, command, info = torch.cuda.get_device_name(0), command_line(), versions()
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
    out = results_file("kernels")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
