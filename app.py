"""MVG in the browser: open a scan, label a slice or two, get the whole volume segmented.

    python app.py --checkpoint demo_output/train/checkpoint-last.pth     # then open http://127.0.0.1:7860

The page opens a query (a NIfTI, MetaImage or NRRD volume, the files of a DICOM series, one DICOM file,
or a PNG picture), shows its slices with a slider and a window/level, and takes its context either as
a label painted with a brush on one or two of its own slices (one colour per class) or as chosen slices
of a labelled volume. The image tasks (synthesis, denoising, inpainting) take an image pair instead.
Run predicts every slice (with a progress bar), colours the result over the slices, gives each class's
volume in millilitres, and offers the prediction for download as NIfTI on the query's grid (its affine
and header kept) or as PNG, plus the shown slice as a PNG.

Why gradio: it is what in-context segmentation models ship their demos with (SegGPT's and MedSAM2's
are gradio apps), so users meet a familiar page; it gives file upload, sliders, an image editor with
brush layers and a progress bar without any JavaScript here; and it serves from one Python process
that holds the model. It is an optional extra: pip install -r requirements-app.txt.

Privacy and files. The server listens on 127.0.0.1 only, unless --host names another address (0.0.0.0:
every address; then anyone who reaches the port can use the app). Gradio's usage statistics are
switched off. Uploaded scans are copies the browser sends; they, and everything the app writes, stay
in a temporary folder of its own that is removed when the app stops (Ctrl-C or SIGTERM); with
--output_dir, each run's downloads go to a fresh folder under it instead, and stay. Nothing is written
beside an input.

The model is read as predict.py reads it (inference.load_checkpoint): model, canvas, depth, label
encoding and slice size come from the checkpoint's record; --axis, --slice_size, --normalization,
--num_prompts, --scale and the other flags below mean what they mean for predict.py. The logic behind
the page is in app_session.py.
"""

import ipaddress
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback

from app_session import (
    AUTO_MODALITY,
    BRUSH_CLASSES,
    MODALITIES,
    LabelledContext,
    Session,
    colour_hex,
    describe_pairs,
    label_layer,
    load_predictor,
    non_finite_note,
    render_slice,
)
from predict import add_volume_and_model_flags, check_volume_and_model_flags
from tasks import TASK_NAMES, get_task
from util.cli import UsageError, docstring_parser, first_line, log, run_main, warn

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860  # gradio's own default
GRADIO_MISSING = "the app needs gradio: pip install -r requirements-app.txt"


def get_args_parser():
    parser = docstring_parser(__doc__)
    server = parser.add_argument_group("server")
    server.add_argument(
        "--host",
        "--listen",
        dest="host",
        default=DEFAULT_HOST,
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 listens on every address)",
    )
    server.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port to listen on (default: {DEFAULT_PORT}); 0 picks a free one",
    )
    server.add_argument(
        "--output_dir",
        help="keep every prediction (its downloads) in a fresh folder under this one (default: in the app's "
        "temporary folder, removed when it stops)",
    )

    add_volume_and_model_flags(
        parser,
        "volumes: slicing and intensities (as predict.py)",
        slice_size_help="the size of the prepared training slices (default: what the checkpoint records, else 512)",
        modality_flag=False,
    )
    return parser


# ---------------------------------------------------------------------------------------------------
# checks before the server starts


def check_args(args):
    check_volume_and_model_flags(args)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: expected 0..65535")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def browser_url(host: str, port: int) -> str:
    """Where a browser on this machine finds the server."""
    if host in ("0.0.0.0", "::", ""):  # every address: this machine's own is one of them
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def claim_port(host: str, port: int) -> int:
    """The port the server will listen on (a free one for 0), checked now so that an address in use or
    one this machine does not have is a one-line error before the model is loaded."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
            return probe.getsockname()[1]
    except OSError as error:
        reason = error.strerror or str(error)
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({reason}); choose another") from None


def import_gradio(upload_dir: str):
    """gradio, imported only now: it is an optional extra. Its uploads go into the app's own folder, and it
    sends no usage statistics (a medical app calls nowhere)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = upload_dir
    try:
        import gradio
    except ImportError:
        raise UsageError(GRADIO_MISSING) from None
    return gradio


# ---------------------------------------------------------------------------------------------------
# the page


INTRO = """# MVG: segment a scan from a slice or two
1. **Open a query**: a NIfTI, MetaImage or NRRD volume, the files of a DICOM series, or a PNG picture.
2. **Give a context**: paint one or two of its slices (*Draw on the shown slice*), or give a labelled
   volume and its slices. Image tasks take an image pair.
3. **Run**: every slice is predicted; the result is coloured over the slices, measured per class and
   ready to download."""


def brush_legend() -> str:
    swatches = " ".join(
        f'<span style="background:{colour_hex(c)};padding:0 0.6em;border-radius:3px">&nbsp;</span>&nbsp;{c}'
        for c in range(1, BRUSH_CLASSES + 1)
    )
    return f"Brush colour = class id: {swatches}"


def slider_step(low: float, high: float) -> float:
    span = high - low
    return 1.0 if span > 100 else max(span / 1000, 1e-6)


class Page:
    """The page's handlers: each turns the inputs of one event into the updates of its outputs, with the
    app's logic in app_session.Session. Problems with the user's input become a message in the page."""

    def __init__(self, gr, predictor, args, work_dir: str):
        self.gr, self.predictor, self.args, self.work_dir = gr, predictor, args, work_dir

    def message(self, handler):
        """handler, with a UsageError shown in the page as its one-line message, and any other error as a
        short message, its traceback going to the terminal; the server carries on either way."""
        gr = self.gr

        def shown(*inputs, **keywords):
            try:
                return handler(*inputs, **keywords)
            except UsageError as error:
                raise gr.Error(str(error), print_exception=False) from None
            except gr.Error:
                raise
            except Exception as error:
                traceback.print_exc()
                raise gr.Error(f"unexpected {first_line(error)}; the terminal shows the details") from None

        shown.__name__ = handler.__name__
        shown.__doc__ = handler.__doc__
        return shown

    def outputs_dir(self) -> str:
        return self.args.output_dir or os.path.join(self.work_dir, "predictions")

    # -- query and view

    def open_query(self, session: Session, files, modality):
        """Opens the uploaded query: slider over its slices, window/level of the model's scaling; what was
        drawn on the previous query, and its prediction, are gone."""
        gr = self.gr
        modality = modality or AUTO_MODALITY
        query = session.open(files or [], self.args, modality, self.work_dir)
        low, high = query.value_range()
        level, width = query.default_window()
        step = slider_step(low, high)
        middle = query.num_slices // 2
        return (
            session,
            gr.Slider(minimum=0, maximum=max(query.num_slices - 1, 1), value=middle, interactive=query.num_slices > 1),
            gr.Slider(minimum=low, maximum=high, value=level, step=step),
            gr.Slider(minimum=step, maximum=max(high - low, step), value=width, step=step),
            session.view(middle, level, width),
            f"Opened {query.describe()}.{non_finite_note(query)}",
            [],
            None,
            self.drawn_summary(session),
            None,
            None,
        )

    def show(self, session: Session, index, level, width, show_prediction):
        if session.query is None:
            return None
        return session.view(int(index), level, width, show_prediction)

    # -- drawing

    def start_drawing(self, session: Session, index, level, width):
        """The shown slice (windowed, no overlay) into the editor, with what was drawn on it before."""
        gr = self.gr
        index = int(index)
        background = render_slice(session.require_query(), index, level, width)
        drawn = session.drawn.get(index)
        value = {"background": background, "layers": [] if drawn is None else [label_layer(drawn)], "composite": None}
        return (
            index,
            gr.ImageEditor(value=value, label=f"draw on slice {index} (brush colour = class)"),
            gr.Tabs(selected="draw"),
        )

    def choose_class(self, class_id):
        return self.gr.ImageEditor(brush=brush(self.gr, int(class_id)))

    def keep_drawing(self, session: Session, editor_slice, editor_value, level, width):
        """The strokes in the editor become the drawn label of the slice they were painted on."""
        if editor_slice is None or not editor_value:
            raise UsageError("press 'Draw on the shown slice' first, then paint with the brush")
        session.draw(int(editor_slice), editor_value.get("layers") or [])
        return (
            session,
            self.drawn_summary(session),
            session.view(int(editor_slice), level, width, show_prediction=False),
            int(editor_slice),
            self.gr.Tabs(selected="view"),
        )

    def forget_drawings(self, session: Session):
        session.drawn = {}
        return session, self.drawn_summary(session)

    def drawn_summary(self, session: Session) -> str:
        if not session.drawn:
            return "No slice drawn yet."
        parts = [
            f"slice {index} (class {', '.join(str(c) for c in sorted(set(label[label > 0].tolist())))})"
            for index, label in sorted(session.drawn.items())
        ]
        return "Drawn context: " + "; ".join(parts) + "."

    # -- labelled volume

    def choose_labelled(self, session: Session, task_name, images, targets, slices):
        task = get_task(task_name, "task")
        context = LabelledContext(tuple(images or ()), tuple(targets or ()), (slices or "").strip() or "auto:3")
        pairs = session.choose_labelled(context, task, self.args, self.work_dir)
        return session, f"Labelled context: {describe_pairs(pairs, task)}."

    # -- running

    def run(self, session: Session, task_name, index, level, width, progress=None):
        task = get_task(task_name, "task")
        started = time.perf_counter()

        def report(done, total):
            if progress is not None:
                progress((done, total), desc="predicting slices", unit="slices")

        session.run(self.predictor, task, self.args, self.work_dir, on_progress=report)
        seconds = time.perf_counter() - started
        index = int(index)
        files = session.downloads(index, level, width, self.outputs_dir())
        query = session.require_query()
        status = f"Predicted {query.num_slices} slice(s) of {query.name} in {seconds:.1f} s ({task.name})."
        return session, session.view(index, level, width), session.volumes_table(), files, status


def brush(gr, class_id: int = 1):
    """The editor's brush: one fixed colour per class, the chosen class's colour in hand."""
    colours = [colour_hex(c) for c in range(1, BRUSH_CLASSES + 1)]
    return gr.Brush(colors=colours, default_color=colour_hex(class_id), color_mode="fixed")


def build_app(gr, predictor, args, work_dir: str):
    """The gradio Blocks of the page, with its events wired to a Page."""
    page = Page(gr, predictor, args, work_dir)
    shown = page.message
    with gr.Blocks(title="MVG", analytics_enabled=False) as app:
        session = gr.State(Session())
        editor_slice = gr.State(None)
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=340):
                query_files = gr.File(
                    label="query: a volume (NIfTI, MetaImage, NRRD, DICOM files) or a PNG",
                    file_count="multiple",
                    elem_id="query-files",
                )
                with gr.Row():
                    modality = gr.Radio(list(MODALITIES), value=AUTO_MODALITY, label="modality (intensity scaling)")
                    task = gr.Dropdown(list(TASK_NAMES), value="segmentation", label="task")
                with gr.Accordion("context from a labelled volume (or an image pair)", open=False):
                    context_image = gr.File(label="context image", file_count="multiple", elem_id="context-image")
                    context_target = gr.File(
                        label="its label (image tasks: its target image)",
                        file_count="multiple",
                        elem_id="context-label",
                    )
                    context_slices = gr.Textbox(
                        "auto:3", label="slices: indices (40 55 70) or auto:K", elem_id="context-slices"
                    )
                    labelled_button = gr.Button("Use these slices", elem_id="use-labelled")
                with gr.Row(equal_height=True):
                    drawn_status = gr.Markdown("No slice drawn yet.", elem_id="drawn-status")
                    forget_button = gr.Button("Forget the drawn slices", size="sm", elem_id="forget", scale=0)
                run_button = gr.Button("Run on every slice", variant="primary", elem_id="run")
                status = gr.Markdown("Open a query to begin.", elem_id="status")
            with gr.Column(scale=2):
                with gr.Tabs(selected="view") as tabs:
                    with gr.Tab("Slices", id="view"):
                        view = gr.Image(
                            label="slice", type="numpy", format="png", interactive=False, elem_id="view", height=480
                        )
                    with gr.Tab("Draw a context label", id="draw"):
                        gr.Markdown(brush_legend())
                        class_picker = gr.Radio(
                            list(range(1, BRUSH_CLASSES + 1)), value=1, label="class to paint", elem_id="class-picker"
                        )
                        editor = gr.ImageEditor(
                            type="numpy",
                            image_mode="RGBA",
                            format="png",  # lossless: the stroke colours are the classes
                            sources=(),
                            transforms=(),
                            layers=False,
                            brush=brush(gr),
                            label="draw on the shown slice",
                            elem_id="editor",
                            height=480,
                        )
                        keep_button = gr.Button("Use the drawing as a context", variant="primary", elem_id="keep")
                with gr.Row():
                    slice_index = gr.Slider(0, 1, value=0, step=1, label="slice", elem_id="slice", scale=2)
                    level = gr.Slider(0, 255, value=127.5, label="window level", elem_id="level")
                    width = gr.Slider(1, 255, value=255, label="window width", elem_id="width")
                with gr.Row():
                    show_prediction = gr.Checkbox(True, label="show the prediction")
                    draw_button = gr.Button("Draw on the shown slice", elem_id="draw-button")
                with gr.Row():
                    volumes = gr.Dataframe(
                        headers=["class", "voxels", "ml"],
                        datatype=["number", "number", "number"],
                        label="predicted volume per class",
                        interactive=False,
                        elem_id="volumes",
                    )
                    downloads = gr.File(
                        label="downloads", file_count="multiple", interactive=False, elem_id="downloads", height=160
                    )

        view_inputs = [session, slice_index, level, width, show_prediction]
        opened = [
            session,
            slice_index,
            level,
            width,
            view,
            status,
            volumes,
            downloads,
            drawn_status,
            editor,
            editor_slice,
        ]
        query_files.upload(shown(page.open_query), [session, query_files, modality], opened, api_name="open_query")

        def reopen_query(session, files, modality):
            """Another modality: the query read again with its scaling; nothing to do before there is one."""
            if not files:
                return [gr.skip()] * len(opened)
            return page.open_query(session, files, modality)

        modality.input(shown(reopen_query), [session, query_files, modality], opened, api_visibility="private")
        for control in (slice_index, level, width, show_prediction):
            control.change(
                shown(page.show),
                view_inputs,
                view,
                show_progress="hidden",
                trigger_mode="always_last",
                api_visibility="private",
            )
        draw_button.click(
            shown(page.start_drawing),
            [session, slice_index, level, width],
            [editor_slice, editor, tabs],
            api_visibility="private",
        )
        class_picker.input(shown(page.choose_class), class_picker, editor, api_visibility="private")
        keep_button.click(
            shown(page.keep_drawing),
            [session, editor_slice, editor, level, width],
            [session, drawn_status, view, slice_index, tabs],
            api_visibility="private",
        )
        forget_button.click(shown(page.forget_drawings), session, [session, drawn_status], api_visibility="private")
        labelled_button.click(
            shown(page.choose_labelled),
            [session, task, context_image, context_target, context_slices],
            [session, status],
            api_name="use_labelled",
        )

        def run(session, task_name, index, level, width, progress=gr.Progress()):  # noqa: B008 (gradio's idiom)
            return page.run(session, task_name, index, level, width, progress)

        run_button.click(
            shown(run),
            [session, task, slice_index, level, width],
            [session, view, volumes, downloads, status],
            api_name="run",
        )
    return app


# ---------------------------------------------------------------------------------------------------
# command line


def make_work_dir() -> str:
    return tempfile.mkdtemp(prefix="mvg-app-")


def launch(app, args, block: bool = True):
    allowed = [os.path.abspath(args.output_dir)] if args.output_dir else None
    return app.launch(
        server_name=args.host,
        server_port=args.port,
        prevent_thread_lock=not block,
        quiet=True,
        show_error=False,
        allowed_paths=allowed,
    )


def stop_on_sigterm():
    """SIGTERM stops the server as Ctrl-C does (gradio closes on KeyboardInterrupt), so that the app's
    folder, with its copies of the uploaded scans, is removed either way."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def run(argv):
    args = get_args_parser().parse_args(argv)
    check_args(args)
    args.port = claim_port(args.host, args.port)
    work_dir = make_work_dir()
    try:
        gr = import_gradio(os.path.join(work_dir, "uploads"))
        predictor = load_predictor(args)
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
        app = build_app(gr, predictor, args, work_dir)
        if not is_loopback(args.host):
            warn(f"listening on {args.host}: anyone who can reach port {args.port} of this machine can use the app")
        log(f"MVG app on {browser_url(args.host, args.port)} (Ctrl-C stops it)")
        stop_on_sigterm()
        launch(app, args)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


def main(argv=None):
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
