"""util.checkpoint's writing: atomic files, pruning of numbered checkpoints, and the background writer
that lets training go on while a checkpoint is written."""

import os
import threading

import pytest
import torch

from engine_pretrain import Progress
from tests.helpers import assert_same_weights
from util import checkpoint
from util.cli import UsageError


def test_atomic_save_and_pruning(tmp_path):
    for epoch in range(5):
        checkpoint.atomic_save({"epoch": epoch}, str(tmp_path / f"checkpoint-{epoch}.pth"))
    checkpoint.prune_numbered(str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3.pth", "checkpoint-4.pth"]  # no temp files left
    assert torch.load(tmp_path / "checkpoint-4.pth", weights_only=True) == {"epoch": 4}


def save_in_background(path, model, optimizer, writer, args, **extra):
    """save_training_state of a one-process run at a fresh Progress, through `writer`."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    checkpoint.save_training_state(
        path, model, optimizer, scaler, Progress(), args, global_batch=1, world_size=1, writer=writer, **extra
    )


def test_background_checkpoint_holds_the_state_of_its_step_and_errors_surface(tmp_path, monkeypatch):
    """Training goes on while the file is written: the file must hold the state at the moment of the
    save, not what the weights became meanwhile; and a failed write is not lost in its thread."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    release, original_save = threading.Event(), checkpoint.atomic_save

    def slow_disk(state, path):
        assert release.wait(timeout=30)
        original_save(state, path)

    monkeypatch.setattr(checkpoint, "atomic_save", slow_disk)
    writer = checkpoint.CheckpointWriter()
    path = str(tmp_path / checkpoint.LAST)
    save_in_background(
        path, model, optimizer, writer, {"model": "linear"}, then=lambda: open(tmp_path / "then-ran", "w").close()
    )
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on while the write waits for the disk
    assert not os.path.exists(path)
    release.set()
    writer.wait()
    saved = checkpoint.load_training_state(path)
    assert_same_weights(saved["model"], at_save)
    assert os.path.exists(tmp_path / "then-ran")

    def full_disk(state, path):
        raise OSError(28, "No space left on device")

    def bug(state, path):
        raise ValueError("a bug")

    # A file system error is the user's to fix: one line naming the file; anything else keeps its traceback.
    for failing, error, message in (
        (full_disk, UsageError, f"{path}: cannot write the checkpoint (the disk is full)"),
        (bug, RuntimeError, "writing a checkpoint failed: ValueError: a bug"),
    ):
        monkeypatch.setattr(checkpoint, "atomic_save", failing)
        save_in_background(path, model, optimizer, writer, {})
        with pytest.raises(error) as raised:
            writer.wait()
        assert str(raised.value).startswith(message)
        writer.wait()  # reported once
