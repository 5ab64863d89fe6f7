"""datasets/readers.py: MetaImage, NRRD and DICOM series through SimpleITK, in the module's convention
(arrays indexed i, j, k[, t]; 4x4 voxel-to-RAS affine, as nibabel gives for NIfTI)."""

import os
import sys

import nibabel as nib
import numpy as np
import pytest

from datasets import readers
from tests.helpers import real_dicom

sitk = pytest.importorskip("SimpleITK")

# In LPS, axis 0 runs along -y (anterior), axis 1 along +x (left), axis 2 along -z (inferior): a
# permutation and two flips.
DIRECTION = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
SPACING = (0.6, 0.8, 2.5)
ORIGIN = (12.0, -34.0, 56.0)


def ijk_array(shape=(5, 4, 3), dtype=np.int16):
    """Distinct values, so that any transposed or flipped axis shows."""
    return np.arange(np.prod(shape), dtype=dtype).reshape(shape) * 3 - 20


def itk_image(data, components=False):
    """An ITK image holding `data` (indexed i, j, k[, component]) with a non-trivial geometry."""
    ndim = data.ndim - (1 if components else 0)
    order = tuple(reversed(range(ndim))) + ((ndim,) if components else ())
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(order)), isVector=components)
    image.SetSpacing(SPACING[:ndim])
    image.SetOrigin(ORIGIN[:ndim])
    image.SetDirection(tuple(DIRECTION[:ndim, :ndim].ravel()))
    return image


def nifti_twin(image, path):
    """What nibabel reads from the same image written as NIfTI by SimpleITK."""
    sitk.WriteImage(image, str(path))
    twin = nib.load(str(path))
    return np.asarray(twin.dataobj), twin.affine


@pytest.mark.parametrize("name", ["volume.mhd", "volume.mha", "volume.nrrd", "volume.nhdr"])
def test_itk_files_read_like_their_nifti_twin(tmp_path, name):
    data = ijk_array()
    image = itk_image(data)
    sitk.WriteImage(image, str(tmp_path / name))
    expected, expected_affine = nifti_twin(image, tmp_path / "twin.nii.gz")
    assert np.array_equal(expected, data)  # the twin itself is indexed i, j, k

    read, affine = readers.read_volume(readers.Source(str(tmp_path / name)))
    assert read.dtype == np.int16 and np.array_equal(read, expected)
    np.testing.assert_allclose(affine, expected_affine, atol=1e-6)
    assert nib.aff2axcodes(affine) == ("A", "L", "I")
    shape, header_affine = readers.read_header(readers.Source(str(tmp_path / name)))
    assert shape == read.shape and np.array_equal(header_affine, affine)


def test_itk_world_points_are_lps_negated(tmp_path):
    image = itk_image(ijk_array())
    sitk.WriteImage(image, str(tmp_path / "v.nrrd"))
    _, affine = readers.read_volume(readers.Source(str(tmp_path / "v.nrrd")))
    for index in [(0, 0, 0), (4, 1, 2), (2, 3, 1)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose((affine @ [*index, 1.0])[:3], lps * [-1, -1, 1], atol=1e-9)


@pytest.mark.parametrize("name", ["colour.mha", "colour.nrrd"])
def test_vector_images_keep_their_components_last(tmp_path, name):
    data = np.stack([ijk_array(), -ijk_array(), ijk_array() // 2], axis=-1)
    sitk.WriteImage(itk_image(data, components=True), str(tmp_path / name))
    read, _ = readers.read_volume(readers.Source(str(tmp_path / name)))
    assert read.shape == (5, 4, 3, 3) and np.array_equal(read, data)
    assert readers.read_header(readers.Source(str(tmp_path / name)))[0] == read.shape


def test_4d_nrrd_keeps_time_last_like_nifti(tmp_path):
    data = ijk_array((4, 3, 2, 5)).astype(np.float32)
    image = sitk.GetImageFromArray(data.transpose(3, 2, 1, 0), isVector=False)
    image.SetSpacing((*SPACING, 1.5))
    image.SetOrigin((*ORIGIN, 0.0))
    direction = np.eye(4)
    direction[:3, :3] = DIRECTION
    image.SetDirection(tuple(direction.ravel()))
    sitk.WriteImage(image, str(tmp_path / "series.nrrd"))
    expected, expected_affine = nifti_twin(image, tmp_path / "twin.nii")
    read, affine = readers.read_volume(readers.Source(str(tmp_path / "series.nrrd")))
    assert read.shape == (4, 3, 2, 5) and np.array_equal(read, expected)
    np.testing.assert_allclose(affine, expected_affine, atol=1e-6)


def test_2d_metaimage_stays_2d(tmp_path):
    data = ijk_array((6, 4))
    sitk.WriteImage(itk_image(data), str(tmp_path / "plane.mha"))
    read, affine = readers.read_volume(readers.Source(str(tmp_path / "plane.mha")))
    assert np.array_equal(read, data)
    expected = np.eye(4)
    expected[:2, :2] = DIRECTION[:2, :2] * SPACING[:2]
    expected[:2, 3] = ORIGIN[:2]
    np.testing.assert_allclose(affine, readers.LPS_TO_RAS @ expected)


def test_nrrd_is_a_readable_extension():
    assert {".nrrd", ".nhdr", ".mhd", ".mha", ".nii.gz", ".h5", ".png", ".dcm"} <= set(readers.VOLUME_FILE_EXTENSIONS)
    assert readers.volume_format("/data/seg.seg.NRRD") == "nrrd"
    with pytest.raises(readers.InputError, match=r"x\.vtk: unknown volume format .*\.nrrd"):
        readers.volume_format("x.vtk")


# ---------------------------------------------------------------- DICOM series

ROW_COSINE, COLUMN_COSINE = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])  # coronal slices
FIRST_POSITION = np.array([-40.0, 25.0, 60.0])  # at 25 mm along the slice normal, +y
PIXEL_SPACING = (0.9, 0.7)  # (between rows, between columns), as DICOM lists them


def write_slices(folder, slices, series_uid=None, photometric="MONOCHROME2", seed=0, prefix="IM"):
    """One CT file per (offset along the normal, stored rows x columns array) pair, named in a
    shuffled order, so that only positions can sort them."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder, exist_ok=True)
    series_uid = series_uid or generate_uid()
    normal = np.cross(ROW_COSINE, COLUMN_COSINE)
    names = np.random.default_rng(seed).permutation(len(slices))
    for (offset, stored, slope), name in zip(slices, names, strict=True):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.Modality, ds.Rows, ds.Columns = "CT", stored.shape[0], stored.shape[1]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.ImageOrientationPatient = [*ROW_COSINE, *COLUMN_COSINE]
        ds.ImagePositionPatient = [float(v) for v in FIRST_POSITION + offset * normal]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, -1024
        ds.PixelData = np.ascontiguousarray(stored.astype(np.uint16)).tobytes()
        ds.save_as(os.path.join(folder, f"{prefix}{name:04d}"), enforce_file_format=True)


def stored_slices(count, rows=5, columns=6, seed=1):
    return [np.random.default_rng(seed + k).integers(0, 4000, size=(rows, columns)) for k in range(count)]


def at_offsets(offsets):
    """Slices at these offsets along the normal, unscaled."""
    return [(offset, stored, 1) for offset, stored in zip(offsets, stored_slices(len(offsets)), strict=True)]


def test_dicom_series_sorted_by_position_and_placed_in_ras(tmp_path):
    offsets = [0.0, 3.0, 6.0, 9.0]
    stored = stored_slices(len(offsets))
    slopes = [1, 2, 1, 0.5]  # each slice's own rescale counts
    write_slices(tmp_path / "series", list(zip(offsets, stored, slopes, strict=True)))
    (tmp_path / "series" / "notes.txt").write_text("not a slice")
    data, affine = readers.read_volume(readers.Source(str(tmp_path / "series")))
    assert data.shape == (6, 5, 4) and data.dtype == np.float32
    for k in range(4):  # voxel (i, j) is column i, row j of the k-th slice along the normal
        assert np.array_equal(data[:, :, k], (stored[k] * slopes[k] - 1024).T)

    # DICOM: point(row r, column c) = position + c * column spacing * row cosine + r * row spacing * column cosine.
    normal = np.cross(ROW_COSINE, COLUMN_COSINE)
    for i, j, k in [(0, 0, 0), (5, 0, 0), (0, 4, 0), (2, 3, 3)]:
        lps = (
            FIRST_POSITION
            + offsets[k] * normal
            + i * PIXEL_SPACING[1] * ROW_COSINE
            + j * PIXEL_SPACING[0] * COLUMN_COSINE
        )
        np.testing.assert_allclose((affine @ [i, j, k, 1.0])[:3], lps * [-1, -1, 1], atol=1e-9)
    assert readers.read_header(readers.Source(str(tmp_path / "series"))) == ((6, 5, 4), pytest.approx(affine))


def test_dicom_series_geometry_agrees_with_simpleitk(tmp_path):
    write_slices(tmp_path / "s", [(2.5 * k, a, 1) for k, a in enumerate(stored_slices(3))])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    image = reader.Execute()
    data, affine = readers.read_volume(readers.Source(str(tmp_path / "s")))
    for index in [(0, 0, 0), (5, 4, 2), (1, 2, 1)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose((affine @ [*index, 1.0])[:3], lps * [-1, -1, 1], atol=1e-6)
        assert data[index] == image[index]


def test_monochrome1_series_comes_back_bright_is_high(tmp_path):
    stored = stored_slices(2)
    write_slices(tmp_path / "m1", [(0.0, stored[0], 1), (2.0, stored[1], 1)], photometric="MONOCHROME1")
    data, _ = readers.read_volume(readers.Source(str(tmp_path / "m1")))
    sums = data + np.stack([s.T - 1024 for s in stored], axis=2)
    assert np.ptp(sums) == 0, "inverted: stored plus read is the same everywhere"


def refusal(path, header_only=True):
    """The one-line InputError that reading `path` raises."""
    reader = readers.read_header if header_only else readers.read_volume
    with pytest.raises(readers.InputError) as caught:
        reader(readers.Source(str(path)))
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    return message


def test_dicom_series_with_a_duplicate_position_is_refused(tmp_path):
    stored = stored_slices(4)
    write_slices(tmp_path / "dup", [(0.0, stored[0], 1), (2.0, stored[1], 1), (2.0, stored[2], 1), (4.0, stored[3], 1)])
    assert "two slices at the same position (27 mm along the slice normal)" in refusal(tmp_path / "dup")


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    write_slices(tmp_path / "gap", at_offsets([0.0, 2.5, 5.0, 10.0, 12.5]))
    message = refusal(tmp_path / "gap", header_only=False)
    assert "missing slice between" in message and "(30 mm) and" in message and "(35 mm) along" in message
    assert "a step of 5 mm where the others are 2.5 mm" in message


def test_dicom_series_with_uneven_steps_is_refused(tmp_path):
    write_slices(tmp_path / "uneven", at_offsets([0.0, 2.5, 5.0, 6.5, 9.0]))
    assert "uneven slice spacing: steps from 1.5 to 2.5 mm" in refusal(tmp_path / "uneven")


def test_dicom_series_within_the_position_tolerance_is_read(tmp_path):
    write_slices(tmp_path / "rounded", at_offsets([0.0, 2.51, 4.99, 7.5]))  # positions rounded off
    _, affine = readers.read_header(readers.Source(str(tmp_path / "rounded")))
    assert np.isclose(np.linalg.norm(affine[:3, 2]), 2.5)


def test_folder_with_two_series_is_refused_naming_both(tmp_path):
    write_slices(tmp_path / "two", at_offsets([0.0, 2.0]), series_uid="1.2.3.4")
    write_slices(tmp_path / "two", at_offsets([0.0, 2.0]), series_uid="1.2.3.5", prefix="B")
    message = refusal(tmp_path / "two")
    assert "holds 2 DICOM series (SeriesInstanceUID 1.2.3.4, 1.2.3.5); which one is meant?" in message


def test_folder_without_dicom_files_is_refused(tmp_path):
    os.makedirs(tmp_path / "empty")
    assert "no DICOM files found" in refusal(tmp_path / "empty")
    (tmp_path / "empty" / "readme.txt").write_text("scans to follow")
    assert "no DICOM files found" in refusal(tmp_path / "empty")


def test_missing_simpleitk_is_named_with_the_file(tmp_path, monkeypatch):
    sitk.WriteImage(itk_image(ijk_array()), str(tmp_path / "v.nrrd"))
    sitk.WriteImage(itk_image(ijk_array()), str(tmp_path / "v.mhd"))
    os.makedirs(tmp_path / "series")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    for path in (tmp_path / "v.nrrd", tmp_path / "v.mhd", tmp_path / "series"):
        with pytest.raises(readers.MissingExtraError, match="pip install SimpleITK") as caught:
            readers.read_header(readers.Source(str(path)))
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_broken_metaimage_error_is_one_line(tmp_path):
    (tmp_path / "broken.mhd").write_text(
        "NDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nElementDataFile = gone.raw\n"
    )
    assert readers.read_header(readers.Source(str(tmp_path / "broken.mhd")))[0] == (2, 2, 2)
    assert "cannot read" in refusal(tmp_path / "broken.mhd", header_only=False)


# ---------------------------------------------------------------- real scans (pydicom-data)


def test_real_mr_slice_reads_the_same_as_a_series_and_as_a_file(tmp_path):
    path = real_dicom("MR2_UNCR.dcm")
    os.makedirs(tmp_path / "mr")
    os.symlink(path, tmp_path / "mr" / "slice.dcm")
    as_series, series_affine = readers.read_volume(readers.Source(str(tmp_path / "mr")))
    as_file, file_affine = readers.read_volume(readers.Source(path))
    assert as_series.shape == as_file.shape == (1024, 1024, 1)
    np.testing.assert_allclose(as_series, as_file, rtol=1e-6)
    np.testing.assert_allclose(series_affine, file_affine)


def test_real_multiframe_and_radiograph_are_refused_as_series(tmp_path):
    os.makedirs(tmp_path / "mf")
    os.symlink(real_dicom("emri_small.dcm"), tmp_path / "mf" / "frames.dcm")
    assert "multi-frame DICOM" in refusal(tmp_path / "mf")
    os.makedirs(tmp_path / "cr")
    os.symlink(real_dicom("RG1_UNCR.dcm"), tmp_path / "cr" / "chest.dcm")
    assert "needs 3 numbers in ImagePositionPatient" in refusal(tmp_path / "cr")
