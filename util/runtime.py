"""Where and in what precision a run computes: one device default, one precision table, one rule
for `--precision auto`, shared by training, evaluation, prediction and the benches.

    auto   CUDA: bf16 where the GPU has it (no loss scaling needed), else fp16 with a GradScaler;
           CPU: fp32 (bf16 autocast is a choice to make per CPU: bench/README.md)
"""

import contextlib

import torch

from util.cli import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str, device: str) -> str:
    """`--precision` as one of DTYPES' names for `device`; fp16 on a CPU is refused."""
    on_cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        if not on_cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision not in DTYPES:
        raise UsageError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and not on_cuda:
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast to the precision's dtype; fp32 runs without it."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])
