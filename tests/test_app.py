"""The browser app: its logic (app_session.py) on tiny volumes and pictures, with a stand-in for a perfect
model where the answer must be exact and a real tiny checkpoint where it must only run; its command line
(app.py); and the page itself over HTTP through gradio's client. scripts/browser_check.py drives the page
in a real browser (not part of the suite: CI has no browser)."""

import contextlib
import hashlib
import os
import re
import socket
import sys
import tempfile

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import app
import app_session
from datasets import geometry
from datasets.readers import InputError
from inference import Predictor
from models_mvg import mvg_vit_tiny_patch16
from tasks import get_task
from tests.helpers import SIDE, CopyContextModel, save_placed_nifti, save_png, write_dicom_series
from util import runtime

SHAPE = (20, 18, 6)  # voxels of the test volume, stored left-anterior-superior (x runs to the left)
SPACING = (0.8, 0.9, 2.5)  # mm
VOXEL_ML = 0.8 * 0.9 * 2.5 / 1000
MARKER = (1, 2, 3)  # a voxel of the image brighter than everything else
SEGMENTATION = get_task("segmentation")

# gradio's queue calls pandas in ways pandas 3 deprecates; nothing here to act on.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


# ---------------------------------------------------------------------------------------------------
# inputs


@pytest.fixture(scope="module")
def gradio_folder(tmp_path_factory):
    """gradio's upload folder for this module. gradio reads it (partly) when first imported, so it is
    imported here, before app.main, which points it at the app's own folder and removes that on exit."""
    folder = str(tmp_path_factory.mktemp("gradio"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", folder)
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        with contextlib.suppress(ImportError):
            import gradio  # noqa: F401
    return folder


@pytest.fixture(autouse=True)
def gradio_environment(gradio_folder, monkeypatch):
    """What app.py sets before it imports gradio, set for each test and undone after it, so that an
    in-process app.main leaves the test process's environment as it found it."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", gradio_folder)
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")


def placed_affine():
    affine = np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [15.0, -20.0, 30.0]
    return affine


def truth_labels():
    """Class 1 on every slice (6 x 6 x 6 voxels), class 2 on two of them (6 x 6 x 2)."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:8, 3:9, :] = 1
    labels[10:16, 4:10, 2:4] = 2
    return labels


def ct_image(labels, seed=0):
    """Hounsfield-like: air in a corner (so 'auto' reads it as CT), tissue that follows the labels, a marker."""
    rng = np.random.default_rng(seed)
    image = (-50.0 + 60.0 * labels + rng.normal(0, 5, labels.shape)).astype(np.float32)
    image[-3:, -3:, :] = -1000.0
    image[MARKER] = 900.0
    return image


@pytest.fixture
def volume_files(tmp_path):
    """A CT query with its label (qform code 1, sform code 2, so that a header carried over shows), an
    unlabelled one, a label on another grid, and a file of no known format, in a folder of their own."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    labels, affine = truth_labels(), placed_affine()
    files = {
        "image": save_placed_nifti(folder / "scan.nii.gz", ct_image(labels), affine),
        "label": save_placed_nifti(folder / "scan_seg.nii.gz", labels, affine),
        "empty_label": save_placed_nifti(folder / "empty_seg.nii.gz", labels * 0, affine),
        "short_label": save_placed_nifti(folder / "short_seg.nii.gz", labels[:, :, :5], affine),
        "text": str(folder / "notes.txt"),
    }
    (folder / "notes.txt").write_text("not a scan")
    return files


def folder_hashes(folder) -> dict:
    hashes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                hashes[path] = hashlib.sha256(handle.read()).hexdigest()
    return hashes


def app_args(*extra):
    return app.get_args_parser().parse_args(["--checkpoint", "unused.pth", "--device", "cpu", *map(str, extra)])


@pytest.fixture
def args():
    """The app's settings: slices stretched to the stand-in model's canvas half, so its copy is exact."""
    return app_args("--slice_size", SIDE, "--batch_size", 4)


@pytest.fixture
def copy_predictor():
    return Predictor(CopyContextModel(), label_encoding="random_colors", batch_size=4)


@pytest.fixture
def work_dir(tmp_path):
    folder = tmp_path / "app"
    folder.mkdir()
    return str(folder)


def display_truth(index):
    """Slice `index` of the truth as the page shows it (RAS, anterior at the top)."""
    canonical, _ = geometry.to_canonical(truth_labels(), placed_affine())
    return geometry.slice_for_display(canonical, 2, index)


def brush_layer(label, zoom, seed=0):
    """Strokes as the editor returns them: class colours (a little off, as a browser's colour management
    may leave them) at full opacity, with a faint, wrongly coloured fringe of anti-aliasing around them."""
    rng = np.random.default_rng(seed)
    colours = app_session.class_colours(app_session.BRUSH_CLASSES).astype(int)
    rgb = np.clip(colours[label] + rng.integers(-12, 13, size=(*label.shape, 3)), 0, 255)
    rgba = np.dstack([rgb, np.where(label > 0, 255, 0)]).astype(np.uint8)
    fringe = (np.roll(label, 1, axis=0) > 0) & (label == 0)
    rgba[fringe] = [255, 255, 255, 60]
    return np.kron(rgba, np.ones((zoom, zoom, 1), np.uint8))


# ---------------------------------------------------------------------------------------------------
# opening and showing


def test_open_a_volume_and_browse_a_slice_with_a_window(volume_files, args, work_dir):
    session = app_session.Session()
    query = session.open([volume_files["image"]], args, "auto", work_dir)
    assert query.modality == "CT" and query.guessed and "CT (guessed: choose the modality if wrong)" in query.describe()
    assert query.num_slices == SHAPE[2] and query.display_shape == (18, 20)
    assert query.default_window() == (50.0, 300.0)  # the model's CT window, -100..200 HU
    assert query.voxel_ml == pytest.approx(VOXEL_ML)
    assert "20x18x6 voxels of 0.8x0.9x2.5 mm" in query.describe()

    np.testing.assert_array_equal(
        app_session.window_to_uint8(np.array([-100.0, 50.0, 200.0, 900.0]), 50, 300), [0, 128, 255, 255]
    )

    zoom = app_session.display_zoom(query.display_shape)
    shown = session.view(MARKER[2], level=0, width=1800)  # only the marker reaches white
    assert shown.shape == (18 * zoom, 20 * zoom, 3) and shown.dtype == np.uint8
    # x runs to the left in the file: RAS puts it at column 19 - x; anterior (y) is up: row 17 - y.
    white = np.argwhere((shown == 255).all(axis=2))
    rows, cols = white[:, 0] // zoom, white[:, 1] // zoom
    assert set(rows) == {17 - MARKER[1]} and set(cols) == {19 - MARKER[0]}
    with pytest.raises(InputError, match=re.escape("slice 6 is outside 0..5")):
        session.view(6, 0, 100)


def test_modality_chosen_by_hand_scales_as_predict_does(volume_files, args, work_dir):
    query = app_session.open_query([volume_files["image"]], args, "MRI", work_dir)
    parameters = query.volume.parameters["image"]
    assert query.modality == "MRI" and not query.guessed and parameters["method"] == "percentile"
    assert query.default_window() == (
        (parameters["low"] + parameters["high"]) / 2,
        parameters["high"] - parameters["low"],
    )


def test_other_formats_open_as_volumes(tmp_path, args, work_dir):
    """A MetaImage header with its data file, and the files of a DICOM series, uploaded together."""
    sitk = pytest.importorskip("SimpleITK")
    volume = np.random.default_rng(1).normal(0, 50, (5, 12, 10)).astype(np.float32)  # ITK's (z, y, x)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.5, 0.6, 3.0))
    sitk.WriteImage(image, str(tmp_path / "prostate.mhd"))
    parts = sorted(str(p) for p in tmp_path.iterdir() if p.name.startswith("prostate"))
    assert len(parts) == 2  # prostate.mhd and its data file
    query = app_session.open_query(parts, args, "MRI", work_dir)
    assert query.name == "prostate" and query.num_slices == 5 and query.display_shape == (12, 10)
    assert query.voxel_ml == pytest.approx(0.5 * 0.6 * 3.0 / 1000)

    hounsfield = np.random.default_rng(2).normal(0, 40, (8, 9, 4))
    hounsfield[0] = -1000.0  # air along one side
    write_dicom_series(tmp_path / "series", hounsfield)
    files = sorted(str(p) for p in (tmp_path / "series").iterdir())
    query = app_session.open_query(files, args, "auto", work_dir)
    assert query.modality == "CT" and query.num_slices == 4 and query.volume.original_shape == (8, 9, 4)
    assert os.path.commonpath([query.path, work_dir]) == work_dir  # the files were gathered in the app's folder


# ---------------------------------------------------------------------------------------------------
# contexts


def test_brush_strokes_give_the_context_the_label_file_gives(volume_files, args, work_dir):
    session = app_session.Session()
    query = session.open([volume_files["image"]], args, "auto", work_dir)
    zoom = app_session.display_zoom(query.display_shape)
    index = 2
    drawn = session.draw(index, [None, brush_layer(display_truth(index), zoom)])
    np.testing.assert_array_equal(drawn, display_truth(index))

    (from_strokes,) = app_session.drawn_contexts(query, session.drawn)
    labelled = app_session.LabelledContext((volume_files["image"],), (volume_files["label"],), str(index))
    (from_file,) = app_session.labelled_contexts(labelled, SEGMENTATION, args, query.modality, work_dir)
    assert from_strokes.target.shape == (SIDE, SIDE)
    np.testing.assert_array_equal(from_strokes.target, from_file.target)
    np.testing.assert_array_equal(from_strokes.image, from_file.image)
    assert from_strokes.position == from_file.position == (index + 0.5) / SHAPE[2]

    layer = app_session.label_layer(drawn)  # a kept drawing goes back into the editor unchanged
    np.testing.assert_array_equal(app_session.strokes_to_label([layer], query.display_shape), drawn)


def test_labelled_volume_gives_the_chosen_slices(volume_files, args, work_dir):
    session = app_session.Session()
    session.open([volume_files["image"]], args, "auto", work_dir)
    pairs = session.choose_labelled(
        app_session.LabelledContext((volume_files["image"],), (volume_files["label"],), "auto:3"),
        SEGMENTATION,
        args,
        work_dir,
    )
    assert [round(p.position * SHAPE[2] - 0.5) for p in pairs] == [0, 2, 5]  # 0, 2.5, 5: the tie goes to the lower
    assert app_session.describe_pairs(pairs, SEGMENTATION) == "3 context pair(s), classes 1, 2"


# ---------------------------------------------------------------------------------------------------
# running, measuring, downloading


def test_whole_volume_predicted_measured_and_written_on_the_query_grid(volume_files, args, work_dir, copy_predictor):
    inputs_before = folder_hashes(os.path.dirname(volume_files["image"]))
    session = app_session.Session()
    session.open([volume_files["image"]], args, "auto", work_dir)
    session.choose_labelled(
        app_session.LabelledContext((volume_files["image"],), (volume_files["label"],), "auto:6"),
        SEGMENTATION,
        args,
        work_dir,
    )
    progress = []
    prediction = session.run(copy_predictor, SEGMENTATION, args, work_dir, on_progress=lambda *p: progress.append(p))
    assert progress == [(4, 6), (6, 6)]
    np.testing.assert_array_equal(prediction.values, truth_labels())  # every slice its own context
    np.testing.assert_array_equal(prediction.display_slice(3), display_truth(3))

    expected = {1: 6 * 6 * 6, 2: 6 * 6 * 2}
    table = session.volumes_table()
    assert [row[:2] for row in table] == [[c, n] for c, n in expected.items()]
    assert [row[2] for row in table] == pytest.approx([round(n * VOXEL_ML, 3) for n in expected.values()])

    outputs = os.path.join(work_dir, "predictions")
    nifti, png = session.downloads(3, 50, 300, outputs)
    assert os.path.dirname(nifti) == os.path.dirname(png) and os.path.dirname(os.path.dirname(nifti)) == outputs
    written, query = nib.load(nifti), nib.load(volume_files["image"])
    assert written.shape == query.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, query.affine)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 2
    np.testing.assert_array_equal(np.asarray(written.dataobj), truth_labels())
    picture = np.asarray(Image.open(png))
    np.testing.assert_array_equal(picture, session.view(3, 50, 300))
    assert (picture != session.view(3, 50, 300, show_prediction=False)).any()  # the prediction is coloured in

    again, _ = session.downloads(3, 50, 300, outputs)
    assert again != nifti and os.path.exists(nifti)  # a second download never writes over the first
    assert folder_hashes(os.path.dirname(volume_files["image"])) == inputs_before


def test_picture_query_with_a_real_tiny_checkpoint(tmp_path, work_dir):
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pth"
    torch.save(
        {
            "model": mvg_vit_tiny_patch16(input_size=(64, 32), depth=4).state_dict(),
            "args": {"model": "mvg_vit_tiny_patch16", "input_size": [64, 32], "depth": 4, "label_encoding": "grey"},
        },
        checkpoint,
    )
    args = app.get_args_parser().parse_args(["--checkpoint", str(checkpoint), "--device", "cpu"])
    predictor = app_session.load_predictor(args)
    assert args.label_encoding == "grey" and args.slice_size == 512
    assert args.precision == ("bf16" if runtime.cpu_has_native_bf16() else "fp32")  # auto, for inference

    picture = np.random.default_rng(3).integers(0, 256, size=(30, 26), dtype=np.uint8)
    path = save_png(tmp_path / "xray.png", picture)
    session = app_session.Session()
    query = session.open([path], args, "auto", work_dir)
    assert query.is_picture and query.num_slices == 1 and query.voxel_ml is None
    label = np.zeros((30, 26), np.uint8)
    label[5:15, 4:12], label[18:25, 10:20] = 1, 3
    session.draw(0, [brush_layer(label, app_session.display_zoom(label.shape))])
    prediction = session.run(predictor, SEGMENTATION, args, work_dir)
    assert prediction.values.shape == (30, 26) and set(np.unique(prediction.values)) <= {0, 1, 3}
    assert [row[2] for row in session.volumes_table()] == [None] * len(session.volumes_table())  # no pixel size
    written, _ = session.downloads(0, 127.5, 255, work_dir)
    assert written.endswith("xray_segmentation.png")
    np.testing.assert_array_equal(np.asarray(Image.open(written)), prediction.values)


def test_image_task_predicts_images_from_an_image_pair(tmp_path, args, work_dir, copy_predictor):
    rng = np.random.default_rng(4)
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    clean = 2 * x + 3 * y + 5 * z  # smooth, so that stretching slices to the model's size and back keeps it
    noisy = save_placed_nifti(
        tmp_path / "low_dose.nii.gz", clean + rng.normal(0, 5, SHAPE).astype(np.float32), placed_affine()
    )
    target = save_placed_nifti(tmp_path / "full_dose.nii.gz", clean, placed_affine())
    session = app_session.Session()
    session.open([noisy], args, "other", work_dir)
    denoising = get_task("denoising")
    session.choose_labelled(app_session.LabelledContext((noisy,), (target,), "auto:6"), denoising, args, work_dir)
    prediction = session.run(copy_predictor, denoising, args, work_dir)
    assert prediction.values.shape == SHAPE and prediction.values.dtype == np.float32
    low, high = session.query.volume.parameters["image"]["low"], session.query.volume.parameters["image"]["high"]
    inside = (clean > low) & (clean < high)  # the query's own min-max range; the target is scaled with it
    step = (high - low) / 255  # one grey level of the 8-bit slices, in the query's units
    np.testing.assert_allclose(prediction.values[inside], clean[inside], atol=3 * step)  # levels, and resampling
    assert session.volumes_table() == []
    shown = session.view(2, 50, 100)
    assert shown.shape[1] > 2 * shown.shape[0] * 20 / 18 * 0.9  # the query beside the prediction

    session.draw(2, [brush_layer(display_truth(2), app_session.display_zoom(session.query.display_shape))])
    with pytest.raises(InputError, match="denoising needs an image pair"):
        session.run(copy_predictor, denoising, args, work_dir)


# ---------------------------------------------------------------------------------------------------
# bad input: a clear message, nothing written over


def test_bad_inputs_give_clear_messages(volume_files, args, work_dir, copy_predictor):
    inputs_before = folder_hashes(os.path.dirname(volume_files["image"]))
    session = app_session.Session()
    with pytest.raises(InputError, match="open a query first"):
        session.run(copy_predictor, SEGMENTATION, args, work_dir)
    with pytest.raises(InputError, match=re.escape("query notes.txt: unknown format; expected .png")):
        session.open([volume_files["text"]], args, "auto", work_dir)
    broken = os.path.join(work_dir, "broken.nii.gz")
    with open(broken, "wb") as handle:
        handle.write(b"\x1f\x8b not really gzip")
    with pytest.raises(InputError, match=re.escape("broken.nii.gz: cannot read")):
        session.open([broken], args, "auto", work_dir)
    with pytest.raises(InputError, match="query: no file given"):
        session.open([], args, "auto", work_dir)

    session.open([volume_files["image"]], args, "auto", work_dir)
    with pytest.raises(InputError, match="no context yet: draw a label"):
        session.run(copy_predictor, SEGMENTATION, args, work_dir)
    with pytest.raises(InputError, match="slice 1: nothing is drawn"):
        session.draw(1, [np.zeros((414, 460, 4), np.uint8)])
    mismatched = app_session.LabelledContext((volume_files["image"],), (volume_files["short_label"],))
    with pytest.raises(InputError, match="context image scan and context label short_seg: the voxel grids differ"):
        session.choose_labelled(mismatched, SEGMENTATION, args, work_dir)
    empty = app_session.LabelledContext((volume_files["image"],), (volume_files["empty_label"],))
    with pytest.raises(InputError, match="holds no class other than background"):
        session.choose_labelled(empty, SEGMENTATION, args, work_dir)
    outside = app_session.LabelledContext((volume_files["image"],), (volume_files["label"],), "7")
    with pytest.raises(InputError, match=re.escape("--context_slices 7 is outside 0..5")):
        session.choose_labelled(outside, SEGMENTATION, args, work_dir)
    assert session.labelled is None and session.prediction is None  # nothing refused was kept
    assert folder_hashes(os.path.dirname(volume_files["image"])) == inputs_before


@pytest.mark.parametrize(
    "contents, message",
    [
        (b"not a checkpoint", "not a readable checkpoint"),
        ({"weights": torch.zeros(3)}, "does not record its model"),
        (
            {
                "model": {"head.weight": torch.zeros(2, 2)},
                "args": {"model": "mvg_vit_tiny_patch16", "label_encoding": "grey"},
            },
            "does not fit",
        ),
    ],
)
def test_a_checkpoint_that_is_not_mvg_stops_before_the_server(tmp_path, capsys, contents, message):
    checkpoint = tmp_path / "other.pth"
    if isinstance(contents, bytes):
        checkpoint.write_bytes(contents)
    else:
        torch.save(contents, checkpoint)
    folders_before = set(os.listdir(tempfile.gettempdir()))
    assert app.main(["--checkpoint", str(checkpoint), "--port", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    left = {n for n in set(os.listdir(tempfile.gettempdir())) - folders_before if n.startswith("mvg-app-")}
    assert not left  # the app's folder is removed on the way out


def test_bad_flags_and_a_missing_gradio(tmp_path, capsys, monkeypatch):
    for argv, message in (
        (["--port", "70000"], "--port 70000: expected 0..65535"),
        (["--batch_size", "0"], "--batch_size 0: expected at least 1"),
        (["--host", "256.1.1.1"], "--host 256.1.1.1 --port 0: cannot listen there"),
    ):
        assert app.main(["--checkpoint", "x.pth", "--port", "0", *argv]) == 2
        assert message in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert app.main(["--checkpoint", "x.pth", "--port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen there" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if it were not installed
    assert app.main(["--checkpoint", "x.pth", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {app.GRADIO_MISSING}"


def test_listens_on_this_machine_only_unless_told():
    assert app.DEFAULT_HOST == "127.0.0.1" and app_args().host == "127.0.0.1"
    assert app_args("--listen", "0.0.0.0").host == "0.0.0.0" == app_args("--host", "0.0.0.0").host
    assert app.is_loopback("127.0.0.1") and app.is_loopback("localhost") and app.is_loopback("::1")
    assert not app.is_loopback("0.0.0.0") and not app.is_loopback("192.168.1.5")
    assert (
        app.browser_url("0.0.0.0", 7860) == "http://127.0.0.1:7860/"
        and app.browser_url("::1", 80) == "http://[::1]:80/"
    )


# ---------------------------------------------------------------------------------------------------
# the page over HTTP


def test_handlers_turn_errors_into_messages_in_the_page(work_dir, capsys):
    gr = pytest.importorskip("gradio")
    page = app.Page(gr, None, app_args(), work_dir)

    def refused():
        raise InputError("query scan.txt: unknown format")

    def broken():
        raise RuntimeError("a bug\nwith a long story")

    with pytest.raises(gr.Error) as shown:
        page.message(refused)()
    assert shown.value.message == "query scan.txt: unknown format"
    with pytest.raises(gr.Error) as shown:
        page.message(broken)()
    assert shown.value.message == "unexpected RuntimeError: a bug; the terminal shows the details"
    assert "Traceback" in capsys.readouterr().err  # the details, for whoever runs the app


def test_the_page_over_http(volume_files, work_dir, copy_predictor):
    gr = pytest.importorskip("gradio")
    client_module = pytest.importorskip("gradio_client")
    inputs_before = folder_hashes(os.path.dirname(volume_files["image"]))
    args = app_args("--slice_size", SIDE, "--port", 0)
    args.port = app.claim_port(args.host, args.port)
    blocks = app.build_app(gr, copy_predictor, args, work_dir)
    _, local_url, _ = app.launch(blocks, args, block=False)
    try:
        assert blocks.server_name == "127.0.0.1" and local_url.startswith("http://127.0.0.1:")
        client = client_module.Client(local_url, verbose=False)
        upload = client_module.handle_file
        with pytest.raises(Exception, match=re.escape("query notes.txt: unknown format")):  # shown in the page ...
            client.predict([upload(volume_files["text"])], "auto", api_name="/open_query")
        opened = client.predict(
            [upload(volume_files["image"])], "auto", api_name="/open_query"
        )  # ... and it carries on
        assert "scan: 20x18x6 voxels" in opened[4]  # the state is not sent; the status is the fifth
        with pytest.raises(Exception, match="no context yet"):
            client.predict("segmentation", 3, 50, 300, api_name="/run")
        used = client.predict(
            "segmentation",
            [upload(volume_files["image"])],
            [upload(volume_files["label"])],
            "auto:6",
            api_name="/use_labelled",
        )
        assert used == "Labelled context: 6 context pair(s), classes 1, 2."
        _, table, files, status = client.predict("segmentation", 3, 50, 300, api_name="/run")
        assert status.startswith("Predicted 6 slice(s) of scan")
        assert [row[:2] for row in table["data"]] == [[1, 216], [2, 72]]
        nifti = next(f for f in files if f.endswith(".nii.gz"))
        np.testing.assert_array_equal(np.asarray(nib.load(nifti).dataobj), truth_labels())
    finally:
        blocks.close()
    assert folder_hashes(os.path.dirname(volume_files["image"])) == inputs_before
