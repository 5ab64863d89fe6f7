"""The training entry point on CPU with a tiny model and tiny data made by the project's prepare tool:
learning, exact resume, multi-process equivalence, non-finite steps, the CLI. Pretrained weights
(--finetune): tests/test_train_finetune.py."""

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import main_pretrain
import pretrain_setup
from engine_pretrain import NonFiniteError, Progress, train_one_epoch
from models_mvg import MVG, create_model
from tests.helpers import REPO, TINY, assert_same_weights, run_training, weights
from util.cli import UsageError
from util.lr_sched import lr_at, set_lr
from util.misc import ShardSampler, _launcher_ranks

# ---------------------------------------------------------------------------------------------------
# command line


SEED_COMMAND = (
    "--batch_size 16 --model mvg_vit_large_patch16 --mask_ratio 0.75 --epochs 100 --warmup_epochs 5 "
    "--lr 1e-3 --weight_decay 0.05 --num_mask_patches 256 --half_mask_ratio 1.0 "
    "--max_mask_patches_per_block 128 --min_mask_patches_per_block 16 --input_size 896 448 "
    "--data_path /data/MVGDataSet/train/ --finetune /ckpt/mae_pretrain_vit_large.pth"
)


# What the seed command sets, as parse_args reports it.
SEED_SETTINGS = {
    "batch_size": 16,
    "model": "mvg_vit_large_patch16",
    "epochs": 100,
    "warmup_epochs": 5,
    "lr": 1e-3,
    "num_mask_patches": 256,
    "half_mask_ratio": 1.0,
    "max_mask_patches_per_block": 128,
    "min_mask_patches_per_block": 16,
    "input_size": [896, 448],
    "data_path": ["/data/MVGDataSet/train/"],
    "finetune": "/ckpt/mae_pretrain_vit_large.pth",
    "layer_decay": 0.8,
}

# Every flag of the authors' main_pretrain.py, with a value where it takes one.
AUTHORS_COMMAND = (
    "--accum_iter 2 --norm_pix_loss --layer_decay 0.75 --blr 1e-3 --min_lr 1e-6 --output_dir o --log_dir l "
    "--device cpu --seed 3 --resume r.pth --seg_only --start_epoch 2 --num_workers 1 --pin_mem --no_pin_mem "
    "--world_size 8 --local_rank 0 --dist_on_itp --dist_url env:// --last_norm_instance"
)


def test_seed_command_parses_and_every_authors_flag_is_accepted():
    args = main_pretrain.parse_args(SEED_COMMAND.split() + ["--device", "cpu"])
    assert {name: getattr(args, name) for name in SEED_SETTINGS} == SEED_SETTINGS
    assert "--mask_ratio 0.75 has no effect" in main_pretrain.inert_flag_notes(args, 8)[0]

    args = main_pretrain.parse_args(SEED_COMMAND.split() + AUTHORS_COMMAND.split())
    assert args.seg_only and not args.pin_mem and args.start_epoch == 2 and args.dist_on_itp
    notes = " ".join(main_pretrain.inert_flag_notes(args, 1))
    for flag in ("--mask_ratio", "--norm_pix_loss", "--last_norm_instance", "--world_size"):
        assert flag in notes
    assert main_pretrain.parse_args(["--local-rank=1"]).local_rank == 1  # torch.distributed.launch's spelling
    # Boolean flags are real switches (the authors' --seg_only type=bool could not be turned off).
    assert not main_pretrain.parse_args(["--seg_only", "--no-seg_only"]).seg_only
    assert main_pretrain.parse_args(["--auto_resume", "--compile", "--grad_checkpointing"]).auto_resume
    with pytest.raises(UsageError, match="--precision fp16 needs a CUDA device"):
        main_pretrain.parse_args(["--device", "cpu", "--precision", "fp16"])
    # --precision auto (the default) trains in fp32 on the CPU, whatever instructions it has.
    defaults = main_pretrain.parse_args(["--device", "cpu"])
    assert defaults.precision == "fp32" and defaults.context_from == "same_case"


def test_seg_only_keeps_the_datasets_whose_target_is_a_label_map(mixed):
    args = main_pretrain.parse_args(["--device", "cpu", "--data_path", mixed, "--seg_only"])
    assert [os.path.basename(entry.path) for entry in pretrain_setup.build_mixture(args).entries] == ["Seg"]


def test_lr_schedule_warmup_cosine_and_layer_scales():
    lrs = [lr_at(step, 1.0, 0.1, warmup_steps=4, total_steps=12) for step in range(13)]
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == 1.0 and all(a > b for a, b in itertools.pairwise(lrs[4:12]))
    assert abs(lrs[8] - 0.55) < 1e-9 and lrs[12] == pytest.approx(0.1)
    model = create_model("mvg_vit_tiny_patch16", input_size=(64, 32), depth=4)
    args = main_pretrain.parse_args(["--device", "cpu", "--layer_decay", "0.5"])
    optimizer = pretrain_setup.build_optimizer(model, args, 1.0, torch.device("cpu"))
    set_lr(optimizer, 0.2)
    assert all(g["lr"] == pytest.approx(0.2 * g["lr_scale"]) for g in optimizer.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    scale, decay = {}, {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            scale[names[id(param)]], decay[names[id(param)]] = group["lr_scale"], group["weight_decay"]
    blocks = [scale[f"blocks.{i}.attn.qkv.weight"] for i in range(4)]
    assert blocks == sorted(blocks) and blocks[0] == pytest.approx(blocks[1] / 2)  # decays towards the input
    assert scale["patch_embed.proj.weight"] < blocks[0] and scale["decoder_embed.weight"] == 1.0
    for name, param in model.named_parameters():
        no_decay = param.ndim <= 1 or name in ("pos_embed", "mask_token", "segment_token_x", "segment_token_y")
        assert (decay[name] == 0) == no_decay, name


def test_shard_sampler_global_batches_do_not_depend_on_the_number_of_ranks():
    per_rank = [list(ShardSampler(6, 30, rank, 3)) for rank in range(3)]
    assert sum(map(len, per_rank)) == 24
    for k in range(4):  # batches of 2 per rank: the k-th global batch is [6 + 6k, 12 + 6k)
        together = sorted(i for shard in per_rank for i in shard[2 * k : 2 * k + 2])
        assert together == list(range(6 + 6 * k, 12 + 6 * k))


def test_ranks_come_from_torchrun_slurm_or_open_mpi(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert _launcher_ranks(False, -1) is None  # plain python: one process
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert _launcher_ranks(False, -1) is None  # a one-task job step
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert _launcher_ranks(False, -1) == (9, 16, 1)
    monkeypatch.setenv("RANK", "3")  # torchrun inside an allocation wins over SLURM's variables
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert _launcher_ranks(False, -1) == (3, 4, 3)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "5")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    assert _launcher_ranks(True, -1) == (5, 8, 1)


# ---------------------------------------------------------------------------------------------------
# the loop


def test_loss_falls_and_the_run_leaves_checkpoints_logs_and_tensorboard(tmp_path, toy):
    out = tmp_path / "run"
    progress = run_training(
        out,
        toy,
        "--label_encoding",
        "binary",
        "--batch_size",
        "4",
        "--samples_per_epoch",
        "40",
        "--epochs",
        "4",
        "--lr",
        "5e-3",
        "--log_dir",
        str(out / "tb"),
        "--vis_every_steps",
        "20",
        "--keep_checkpoints",
        "2",
        "--clip_grad",
        "5.0",
    )
    assert progress.global_step == 40 and progress.skipped_steps == 0
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    first, last = records[0]["train_loss"], records[-1]["train_loss"]
    assert last < 0.6 * first, (first, last)
    assert records[-1]["train_loss_task/segmentation"] == pytest.approx(last, rel=0.05)

    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == [
        "checkpoint-2.pth",
        "checkpoint-3.pth",
        "checkpoint-last.pth",
    ]  # older numbered ones pruned
    state = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert isinstance(state["args"], dict) and state["args"]["lr"] == 5e-3
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (4, 0, 40)
    assert set(state["rng"][0]) == {"torch", "cuda", "numpy", "python"}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {
        "loss",
        "lr",
        "grad_norm",
        "samples_per_s",
        "skipped_steps",
        "loss_task/segmentation",
        "loss_dataset/Toy",
    } <= scalars
    image = events.Images(events.Tags()["images"][0])[-1]
    assert (image.height, image.width) == (4 * 64, 4 * 32)  # 4 samples x (image | masked | pred | target)


def test_resume_mid_epoch_and_after_a_truncated_checkpoint_equals_a_straight_run(tmp_path, mixed, capsys):
    # 6 steps per epoch, 2 epochs; drop path makes the torch RNG matter.
    common = [
        "--batch_size",
        "2",
        "--samples_per_epoch",
        "12",
        "--epochs",
        "2",
        "--drop_path",
        "0.1",
        "--save_every_epochs",
        "1",
    ]
    run_training(tmp_path / "straight", mixed, *common)
    straight = weights(tmp_path / "straight" / "checkpoint-last.pth")

    resumed = tmp_path / "resumed"
    run_training(resumed, mixed, *common, "--stop_after_steps", "3")
    state = torch.load(resumed / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 3, 3)
    assert not list(resumed.glob("checkpoint-0.pth"))
    run_training(resumed, mixed, *common, "--auto_resume")
    assert_same_weights(weights(resumed / "checkpoint-last.pth"), straight)

    # A crash leaves a truncated checkpoint-last.pth (newest): --auto_resume falls back to checkpoint-0.pth.
    crashed = tmp_path / "crashed"
    run_training(crashed, mixed, *common, "--stop_after_steps", "8")
    last = crashed / "checkpoint-last.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (crashed / "checkpoint-last.pth.x1y2.tmp").write_bytes(b"a write cut short by the crash")
    capsys.readouterr()
    run_training(crashed, mixed, *common, "--auto_resume")
    captured = capsys.readouterr()
    assert not list(crashed.glob("*.tmp")) and "removed checkpoint-last.pth.x1y2.tmp" in captured.out
    assert "skipping checkpoint" in captured.err and "checkpoint-last.pth" in captured.err
    assert "resumed from" in captured.out and "checkpoint-0.pth" in captured.out
    assert_same_weights(weights(crashed / "checkpoint-last.pth"), straight)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_and_accumulation_match_one_process_with_the_same_global_batch(tmp_path, mixed):
    # Global batch 4 as 2 processes x 1 x 2 micro-steps (DDP with no_sync), as 1 process x 2 x 2, and
    # as 1 x 4. Tasks whose samples all weigh the same in the loss (MIM masks of 3 tokens, valid = 1):
    # the mean that DDP and accumulation average then equals the mean over the global batch.
    common = [
        *TINY,
        "--data_path",
        mixed,
        "--datasets",
        "Denoise",
        "Synth",
        "Inpaint",
        "--half_mask_ratio",
        "0",
        "--samples_per_epoch",
        "16",
        "--epochs",
        "1",
        "--lr",
        "1e-3",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "main_pretrain.py",
        *common,
        "--batch_size",
        "1",
        "--accum_iter",
        "2",
        "--output_dir",
        str(tmp_path / "ddp"),
        "--auto_resume",
    ]  # a first run: nothing to resume, and the ranks must agree on that
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout

    main_pretrain.main([*common, "--batch_size", "4", "--output_dir", str(tmp_path / "one")])
    main_pretrain.main([*common, "--batch_size", "2", "--accum_iter", "2", "--output_dir", str(tmp_path / "accum")])
    one = weights(tmp_path / "one" / "checkpoint-last.pth")
    torch.manual_seed(0)  # the initial weights, as main builds them
    initial = create_model("mvg_vit_tiny_patch16", input_size=(64, 32), depth=4).state_dict()
    moved = max((one[k] - initial[k]).abs().max().item() for k in one)
    # Gradients summed in another order differ by float rounding, which Adam's normalised update
    # can magnify where gradients are tiny: measured about 1e-5 after these 4 steps, against weights
    # that moved by about 3e-3. The tolerance, 1e-4, is a small fraction of that movement.
    assert moved > 1e-3
    assert_same_weights(weights(tmp_path / "ddp" / "checkpoint-last.pth"), one, atol=1e-4, rtol=0)
    assert_same_weights(weights(tmp_path / "accum" / "checkpoint-last.pth"), one, atol=1e-4, rtol=0)


def nan_forward_on(monkeypatch, calls, value=float("nan")):
    """Makes MVG.forward return a NaN (or `value`) loss on the given (0-based) calls."""
    original = MVG.forward
    count = [0]

    def forward(self, *args, **kwargs):
        loss, *rest = original(self, *args, **kwargs)
        count[0] += 1
        if count[0] - 1 in calls:
            loss = loss * value
        return (loss, *rest)

    monkeypatch.setattr(MVG, "forward", forward)


def test_non_finite_loss_skips_the_step_and_many_in_a_row_stop_the_run(tmp_path, mixed, monkeypatch, capsys):
    nan_forward_on(monkeypatch, calls={2, 5})
    progress = run_training(tmp_path / "a", mixed, "--batch_size", "2", "--samples_per_epoch", "16", "--epochs", "1")
    assert progress.global_step == 8 and progress.skipped_steps == 2
    assert "non-finite loss" in capsys.readouterr().err
    state = torch.load(tmp_path / "a" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert state["skipped_steps"] == 2
    assert all(s["step"] == 6 for s in state["optimizer"]["state"].values())  # 6 real updates
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert json.loads((tmp_path / "a" / "log.txt").read_text())["train_skipped_steps"] == 2

    nan_forward_on(monkeypatch, calls=set(range(1, 100)))
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        run_training(
            tmp_path / "b",
            mixed,
            "--batch_size",
            "2",
            "--samples_per_epoch",
            "16",
            "--epochs",
            "1",
            "--max_nonfinite_steps",
            "3",
        )
    state = torch.load(tmp_path / "b" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert (state["global_step"], state["skipped_steps"]) == (4, 3)
    assert all(s["step"] == 1 for s in state["optimizer"]["state"].values())  # the last good state


def engine_run(toy, scaler, steps=4):
    """`steps` optimizer steps of the engine on the toy data with the given loss scaler; the initial
    and final weights and the progress."""
    args = main_pretrain.parse_args([*TINY, "--data_path", toy, "--batch_size", "2"])
    main_pretrain.resolve_model_settings(args)
    pretrain_setup.seed_everything(0)
    model = pretrain_setup.build_model(args)
    dataset = pretrain_setup.build_dataset(args, pretrain_setup.build_mixture(args), model.patch_size)
    batches = [torch.utils.data.default_collate([dataset[2 * i], dataset[2 * i + 1]]) for i in range(steps)]
    optimizer = pretrain_setup.build_optimizer(model, args, 1e-3, torch.device("cpu"))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    progress = Progress()
    train_one_epoch(model, batches, optimizer, scaler, progress, args, lambda step: 1e-3, dataset.names)
    return initial, model.state_dict(), progress


def test_fp16_loss_scaling_is_exact_and_an_overflow_skips_the_step_and_lowers_the_scale(toy, monkeypatch):
    """The fp16 recipe's GradScaler path, on the CPU: scaling by a power of two and unscaling before
    the norm and the update changes nothing; an overflow (an infinite scaled loss) skips that step,
    leaves the weights alone and halves the scale."""
    initial, plain, _ = engine_run(toy, torch.amp.GradScaler("cpu", enabled=False))
    _, scaled, _ = engine_run(toy, torch.amp.GradScaler("cpu", init_scale=2.0**16))
    assert not torch.equal(plain["patch_embed.proj.weight"], initial["patch_embed.proj.weight"])
    assert_same_weights(scaled, plain)

    nan_forward_on(monkeypatch, calls={0, 1}, value=float("inf"))  # the first step of each run below
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    initial, overflowed, progress = engine_run(toy, scaler, steps=1)
    assert progress.skipped_steps == 1 and scaler.get_scale() == 2.0**15
    assert_same_weights(overflowed, initial)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    initial, recovered, progress = engine_run(toy, scaler, steps=2)
    assert (progress.global_step, progress.skipped_steps, scaler.get_scale()) == (2, 1, 2.0**15)
    assert not torch.equal(recovered["patch_embed.proj.weight"], initial["patch_embed.proj.weight"])


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile on the CPU needs a C compiler"
)
def test_compile_trains_like_eager_and_saves_unprefixed_keys(tmp_path, toy):
    """--compile (inductor, here on the CPU): same weights as eager after a few steps, and the
    checkpoint holds the plain module's keys, loadable without the compile wrapper."""
    common = ("--batch_size", "2", "--samples_per_epoch", "6", "--epochs", "1")
    run_training(tmp_path / "eager", toy, *common)
    run_training(tmp_path / "compiled", toy, *common, "--compile")
    eager, compiled = (
        weights(tmp_path / "eager" / "checkpoint-last.pth"),
        weights(tmp_path / "compiled" / "checkpoint-last.pth"),
    )
    assert not any(key.startswith("_orig_mod") for key in compiled)
    # Fused kernels sum in another order: measured about 5e-7 apart after 8 steps of the 4-block model.
    assert_same_weights(compiled, eager, atol=1e-5, rtol=0)


def test_a_signal_stops_the_run_at_the_next_step_with_a_checkpoint(tmp_path, mixed, monkeypatch):
    original = MVG.forward
    calls = [0]

    def forward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # as `scancel --signal=USR1` would
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MVG, "forward", forward)
    progress = run_training(
        tmp_path, mixed, "--batch_size", "2", "--samples_per_epoch", "16", "--epochs", "1", "--precision", "bf16"
    )  # CPU autocast, on the way
    assert progress.global_step == 2
    state = torch.load(tmp_path / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 2)


def test_wandb_is_optional_with_a_clear_message(tmp_path, mixed, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(UsageError, match="--wandb needs the wandb package"):
        run_training(tmp_path, mixed, "--wandb", "--batch_size", "2", "--samples_per_epoch", "4", "--epochs", "1")
