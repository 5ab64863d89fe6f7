"""Per-step learning rate: linear warm-up, then half a cosine down to min_lr.

A pure function of the global step, so a resumed run needs no scheduler state: the step counter in
the checkpoint is enough.
"""

import math


def lr_at(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        # (step + 1): the first update already moves the weights instead of running at lr 0.
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float):
    """Sets every group's lr to lr x its lr_scale (the layer-wise decay factor)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
