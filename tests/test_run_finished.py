"""Whether a training run is finished, as its own checkpoint-last.pth records it (util.cli's
run_is_finished and its `finished` command), and how scripts/train_slurm.sh uses that to requeue
only a run that stopped before its end."""

import os
import stat
import subprocess
import sys

import torch

from tests.helpers import REPO, assert_one_error_line, run_module, usage_error
from util import checkpoint
from util.cli import LAST_CHECKPOINT, run_is_finished

# ---------------------------------------------------------------- has a training run finished?


def save_last_checkpoint(output_dir, epoch, step_in_epoch, global_step, **args):
    """checkpoint-last.pth as util.checkpoint.save_training_state writes it, with empty weights."""
    os.makedirs(output_dir, exist_ok=True)
    state = {
        "model": {},
        "optimizer": {},
        "scaler": {},
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_step": global_step,
        "skipped_steps": 0,
        "consecutive_skips": 0,
        "global_batch": 16,
        "world_size": 1,
        "rng": [],
        "args": {"epochs": 100, "stop_after_steps": 0, **args},
    }
    torch.save(state, os.path.join(output_dir, LAST_CHECKPOINT))


def test_a_run_is_finished_when_its_own_record_says_so(tmp_path):
    assert LAST_CHECKPOINT == checkpoint.LAST
    # --epochs 3 through "$@": no checkpoint-99.pth will ever be written, yet the run is done.
    save_last_checkpoint(tmp_path / "done", epoch=3, step_in_epoch=0, global_step=30, epochs=3)
    assert run_is_finished(tmp_path / "done")
    # Stopped by the signal in the middle of the last epoch.
    save_last_checkpoint(tmp_path / "signal", epoch=2, step_in_epoch=4, global_step=24, epochs=3)
    assert not run_is_finished(tmp_path / "signal")
    # At the end of an epoch that is not the last.
    save_last_checkpoint(tmp_path / "epoch_end", epoch=2, step_in_epoch=0, global_step=20, epochs=3)
    assert not run_is_finished(tmp_path / "epoch_end")
    # Asked to stop after 25 steps: a resumed run would stop again at once.
    save_last_checkpoint(tmp_path / "steps", epoch=2, step_in_epoch=5, global_step=25, stop_after_steps=25)
    assert run_is_finished(tmp_path / "steps")


def test_a_run_without_a_readable_record_is_an_error(tmp_path):
    assert usage_error(run_is_finished, tmp_path).startswith(f"{tmp_path / LAST_CHECKPOINT}: not found")
    (tmp_path / LAST_CHECKPOINT).write_bytes(b"torn")
    assert usage_error(run_is_finished, tmp_path).startswith(
        f"{tmp_path / LAST_CHECKPOINT}: cannot be read as a checkpoint"
    )
    torch.save({"model": {}, "epoch": 1, "global_step": 3, "args": {"epochs": "many"}}, tmp_path / LAST_CHECKPOINT)
    assert usage_error(run_is_finished, tmp_path).endswith("records no whole number for epochs")


def test_the_finished_command(tmp_path):
    save_last_checkpoint(tmp_path, epoch=1, step_in_epoch=0, global_step=10, epochs=3)
    result = run_module("util.cli", "finished", tmp_path)
    assert (result.returncode, result.stdout) == (0, "unfinished\n")
    assert_one_error_line(run_module("util.cli", "finished", tmp_path / "nothing"), "not found")


# ---------------------------------------------------------------- scripts/train_slurm.sh


def write_executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_slurm_script(tmp_path, srun_status):
    """scripts/train_slurm.sh with srun and scontrol replaced by stand-ins: srun exits with
    srun_status, scontrol writes what it is asked into requeue.log. (status, requeued)."""
    bin_dir = tmp_path / "bin"
    os.makedirs(bin_dir, exist_ok=True)
    write_executable(bin_dir / "srun", f"#!/bin/sh\nexit {srun_status}\n")
    write_executable(
        bin_dir / "scontrol", '#!/bin/sh\nif [ "$1" = show ]; then echo node1; else echo "$@" >> "$REQUEUE_LOG"; fi\n'
    )
    log = tmp_path / "requeue.log"
    env = dict(
        os.environ,
        PATH=os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]]),
        DATA="prepared",
        OUT=str(tmp_path / "run"),
        SLURM_JOB_ID="7",
        SLURM_JOB_NODELIST="node1",
        SLURM_SUBMIT_DIR=str(REPO),
        REQUEUE_LOG=str(log),
    )
    result = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "train_slurm.sh"), "--epochs", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, log.read_text() if log.exists() else ""


def test_the_slurm_job_requeues_only_an_unfinished_run(tmp_path):
    save_last_checkpoint(tmp_path / "run", epoch=3, step_in_epoch=0, global_step=30, epochs=3)
    assert run_slurm_script(tmp_path, srun_status=0) == (0, "")  # done, though checkpoint-99.pth is absent
    save_last_checkpoint(tmp_path / "run", epoch=2, step_in_epoch=4, global_step=24, epochs=3)
    assert run_slurm_script(tmp_path, srun_status=0) == (0, "requeue 7\n")  # stopped by the signal


def test_the_slurm_job_does_not_requeue_a_failed_run(tmp_path):
    save_last_checkpoint(tmp_path / "run", epoch=2, step_in_epoch=4, global_step=24, epochs=3)
    assert run_slurm_script(tmp_path, srun_status=1) == (1, "")
    os.remove(tmp_path / "run" / LAST_CHECKPOINT)  # nothing recorded: asking again would loop forever
    assert run_slurm_script(tmp_path, srun_status=0) == (2, "")
