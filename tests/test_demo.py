"""The README demo: its sources on the real MNI152 template, and its fast version end to end."""

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from datasets import mni_demo
from datasets.manifest import PreparedDataset
from scripts import demo, demo_report
from util.cli import UsageError


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return mni_demo.write_demo_sources(str(tmp_path_factory.mktemp("sources")))


def load(path):
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def slab_files(sources):
    return sorted(os.listdir(os.path.join(sources.label_sets["tissue"], "labelsTr")))


def test_demo_sources_hold_out_slabs_far_from_training(sources):
    held_out = set(Path(sources.test_cases).read_text().split())
    slabs = slab_files(sources)
    assert len(slabs) >= 6 and held_out and held_out < {s.split(".")[0] for s in slabs}
    z = {}
    for name in slabs:
        labels, affine = load(os.path.join(sources.label_sets["tissue"], "labelsTr", name))
        assert set(np.unique(labels)) <= {0, 1, 2, 3} and labels.shape[2] == mni_demo.SLAB_SLICES
        z[name.split(".")[0]] = affine[2, 3]  # world position of the slab's first slice
    for case in held_out:  # one pose each; every training slab comes in TRAINING_POSES poses
        assert not [name for name in slabs if name.startswith(f"{case}_")]
    assert sum(name.startswith("slab00") for name in slabs) == mni_demo.TRAINING_POSES
    train = [v for k, v in z.items() if k not in held_out]
    for case in held_out:  # at least a gap of SLAB_GAP slices (1 mm) to any training slice
        nearest = min(abs(z[case] - t) for t in train)
        assert nearest >= mni_demo.SLAB_SLICES + mni_demo.SLAB_GAP - 1e-6
    noisy, _ = load(os.path.join(sources.denoise, "noisy", slabs[3]))
    clean, _ = load(os.path.join(sources.denoise, "clean", slabs[3]))
    assert noisy.shape == clean.shape and 0 < np.abs(noisy - clean).mean() < 0.2 * clean.max()


def test_label_sets_share_the_slices_and_their_ids_collide(sources):
    """Same T1 under every label set; id 1 means CSF, brain, left hemisphere and cerebral territory in
    turn, so only the context can say which; the left hemisphere lies towards lower x (RAS), whatever
    the slab's pose."""
    for name in slab_files(sources)[2:5]:
        images = {s: load(os.path.join(folder, "imagesTr", name))[0] for s, folder in sources.label_sets.items()}
        assert all(np.array_equal(images["tissue"], image) for image in images.values())
        labels = {s: load(os.path.join(folder, "labelsTr", name)) for s, folder in sources.label_sets.items()}
        tissue, brain, sides = (labels[s][0] for s in ("tissue", "brain", "hemispheres"))
        assert set(np.unique(brain)) == {0, 1} and set(np.unique(sides)) == {0, 1, 2}
        assert np.array_equal(sides > 0, brain == 1) and np.all(brain[tissue > 0] == 1)
        assert labels["hemispheres"][1][0, 0] > 0  # RAS: x grows to the right
        assert np.argwhere(sides == 1)[:, 0].mean() + 5 < np.argwhere(sides == 2)[:, 0].mean()
        assert (tissue == 1).any() and (tissue == 3).any()
        assert np.array_equal(labels["regions"][0] > 0, brain == 1)


def test_inpainting_sources_remove_a_region_from_every_slice(sources):
    for case in [s.split(".")[0] for s in slab_files(sources)][:4]:
        stem = os.path.join(sources.inpaint, case, case)
        voided, healthy, mask = (load(f"{stem}-{s}.nii.gz")[0] for s in ("t1n-voided", "t1n", "mask"))
        assert mask.reshape(-1, mask.shape[2]).any(axis=0).all()  # something to fill on every slice
        assert np.all(voided[mask > 0] == 0) and np.array_equal(voided[mask == 0], healthy[mask == 0])
        assert healthy[mask > 0].mean() > 20  # the removed disc held brain


def test_slabs_lie_in_poses_of_their_own(sources):
    """Rotated and shifted per slab, image and labels alike: the brain's centre moves between slabs,
    and the label still covers the same T1 it covered on the template."""
    centres = []
    for name in slab_files(sources)[3:7]:
        brain, _ = load(os.path.join(sources.label_sets["brain"], "labelsTr", name))
        image, _ = load(os.path.join(sources.label_sets["brain"], "imagesTr", name))
        centres.append(np.argwhere(brain[:, :, 4]).mean(axis=0))
        assert image[brain == 1].mean() > 5 * max(image[brain == 0].mean(), 1.0)
    spread = np.ptp(np.array(centres), axis=0)
    assert spread.max() > 2.0


def test_regions_are_the_territories_of_real_roi_centres():
    """Each brain voxel takes the group of its nearest Seitzman ROI: the cerebellum's territory lies
    below the cerebrum's, the subcortical one sits between them in the middle of the brain."""
    maps = mni_demo.TemplateMaps()
    regions = mni_demo._regions(maps)
    assert np.array_equal(regions > 0, maps.envelope)
    centres, codes = mni_demo.seitzman_rois()
    assert centres.shape == (300, 3) and np.bincount(codes).tolist() == [1, 115, 123, 4, 2, 16, 12, 27]
    height = {k: np.argwhere(regions == k)[:, 2].mean() for k in (1, 2, 3)}
    assert height[3] + 10 < height[2] < height[1]
    middle = np.argwhere(regions == 2)[:, 0].mean()
    assert abs(middle - regions.shape[0] / 2) < 10
    thalamus = np.round(nib.affines.apply_affine(np.linalg.inv(maps.image.affine), [10, -18, 8])).astype(int)
    assert regions[tuple(thalamus)] == 2


def test_pose_moves_images_and_labels_together():
    labels = np.zeros((41, 41, 2), np.uint8)
    labels[25:30, 18:23] = 1
    pose = mni_demo.Pose(degrees=90.0)
    moved = pose.apply(labels, is_label=True)
    assert moved.sum() == labels.sum() and np.array_equal(moved[:, :, 0], np.rot90(labels[:, :, 0], k=1))
    shifted = mni_demo.Pose(shift=(3.0, -2.0)).apply(labels, is_label=True)
    assert np.array_equal(shifted[28:33, 16:21], labels[25:30, 18:23])
    image = np.random.default_rng(0).random((41, 41, 1)).astype(np.float32)
    assert np.allclose(mni_demo.Pose().apply(image, is_label=False), image)


def test_curve_steps_end_at_the_last_step():
    assert demo.curve_steps(800, 5) == [160, 320, 480, 640, 800]
    assert demo.curve_steps(3, 2) == [2, 3] and demo.curve_steps(1, 5) == [1]


@pytest.mark.parametrize("wanted,trained", [(800, 800), (8209, 8210), (8204, 8200), (3, 10), (0, 10)])
def test_the_demo_trains_the_steps_it_reports(wanted, trained):
    # main_pretrain.py runs whole epochs: the step count the demo logs and evaluates at is what it trains.
    steps = demo.whole_epochs(wanted)
    assert steps == trained and steps % demo.EPOCHS == 0
    args = demo.get_args_parser().parse_args(["--steps", str(wanted)])
    flags = demo.training_arguments(demo.FULL, args, steps, "mix.json", "run")
    epochs = int(flags[flags.index("--epochs") + 1])
    per_epoch = int(flags[flags.index("--samples_per_epoch") + 1]) // demo.FULL["batch_size"]
    assert epochs * per_epoch == steps


def test_a_step_count_below_one_is_refused(tmp_path):
    with pytest.raises(UsageError, match="--steps 0: must be at least 1"):
        demo.main(["--steps", "0", "--out", str(tmp_path / "out")])
    with pytest.raises(UsageError, match="--minutes 0: must be more than 0"):
        demo.main(["--minutes", "0", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_fast_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    image_tasks = ["--image_tasks", *demo.IMAGE_TASKS]
    assert demo.main(["--fast", "--out", str(out), "--workers", "0", *image_tasks, "--specialists"]) == 0
    printed = capsys.readouterr().out
    assert "| MVG (this run) | copy the context label | intensity classifier | one model per label set |" in printed
    for name in mni_demo.LABEL_SETS:
        assert re.search(rf"\| {name} \|( \d\.\d{{3}} \|){{4}}$", printed, re.M)
        assert (out / "specialists" / f"MNI_{name}" / "train" / "checkpoint-last.pth").is_file()
        assert re.search(rf"^\| {name} \|( \**\d\.\d{{3}}\** \|){{{len(mni_demo.LABEL_SETS)}}}$", printed, re.M)
    assert re.search(r"\| \*\*mean over label sets\*\* \|( \*\*\d\.\d{3}\*\* \|){4}", printed)
    assert re.search(r"\| denoising PSNR \(dB\) / SSIM \| \d+\.\d\d / \d\.\d{3} \| noisy input", printed)
    assert re.search(r"\| inpainting PSNR .* \| \d+\.\d\d / \d+\.\d\d \| voided input", printed)
    assert re.search(r"mean Dice: MVG \d\.\d{3} beats", printed)
    unsolvable = [name for name, label_set in mni_demo.LABEL_SETS.items() if not label_set.by_intensity]
    assert unsolvable == ["hemispheres", "regions"]
    for name in unsolvable:
        assert re.search(rf"^{name} \(intensity cannot solve it\): MVG \d\.\d{{3}} beats", printed, re.M)
    for label_set in mni_demo.LABEL_SETS.values():
        assert PreparedDataset(str(out / "prepared" / label_set.dataset)).case_ids("test")
    for dataset in demo.IMAGE_TASKS:
        assert PreparedDataset(str(out / "prepared" / dataset)).case_ids("test")
    assert (out / "train" / "checkpoint-last.pth").is_file() and (out / "train" / "log.txt").is_file()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "train"))
    steps = [json.loads(line)["global_step"] for line in (out / "train" / "log.txt").read_text().splitlines()]
    assert steps[-1] == 3  # trained in stretches, to the same end as one run
    curve = json.loads((out / "curve.json").read_text())
    assert curve["steps"] == [2, 3] and len(curve["MNI_hemispheres"]["MVG"]) == 2
    for picture in ("context_switch.png", "learning_curve.png"):
        assert (out / picture).stat().st_size > 1000
    assert (out / "eval" / "results.json").is_file()
    assert (out / "summary.md").read_text().startswith("| held-out slabs, mean Dice |")


def test_verdicts_name_what_mvg_beats_and_what_it_does_not():
    scores = {"MVG": 0.5, "copy_context": 0.4, "intensity": 0.5}
    assert demo_report.verdict("tissue", scores, demo_report.BASELINES) == (
        "tissue: MVG 0.500 beats copy the context label; does NOT beat intensity classifier"
    )
    table = {"MVG": [0.2, 0.6], "copy_context": [0.3, 0.3], "intensity": [0.9, 0.1]}
    results = {
        (f"MNI_{name}", "foreground"): {
            "dice": table["MVG"][k],
            "baselines": {b: {"dice": table[b][k]} for b in demo_report.BASELINES},
        }
        for k, name in enumerate(("tissue", "hemispheres"))
    }
    lines, verdicts, means = demo_report.label_rows(results, ["MNI_tissue", "MNI_hemispheres"])
    assert means == pytest.approx({"MVG": 0.4, "copy_context": 0.3, "intensity": 0.5})
    assert lines[-1] == "| **mean over label sets** | **0.400** | **0.300** | **0.500** |"
    assert verdicts == [
        "mean Dice: MVG 0.400 beats copy the context label; does NOT beat intensity classifier",
        "hemispheres (intensity cannot solve it): MVG 0.600 beats copy the context label, intensity classifier",
    ]


def test_the_demo_replaces_only_its_own_training_folders(tmp_path):
    run_dir = tmp_path / "train"
    demo.fresh_run_dir(str(run_dir))
    (run_dir / "checkpoint-last.pth").write_bytes(b"an earlier demo's")
    demo.fresh_run_dir(str(run_dir))  # the demo's own: replaced, so training cannot resume from it
    assert sorted(os.listdir(run_dir)) == [demo.RUN_MARKER]
    users = tmp_path / "users" / "train"
    users.mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="was not written by the demo"):
        demo.fresh_run_dir(str(users))
    assert (users / "notes.txt").read_text() == "mine"


def test_a_fixed_step_count_reproduces_the_model_and_the_table(tmp_path):
    """Same seed, same --steps, same machine: the same weights bit for bit, and the same summary
    (only its timing line may differ)."""
    runs = [tmp_path / name for name in ("first", "second")]
    for out in runs:
        assert demo.main(["--fast", "--out", str(out), "--workers", "0", "--seed", "3"]) == 0
    weights = [
        torch.load(out / "train" / "checkpoint-last.pth", map_location="cpu", weights_only=True)["model"]
        for out in runs
    ]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
    summaries = [
        [line for line in (out / "summary.md").read_text().splitlines() if not line.startswith("time:")] for out in runs
    ]
    assert summaries[0] == [line.replace(str(runs[1]), str(runs[0])) for line in summaries[1]]
    assert any(line.startswith("| tissue |") for line in summaries[0])


def test_each_image_task_weighs_as_much_as_all_label_sets(tmp_path):
    datasets = ["MNI_tissue", "MNI_brain", "MNI_hemispheres", "MNI_regions", "MNI_denoise", "MNI_inpaint"]
    path = demo.write_mixture(str(tmp_path / "prepared"), str(tmp_path), datasets)
    weights = {os.path.basename(d["path"]): d["weight"] for d in json.loads(Path(path).read_text())["datasets"]}
    assert weights == {name: 4 if name in demo.IMAGE_TASKS else 1 for name in datasets}
