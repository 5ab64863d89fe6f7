"""The README demo's fast version: every stage runs on the real MNI152 data and writes its files."""

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from datasets import mni_demo
from datasets.manifest import PreparedDataset
from scripts import demo


def test_demo_sources_hold_out_slabs_far_from_training(tmp_path):
    tissue, denoise, test_cases = mni_demo.write_demo_sources(str(tmp_path))
    held_out = set(Path(test_cases).read_text().split())
    slabs = sorted(os.listdir(os.path.join(tissue, "labelsTr")))
    assert len(slabs) >= 6 and held_out and held_out < {s.split(".")[0] for s in slabs}
    z = {}
    for name in slabs:
        image = nib.load(os.path.join(tissue, "labelsTr", name))
        labels = np.asarray(image.dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2, 3} and labels.shape[2] == mni_demo.SLAB_SLICES
        z[name.split(".")[0]] = image.affine[2, 3]  # world position of the slab's first slice
    train = [v for k, v in z.items() if k not in held_out]
    for case in held_out:  # at least a gap of SLAB_GAP slices (1 mm) to any training slice
        nearest = min(abs(z[case] - t) for t in train)
        assert nearest >= mni_demo.SLAB_SLICES + mni_demo.SLAB_GAP - 1e-6
    noisy = np.asarray(nib.load(os.path.join(denoise, "noisy", slabs[3])).dataobj)
    clean = np.asarray(nib.load(os.path.join(denoise, "clean", slabs[3])).dataobj)
    assert noisy.shape == clean.shape and 0 < np.abs(noisy - clean).mean() < 0.2 * clean.max()


def test_fast_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--fast", "--out", str(out), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"\| tissue mean Dice \| \d\.\d{3} \| \d\.\d{3} \| \d\.\d{3} \| - \|", printed)
    assert re.search(r"\| denoising PSNR \(dB\) \| \d+\.\d\d \| - \| - \| \d+\.\d\d \|", printed)
    assert "copying the context label" in printed and "the noisy input" in printed
    for dataset in ("MNI_tissue", "MNI_denoise"):
        assert PreparedDataset(str(out / "prepared" / dataset)).case_ids("test")
    assert (out / "train" / "checkpoint-last.pth").is_file() and (out / "train" / "log.txt").is_file()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "train"))
    assert (out / "eval" / "results.json").is_file() and (out / "demo.png").is_file()
    assert (out / "summary.md").read_text().startswith("| held-out slabs |")
