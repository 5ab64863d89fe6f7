"""Model speed and memory: a full training step (forward, backward, AdamW) and an inference forward.

Each precision and activation-checkpointing setting runs in its own subprocess, in which the
attention paths (rel_pos_attention.ATTENTION_PATHS) take turns step by step (A B C A B C ...), so
that a slow spell of a shared machine hits them all alike; medians are reported. Peak memory is the
accelerator's peak per path, or on a CPU the peak resident memory of a separate one-step process per
path (weights and imports included). Prints a markdown table; --json writes the rows too.

    python -m bench.bench_model --model mvg_vit_base_patch16 --input_size 448 224 --batch_size 2
    python -m bench.bench_model --model mvg_vit_large_patch16 --input_size 896 448 --batch_size 8 \
        --device cuda --precision bf16 --attention fused eager augmented flex --checkpointing off
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from models_mvg import MODELS, create_model
from rel_pos_attention import ATTENTION_PATHS, choose_attention
from util.cli import ArgumentParser, UsageError, log, run_main, warn
from util.runtime import DTYPES, PRECISIONS, autocast, default_device, resolve_precision

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) for model FLOP utilisation; --peak_tflops overrides.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A5000": 111.0, "L40S": 362.0}


def parse_args(argv=None):
    """The arguments, each --precision resolved for --device (util.runtime.resolve_precision)."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mvg_vit_base_patch16", choices=sorted(MODELS))
    p.add_argument("--input_size", type=int, nargs=2, default=(448, 224), metavar=("H", "W"))
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--device", default=default_device(), help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument(
        "--precision",
        nargs="+",
        default=["fp32", "bf16"],
        choices=PRECISIONS,
        help="autocast precisions, timed in turn (auto: as training resolves it for the device)",
    )
    p.add_argument(
        "--attention",
        nargs="+",
        default=["fused", "eager", "augmented"],
        choices=ATTENTION_PATHS,
        help="attention paths, timed in turns ('flex' on a CPU: forward only, no CPU backward)",
    )
    p.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per path before timing")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path; the median is reported")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="accelerator peak for MFU (0: by name)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's forward (warm-up compiles)")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, profile one training step of the first path and print its N costliest ops "
        "(device time on an accelerator), with the step's host and device totals (0: off)",
    )
    p.add_argument("--json", default="", help="also write the rows to this file")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: precision,checkpointing
    p.add_argument("--memory_of", default="", help=argparse.SUPPRESS)  # internal: one path's memory
    args = p.parse_args(argv)
    args.precision = list(dict.fromkeys(resolve_precision(precision, args.device) for precision in args.precision))
    return args


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trains_on(device, attention):
    """PyTorch has no FlexAttention backward on the CPU."""
    return not (attention == "flex" and device.type == "cpu")


def forward_flops(model, imgs, tgts, mask):
    """FLOPs of one forward as torch's FlopCounterMode counts them (matmuls, convs, attention), on
    the eager path: the model's work, the same for every path, so MFU compares like with like."""
    from torch.utils.flop_counter import FlopCounterMode

    attention = model.attention
    model.set_attention("eager")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(imgs, tgts, mask)
    model.set_attention(attention)
    return counter.get_total_flops()


class Bench:
    """One model, batch and optimizer; a training step and a forward on any attention path."""

    def __init__(self, args, precision, checkpointing):
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        self.model = create_model(args.model, input_size=args.input_size).to(self.device)
        self.model.set_grad_checkpointing(checkpointing == "on")
        if args.compile:
            self.model.compile()
        n = args.batch_size
        self.imgs = torch.randn(n, 3, *args.input_size, device=self.device)
        self.tgts = torch.randn(n, 3, *args.input_size, device=self.device)
        self.mask = self.model.ar_mask(n, device=self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.precision = precision

    def train_step(self, attention):
        self.model.set_attention(attention)
        self.model.train()
        with autocast(self.device, self.precision):
            loss, _, _ = self.model(self.imgs, self.tgts, self.mask)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def forward(self, attention):
        self.model.set_attention(attention)
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.precision):
            self.model.predict(self.imgs, self.tgts)

    def timed(self, step, attention):
        """(seconds, accelerator peak bytes or None) of one call."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        step(attention)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return seconds, peak

    def warms_up(self, step, attention, warmup):
        """Runs the warm-up steps; False, with the error reported, where the path fails (say, a
        kernel that does not compile on this device), so that the other paths still get timed."""
        try:
            for _ in range(warmup):
                step(attention)
        except Exception as error:
            warn(f"attention {attention}: {step.__name__} failed in the warm-up, left out: {error!r}")
            self.optimizer.zero_grad(set_to_none=True)
            return False
        return True

    def alternate(self, step, attentions, warmup, steps):
        """Per path that runs: (every step's seconds, highest accelerator peak), the paths in turns."""
        attentions = [a for a in attentions if self.warms_up(step, a, warmup)]
        seconds = {a: [] for a in attentions}
        peaks = {a: [] for a in attentions}
        for _ in range(steps):
            for attention in attentions:
                s, peak = self.timed(step, attention)
                seconds[attention].append(s)
                peaks[attention].append(peak or 0)
        return {a: (seconds[a], max(peaks[a])) for a in attentions}


def run_one(args, precision, checkpointing):
    """Rows for every attention path at one precision and checkpointing setting."""
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args, precision, checkpointing)
    trainable = [a for a in args.attention if trains_on(bench.device, a)]
    train = bench.alternate(bench.train_step, trainable, args.warmup, args.steps)
    forward = bench.alternate(bench.forward, args.attention, args.warmup, args.steps)
    if args.profile and train:
        profile_train_step(bench, next(iter(train)), args.profile)
    with autocast(bench.device, precision):
        flops = forward_flops(bench.model, bench.imgs, bench.tgts, bench.mask)
    n = args.batch_size
    rows = []
    for attention, (forward_times, _) in forward.items():
        train_times, train_peak = train.get(attention, (None, None))
        train_s = statistics.median(train_times) if train_times else None
        forward_s = statistics.median(forward_times)
        rows.append(
            dict(
                model=args.model,
                input_size=list(args.input_size),
                batch_size=n,
                device=device_name(bench.device),
                precision=precision,
                attention=attention,
                resolved=resolved_label(bench.device, precision, attention, math.prod(bench.model.grid_size))
                + (" +compile" if args.compile else ""),
                checkpointing=checkpointing,
                train_step_s=train_s,
                forward_s=forward_s,
                forward_samples_per_s=n / forward_s,
                train_samples_per_s=n / train_s if train_s else None,
                train_step_times_s=train_times,
                forward_times_s=forward_times,
                peak_memory_bytes=train_peak if bench.device.type == "cuda" else None,
                forward_flops_per_sample=flops / n,
            )
        )
    return rows


def profile_train_step(bench, attention, top):
    """Prints (to stderr, the JSON result stays alone on stdout) where one training step's time goes:
    the costliest ops, and the host's wall time against the device's busy time. A device busy for much
    less than the wall time waits on the host (kernel launches, Python), not on arithmetic."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    synchronize(bench.device)
    start = time.perf_counter()
    with profile(activities=activities) as profiler:
        bench.train_step(attention)
        synchronize(bench.device)
    wall = time.perf_counter() - start
    averages = profiler.key_averages()
    sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    print(f"profile of one training step, attention {attention}:", file=sys.stderr)
    print(averages.table(sort_by=sort_by, row_limit=top), file=sys.stderr)
    if on_cuda:
        busy = sum(event.self_device_time_total for event in averages) / 1e6
        kernels = sum(event.count for event in averages if event.self_device_time_total > 0)
        print(f"step wall {wall:.3f} s (profiled), device busy {busy:.3f} s, {kernels} device ops", file=sys.stderr)


def peak_resident_bytes(args, precision, attention, checkpointing, step):
    """Peak resident memory of this process after one training step, or one forward for a path that
    was not trained: weights, imports and that step's activations (KiB on Linux)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args, precision, checkpointing)
    getattr(bench, step)(attention)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resolved_label(device, precision, attention, tokens):
    if attention != "auto":
        return attention
    dtype = DTYPES[precision]
    train, forward = (choose_attention(device.type, dtype, needs_grad, tokens) for needs_grad in (True, False))
    return f"auto: {train}" if train == forward else f"auto: {train} / {forward}"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()} threads"


def peak_tflops(args, device_label):
    if args.peak_tflops:
        return args.peak_tflops
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_label), 0.0)


def number(value, spec):
    return "-" if value is None else format(value, spec)


def format_table(rows, args):
    header = (
        "| precision | attention | act. ckpt | train step (s) | train samples/s | forward (s) | "
        "forward samples/s | peak memory (GiB) | train TFLOP/s | MFU |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        train_tflops = mfu = None
        if r["train_step_s"] is not None:
            # Training costs about three forwards (forward, and backward at twice the forward).
            train_tflops = 3 * r["forward_flops_per_sample"] * r["train_samples_per_s"] / 1e12
            peak = peak_tflops(args, r["device"])
            mfu = train_tflops / peak if peak and r["precision"] != "fp32" else None
        cells = (
            r["precision"],
            r["resolved"],
            r["checkpointing"],
            number(r["train_step_s"], ".3f"),
            number(r["train_samples_per_s"], ".2f"),
            f"{r['forward_s']:.3f}",
            f"{r['forward_samples_per_s']:.2f}",
            f"{r['peak_memory_bytes'] / 2**30:.2f}",
            number(train_tflops, ".2f"),
            number(mfu, ".1%"),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def subprocess_result(base, flag, config):
    """The JSON line a child process of this bench prints for `flag config` (--one or --memory_of)."""
    cmd = [sys.executable, "-m", __spec__.name, *base, flag, config]
    # stderr passes through: warnings and paths left out are shown as they happen.
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    if done.returncode:
        raise UsageError(f"{flag} {config} failed (exit status {done.returncode}; its error is above)")
    log(f"done: {flag} {config}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        log(json.dumps(run_one(args, *args.one.split(","))))
        return
    if args.memory_of:
        log(json.dumps(peak_resident_bytes(args, *args.memory_of.split(","))))
        return
    base = list(argv if argv is not None else sys.argv[1:])
    rows = []
    for precision in args.precision:
        for checkpointing in args.checkpointing:
            group = subprocess_result(base, "--one", f"{precision},{checkpointing}")
            for row in group:
                if row["peak_memory_bytes"] is None:  # a CPU: one process per path
                    step = "forward" if row["train_step_s"] is None else "train_step"
                    config = f"{precision},{row['attention']},{checkpointing},{step}"
                    row["peak_memory_bytes"] = subprocess_result(base, "--memory_of", config)
            rows += group
    if not rows:
        raise UsageError("no attention path ran (the reasons are above)")
    first = rows[0]
    log(
        f"{first['model']}, input {first['input_size'][0]}x{first['input_size'][1]}, batch {first['batch_size']}, "
        f"{first['device']}, forward {first['forward_flops_per_sample'] / 1e9:.1f} GFLOP/sample, "
        f"median of {args.steps} steps per path after {args.warmup} warm-up, paths in turns"
    )
    log(format_table(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(run_main(main))
