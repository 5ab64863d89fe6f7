"""datasets.prepare through the optional readers: MetaImage (PROMISE12), HDF5 (LA), DICOM series."""

import os
import sys

import numpy as np
import pytest

from datasets import readers
from tests.helpers import common, dataset_at, labelled_volume, run, write_dicom_series

# ---------------------------------------------------------------- optional readers


def write_metaimage(path, data, spacing, origin, direction, element_type="MET_SHORT"):
    """An .mhd header and .raw file by hand (axis 0 fastest, as MetaIO stores it)."""
    raw_name = os.path.basename(path).replace(".mhd", ".raw")
    header = [
        "ObjectType = Image",
        "NDims = 3",
        "BinaryData = True",
        "BinaryDataByteOrderMSB = False",
        "CompressedData = False",
        f"TransformMatrix = {' '.join(str(v) for v in np.asarray(direction).T.ravel())}",
        f"Offset = {' '.join(str(v) for v in origin)}",
        f"ElementSpacing = {' '.join(str(v) for v in spacing)}",
        f"DimSize = {' '.join(str(v) for v in data.shape)}",
        f"ElementType = {element_type}",
        f"ElementDataFile = {raw_name}",
    ]
    with open(path, "w") as handle:
        handle.write("\n".join(header) + "\n")
    np.ascontiguousarray(data.transpose(2, 1, 0)).tofile(os.path.join(os.path.dirname(path), raw_name))


def test_metaimage_reader_and_promise12_layout(tmp_path):
    direction = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    image, label = labelled_volume(ids_on_slices={1: 1, 3: 1})
    write_metaimage(str(tmp_path / "Case00.mhd"), image.astype(np.int16), (0.6, 0.7, 3.0), (5, -6, 7), direction)
    write_metaimage(
        str(tmp_path / "Case00_segmentation.mhd"),
        label.astype(np.uint8),
        (0.6, 0.7, 3.0),
        (5, -6, 7),
        direction,
        "MET_UCHAR",
    )
    data, affine = readers.read_volume(readers.Source(str(tmp_path / "Case00.mhd")))
    assert np.array_equal(data, image.astype(np.int16))
    expected = np.eye(4)
    expected[:3, :3] = direction * np.array([0.6, 0.7, 3.0])
    expected[:3, 3] = (5, -6, 7)
    assert np.allclose(affine, readers.LPS_TO_RAS @ expected)
    assert (
        run(
            "glob",
            "--root",
            tmp_path,
            "--images",
            "Case??.mhd",
            "--labels",
            "Case??_segmentation.mhd",
            "--modality",
            "MRI",
            *common(tmp_path / "out", "PROMISE12"),
        )
        == 0
    )
    assert dataset_at(tmp_path / "out", "PROMISE12").case("00")["original"]["axcodes"] == "PLS"


def test_metaimage_reader_agrees_with_simpleitk(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    image = sitk.GetImageFromArray(data.transpose(2, 1, 0))
    image.SetSpacing((0.5, 0.75, 2.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    theta = np.deg2rad(20)
    image.SetDirection(
        tuple(np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]).ravel())
    )
    for name, compress in (("plain.mhd", False), ("packed.mha", True)):
        sitk.WriteImage(image, str(tmp_path / name), useCompression=compress)
        read, affine = readers.read_volume(readers.Source(str(tmp_path / name)))
        assert np.array_equal(read, data)
        world_lps = image.TransformIndexToPhysicalPoint((3, 1, 2))
        world_ras = affine @ np.array([3, 1, 2, 1.0])
        assert np.allclose(world_ras[:3], np.array(world_lps) * [-1, -1, 1])


def test_hdf5_left_atrium_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    for case_id in ("case_a", "case_b"):
        image, label = labelled_volume(ids_on_slices={2: 1, 3: 1})
        os.makedirs(tmp_path / case_id)
        with h5py.File(tmp_path / case_id / "mri_norm2.h5", "w") as handle:
            handle["image"], handle["label"] = image, label.astype(np.uint8)
    assert (
        run(
            "glob",
            "--root",
            tmp_path,
            "--images",
            "*/mri_norm2.h5",
            "--labels",
            "*/mri_norm2.h5",
            "--modality",
            "MRI",
            *common(tmp_path / "out", "LA"),
        )
        == 0
    )
    dataset = dataset_at(tmp_path / "out", "LA")
    assert dataset.case_ids() == ["case_a", "case_b"] and dataset.case("case_a")["slices"] == [2, 3]
    assert dataset.case("case_a")["sources"]["label"].endswith("mri_norm2.h5[label]")
    with pytest.raises(readers.InputError, match="no dataset 'seg'"):
        readers.read_header(readers.Source(str(tmp_path / "case_a" / "mri_norm2.h5"), "seg"))


def test_dicom_series_denoising(tmp_path):
    rng = np.random.default_rng(1)
    normal = np.full((6, 7, 3), -1000.0)
    normal[1:5, 1:6, :] = 40.0
    for case_id in ("L001", "L002"):
        write_dicom_series(tmp_path / case_id / "full", normal)
        (tmp_path / case_id / "full" / "notes.txt").write_text("not a DICOM file")
        write_dicom_series(tmp_path / case_id / "quarter", np.rint(normal + rng.normal(0, 20, normal.shape)))
    data, affine = readers.read_volume(readers.Source(str(tmp_path / "L001" / "full")))
    assert np.array_equal(data, normal)
    assert np.allclose(affine, [[-0.8, 0, 0, 10], [0, -0.7, 0, 20], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    assert (
        run(
            "denoising",
            "--root",
            tmp_path,
            "--low_dose",
            "*/quarter",
            "--normal_dose",
            "*/full",
            *common(tmp_path / "out", "LDCT", 8),
        )
        == 0
    )
    record = dataset_at(tmp_path / "out", "LDCT").case("L001")
    assert record["original"]["axcodes"] == "LPS" and record["slices"] == [0, 1, 2]


def test_missing_optional_package_is_named(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "series")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(readers.MissingExtraError, match="pip install SimpleITK"):  # series read through SimpleITK
        readers.read_header(readers.Source(str(tmp_path / "series")))
    (tmp_path / "x.dcm").write_bytes(b"")
    with pytest.raises(readers.MissingExtraError, match="pip install pydicom"):  # single files through pydicom
        readers.read_header(readers.Source(str(tmp_path / "x.dcm")))
    (tmp_path / "x.h5").write_bytes(b"")
    with pytest.raises(readers.MissingExtraError, match="pip install h5py"):
        readers.read_header(readers.Source(str(tmp_path / "x.h5"), "image"))
