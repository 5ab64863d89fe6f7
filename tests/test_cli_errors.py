"""The command line's one error path (util/cli.py): bad input becomes one `error:` line and status 2,
never a traceback; what the data-reading layer says about bad prepared roots and manifests; and that
the installed packages meet the floors of requirements.txt. When a SLURM job's training run is
finished: tests/test_run_finished.py."""

import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import nibabel as nib
import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from datasets import prepare
from datasets.manifest import PreparedDataset, find_datasets, load_manifest
from datasets.readers import InputError
from tests.helpers import REPO, assert_one_error_line, run_module, usage_error
from util.cli import UsageError, run_main

# ---------------------------------------------------------------- run_main


def test_run_main_turns_a_usage_error_into_one_line_and_status_2(capsys):
    def bad_input(argv):
        raise UsageError(f"--data_path {argv[0]}: not found")

    assert run_main(bad_input, ["/nowhere"]) == 2
    assert capsys.readouterr().err == "error: --data_path /nowhere: not found\n"


def test_run_main_passes_on_exit_statuses_and_bugs():
    assert run_main(lambda argv: 1) == 1
    assert run_main(lambda argv: {"progress": "a result, not a status"}) == 0
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_main(lambda argv: 1 / 0)


def test_input_errors_of_the_readers_are_usage_errors(capsys):
    def unreadable(argv):
        raise InputError("case 'x', x.nii.gz: cannot read")

    assert issubclass(InputError, UsageError) and run_main(unreadable) == 2
    assert capsys.readouterr().err == "error: case 'x', x.nii.gz: cannot read\n"


# ---------------------------------------------------------------- prepared roots and manifests


@pytest.fixture
def prepared(tmp_path):
    """A prepared root tmp_path/out holding one small segmentation dataset, DS."""
    image = np.random.default_rng(0).normal(100, 20, (8, 8, 4)).astype(np.float32)
    label = np.zeros((8, 8, 4), np.int16)
    label[2:5, 2:5, 1:3] = 1
    for folder, volume in (("imagesTr", image), ("labelsTr", label)):
        os.makedirs(tmp_path / "src" / folder)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "src" / folder / "c0.nii.gz")
    assert (
        prepare.main(
            [
                "msd",
                "--root",
                str(tmp_path / "src"),
                "--out",
                str(tmp_path / "out"),
                "--dataset",
                "DS",
                "--size",
                "8",
                "--modality",
                "CT",
                "--test_fraction",
                "0",
            ]
        )
        == 0
    )
    return tmp_path / "out"


def manifest_path(root):
    return root / "DS" / "manifest.json"


def rewrite_manifest(root, edit):
    manifest = json.loads(manifest_path(root).read_text())
    edit(manifest)
    manifest_path(root).write_text(json.dumps(manifest))


def test_a_missing_or_unreadable_root(tmp_path):
    missing = tmp_path / "nonexistent"
    assert usage_error(find_datasets, missing) == f"{missing}: prepared root not found"
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    assert usage_error(find_datasets, a_file).startswith(f"{a_file}: not a folder")


def test_a_root_without_datasets(tmp_path):
    assert usage_error(find_datasets, tmp_path).startswith(f"{tmp_path}: no dataset folder with a manifest.json")
    os.makedirs(tmp_path / "half_prepared" / "meta")
    assert "(found 1 without one)" in usage_error(find_datasets, tmp_path)


def test_a_dataset_folder_given_as_the_root(prepared):
    assert usage_error(find_datasets, prepared / "DS") == (
        f"{prepared / 'DS'}: a dataset folder, not a prepared root; give the folder that holds it, {prepared}"
    )


def test_a_dataset_folder_without_its_manifest(prepared):
    os.remove(manifest_path(prepared))
    message = usage_error(PreparedDataset, prepared / "DS")
    assert message.startswith(f"{manifest_path(prepared)}: not found")
    assert usage_error(find_datasets, prepared).startswith(f"{prepared}: no dataset folder")


def test_a_manifest_that_is_not_json(prepared):
    manifest_path(prepared).write_text('{"format_version": 1,\n "dataset": "DS",, }')
    message = usage_error(load_manifest, prepared / "DS")
    assert message.startswith(f"{manifest_path(prepared)}: not valid JSON (") and "line 2, column" in message
    manifest_path(prepared).write_text("[1, 2]")
    assert usage_error(load_manifest, prepared / "DS").endswith("expected a JSON object, found a list")


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda m: m.pop("cases"), "manifest.json lacks the key 'cases'"),
        (lambda m: m.update(size="512x512"), "manifest.json: 'size' should be a list, not a string"),
        (lambda m: m.update(classes={}), "manifest.json: 'classes' should be a list or null, not an object"),
        (lambda m: m["cases"]["c0"].pop("slices"), "manifest.json: cases['c0'] lacks the key 'slices'"),
        (
            lambda m: m["cases"]["c0"].update(num_slices="4"),
            "manifest.json: cases['c0']: 'num_slices' should be a whole number, not a string",
        ),
        (
            lambda m: m["cases"]["c0"].update(foreground_slices=None),
            "manifest.json: cases['c0']: 'foreground_slices' should be a list, not null",
        ),
        (lambda m: m["cases"].update(c1=[]), "manifest.json: cases['c1'] should be an object, not a list"),
    ],
)
def test_a_manifest_without_a_required_key_or_of_a_wrong_type(prepared, edit, expected):
    rewrite_manifest(prepared, edit)
    message = usage_error(PreparedDataset, prepared / "DS")
    assert message.startswith(str(manifest_path(prepared))) and message.endswith(expected)


def test_an_unsupported_format_version(prepared):
    rewrite_manifest(prepared, lambda m: m.update(format_version=99))
    assert usage_error(load_manifest, prepared / "DS").startswith(
        f"{manifest_path(prepared)}: unsupported format_version 99 (this version of MVG reads 1)"
    )
    rewrite_manifest(prepared, lambda m: m.pop("format_version"))
    assert "unsupported format_version null" in usage_error(load_manifest, prepared / "DS")


def test_verify_reports_a_bad_manifest_among_its_problems(prepared, capsys):
    rewrite_manifest(prepared, lambda m: m.pop("cases"))
    assert prepare.main(["verify", str(prepared)]) == 2
    assert "manifest.json lacks the key 'cases'" in capsys.readouterr().err


def test_verify_of_a_missing_root_is_one_error_line():
    assert_one_error_line(
        run_module("datasets.prepare", "verify", "/nonexistent"), "/nonexistent: prepared root not found"
    )
    assert_one_error_line(run_module("datasets.verify", "/nonexistent"), "/nonexistent")


def test_prepare_with_bad_input_is_one_error_line(tmp_path):
    result = run_module(
        "datasets.prepare",
        "msd",
        "--root",
        tmp_path / "nothing",
        "--out",
        tmp_path / "out",
        "--dataset",
        "X",
        "--modality",
        "CT",
    )
    assert_one_error_line(result, str(tmp_path / "nothing"))


# ---------------------------------------------------------------- requirements.txt floors


def unmet_requirements(lines):
    """The requirement lines the installed packages do not satisfy, with what is installed."""
    unmet = []
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        requirement = Requirement(text)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            unmet.append(f"{text} (not installed)")
            continue
        # A local build tag such as torch's +cu130 is the same release.
        if not requirement.specifier.contains(Version(installed).public, prereleases=True):
            unmet.append(f"{text} (installed {installed})")
    return unmet


def test_the_installed_packages_meet_the_floors_of_requirements_txt():
    with open(os.path.join(REPO, "requirements.txt")) as handle:
        assert unmet_requirements(handle) == []


def test_an_unmet_floor_is_found():
    installed_torch = version("torch")
    assert unmet_requirements(
        [f"torch>={Version(installed_torch).public}  # the installed release", "torch>=999", "no-such-package-xyz>=1"]
    ) == [f"torch>=999 (installed {installed_torch})", "no-such-package-xyz>=1 (not installed)"]


# ---------------------------------------------------------------- every entry script, bad paths


def run_script(*argv):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_training_on_a_missing_data_path_is_one_error_line(tmp_path):
    """The seed command's most common mistake, answered before any model is built."""
    result = run_script(
        "main_pretrain.py",
        "--device",
        "cpu",
        "--model",
        "mvg_vit_tiny_patch16",
        "--data_path",
        tmp_path / "nowhere",
        "--output_dir",
        tmp_path / "out",
    )
    assert_one_error_line(result, "nowhere: prepared root not found")


def test_evaluation_and_prediction_with_a_broken_checkpoint_are_one_error_line(tmp_path, prepared):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(os.urandom(4096))
    result = run_script("main_eval.py", "--checkpoint", broken, "--data_path", prepared, "--device", "cpu")
    assert_one_error_line(result, f"--checkpoint {broken}: not a readable checkpoint")
    result = run_script(
        "predict.py",
        "--checkpoint",
        broken,
        "--context_image",
        "a.png",
        "--context_label",
        "b.png",
        "--query",
        "c.png",
        "--output",
        tmp_path / "d.png",
    )
    assert_one_error_line(result, f"--checkpoint {broken}: not a readable checkpoint")


def entry_point_mains():
    import main_eval
    import main_pretrain
    import predict

    return {"train": lambda argv: run_main(main_pretrain.main, argv), "eval": main_eval.main, "predict": predict.main}


BAD_PATHS = {  # entry point, its arguments ({root}: a prepared root, {tmp}: a scratch folder), the message
    "train, empty root": ("train", ["--data_path", "{tmp}/empty"], "no dataset folder with a manifest.json"),
    "train, bad manifest": ("train", ["--data_path", "{root}"], "manifest.json: not valid JSON"),
    "train, missing mixture": ("train", ["--mixture", "{tmp}/mix.json"], "mix.json"),
    "train, missing finetune": (
        "train",
        ["--finetune", "{tmp}/mae.pth", "--data_path", "{root}"],
        "--finetune {tmp}/mae.pth: file not found",
    ),
    "eval, missing root": (
        "eval",
        ["--checkpoint", "{tmp}/c.pth", "--data_path", "{tmp}/none"],
        "{tmp}/none: prepared root not found",
    ),
    "eval, bad manifest": (
        "eval",
        ["--checkpoint", "{tmp}/c.pth", "--data_path", "{root}"],
        "manifest.json: not valid JSON",
    ),
    "eval, missing checkpoint": (
        "eval",
        ["--checkpoint", "{tmp}/c.pth", "--data_path", "{good}"],
        "--checkpoint {tmp}/c.pth: file not found",
    ),
    "predict, missing checkpoint": (
        "predict",
        [
            "--checkpoint",
            "{tmp}/c.pth",
            "--context_image",
            "{tmp}/a.png",
            "--context_label",
            "{tmp}/b.png",
            "--query",
            "{tmp}/q.png",
            "--output",
            "{tmp}/o.png",
        ],
        "--checkpoint {tmp}/c.pth: file not found",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PATHS))
def test_bad_paths_are_one_error_line_in_every_entry_point(case, tmp_path, prepared, capsys):
    entry, argv, message = BAD_PATHS[case]
    os.makedirs(tmp_path / "empty")
    broken = tmp_path / "broken"
    os.makedirs(broken / "DS")
    (broken / "DS" / "manifest.json").write_text("{not json")
    names = {"tmp": str(tmp_path), "root": str(broken), "good": str(prepared)}
    argv = [word.format(**names) for word in argv]
    if entry == "train":
        argv += ["--device", "cpu", "--model", "mvg_vit_tiny_patch16", "--output_dir", str(tmp_path / "out")]
    capsys.readouterr()
    assert entry_point_mains()[entry](argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ") and message.format(**names) in error, error


# ---------------------------------------------------------------- one convention across entry points

SHARED_FLAGS = (
    "--device",
    "--precision",
    "--attention",
    "--model",
    "--input_size",
    "--depth",
    "--label_encoding",
    "--force",
)
PROMPT_FLAGS = ("--num_prompts", "--ensemble", "--scale")


def entry_point_parsers():
    import main_eval
    import main_pretrain
    import predict

    return {
        "train": main_pretrain.get_args_parser(),
        "eval": main_eval.get_args_parser(),
        "predict": predict.get_args_parser(),
    }


def flag_spec(parser, flag):
    """What a user sees of a flag: its default, choices, number of values and type."""
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    return action.default, tuple(action.choices or ()), action.nargs, action.type


def test_shared_flags_are_spelled_and_defaulted_alike_in_every_entry_point():
    parsers = entry_point_parsers()
    for flag in SHARED_FLAGS:
        specs = {name: flag_spec(parser, flag) for name, parser in parsers.items()}
        assert len(set(specs.values())) == 1, (flag, specs)
    for flag in PROMPT_FLAGS:
        specs = {name: flag_spec(parsers[name], flag) for name in ("eval", "predict")}
        assert len(set(specs.values())) == 1, (flag, specs)
    assert flag_spec(parsers["eval"], "--precision")[0] == "auto"


@pytest.mark.parametrize("entry", ["train", "eval", "predict"])
def test_a_bad_flag_value_is_one_error_line_in_every_entry_point(entry, capsys):
    assert entry_point_mains()[entry](["--precision", "fp64"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ") and "--precision" in error and "fp64" in error, error


def test_fp16_on_the_cpu_is_refused_by_name():
    from util.runtime import resolve_precision

    with pytest.raises(UsageError, match="--precision fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    assert resolve_precision("auto", "cpu") == "fp32"


@pytest.mark.parametrize("native_bf16", (True, False))
def test_auto_precision_on_the_cpu_infers_in_bf16_only_where_the_cpu_has_it(monkeypatch, native_bf16):
    from util import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)
    assert runtime.resolve_precision("auto", "cpu", inference=True) == ("bf16" if native_bf16 else "fp32")
    assert runtime.resolve_precision("auto", "cpu") == "fp32"  # training
    assert runtime.resolve_precision("fp32", "cpu", inference=True) == "fp32"
