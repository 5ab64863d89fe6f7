"""util/files.py: outputs replace their file whole or not at all, and never land outside their folder."""

import errno
import os
import stat

import pytest

from util import files
from util.cli import UsageError
from util.files import atomic_output, path_below, writable_folder


@pytest.mark.parametrize("parts", [("..", "x"), ("a", "../../x"), ("/tmp/x",), ("",), ("a/../../b",)])
def test_path_below_refuses_parts_that_lead_out(tmp_path, parts):
    with pytest.raises(UsageError):
        path_below(str(tmp_path), *parts)


def test_path_below_refuses_a_link_out_and_accepts_plain_names(tmp_path):
    os.symlink("/tmp", tmp_path / "escape")
    with pytest.raises(UsageError, match="leads outside"):
        path_below(str(tmp_path), "escape", "x.png")
    assert path_below(str(tmp_path), "predictions", "case (1)", "0001.png") == os.path.join(
        str(tmp_path), "predictions", "case (1)", "0001.png"
    )


def test_a_failed_write_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("earlier")

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with (
        pytest.raises(UsageError, match=r"results\.json: cannot write \(the disk is full\)"),
        atomic_output(str(target), "w") as handle,
    ):
        handle.write("new")
    assert target.read_text() == "earlier" and os.listdir(tmp_path) == ["results.json"]
    monkeypatch.undo()
    with atomic_output(str(target), "w") as handle:
        handle.write("new")
    assert target.read_text() == "new"


def test_writable_folder_names_the_flag(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(UsageError, match=f"--output_dir {blocked}: cannot write there"):
        writable_folder(str(blocked), "--output_dir")
    assert writable_folder(str(tmp_path / "new"), "--output_dir") == str(tmp_path / "new")


def test_written_files_get_the_permissions_open_would_give(tmp_path):
    """Owner-only files (mkstemp's default) would hide predictions and tables from a user's group."""
    with atomic_output(str(tmp_path / "table.md"), mode="w") as handle:
        handle.write("| a |\n")
    with open(tmp_path / "plain.md", "w") as handle:
        handle.write("| a |\n")
    mode = stat.S_IMODE(os.stat(tmp_path / "table.md").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.md").st_mode) == 0o666 & ~files.UMASK
