"""2D sources: pictures (PNG, JPEG, BMP, TIFF) and single DICOM files, e.g. chest radiographs and
their masks, prepared like one-slice volumes."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from datasets import readers
from datasets.manifest import PreparedDataset, read_png
from datasets.verify import verify_root
from tests.helpers import CopyContextModel, real_dicom, run, stand_in_loader, write_dicom_series


def save_picture(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    picture = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    picture.save(path)
    return str(path)


def radiograph_and_mask(rows=16, cols=16, seed=0):
    """An 8-bit picture spanning 0..255 (so min-max scaling leaves it unchanged) with a bright
    upper-left block, and a mask of that block: any flip or transpose shows."""
    rng = np.random.default_rng(seed)
    picture = rng.integers(1, 255, size=(rows, cols)).astype(np.uint8)
    picture[0, 0], picture[-1, -1] = 0, 255
    mask = np.zeros((rows, cols), dtype=np.uint8)
    mask[2:6, 1:9] = 1
    return picture, mask


def read_prepared(out, name):
    return PreparedDataset(os.path.join(out, name))


def test_picture_reads_as_a_one_slice_volume_shown_as_stored(tmp_path):
    picture, _ = radiograph_and_mask(12, 20)
    path = save_picture(tmp_path / "a.png", picture)
    data, affine = readers.read_volume(readers.Source(path))
    assert data.shape == (20, 12, 1) and data.dtype == np.uint8
    assert np.array_equal(np.flipud(data[:, :, 0].T), picture)
    assert np.array_equal(affine, np.eye(4))
    shape, _ = readers.read_header(readers.Source(path))
    assert shape == data.shape


def test_picture_modes(tmp_path):
    picture, mask = radiograph_and_mask()
    grey_as_rgb = save_picture(tmp_path / "rgb.png", np.repeat(picture[..., None], 3, axis=2))
    data, _ = readers.read_volume(readers.Source(grey_as_rgb))
    assert data.shape == (16, 16, 1) and np.array_equal(np.flipud(data[:, :, 0].T), picture)

    colour = np.stack([picture, 255 - picture, picture // 2], axis=2)
    data, _ = readers.read_volume(readers.Source(save_picture(tmp_path / "colour.png", colour)))
    assert data.shape == (16, 16, 1, 3) and np.array_equal(np.flipud(data[:, :, 0, 1].T), 255 - picture)

    deep = picture.astype(np.uint16) * 257
    data, _ = readers.read_volume(readers.Source(save_picture(tmp_path / "deep.png", deep)))
    assert data.dtype == np.uint16 and np.array_equal(np.flipud(data[:, :, 0].T), deep)

    palette = Image.fromarray(mask * 3, "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    palette.save(tmp_path / "palette.png")
    data, _ = readers.read_volume(readers.Source(str(tmp_path / "palette.png")))
    assert sorted(np.unique(data)) == [0, 3], "palette pictures give their indices (class ids)"

    Image.fromarray(mask.astype(bool)).save(tmp_path / "bits.png")
    data, _ = readers.read_volume(readers.Source(str(tmp_path / "bits.png")))
    assert np.array_equal(np.flipud(data[:, :, 0].T), mask)


def chest_xray_folder(root, cases=3, mask_value=255):
    for index in range(cases):
        picture, mask = radiograph_and_mask(seed=index)
        save_picture(root / "CXR_png" / f"CHN_{index:04d}.png", picture)
        save_picture(root / "masks" / f"CHN_{index:04d}_mask.png", (mask * mask_value).astype(np.uint8))


def test_chest_xray_pictures_prepare_unchanged_with_spacing_and_binary_masks(tmp_path, capsys):
    chest_xray_folder(tmp_path)
    common = [
        "--root",
        tmp_path,
        "--images",
        "CXR_png/CHN_*.png",
        "--labels",
        "masks/CHN_*_mask.png",
        "--modality",
        "XR",
        "--size",
        16,
        "--out",
        tmp_path / "out",
    ]
    assert run("glob", *common, "--dataset", "raw") == 0
    assert "warning: the labels hold only the ids 0 and 255" in capsys.readouterr().err
    assert read_prepared(tmp_path / "out", "raw").classes == {0: "background", 255: "class_255"}

    assert (
        run(
            "glob",
            *common,
            "--dataset",
            "CXR",
            "--label_map",
            "255:1",
            "--class_names",
            "1:lungs",
            "--spacing",
            0.5,
            0.7,
        )
        == 0
    )
    dataset = read_prepared(tmp_path / "out", "CXR")
    assert dataset.case_ids() == ["0000", "0001", "0002"] and dataset.classes == {0: "background", 1: "lungs"}
    record = dataset.case("0001")
    assert record["slices"] == [0] and record["original"]["spacing"] == [0.5, 0.7, 1.0]
    picture, mask = radiograph_and_mask(seed=1)
    assert np.array_equal(read_png(dataset.slice_path("image", "0001", 0)), picture)
    assert np.array_equal(read_png(dataset.slice_path("label", "0001", 0)), mask)
    summaries, problems = verify_root(tmp_path / "out")
    assert problems == [] and len(summaries) == 2


def test_images_without_masks_are_refused_or_left_out(tmp_path, capsys):
    chest_xray_folder(tmp_path, mask_value=1)
    save_picture(tmp_path / "CXR_png" / "CHN_0099.png", radiograph_and_mask()[0])
    argv = [
        "glob",
        "--root",
        tmp_path,
        "--images",
        "CXR_png/CHN_*.png",
        "--labels",
        "masks/CHN_*_mask.png",
        "--modality",
        "XR",
        "--size",
        16,
        "--out",
        tmp_path / "out",
        "--dataset",
        "CXR",
    ]
    assert run(*argv) == 2
    assert "case '0099': no label file" in capsys.readouterr().err
    assert run(*argv, "--skip_unpaired") == 0
    assert "1 of 4 case ids lack a partner file" in capsys.readouterr().out
    assert read_prepared(tmp_path / "out", "CXR").case_ids() == ["0000", "0001", "0002"]


def test_nnunet_2d_png_dataset(tmp_path):
    for index in range(2):
        picture, mask = radiograph_and_mask(seed=index)
        save_picture(tmp_path / "imagesTr" / f"xr_{index:03d}_0000.png", picture)
        save_picture(tmp_path / "labelsTr" / f"xr_{index:03d}.png", mask)
    (tmp_path / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "XR"}, "labels": {"background": 0, "lung": 1}, "file_ending": ".png"})
    )
    assert (
        run("msd", "--root", tmp_path, "--modality", "XR", "--size", 16, "--out", tmp_path / "out", "--dataset", "XR2D")
        == 0
    )
    dataset = read_prepared(tmp_path / "out", "XR2D")
    assert dataset.case_ids() == ["xr_000", "xr_001"] and dataset.classes == {0: "background", 1: "lung"}
    assert np.array_equal(read_png(dataset.slice_path("label", "xr_001", 0)), radiograph_and_mask(seed=1)[1])


def prepare_pictures(root, images, labels, dataset, *extra):
    """prepare's glob layout on the XR pictures `images` and masks `labels` under root, into root/out."""
    return run(
        "glob",
        "--root",
        root,
        "--images",
        images,
        "--labels",
        labels,
        "--modality",
        "XR",
        "--out",
        root / "out",
        "--dataset",
        dataset,
        *extra,
    )


def test_jpeg_labels_and_colour_images_are_refused_by_name(tmp_path, capsys):
    picture, mask = radiograph_and_mask()
    save_picture(tmp_path / "img" / "a.png", picture)
    save_picture(tmp_path / "lab" / "a.jpg", mask * 255)
    assert prepare_pictures(tmp_path, "img/*.png", "lab/*.jpg", "bad") == 2
    assert "lab/a.jpg: a label in JPEG" in capsys.readouterr().err

    save_picture(tmp_path / "img" / "b.png", np.stack([picture, mask * 255, picture], axis=2))
    save_picture(tmp_path / "lab" / "b.png", mask)
    assert prepare_pictures(tmp_path, "img/[b].png", "lab/[b].png", "colour") == 2
    error = capsys.readouterr().err
    assert "img/b.png" in error and "--channel" in error

    assert prepare_pictures(tmp_path, "img/[b].png", "lab/[b].png", "green", "--channel", "1", "--size", 16) == 0
    assert np.array_equal(read_png(read_prepared(tmp_path / "out", "green").slice_path("image", "b", 0)), mask * 255)


def test_spacing_flag_is_checked(tmp_path, capsys):
    chest_xray_folder(tmp_path, cases=1, mask_value=1)
    assert (
        run(
            "glob",
            "--root",
            tmp_path,
            "--images",
            "CXR_png/CHN_*.png",
            "--labels",
            "masks/CHN_*_mask.png",
            "--modality",
            "XR",
            "--out",
            tmp_path / "out",
            "--dataset",
            "x",
            "--spacing",
            "0.5",
        )
        == 2
    )
    assert "--spacing 0.5" in capsys.readouterr().err


# ---------------------------------------------------------------- single DICOM files


def write_dicom_file(path, sop_class, pixel_data, **attributes):
    """A minimal single-image DICOM file: file meta, the given attributes and the pixel bytes."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixel_data
    ds.save_as(path, enforce_file_format=True)
    return pydicom


def write_radiograph_dicom(path, stored, photometric="MONOCHROME1", imager_spacing=(0.143, 0.139)):
    spacing = {"ImagerPixelSpacing": list(imager_spacing)} if imager_spacing else {}
    return write_dicom_file(
        path,
        "1.2.840.10008.5.1.4.1.1.1.1",  # digital X-ray
        np.ascontiguousarray(stored.astype(np.uint16)).tobytes(),
        Modality="DX",
        Rows=stored.shape[0],
        Columns=stored.shape[1],
        SamplesPerPixel=1,
        PhotometricInterpretation=photometric,
        BitsAllocated=16,
        BitsStored=12,
        HighBit=11,
        PixelRepresentation=0,
        **spacing,
    )


def test_monochrome1_radiograph_is_inverted_and_keeps_its_spacing(tmp_path):
    stored = np.random.default_rng(0).integers(100, 4000, size=(10, 14))
    write_radiograph_dicom(tmp_path / "dx.dcm", stored)
    data, affine = readers.read_volume(readers.Source(str(tmp_path / "dx.dcm")))
    shown = np.flipud(data[:, :, 0].T)
    assert data.shape == (14, 10, 1)
    assert np.array_equal(shown, stored.max() + stored.min() - stored), "MONOCHROME1: low values are white"
    assert np.allclose(np.diag(affine), [0.139, 0.143, 1, 1]), "column spacing along i, row spacing along j"
    assert readers.read_header(readers.Source(str(tmp_path / "dx.dcm")))[0] == (14, 10, 1)

    write_radiograph_dicom(tmp_path / "plain.dcm", stored, "MONOCHROME2", imager_spacing=None)
    data, affine = readers.read_volume(readers.Source(str(tmp_path / "plain.dcm")))
    assert np.array_equal(np.flipud(data[:, :, 0].T), stored) and np.array_equal(affine, np.eye(4))


def test_a_single_ct_slice_file_is_placed_like_its_series(tmp_path):
    volume = np.random.default_rng(2).integers(-1000, 1000, size=(6, 7, 1)).astype(float)
    write_dicom_series(tmp_path / "series", volume)
    from_folder = readers.read_volume(readers.Source(str(tmp_path / "series")))
    from_file = readers.read_volume(readers.Source(str(tmp_path / "series" / "slice000.dcm")))
    assert np.array_equal(from_folder[0], from_file[0]) and np.allclose(from_folder[1], from_file[1])


def test_real_computed_radiograph():
    pydicom = pytest.importorskip("pydicom")
    path = real_dicom("RG3_UNCR.dcm")
    stored = pydicom.dcmread(path).pixel_array.astype(np.float32)
    data, affine = readers.read_volume(readers.Source(path))
    assert data.shape == (1760, 1760, 1)
    assert np.array_equal(np.flipud(data[:, :, 0].T), stored.max() + stored.min() - stored)
    assert np.array_equal(affine, np.eye(4)), "the file stores no spacing"
    _, zero_spacing_affine = readers.read_header(readers.Source(real_dicom("RG1_UNCR.dcm")))
    assert np.array_equal(zero_spacing_affine, np.eye(4)), "a PixelSpacing of 0 is no spacing"


def test_evaluation_on_one_slice_picture_cases(tmp_path, monkeypatch):
    """main_eval on a prepared radiograph set: each case is one slice, contexts come from the other
    (training) cases; a model that paints the context label scores Dice 1 when all masks agree."""
    import main_eval

    for index in range(4):
        picture, mask = radiograph_and_mask(seed=index)
        save_picture(tmp_path / "img" / f"r{index}.png", picture)
        save_picture(tmp_path / "lab" / f"r{index}.png", mask)
    assert (
        run(
            "glob",
            "--root",
            tmp_path,
            "--images",
            "img/r*.png",
            "--labels",
            "lab/r*.png",
            "--modality",
            "XR",
            "--size",
            16,
            "--spacing",
            0.2,
            0.2,
            "--test_fraction",
            0.5,
            "--out",
            tmp_path / "out",
            "--dataset",
            "CXR",
        )
        == 0
    )
    monkeypatch.setattr(main_eval, "load_checkpoint", stand_in_loader(CopyContextModel()))
    assert (
        main_eval.main(
            [
                "--checkpoint",
                "unused",
                "--data_path",
                str(tmp_path / "out"),
                "--output_dir",
                str(tmp_path / "eval"),
                "--baselines",
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["datasets"]
    assert [r["protocol"] for r in results] == ["foreground", "volume"]  # one slice each: both the same
    result = results[0]
    assert (
        results[1]["dice"] == result["dice"]
        and result["cases"] == 2
        and result["dice"] == 1.0
        and result["hd95"] == 0.0
    )
    assert result["baselines"]["copy_context"]["dice"] == 1.0


def test_real_colour_ultrasound_keeps_its_channels():
    pydicom = pytest.importorskip("pydicom")
    path = real_dicom("US1_UNCR.dcm")
    rgb = pydicom.dcmread(path).pixel_array
    data, _ = readers.read_volume(readers.Source(path))
    assert data.shape == (640, 480, 1, 3) and readers.read_header(readers.Source(path))[0] == data.shape
    assert np.array_equal(np.flipud(data[:, :, 0].swapaxes(0, 1)), rgb), "colour stays colour: --channel picks one"


def test_grey_saved_as_colour_dicom_reads_as_grey_in_header_and_data(tmp_path):
    grey = np.random.default_rng(3).integers(0, 255, size=(6, 9)).astype(np.uint8)
    write_dicom_file(
        tmp_path / "sc.dcm",
        "1.2.840.10008.5.1.4.1.1.7",  # secondary capture
        np.repeat(grey[..., None], 3, axis=2).tobytes(),
        Rows=6,
        Columns=9,
        SamplesPerPixel=3,
        PhotometricInterpretation="RGB",
        PlanarConfiguration=0,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        PixelRepresentation=0,
    )
    source = readers.Source(str(tmp_path / "sc.dcm"))
    data, _ = readers.read_volume(source)
    assert readers.read_header(source)[0] == data.shape == (9, 6, 1)
    assert np.array_equal(np.flipud(data[:, :, 0].T), grey)
