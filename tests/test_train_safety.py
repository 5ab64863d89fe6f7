"""Training meets bad input, full disks, kills and Ctrl-C: one `error:` line instead of a traceback,
no checkpoint overwritten that could not be read, no step lost to a Ctrl-C, no data-loading process
outliving its trainer, and one log.txt line per epoch across resumes."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

import main_pretrain
from models_mvg import create_model
from tests.helpers import REPO, TINY, assert_same_weights, weights
from util import checkpoint
from util.cli import UsageError, run_main
from util.misc import EpochTotals, process_alive

# 4 steps per epoch.
SHORT = ["--batch_size", "2", "--samples_per_epoch", "8"]


def train(out, data, *extra):
    return main_pretrain.main([*TINY, "--data_path", data, "--output_dir", str(out), *SHORT, *extra])


def error_line(capsys, out, data, *extra) -> str:
    """The one line a run with bad input prints (status 2, no traceback, nothing else on stderr)."""
    capsys.readouterr()
    status = run_main(main_pretrain.main, [*TINY, "--data_path", data, "--output_dir", str(out), *SHORT, *extra])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err[len("error: ") :].strip()


def folder_contents(folder) -> dict:
    """{name: (bytes, modification time)}, to show that a run changed nothing."""
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(folder.iterdir())}


def cut_short(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def run_with_a_cut_short_last_checkpoint(tmp_path, toy, capsys, steps: int) -> bytes:
    """Trains `steps` steps, cuts checkpoint-last.pth short; returns its damaged bytes."""
    train(tmp_path, toy, "--epochs", "2", "--stop_after_steps", str(steps))
    last = tmp_path / checkpoint.LAST
    cut_short(last)
    capsys.readouterr()
    return last.read_bytes()


# ---------------------------------------------------------------------------------------------------
# checkpoints that do not load


def test_auto_resume_falls_back_to_a_readable_checkpoint_and_keeps_the_unreadable_one(tmp_path, toy, capsys):
    damaged = run_with_a_cut_short_last_checkpoint(tmp_path, toy, capsys, steps=6)
    last = tmp_path / checkpoint.LAST
    train(tmp_path, toy, "--epochs", "2", "--auto_resume")
    captured = capsys.readouterr()
    assert "resumed from" in captured.out and "checkpoint-0.pth" in captured.out
    kept = list(tmp_path.glob("checkpoint-last.pth.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged
    assert f"kept as {kept[0]}" in captured.err
    assert torch.load(last, weights_only=True)["global_step"] == 8  # the run went on to its end


def read_error_on(monkeypatch, name):
    """Reading `name` fails as a flaky network file system would."""
    original = checkpoint.load_weights_only

    def flaky(path, *args, **kwargs):
        if os.path.basename(path) == name:
            raise OSError(errno.EIO, "Input/output error")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_weights_only", flaky)


@pytest.mark.parametrize("problem", ["cut short", "read error"])
def test_auto_resume_stops_and_changes_nothing_when_no_checkpoint_loads(problem, tmp_path, toy, capsys, monkeypatch):
    train(tmp_path, toy, "--epochs", "2", "--stop_after_steps", "2")  # only checkpoint-last.pth, mid-epoch
    last = tmp_path / checkpoint.LAST
    if problem == "cut short":
        cut_short(last)
        why = "not a whole PyTorch file: cut short, or another kind of file"
    else:
        read_error_on(monkeypatch, checkpoint.LAST)
        why = "Input/output error"
    before = folder_contents(tmp_path)
    message = error_line(capsys, tmp_path, toy, "--epochs", "2", "--auto_resume")
    assert message == (
        f"--auto_resume: {last}: not a readable checkpoint ({why}), and no checkpoint in {tmp_path} "
        "loads; nothing was changed: rerun if the file system had a passing problem, or pass "
        "--start_over_if_unreadable to train from step 0 (the unreadable files are kept, renamed)"
    )
    assert folder_contents(tmp_path) == before


def test_start_over_if_unreadable_trains_from_step_0_and_keeps_the_file(tmp_path, toy, capsys):
    damaged = run_with_a_cut_short_last_checkpoint(tmp_path, toy, capsys, steps=2)
    progress = train(tmp_path, toy, "--epochs", "1", "--auto_resume", "--start_over_if_unreadable")
    err = capsys.readouterr().err
    assert progress.global_step == 4 and "training from step 0" in err
    kept = list(tmp_path.glob("checkpoint-last.pth.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged and f"kept as {kept[0]}" in err


def fake_training_checkpoint(path, input_size=(64, 32)):
    """A training checkpoint of the 4-block tiny model (its other contents do not matter)."""
    model = create_model("mvg_vit_tiny_patch16", input_size=input_size, depth=4)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": {},
            "epoch": 0,
            "step_in_epoch": 1,
            "global_step": 1,
            "args": {"model": "mvg_vit_tiny_patch16", "depth": 4, "input_size": list(input_size)},
        },
        path,
    )


def test_resume_of_a_file_that_is_not_a_checkpoint_of_this_model_is_one_line(tmp_path, toy, capsys):
    random_bytes, truncated, foreign, other_size = (tmp_path / name for name in ("r.pth", "t.pth", "f.pth", "o.pth"))
    random_bytes.write_bytes(os.urandom(4096))
    fake_training_checkpoint(truncated)
    cut_short(truncated)
    torch.save({"model": {}}, foreign)
    fake_training_checkpoint(other_size, input_size=(64, 64))
    out = tmp_path / "out"
    unreadable = "not a readable checkpoint (not a whole PyTorch file: cut short, or another kind of file)"
    assert error_line(capsys, out, toy, "--resume", str(random_bytes)) == f"--resume {random_bytes}: {unreadable}"
    assert error_line(capsys, out, toy, "--resume", str(truncated)) == f"--resume {truncated}: {unreadable}"
    assert error_line(capsys, out, toy, "--resume", str(foreign)) == (
        f"--resume {foreign}: not a training checkpoint of this project "
        "(no optimizer, epoch, step_in_epoch, global_step, args)"
    )
    message = error_line(capsys, out, toy, "--resume", str(other_size), "--depth", "8")
    assert re.fullmatch(
        rf"--resume {re.escape(str(other_size))} does not fit the model: \d+ misshapen, \d+ missing weights, e\.g\. "
        r"\S+ \(\[[\d, ]+\] in the file, \[[\d, ]+\] in the model\); it records --model mvg_vit_tiny_patch16 "
        r"--depth 4 --input_size 64 64; resume with the same settings",
        message,
    ), message


def test_finetune_from_weights_that_do_not_fit_is_one_line_with_the_keys_on_stdout(tmp_path, toy, capsys):
    torch.save(create_model("mvg_vit_tiny_patch16", input_size=(64, 32), depth=4).state_dict(), tmp_path / "w.pth")
    capsys.readouterr()
    status = run_main(
        main_pretrain.main,
        [
            *TINY,
            "--data_path",
            toy,
            "--output_dir",
            str(tmp_path / "out"),
            *SHORT,
            "--finetune",
            str(tmp_path / "w.pth"),
            "--depth",
            "8",
        ],
    )
    captured = capsys.readouterr()
    assert status == 2 and captured.err.count("\n") == 1, captured.err
    assert re.fullmatch(
        rf"error: --finetune {re.escape(str(tmp_path / 'w.pth'))} does not fit the model: (\d+) missing weights, "
        r"e\.g\. blocks\.4\.\S+ \(missing from the checkpoint\) \(all \1 listed on stdout\); pass "
        r"--allow_key_mismatch to keep those parameters initialised\n",
        captured.err,
    ), captured.err
    assert "blocks.7.attn.qkv.weight: missing from the checkpoint" in captured.out


# ---------------------------------------------------------------------------------------------------
# stopping and killing


def start_training(out, data, *extra, program=("main_pretrain.py",)):
    """A tiny training of 1000 steps in its own process group (as a shell job is), printing every step."""
    command = [
        sys.executable,
        *program,
        *TINY,
        "--data_path",
        data,
        "--output_dir",
        str(out),
        "--batch_size",
        "2",
        "--samples_per_epoch",
        "2000",
        "--epochs",
        "1",
        "--print_freq",
        "1",
        *extra,
    ]
    return subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        start_new_session=True,
    )


def wait_for_the_first_step(process):
    for line in process.stdout:
        if line.startswith("Epoch [0]"):
            return
    raise AssertionError(f"the training ended before its first step: {process.communicate()[1][-3000:]}")


def test_ctrl_c_stops_at_the_next_step_with_a_checkpoint(tmp_path, toy):
    process = start_training(tmp_path, toy, "--num_workers", "2")
    wait_for_the_first_step(process)
    os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the trainer and its workers
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0 and "Traceback" not in err, err
    assert "Ctrl-C: stopping after this step" in err
    step = int(re.search(r"stopping after step (\d+) \(signal\)", out).group(1))
    state = torch.load(tmp_path / checkpoint.LAST, map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, step, step)


def children(pid) -> list:
    pids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listing:
            pids += [int(child) for child in listing.read().split()]
    return pids


# main_pretrain.py whose samples take a minute each: its workers are always in the middle of one, where
# PyTorch's own check for a dead trainer does not look.
SLOW_SAMPLES = """import sys, time
from datasets.canvas import InContextDataset
read = InContextDataset.__getitem__
InContextDataset.__getitem__ = lambda self, index: time.sleep(60) or read(self, index)
import main_pretrain
from util.cli import run_main
sys.exit(run_main(main_pretrain.main, sys.argv[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_data_loading_workers_end_with_a_killed_trainer(tmp_path, toy):
    process = start_training(tmp_path, toy, "--num_workers", "2", program=("-c", SLOW_SAMPLES))
    workers = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            workers = children(process.pid)
        assert len(workers) == 2, process.communicate()[1][-3000:]
        time.sleep(0.5)  # into their first sample
        process.kill()
        process.communicate(timeout=60)
        deadline = time.monotonic() + 2
        while any(map(process_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(process_alive, workers))
    finally:
        process.kill()
        for pid in filter(process_alive, workers):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------
# log.txt


def log_records(out) -> list:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def test_an_epoch_trained_again_has_one_line_in_the_log(tmp_path, toy):
    """A kill after an epoch's line was written but before its checkpoint was: the epoch is trained again
    from the checkpoint before, and its line is replaced, not repeated."""
    common = ("--epochs", "2", "--save_every_epochs", "1")
    train(tmp_path / "straight", toy, *common)
    out = tmp_path / "killed"
    train(out, toy, *common)
    (out / "checkpoint-1.pth").unlink()
    shutil.copy2(out / "checkpoint-0.pth", out / checkpoint.LAST)  # where epoch 1 started
    os.utime(out / checkpoint.LAST)
    train(out, toy, *common, "--auto_resume")
    records = log_records(out)
    assert [record["epoch"] for record in records] == [0, 1]
    assert records[1]["train_loss"] == log_records(tmp_path / "straight")[1]["train_loss"]
    assert_same_weights(weights(out / checkpoint.LAST), weights(tmp_path / "straight" / checkpoint.LAST))


def test_a_resumed_epoch_has_its_averages_over_all_its_steps(tmp_path, toy):
    train(tmp_path / "straight", toy, "--epochs", "1")
    out = tmp_path / "resumed"
    train(out, toy, "--epochs", "1", "--stop_after_steps", "3")
    train(out, toy, "--epochs", "1", "--auto_resume")
    (straight,) = log_records(tmp_path / "straight")
    (resumed,) = log_records(out)
    assert resumed["train_steps"] == straight["train_steps"] == 4
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-12)
    assert resumed["train_grad_norm"] == pytest.approx(straight["train_grad_norm"], rel=1e-12)


def test_epoch_totals_combine_parts_by_their_steps_and_load_weights_only(tmp_path):
    first = {
        "loss": 2.0,
        "grad_norm": 1.0,
        "samples_per_s": 10.0,
        "loss_task/segmentation": float("nan"),
        "lr": 0.1,
        "skipped_steps": 1,
        "steps": 3,
        "stop": True,
    }
    second = {
        "loss": 1.0,
        "grad_norm": 4.0,
        "samples_per_s": 30.0,
        "loss_task/segmentation": 0.5,
        "lr": 0.2,
        "skipped_steps": 0,
        "steps": 1,
        "stop": False,
    }
    alone = (EpochTotals() + EpochTotals.of_stats(second)).stats(second)
    assert alone == second  # bit for bit: a run without a resume logs what the engine measured
    saved = EpochTotals.of_stats(first).as_dict()
    torch.save({"epoch_totals": saved}, tmp_path / "c.pth")
    restored = EpochTotals.from_dict(torch.load(tmp_path / "c.pth", weights_only=True)["epoch_totals"])
    assert (restored + EpochTotals.of_stats(second)).stats(second) == {
        "loss": 1.75,
        "grad_norm": 1.75,
        "samples_per_s": 15.0,
        "loss_task/segmentation": 0.5,  # NaN left out
        "lr": 0.2,
        "skipped_steps": 1,
        "steps": 4,
        "stop": False,
    }
    assert EpochTotals.from_dict(None).as_dict() == {"steps": 0, "skipped_steps": 0, "means": {}}  # older checkpoints


# ---------------------------------------------------------------------------------------------------
# the output folder, the disk and the data


def refuse_to_build(monkeypatch):
    def build_model(args):
        raise AssertionError("the model was built before the output folder was checked")

    monkeypatch.setattr(main_pretrain, "build_model", build_model)


def test_an_output_dir_that_cannot_be_written_is_one_line_before_the_model_is_built(tmp_path, toy, capsys, monkeypatch):
    refuse_to_build(monkeypatch)
    (tmp_path / "a-file").write_text("")
    below_a_file = tmp_path / "a-file" / "out"
    assert error_line(capsys, below_a_file, toy) == f"--output_dir {below_a_file}: cannot write there (Not a directory)"

    read_only = tmp_path / "read-only"
    original = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # root writes into read-only folders: simulate the mount's answer
        if dir == str(read_only):
            raise OSError(errno.EROFS, "Read-only file system")
        return original(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert (
        error_line(capsys, read_only, toy)
        == f"--output_dir {read_only}: cannot write there (no permission to write there (read-only folder?))"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a folder without write permission")
def test_a_folder_without_write_permission_is_one_line(tmp_path, toy, capsys, monkeypatch):
    refuse_to_build(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert (
        error_line(capsys, locked, toy)
        == f"--output_dir {locked}: cannot write there (no permission to write there (read-only folder?))"
    )


def test_a_full_disk_during_a_checkpoint_write_is_one_line_after_the_writer_finished(
    tmp_path, toy, capsys, monkeypatch
):
    def full_disk(state, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_save", full_disk)
    assert error_line(capsys, tmp_path, toy, "--epochs", "1") == (
        f"{tmp_path / checkpoint.LAST}: cannot write the checkpoint (the disk is full); training stopped: make "
        "room or fix the folder, then continue with --auto_resume"
    )
    assert not [thread for thread in threading.enumerate() if thread.name == "checkpoint-writer"]


def test_a_damaged_slice_read_by_a_worker_is_one_line(tmp_path, toy, capsys):
    damaged = tmp_path / "prepared"
    shutil.copytree(toy, damaged)
    for png in damaged.rglob("*.png"):
        png.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    message = error_line(capsys, tmp_path / "out", str(damaged), "--epochs", "1", "--num_workers", "2")
    # The wording is datasets.manifest.read_png's: the file, then what to run.
    assert re.fullmatch(rf"{re.escape(str(damaged))}/\S+\.png: .* verify .*", message), message


def test_zero_epochs_are_refused():
    with pytest.raises(UsageError, match=r"^--epochs 0: nothing to train; give at least 1$"):
        main_pretrain.parse_args(["--device", "cpu", "--epochs", "0"])
