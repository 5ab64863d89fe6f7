"""The app (app.py) driven in a real, headless browser, end to end, with a screenshot of the result.

    python -m scripts.browser_check                               # on what scripts/demo.sh wrote
    python -m scripts.browser_check --demo_output /tmp/demo --screenshot docs/app.png
    python -m scripts.browser_check --checkpoint mvg.pth --query scan.nii.gz \\
        --context_image ctx.nii.gz --context_label ctx_seg.nii.gz

It starts the app on a free port of 127.0.0.1, opens the page in headless Chromium, uploads the query,
paints two classes on the shown slice with the brush (checking that the page reads them back as
classes 1 and 2), forgets that drawing, gives the labelled context volume instead, runs the model on
every slice, waits for the prediction, its per-class volumes and its downloads, and saves a screenshot.
Then it stops the app with Ctrl-C's signal and checks that the app removed its temporary folder.

By default the demo's files are used: the checkpoint scripts/demo.sh trains
(<demo_output>/train/checkpoint-last.pth), a held-out slab as the query and a training slab with its
hemispheres label as the context (<demo_output>/sources/hemispheres/...).

Not part of the test suite (CI has no browser). It needs what the app needs (requirements-app.txt,
which includes selenium) and Chromium with its driver: on Debian, apt-get install chromium chromium-driver.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from util.cli import UsageError, docstring_parser, first_line, log, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = (1400, 1250)  # a desktop window tall enough for the slice, the table and the downloads
WAIT_SECONDS = 300  # the longest wait for one step (a run of the whole volume on a slow CPU)
SCREENSHOT_COLOURS = 128  # the screenshot is quantised to this many colours to stay small


def get_args_parser():
    parser = docstring_parser(__doc__)
    parser.add_argument("--demo_output", default="demo_output", help="the folder scripts/demo.sh wrote")
    parser.add_argument("--checkpoint", help="default: <demo_output>/train/checkpoint-last.pth")
    parser.add_argument("--query", help="default: the demo's held-out slab05")
    parser.add_argument("--context_image", help="default: the demo's training slab04")
    parser.add_argument("--context_label", help="default: slab04's hemispheres label")
    parser.add_argument("--context_slices", default="auto:3", help="which context slices (as the page takes them)")
    parser.add_argument("--screenshot", default=os.path.join(REPO, "docs", "app.png"), help="where the PNG goes")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--chromedriver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return parser


def demo_inputs(args):
    """The paths to use, the demo's where none is given; each must exist."""
    sources = os.path.join(args.demo_output, "sources", "hemispheres")
    paths = {
        "--checkpoint": args.checkpoint or os.path.join(args.demo_output, "train", "checkpoint-last.pth"),
        "--query": args.query or os.path.join(sources, "imagesTr", "slab05.nii.gz"),
        "--context_image": args.context_image or os.path.join(sources, "imagesTr", "slab04.nii.gz"),
        "--context_label": args.context_label or os.path.join(sources, "labelsTr", "slab04.nii.gz"),
    }
    for flag, path in paths.items():
        if not os.path.exists(path):
            raise UsageError(f"{flag} {path}: not found; run scripts/demo.sh first, or give {flag}")
    return {flag: os.path.abspath(path) for flag, path in paths.items()}


def import_selenium():
    try:
        from selenium import webdriver
    except ImportError:
        raise UsageError("the browser check needs selenium: pip install -r requirements-app.txt") from None
    return webdriver


def check_browser(args):
    for flag, path in (("--chromium", args.chromium), ("--chromedriver", args.chromedriver)):
        if not (path and os.path.isfile(path) and os.access(path, os.X_OK)):
            raise UsageError(
                f"{flag} {path}: no such program; install Chromium and its driver "
                f"(Debian: apt-get install chromium chromium-driver) or name them with {flag}"
            )


def app_folders() -> set[str]:
    """The temporary folders apps hold now (app.py names them mvg-app-*)."""
    root = tempfile.gettempdir()
    return {name for name in os.listdir(root) if name.startswith("mvg-app-")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------------
# the app in its own process


class AppProcess:
    """python app.py on a free port, with its output kept for messages; stopped like Ctrl-C."""

    def __init__(self, checkpoint: str, log_path: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        command = [sys.executable, "app.py", "--checkpoint", checkpoint, "--port", str(self.port), "--device", "cpu"]
        with open(log_path, "w") as output:  # the app keeps its own handle on the file
            self.process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)

    def log_text(self) -> str:
        with open(self.log_path) as handle:
            return handle.read()

    def wait_until_serving(self, seconds: float = 180):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UsageError(f"the app stopped (status {self.process.returncode}): {self.log_text().strip()}")
            if "MVG app on" in self.log_text():
                return
            time.sleep(0.5)
        raise UsageError(f"the app did not start within {seconds:.0f} s: {self.log_text().strip()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


# ---------------------------------------------------------------------------------------------------
# the page, step by step


class PageDriver:
    def __init__(self, webdriver, args, url: str):
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = args.chromium
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
        ):
            options.add_argument(argument)
        self.browser = webdriver.Chrome(service=Service(args.chromedriver), options=options)
        self.browser.get(url)

    def element(self, css: str):
        from selenium.webdriver.common.by import By

        return self.wait_for(lambda: self.browser.find_element(By.CSS_SELECTOR, css), f"the page to show {css}")

    def wait_for(self, condition, what: str, seconds: float = WAIT_SECONDS):
        """condition()'s first truthy value; an error shown by the page (a gradio toast) stops the wait."""
        from selenium.common.exceptions import WebDriverException

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                value = condition()
            except WebDriverException:
                value = None
            if value:
                return value
            toast = self.page_error()
            if toast:
                raise UsageError(f"waiting for {what}, the page said: {toast}")
            time.sleep(0.3)
        raise UsageError(f"waited {seconds:.0f} s for {what}")

    def page_error(self) -> str:
        from selenium.webdriver.common.by import By

        toasts = self.browser.find_elements(By.CSS_SELECTOR, ".toast-body.error, [data-testid='toast-body']")
        return " ".join(t.text for t in toasts if t.text.strip())

    def wait_idle(self):
        """Until no output of the page is marked as still being updated (gradio greys those out)."""
        busy = "return document.querySelectorAll('.pending, .translucent').length"
        self.wait_for(lambda: self.browser.execute_script(busy) == 0, "the page to finish updating")

    def text_of(self, element_id: str) -> str:
        return self.element(f"#{element_id}").text

    def wait_text(self, element_id: str, fragment: str) -> str:
        """The element's text once it holds `fragment` and the page has finished updating it."""

        def done():
            text = self.text_of(element_id)
            return text if fragment in text and "processing" not in text else None

        return self.wait_for(done, f"'{fragment}' in #{element_id}")

    def upload(self, element_id: str, path: str):
        self.element(f"#{element_id} input[type=file]").send_keys(path)

    def click(self, element_id: str):
        self.element(f"#{element_id}").click()

    def paint(self, dx0: int, dy0: int, dx1: int, dy1: int):
        """One brush stroke across the editor's canvas, offsets from its centre in screen pixels."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        canvas = self.wait_for(lambda: self.browser.find_elements(By.CSS_SELECTOR, "#editor canvas")[-1], "the canvas")
        stroke = ActionChains(self.browser).move_to_element_with_offset(canvas, dx0, dy0).click_and_hold()
        for step in range(1, 11):
            stroke.move_to_element_with_offset(canvas, dx0 + (dx1 - dx0) * step // 10, dy0 + (dy1 - dy0) * step // 10)
        stroke.release().perform()

    def pick_class(self, class_id: int):
        """Chooses the class in the picker and waits until the editor's brush has taken its colour."""
        from selenium.webdriver.common.by import By

        from app_session import class_colours

        self.element("#class-picker").find_elements(By.CSS_SELECTOR, "input")[class_id - 1].click()
        colour = "rgb({}, {}, {})".format(*class_colours(class_id)[class_id])
        self.wait_for(
            lambda: colour in (self.element("#editor button[title='Color']").get_attribute("style") or ""),
            f"the brush to take class {class_id}'s colour {colour}",
        )
        time.sleep(1)  # the canvas settles after the change; a stroke begun meanwhile is dropped

    def open_accordion(self, title: str):
        from selenium.webdriver.common.by import By

        buttons = self.browser.find_elements(By.CSS_SELECTOR, "button.label-wrap, .label-wrap")
        for button in buttons:
            if title in button.text:
                button.click()
                return
        raise UsageError(f"no section '{title}' on the page")

    def screenshot(self, path: str):
        from PIL import Image

        raw = path + ".raw.png"
        self.browser.save_screenshot(raw)
        with Image.open(raw) as picture:
            picture.convert("RGB").quantize(SCREENSHOT_COLOURS).save(path, optimize=True)
        os.remove(raw)

    def close(self):
        self.browser.quit()


def drive(page: PageDriver, inputs: dict, args):
    page.upload("query-files", inputs["--query"])
    log(page.wait_text("status", "Opened"))

    page.click("draw-button")
    page.element("#editor canvas")
    time.sleep(2)
    page.paint(-50, -30, 50, -30)
    page.pick_class(2)
    page.paint(-50, 40, 50, 40)
    page.click("keep")
    drawn = page.wait_text("drawn-status", "Drawn context")
    if "class 1, 2" not in drawn:
        raise UsageError(f"two classes were painted, but the page read back: {drawn}")
    log(drawn)
    page.click("forget")
    page.wait_text("drawn-status", "No slice drawn")

    page.open_accordion("context from a labelled volume")
    page.upload("context-image", inputs["--context_image"])
    page.upload("context-label", inputs["--context_label"])
    for element_id, flag in (("context-image", "--context_image"), ("context-label", "--context_label")):
        # Uploaded once the page lists the file (it breaks the name before its extension).
        page.wait_text(element_id, os.path.basename(inputs[flag]).split(".")[0])
    slices = page.element("#context-slices textarea, #context-slices input")
    slices.clear()
    slices.send_keys(args.context_slices)
    page.click("use-labelled")
    log(page.wait_text("status", "Labelled context"))

    page.click("run")
    log(page.wait_text("status", "Predicted"))
    page.wait_idle()
    table = page.wait_for(
        lambda: re.search(r"ml\s+\d+\s", page.text_of("volumes")) and page.text_of("volumes"), "the table"
    )
    downloads = page.wait_text("downloads", "_segmentation.nii")
    log(f"volumes per class: {' '.join(table.split())}")
    log(f"downloads: {' '.join(downloads.split())}")
    time.sleep(1)
    page.browser.execute_script("window.scrollTo(0, 0)")
    page.screenshot(args.screenshot)
    log(f"screenshot: {args.screenshot} ({os.path.getsize(args.screenshot) / 1024:.0f} KB)")


def run(argv):
    args = get_args_parser().parse_args(argv)
    inputs = demo_inputs(args)
    webdriver = import_selenium()
    from selenium.common.exceptions import WebDriverException

    check_browser(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.screenshot)), exist_ok=True)
    folders_before = app_folders()
    handle, log_path = tempfile.mkstemp(prefix="browser-check-", suffix=".log")
    os.close(handle)
    app = AppProcess(inputs["--checkpoint"], log_path)
    try:
        app.wait_until_serving()
        log(f"app serving at {app.url}")
        page = PageDriver(webdriver, args, app.url)
        try:
            drive(page, inputs, args)
        except WebDriverException as error:
            raise UsageError(f"the browser failed: {first_line(error)}; the app's output is in {log_path}") from None
        except UsageError as error:
            raise UsageError(f"{error}; the app's output is in {log_path}") from None
        finally:
            page.close()
    finally:
        status = app.stop()
    output = app.log_text()
    os.remove(app.log_path)
    if status not in (0, -signal.SIGINT):
        raise UsageError(f"the app ended with status {status}: {output.strip()}")
    left = app_folders() - folders_before
    if left:
        raise UsageError(f"the app left its temporary folder behind: {', '.join(sorted(left))}")
    log(
        "browser check passed: query opened, two classes drawn and read back, labelled context used, "
        "whole volume predicted, downloads offered"
    )
    return 0


def main(argv=None):
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
