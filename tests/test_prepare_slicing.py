"""The one volume-to-slices path (datasets/slicing.py): predict.py sees a volume as exactly the PNGs
datasets.prepare writes from it, and predicted slices go back onto the volume's own grid unchanged."""

import nibabel as nib
import numpy as np
import pytest

import predict
from datasets import geometry, slicing
from datasets.intensity import IntensitySettings
from datasets.manifest import read_png
from tasks import TASKS
from tests.helpers import common, dataset_at, labelled_volume, run, save_nifti, write_msd

SIZE = 16


def oblique_inferior_left_anterior():
    """Voxel axes i, j, k towards inferior, left and anterior, turned 7 degrees about the vertical: the
    reorientation flips and permutes every axis and has to pick the nearest ones."""
    axes = np.array([[0, -1.2, 0], [0, 0, 0.9], [-2.5, 0, 0]])
    angle = np.deg2rad(7)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ axes
    affine[:3, 3] = [12.0, -30.0, 45.0]
    return affine


def source_volumes(seed=0):
    """A CT-like image (with NaN and infinite voxels), its labels (an id above 255 included) and a
    normal-dose twin, stored (6, 11, 9): axial slices of the RAS volume are 9 x 11, not square."""
    image, label = labelled_volume(shape=(6, 11, 9), seed=seed)
    label[1:4, 2:6, 3:7] = 1
    label[3:6, 5:9, 1:4] = 300
    image = (image - 100.0) * 4.0 + 80.0 * (label > 0)
    normal_dose = image * 0.7 + 10.0
    image[0, 0, :] = np.nan
    image[5, 10, 2] = np.inf
    return image, label, normal_dose


def prepared_and_predict_settings(tmp_path, layout, modality, axis):
    """Prepares one case with every slice kept; returns (its record, its dataset, the image and target
    paths, and predict.py's slice settings for the same flags)."""
    image, label, normal_dose = source_volumes()
    affine = oblique_inferior_left_anterior()
    src = tmp_path / "src"
    if layout == "msd":
        write_msd(src, {"v": (image, label, affine)})
        paths = (src / "imagesTr" / "v.nii.gz", src / "labelsTr" / "v.nii.gz")
        layout_flags = ["msd", "--root", src]
    else:
        paths = (
            save_nifti(src / "v" / "low.nii.gz", image, affine),
            save_nifti(src / "v" / "full.nii.gz", normal_dose, affine),
        )
        layout_flags = ["denoising", "--root", src, "--low_dose", "*/low.nii.gz", "--normal_dose", "*/full.nii.gz"]
    assert (
        run(
            *layout_flags,
            *common(tmp_path / "out", "D", SIZE),
            "--modality",
            modality,
            "--axis",
            axis,
            "--test_fraction",
            1,
        )
        == 0
    )
    dataset = dataset_at(tmp_path / "out", "D")
    args = predict.get_args_parser().parse_args(
        [
            "--checkpoint",
            "unused.pth",
            "--context_image",
            str(paths[0]),
            "--context_label",
            str(paths[1]),
            "--query",
            str(paths[0]),
            "--output",
            str(tmp_path / "pred.nii.gz"),
            "--modality",
            modality,
            "--axis",
            axis,
            "--slice_size",
            str(SIZE),
        ]
    )
    return dataset.case("v"), dataset, [str(p) for p in paths], predict.slice_settings(args)


def assert_same_picture(predicted, prepared_path):
    prepared = read_png(prepared_path)
    assert predicted.dtype == prepared.dtype and predicted.shape == prepared.shape
    assert np.array_equal(predicted, prepared), prepared_path


@pytest.mark.parametrize(
    "layout, task, modality, axis",
    [
        ("msd", "segmentation", "CT", "axial"),
        ("msd", "segmentation", "MRI", "coronal"),
        ("denoising", "denoising", "CT", "axial"),
    ],
)
def test_predict_sees_a_volume_as_the_pngs_prepare_writes(tmp_path, layout, task, modality, axis):
    record, dataset, (image, target), settings = prepared_and_predict_settings(tmp_path, layout, modality, axis)
    task = TASKS[task]
    assert record["slices"] == list(range(record["num_slices"]))
    assert record["non_finite_voxels"]["image"] == 10
    query = predict.read_query(image, settings)
    assert query.num_slices == record["num_slices"]
    for index in record["slices"]:
        assert_same_picture(query.picture("image", index), dataset.slice_path("image", "v", index))

    pairs = predict.volume_contexts(image, target, ("indices", record["foreground_slices"]), task, settings)
    for index, pair in zip(record["foreground_slices"], pairs):
        assert_same_picture(pair.image, dataset.slice_path("image", "v", index))
        assert_same_picture(pair.target, dataset.slice_path(task.target_folder, "v", index))
    if task.target_is_label:
        assert pairs[0].target.dtype == np.uint16  # id 300


@pytest.mark.parametrize("fit", ["stretch", "pad"])
def test_prepared_slices_go_back_onto_the_original_grid(tmp_path, fit):
    affine = np.diag([-0.8, 1.0, 2.5, 1.0])
    image, label = labelled_volume(shape=(10, 7, 5), ids_on_slices={1: 2, 3: 1})
    write_msd(tmp_path / "src", {"r": (image, label, affine)})
    assert (
        run("msd", "--root", tmp_path / "src", *common(tmp_path / "out", "R", 32), "--modality", "MRI", "--fit", fit)
        == 0
    )
    dataset = dataset_at(tmp_path / "out", "R")
    record = dataset.case("r")
    assert record["resize"]["fit"] == fit and record["resize"]["slice_shape"] == [7, 10]
    assert np.allclose(record["original"]["affine"], affine) and record["original"]["axcodes"] == "LAS"
    pictures = {i: read_png(dataset.slice_path("label", "r", i)) for i in record["slices"]}
    restored = slicing.SliceGrid.from_record(record).put_back(pictures, is_label=True)
    assert restored.shape == label.shape
    assert np.array_equal(restored, label)


@pytest.mark.parametrize("fit", ["stretch", "pad"])
def test_a_volume_read_into_slices_and_put_back_is_unchanged(tmp_path, fit):
    """Every slice of a label volume on an oblique, non-RAS grid, stored with a trailing size-1 axis,
    through the plan (enlarging, so nearest neighbour loses nothing) and back."""
    image, label, _ = source_volumes()
    affine = oblique_inferior_left_anterior()
    paths = (
        save_nifti(tmp_path / "image.nii.gz", image[..., None], affine),
        save_nifti(tmp_path / "label.nii.gz", label[..., None], affine),
    )
    settings = slicing.SliceSettings(
        axis=geometry.AXES["axial"], size=32, fit=fit, intensity=IntensitySettings("window")
    )
    pair = slicing.read_pair(*map(str, paths), TASKS["segmentation"], settings, ("image", "label"))
    assert pair.grid.plan.fit == fit and pair.grid.plan.slice_shape == (9, 11)
    restored = pair.grid.put_back(dict(enumerate(pair.pictures("label"))), is_label=True)
    assert restored.shape == label.shape + (1,) and np.array_equal(restored[..., 0], label)
    assert np.array_equal(pair.grid.original_affine, nib.load(paths[1]).affine)

    images = pair.grid.put_back(dict(enumerate(pair.pictures("image"))), is_label=False)
    assert images.shape == image.shape + (1,) and images.dtype == np.float32


def test_a_plan_is_recorded_as_the_dict_older_readers_know():
    plan = geometry.fit_plan(7, 10, 32, "pad")
    recorded = plan.to_json()
    assert recorded == {
        "fit": "pad",
        "slice_shape": [7, 10],
        "padding": [1, 2, 0, 0],
        "resized_from": [10, 10],
        "size": [32, 32],
    }
    assert list(recorded) == ["fit", "slice_shape", "padding", "resized_from", "size"]
    assert geometry.ResizePlan.from_json(recorded) == plan


def test_four_dimensional_volumes_take_a_channel_and_labels_stay_3d(tmp_path):
    image, _label = labelled_volume(shape=(6, 5, 4), ids_on_slices={1: 1})
    four = save_nifti(tmp_path / "four.nii.gz", np.stack([image, image * 2], axis=-1))
    settings = slicing.SliceSettings(axis=2, size=0, intensity=IntensitySettings("minmax"))
    with pytest.raises(slicing.InputError, match=r"q: image is 4D \(6, 5, 4, 2\); choose .* --channel \(0..1\)"):
        slicing.read_image(str(four), settings, "q")
    second = slicing.read_image(
        str(four), slicing.SliceSettings(axis=2, size=0, channel=1, intensity=IntensitySettings("minmax")), "q"
    )
    assert second.grid.written_shape == (6, 5, 4)
    assert np.array_equal(
        second.picture("image", 1),
        slicing.read_image(str(save_nifti(tmp_path / "second.nii.gz", image * 2)), settings, "q").picture("image", 1),
    )
    with pytest.raises(slicing.InputError, match="label volume is 4D"):
        slicing.effective_shape((6, 5, 4, 2), "label", 0, "l")


def test_label_types_follow_the_largest_id():
    assert [slicing.label_dtype(n) for n in (0, 255, 256, 65535, 65536)] == [
        np.uint8,
        np.uint8,
        np.uint16,
        np.uint16,
        np.int32,
    ]
    with pytest.raises(slicing.InputError, match="non-integer"):
        slicing.label_ids(np.array([0.5, 1.0]), "l")
