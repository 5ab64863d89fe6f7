"""Model speed and memory: a full training step (forward, backward, AdamW) and an inference forward.

Every combination of precision, attention path (fused scaled_dot_product_attention or eager) and
activation checkpointing runs in its own subprocess, so peak memory is that configuration's alone.
Prints a markdown table; --json writes the rows too.

    python bench/bench_model.py --model mvg_vit_base_patch16 --input_size 448 224 --batch_size 2
    python bench/bench_model.py --model mvg_vit_large_patch16 --input_size 896 448 --batch_size 16 \
        --device cuda --precision bf16 fp16 --attention fused eager --checkpointing off on
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models_mvg import MODELS, create_model  # noqa: E402

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# Dense bf16/fp16 tensor-core peaks (TFLOP/s) for model FLOP utilisation; --peak_tflops overrides.
PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'A5000': 111.0, 'L40S': 362.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='mvg_vit_base_patch16', choices=sorted(MODELS))
    p.add_argument('--input_size', type=int, nargs=2, default=(448, 224), metavar=('H', 'W'))
    p.add_argument('--batch_size', type=int, default=2)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--precision', nargs='+', default=['fp32', 'bf16'], choices=sorted(DTYPES))
    p.add_argument('--attention', nargs='+', default=['fused', 'eager'], choices=['fused', 'eager'])
    p.add_argument('--checkpointing', nargs='+', default=['off', 'on'], choices=['off', 'on'])
    p.add_argument('--warmup', type=int, default=2, help='untimed steps before timing')
    p.add_argument('--steps', type=int, default=5, help='timed steps; the median is reported')
    p.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')
    p.add_argument('--peak_tflops', type=float, default=0.0, help='accelerator peak for MFU (0: by name)')
    p.add_argument('--json', default='', help='also write the rows to this file')
    p.add_argument('--one', default='', help=argparse.SUPPRESS)  # internal: one configuration
    return p.parse_args(argv)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def median_seconds(fn, device, warmup, steps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_flops(model, imgs, tgts, mask):
    """FLOPs of one forward as counted by torch's FlopCounterMode (matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(imgs, tgts, mask)
    return counter.get_total_flops()


def run_one(args, precision, attention, checkpointing):
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model, input_size=args.input_size).to(device)
    model.set_fused_attn(attention == 'fused')
    model.set_grad_checkpointing(checkpointing == 'on')
    n = args.batch_size
    imgs = torch.randn(n, 3, *args.input_size, device=device)
    tgts = torch.randn(n, 3, *args.input_size, device=device)
    mask = model.ar_mask(n, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == 'cuda')
    scaler = torch.amp.GradScaler(device.type, enabled=precision == 'fp16')
    autocast = dict(device_type=device.type, dtype=DTYPES[precision], enabled=precision != 'fp32')

    def train_step():
        with torch.autocast(**autocast):
            loss, _, _ = model(imgs, tgts, mask)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def forward():
        with torch.no_grad(), torch.autocast(**autocast):
            model.predict(imgs, tgts)

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    train_s = median_seconds(train_step, device, args.warmup, args.steps)
    train_peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None
    model.eval()
    forward_s = median_seconds(forward, device, args.warmup, args.steps)
    if device.type == 'cuda':
        peak = train_peak
    else:  # peak resident memory of this process (KiB on Linux), weights and imports included
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.autocast(**autocast):
        flops = forward_flops(model, imgs, tgts, mask)
    return dict(model=args.model, input_size=list(args.input_size), batch_size=n, device=device_name(device),
                precision=precision, attention=attention, checkpointing=checkpointing,
                train_step_s=train_s, forward_s=forward_s, train_samples_per_s=n / train_s,
                forward_samples_per_s=n / forward_s, peak_memory_bytes=peak,
                forward_flops_per_sample=flops / n)


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'cpu x{torch.get_num_threads()} threads'


def peak_tflops(args, device_label):
    if args.peak_tflops:
        return args.peak_tflops
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_label), 0.0)


def format_table(rows, args):
    header = ('| precision | attention | act. ckpt | train step (s) | train samples/s | forward (s) | '
              'forward samples/s | peak memory (GiB) | train TFLOP/s | MFU |')
    lines = [header, '|' + '---|' * 10]
    for r in rows:
        # Training costs about three forwards (forward, and backward at twice the forward).
        train_tflops = 3 * r['forward_flops_per_sample'] * r['train_samples_per_s'] / 1e12
        peak = peak_tflops(args, r['device'])
        mfu = f'{100 * train_tflops / peak:.1f}%' if peak and r['precision'] != 'fp32' else '-'
        lines.append(
            f"| {r['precision']} | {r['attention']} | {r['checkpointing']} | {r['train_step_s']:.3f} | "
            f"{r['train_samples_per_s']:.2f} | {r['forward_s']:.3f} | {r['forward_samples_per_s']:.2f} | "
            f"{r['peak_memory_bytes'] / 2 ** 30:.2f} | {train_tflops:.2f} | {mfu} |")
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        precision, attention, checkpointing = args.one.split(',')
        print(json.dumps(run_one(args, precision, attention, checkpointing)))
        return
    if 'fp16' in args.precision and not args.device.startswith('cuda'):
        sys.exit('--precision fp16 needs --device cuda (CPU autocast supports bf16 only)')
    base = list(argv if argv is not None else sys.argv[1:])
    rows = []
    for precision in args.precision:
        for attention in args.attention:
            for checkpointing in args.checkpointing:
                config = f'{precision},{attention},{checkpointing}'
                cmd = [sys.executable, __file__, *base, '--one', config]
                done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
                if done.returncode:
                    sys.exit(f'configuration {config} failed:\n{done.stderr[-3000:]}')
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f'done: {config}', file=sys.stderr, flush=True)
    first = rows[0]
    print(f"{first['model']}, input {first['input_size'][0]}x{first['input_size'][1]}, batch {first['batch_size']}, "
          f"{first['device']}, forward {first['forward_flops_per_sample'] / 1e9:.1f} GFLOP/sample, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(format_table(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == '__main__':
    main()
