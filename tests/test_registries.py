"""Adding a task is one entry in tasks.py, plus a layout entry to prepare its data: a task the code
has never seen is prepared, trained, logged per task and evaluated with its metrics and baselines."""

import json
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from tests.helpers import REPO, TINY

NEW_TASK_RUN = """
import sys
sys.path.insert(0, {repo!r})
import tasks

# The one entry a new task needs (here: a smoothing filter learnt in context), made before anything
# else is imported, as an edit of tasks.py would be.
tasks.TASKS["smoothing"] = tasks.Task(
    "smoothing", tasks.IMAGE, {{"image": "image", "target": "image"}},
    help="image -> its smoothed version, on the input's intensity scale", target_on_input_scale=True)
tasks.TASK_NAMES = tuple(tasks.TASKS)

from datasets import layouts

class SmoothingLayout(layouts.DenoisingLayout):  # the denoising layout's files and flags, another task
    name, task, help = "smoothing", tasks.TASKS["smoothing"], "raw / smoothed volumes"

layouts.LAYOUTS["smoothing"] = SmoothingLayout()

import main_eval
import main_pretrain
from datasets import prepare

root, out, run, evaluation = sys.argv[1:5]
assert prepare.main(["smoothing", "--root", root, "--low_dose", "raw/*.nii.gz", "--normal_dose",
                     "smooth/*.nii.gz", "--out", out, "--dataset", "Smooth", "--size", "32",
                     "--test_fraction", "0.34", "--seed", "0"]) == 0
assert main_pretrain.main({tiny!r} + ["--data_path", out, "--output_dir", run, "--epochs", "1",
                                       "--batch_size", "2", "--samples_per_epoch", "4"]) is not None
assert main_eval.main(["--checkpoint", run + "/checkpoint-last.pth", "--data_path", out,
                       "--output_dir", evaluation, "--baselines", "--device", "cpu"]) == 0
"""


def smoothing_cases(root):
    rng = np.random.default_rng(0)
    for number in range(3):
        raw = rng.normal(40.0, 60.0, (24, 24, 4)).astype(np.float32)  # CT-like values in HU
        smooth = gaussian_filter(raw, sigma=(1.5, 1.5, 0))
        for folder, volume in (("raw", raw), ("smooth", smooth)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(volume, np.eye(4)), str(root / folder / f"case{number}.nii.gz"))


def test_a_new_task_is_one_registry_entry_from_preparation_to_evaluation(tmp_path):
    smoothing_cases(tmp_path / "src")
    script = tmp_path / "new_task.py"
    script.write_text(textwrap.dedent(NEW_TASK_RUN.format(repo=str(REPO), tiny=list(TINY))))
    paths = [tmp_path / name for name in ("src", "prepared", "run", "eval")]
    result = subprocess.run(
        [sys.executable, str(script), *map(str, paths)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]

    manifest = json.loads((tmp_path / "prepared" / "Smooth" / "manifest.json").read_text())
    assert manifest["task"] == "smoothing"
    records = [json.loads(line) for line in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    assert np.isfinite(records[-1]["train_loss_task/smoothing"])
    summaries = json.loads((tmp_path / "eval" / "results.json").read_text())["datasets"]
    (summary,) = [s for s in summaries if s["protocol"] == "foreground"]
    assert summary["task"] == "smoothing" and set(summary["baselines"]) == {"identity"}
    assert np.isfinite(summary["psnr"]) and 0 < summary["ssim"] <= 1
