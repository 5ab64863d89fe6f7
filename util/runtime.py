"""Where and in what precision a run computes: one device default, one precision table, one rule
for `--precision auto`, shared by training, evaluation, prediction and the benches.

    auto   CUDA: bf16 where the GPU has it (no loss scaling needed), else fp16 with a GradScaler;
           CPU: fp32 for training; for inference (evaluation, prediction, the app) bf16 where the
           CPU computes it natively (AVX512-BF16 or AMX), else fp32. On such a CPU bf16 ran ViT-B
           inference 1.57x faster, and the demo's Dice moved by at most 0.001 (bench/README.md);
           without those instructions bf16 is emulated and slower.
"""

import contextlib

import torch

from util.cli import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX tiles), as PyTorch detects them."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)


def resolve_precision(precision: str, device: str, inference: bool = False) -> str:
    """`--precision` as one of DTYPES' names for `device` and the job (training unless `inference`);
    fp16 on a CPU is refused."""
    on_cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        if not on_cuda:
            return "bf16" if inference and cpu_has_native_bf16() else "fp32"
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
