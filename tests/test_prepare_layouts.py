"""The layout registry (datasets/layouts.py): datasets.prepare's subcommands, flags and case finding all
come from its entries, so a new layout is one entry; and no module of the data path compares task names."""

import os
import re

import numpy as np
import pytest

from datasets import layouts, prepare
from datasets.readers import InputError, Source
from datasets.sources import Case
from tasks import TASKS, Task
from tests.helpers import common, dataset_at, labelled_volume, run, save_nifti

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subcommands(parser):
    return next(action for action in parser._subparsers._group_actions if action.choices).choices


def test_every_layout_is_a_subcommand_with_its_help_task_and_folders():
    commands = subcommands(prepare.build_parser())
    assert list(commands) == [*layouts.LAYOUTS, "verify"]
    for name, layout in layouts.LAYOUTS.items():
        assert layout.name == name and isinstance(layout.task, Task) and layout.help
        assert layout.help in commands[name].description
        flags = {option for action in commands[name]._actions for option in action.option_strings}
        assert {"--root", "--out", "--dataset", "--size", "--axis", "--channel"} <= flags
        assert ("--label_map" in flags) == layout.task.target_is_label
        assert ("--min_mask_pixels" in flags) == bool(layout.task.region_folder)


def test_folders_follow_the_task_and_synthesis_names_them_by_contrast():
    parser = prepare.build_parser()
    args = parser.parse_args(
        ["brats-synthesis", "--root", "r", "--out", "o", "--dataset", "d", "--source", "t1n", "--target", "t2f"]
    )
    assert layouts.LAYOUTS["brats-synthesis"].folders(args) == {"t1n": "image", "t2f": "image"}
    args.target = "t1n"
    with pytest.raises(InputError, match="--source and --target must be different"):
        layouts.LAYOUTS["brats-synthesis"].folders(args)
    args = parser.parse_args(["brats-inpainting", "--root", "r", "--out", "o", "--dataset", "d"])
    assert layouts.LAYOUTS["brats-inpainting"].folders(args) == TASKS["inpainting"].folders


class CaseFoldersLayout(layouts.Layout):
    """A layout of the kind one would add: <root>/<case>/scan.nii.gz with <case>/truth.nii.gz."""

    name, task, help = "case-folders", TASKS["segmentation"], "one folder per case holding scan and truth"

    def add_arguments(self, parser):
        parser.add_argument("--scan_name", default="scan.nii.gz", help="the image file in each case folder")

    def find_cases(self, args):
        cases = [
            Case(
                name,
                {
                    "image": Source(os.path.join(args.root, name, args.scan_name)),
                    "label": Source(os.path.join(args.root, name, "truth.nii.gz")),
                },
            )
            for name in sorted(os.listdir(args.root))
        ]
        return layouts.FoundCases(cases, {1: "organ"}, "CT")


def test_a_new_layout_is_one_registry_entry(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(layouts.LAYOUTS, CaseFoldersLayout.name, CaseFoldersLayout())
    for case_id in ("a", "b"):
        image, label = labelled_volume(ids_on_slices={2: 1, 3: 1})
        save_nifti(tmp_path / "src" / case_id / "scan.nii.gz", image)
        save_nifti(tmp_path / "src" / case_id / "truth.nii.gz", label)
    assert run("case-folders", "--root", tmp_path / "src", *common(tmp_path / "out", "New"), "--test_fraction", 0) == 0
    dataset = dataset_at(tmp_path / "out", "New")
    assert dataset.case_ids() == ["a", "b"] and dataset.classes == {0: "background", 1: "organ"}
    assert dataset.task == "segmentation" and dataset.modality == "CT" and dataset.case("a")["slices"] == [2, 3]
    with pytest.raises(SystemExit):
        prepare.main(["case-folders", "--help"])
    assert "--scan_name" in capsys.readouterr().out


def test_a_layout_error_leaves_through_the_one_error_path(tmp_path, capsys):
    assert run("msd", "--root", tmp_path / "nothing", *common(tmp_path / "out", "X"), "--source_splits", "Tr:nope") == 2
    assert "error: --source_splits: 'Tr:nope' is not SUFFIX:{train,test,val,skip}" in capsys.readouterr().err
    assert run("no-such-layout", "--root", tmp_path) == 2
    assert "invalid choice: 'no-such-layout'" in capsys.readouterr().err


TASK_NAME_COMPARISON = re.compile(r"""(==|!=|\bin)\s*\(?\s*['"](segmentation|synthesis|inpainting|denoising)['"]""")
DATA_PATH_MODULES = ["predict.py"] + [
    os.path.join("datasets", name)
    for name in (
        "prepare.py",
        "case_processing.py",
        "output_folder.py",
        "slicing.py",
        "layouts.py",
        "sources.py",
        "geometry.py",
        "intensity.py",
        "manifest.py",
        "verify.py",
    )
]


@pytest.mark.parametrize("module", DATA_PATH_MODULES)
def test_no_module_of_the_data_path_compares_task_names(module):
    with open(os.path.join(REPO, module)) as handle:
        source = handle.read()
    assert not TASK_NAME_COMPARISON.findall(source), "ask the task registry (tasks.py) instead"


def test_header_checks_see_every_problem_before_any_case_is_read(tmp_path, capsys):
    image, label = labelled_volume(ids_on_slices={1: 1})
    save_nifti(tmp_path / "imagesTr" / "a.nii.gz", np.stack([image, image], axis=-1))
    save_nifti(tmp_path / "labelsTr" / "a.nii.gz", label)
    save_nifti(tmp_path / "imagesTr" / "b.nii.gz", image)
    save_nifti(tmp_path / "labelsTr" / "b.nii.gz", label[:, :, :3])
    assert run("msd", "--root", tmp_path, *common(tmp_path / "out", "H"), "--modality", "CT") == 2
    error = capsys.readouterr().err
    assert "2 of 2 cases have problems" in error and "case 'a'" in error and "is 4D" in error
    assert "case 'b': the grids of image and label differ (shapes (8, 8, 6) vs (8, 8, 3)" in error
    assert not os.path.exists(tmp_path / "out" / "H")
