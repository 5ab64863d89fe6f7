"""The source layouts datasets.prepare reads, one entry each in LAYOUTS: a subcommand with its help,
its task (tasks.py), its own flags, its case finder and its folder names. prepare builds its subcommands
and finds cases through this registry, so adding a layout is one entry here (plus its tests).

Each finder returns the cases (datasets/sources.py: an id, the volume of each folder, the split when the
source defines one), the class names the source gives ({} when none) and the modality it implies (None
when it does not say). The folders are the task's (tasks.py), input first and target second:
    segmentation   image, label
    synthesis      <source contrast>, <target contrast>   (e.g. t1c, t2w)
    inpainting     image (voided slice), target (healthy image), mask (region to fill)
    denoising      image (low dose), target (normal dose)
"""

import abc
import glob
import json
import os
import re
from typing import NamedTuple

from tasks import TASKS, Task
from util.cli import log

from .readers import VOLUME_FILE_EXTENSIONS, InputError, Source
from .sources import Case, pair_globs, problem_list_error, strip_extension, volume_path

NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
DEFAULT_SOURCE_SPLITS = {"Tr": "train", "Va": "test", "Val": "test", "Ts": "test"}
MR_CHANNEL_NAMES = {
    "MRI",
    "MR",
    "T1",
    "T1W",
    "T1C",
    "T1GD",
    "T2",
    "T2W",
    "FLAIR",
    "ADC",
    "DWI",
    "PD",
    "T1CE",
    "T2F",
    "T1N",
    "CINE",
    "LGE",
    "MPRAGE",
}


class FoundCases(NamedTuple):
    cases: list
    class_names: dict[int, str]  # {id: name} the source gives; {} when none
    modality: str | None  # the modality the source implies; None when it does not say


# ---------------------------------------------------------------- nnU-Net / Medical Segmentation Decathlon


def read_dataset_json(root):
    path = os.path.join(root, "dataset.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not readable JSON ({error})") from error


def class_names_from_dataset_json(description):
    """{id: name} from "labels", MSD style {"0": "background"} or nnU-Net v2 style {"background": 0}.
    nnU-Net v2 region entries (a list of ids) describe training regions, not classes, and are left out."""
    labels = (description or {}).get("labels") or {}
    names = {}
    for key, value in labels.items():
        if str(key).lstrip("-").isdigit():
            names[int(key)] = str(value)
        elif isinstance(value, int):
            names[value] = str(key)
    return names


def modality_from_dataset_json(description, channel):
    """'CT' or 'MRI' from MSD "modality" / nnU-Net v2 "channel_names", None when unclear."""
    channels = (description or {}).get("modality") or (description or {}).get("channel_names") or {}
    name = str(channels.get(str(channel), channels.get(channel, ""))).upper().replace("-", "")
    if name == "CT":
        return "CT"
    if name in MR_CHANNEL_NAMES:
        return "MRI"
    return None


def _volume_stems(folder):
    """{file name: name without extension}; skips hidden files such as the '._x.nii.gz' that macOS
    leaves in the MSD archives."""
    return {
        name: strip_extension(name)
        for name in sorted(os.listdir(folder))
        if not name.startswith(".") and name.lower().endswith(VOLUME_FILE_EXTENSIONS)
    }


def _msd_images(folder, label_folder, channel):
    """{case id: path} of one images folder. nnU-Net names images <case>_XXXX (XXXX the channel) and
    labels <case>; the channel suffix is only taken as such when no label carries the full name, so
    MSD case ids that end in four digits stay intact."""
    stems = _volume_stems(folder)
    label_stems = set(_volume_stems(label_folder).values())
    nnunet_style = bool(stems) and all(
        NNUNET_CHANNEL.match(stem) and stem not in label_stems for stem in stems.values()
    )
    images = {}
    for name, stem in stems.items():
        if nnunet_style:
            match = NNUNET_CHANNEL.match(stem)
            if int(match["channel"]) != channel:
                continue
            stem = match["case"]
        images[stem] = os.path.join(folder, name)
    return images


def find_msd_cases(root, channel=0, source_splits=None):
    """imagesTr/labelsTr (and Va, Val, Ts when they exist with their labels folder)."""
    source_splits = source_splits or DEFAULT_SOURCE_SPLITS
    cases, problems, present = [], [], []
    for suffix, split in source_splits.items():
        image_folder = os.path.join(root, "images" + suffix)
        label_folder = os.path.join(root, "labels" + suffix)
        if not os.path.isdir(image_folder) or split == "skip":
            continue
        if not os.path.isdir(label_folder):
            log(f"note: {image_folder} has no {os.path.basename(label_folder)} next to it; its images are not used")
            continue
        present.append(split)
        images = _msd_images(image_folder, label_folder, channel)
        if not images:
            problems.append(f"{image_folder}: no images (channel {channel})")
        for case_id, image_path in images.items():
            label_path = volume_path(label_folder, case_id)
            if label_path is None:
                problems.append(f"case '{case_id}': {image_path} has no label in {label_folder}")
                continue
            cases.append(
                Case(
                    case_id,
                    {"image": Source(image_path), "label": Source(label_path)},
                    split,
                    {"source_folder": "images" + suffix},
                )
            )
        orphans = sorted(set(_volume_stems(label_folder).values()) - set(images))
        problems += [f"case '{case_id}': label in {label_folder} has no image in {image_folder}" for case_id in orphans]
    if not present:
        raise InputError(f"{root}: no imagesTr/labelsTr (or other images*/labels* pair) found")
    if problems:
        raise problem_list_error(f"{root}: images and labels do not pair up:", problems)
    # A single source split (MSD ships labels for imagesTr only) means the split is drawn later.
    if len(set(present)) == 1:
        for case in cases:
            case.split = None
    return cases


# ---------------------------------------------------------------- ACDC

ACDC_CLASS_NAMES = {0: "background", 1: "right ventricle", 2: "myocardium", 3: "left ventricle"}
ACDC_SPLITS = {"training": "train", "testing": "test"}


def find_acdc_cases(root):
    """patientXXX/patientXXX_frameYY.nii.gz with patientXXX_frameYY_gt.nii.gz; each annotated frame
    (end-diastole, end-systole) is a case. The training/ and testing/ folders give the split."""
    cases, problems = [], []
    pattern = os.path.join(root, "**", "patient*_frame[0-9][0-9].nii*")
    for image_path in sorted(glob.glob(pattern, recursive=True)):
        case_id = strip_extension(os.path.basename(image_path))
        label_path = volume_path(os.path.dirname(image_path), case_id + "_gt")
        if label_path is None:
            problems.append(f"case '{case_id}': {image_path} has no {case_id}_gt label")
            continue
        parts = os.path.relpath(image_path, root).split(os.sep)
        split = next((ACDC_SPLITS[p] for p in parts if p in ACDC_SPLITS), None)
        cases.append(Case(case_id, {"image": Source(image_path), "label": Source(label_path)}, split))
    if not cases and not problems:
        raise InputError(f"{root}: no ACDC frames (patientXXX/patientXXX_frameYY.nii.gz) found")
    if problems:
        raise problem_list_error(f"{root}: ACDC frames without labels:", problems)
    if len({case.split for case in cases}) == 1:
        for case in cases:
            case.split = None
    return cases


# ---------------------------------------------------------------- BraTS 2023 case folders


def _brats_case_folders(root, required_suffix):
    """Case folders <case>/<case>-<suffix>.nii.gz directly under root (or root itself)."""
    folders = [root] + sorted(os.path.join(root, name) for name in os.listdir(root))
    return [
        folder for folder in folders if os.path.isdir(folder) and os.path.exists(_brats_file(folder, required_suffix))
    ]


def _brats_file(folder, suffix):
    case_id = os.path.basename(os.path.normpath(folder))
    return os.path.join(folder, f"{case_id}-{suffix}.nii.gz")


def find_brats_cases(root, roles_to_suffixes, fallbacks=None):
    """BraTS 2023 folders. roles_to_suffixes: {role: file suffix}; fallbacks: {role: [more suffixes
    tried in order when the first is absent]}. Missing files are errors that name the case."""
    fallbacks = fallbacks or {}
    _first_role, first_suffix = next(iter(roles_to_suffixes.items()))
    folders = _brats_case_folders(root, first_suffix)
    if not folders:
        raise InputError(f"{root}: no BraTS case folders with <case>-{first_suffix}.nii.gz found")
    cases, problems = [], []
    for folder in folders:
        case_id = os.path.basename(os.path.normpath(folder))
        sources = {}
        for role, suffix in roles_to_suffixes.items():
            candidates = [suffix] + list(fallbacks.get(role, []))
            path = next((_brats_file(folder, s) for s in candidates if os.path.exists(_brats_file(folder, s))), None)
            if path is None:
                names = " or ".join(f"{case_id}-{s}.nii.gz" for s in candidates)
                problems.append(f"case '{case_id}': no {names}")
            else:
                sources[role] = Source(path)
        cases.append(Case(case_id, sources))
    if problems:
        raise problem_list_error(f"{root}: incomplete BraTS cases:", problems)
    return cases


# ---------------------------------------------------------------- the registry


class Layout(abc.ABC):
    """A source layout, the subcommand `python -m datasets.prepare <name>`. An entry sets name, help and
    task and defines find_cases; add_arguments and folders where it has flags or folder names of its own."""

    name: str
    help: str
    task: Task

    def add_arguments(self, parser):  # noqa: B027  an optional hook: a layout may have no flags of its own
        """The layout's own flags (the flags every layout takes are datasets.prepare's)."""

    @abc.abstractmethod
    def find_cases(self, args) -> FoundCases:
        """The layout's cases under args.root, the class names and the modality the source gives."""

    def folders(self, args) -> dict[str, str]:
        """{folder: kind} of the prepared dataset, input first, target second."""
        return self.task.folder_kinds()


def add_skip_unpaired(parser):
    parser.add_argument(
        "--skip_unpaired",
        action="store_true",
        help="leave out case ids that lack a partner file (e.g. images without a mask) "
        "instead of refusing; the count is printed",
    )


def parse_source_splits(text):
    """'Tr:train,Ts:test' -> {'Tr': 'train', 'Ts': 'test'}."""
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition(":")
        if not sep or value not in ("train", "test", "val", "skip"):
            raise InputError(f"--source_splits: '{item}' is not SUFFIX:{{train,test,val,skip}}")
        pairs[key] = value
    return pairs


class MsdLayout(Layout):
    name, task = "msd", TASKS["segmentation"]
    help = "nnU-Net / Medical Segmentation Decathlon folders (AMOS, WORD, MSD)"

    def add_arguments(self, parser):
        parser.add_argument(
            "--source_splits",
            default="Tr:train,Va:test,Val:test,Ts:test",
            help="images<SUFFIX>/labels<SUFFIX> folders and their split (train, test, val, "
            "skip); with one split present, the test split is drawn (--test_fraction)",
        )

    def find_cases(self, args):
        description = read_dataset_json(args.root)
        cases = find_msd_cases(args.root, args.channel or 0, parse_source_splits(args.source_splits))
        return FoundCases(
            cases,
            class_names_from_dataset_json(description),
            modality_from_dataset_json(description, args.channel or 0),
        )


class GlobLayout(Layout):
    name, task = "glob", TASKS["segmentation"]
    help = "an images glob and a labels glob matched by case id (BTCV, MicroSegNet, PROMISE12, LA, ...)"

    def add_arguments(self, parser):
        parser.add_argument(
            "--images",
            required=True,
            help="glob relative to --root; the case id is what the wildcards match, "
            "e.g. 'img/img*.nii.gz' gives img0001.nii.gz the id 0001",
        )
        parser.add_argument("--labels", required=True, help="glob of the labels, same case ids")
        parser.add_argument("--test_images", help="glob of test images (the others become train)")
        parser.add_argument("--test_labels", help="glob of test labels")
        parser.add_argument("--hdf5_image_key", default="image", help="HDF5 dataset holding the image")
        parser.add_argument("--hdf5_label_key", default="label", help="HDF5 dataset holding the label")
        add_skip_unpaired(parser)

    def find_cases(self, args):
        roles = list(self.folders(args))
        keys = {"image": args.hdf5_image_key, "label": args.hdf5_label_key}
        cases = pair_globs(args.root, [args.images, args.labels], roles, None, keys, args.skip_unpaired)
        if args.test_images or args.test_labels:
            if not (args.test_images and args.test_labels):
                raise InputError("--test_images and --test_labels go together")
            for case in cases:
                case.split = "train"
            cases += pair_globs(
                args.root, [args.test_images, args.test_labels], roles, "test", keys, args.skip_unpaired
            )
        return FoundCases(cases, {}, None)


class AcdcLayout(Layout):
    name, task = "acdc", TASKS["segmentation"]
    help = "ACDC patient folders (frames with _gt labels)"

    def find_cases(self, args):
        return FoundCases(find_acdc_cases(args.root), dict(ACDC_CLASS_NAMES), "MRI")


class BratsSynthesisLayout(Layout):
    name, task = "brats-synthesis", TASKS["synthesis"]
    help = "BraTS 2023 contrasts, source -> target"

    def add_arguments(self, parser):
        parser.add_argument("--source", default="t1c", help="input contrast suffix (t1c, t1n, t2f, t2w)")
        parser.add_argument("--target", default="t2w", help="target contrast suffix")

    def folders(self, args):
        if args.source == args.target:
            raise InputError("--source and --target must be different contrasts")
        return self.task.folder_kinds(args.source, args.target)  # one folder per contrast, named by it

    def find_cases(self, args):
        return FoundCases(find_brats_cases(args.root, {args.source: args.source, args.target: args.target}), {}, "MRI")


class BratsInpaintingLayout(Layout):
    name, task = "brats-inpainting", TASKS["inpainting"]
    help = "BraTS 2023 local synthesis (inpainting)"

    def add_arguments(self, parser):
        parser.add_argument("--voided_suffix", default="t1n-voided", help="image with the region removed")
        parser.add_argument("--healthy_suffix", default="t1n", help="complete image (the target)")
        parser.add_argument(
            "--mask_suffixes",
            nargs="+",
            default=["mask", "mask-healthy"],
            help="region to fill; the first one present is used",
        )

    def find_cases(self, args):
        cases = find_brats_cases(
            args.root,
            {"image": args.voided_suffix, "target": args.healthy_suffix, "mask": args.mask_suffixes[0]},
            {"mask": args.mask_suffixes[1:]},
        )
        return FoundCases(cases, {}, "MRI")


class DenoisingLayout(Layout):
    name, task = "denoising", TASKS["denoising"]
    help = "low-dose / normal-dose volumes (e.g. CT)"

    def add_arguments(self, parser):
        parser.add_argument("--low_dose", required=True, help="glob of low-dose volumes or DICOM folders")
        parser.add_argument("--normal_dose", required=True, help="glob of normal-dose ones, same case ids")
        add_skip_unpaired(parser)

    def find_cases(self, args):
        cases = pair_globs(
            args.root, [args.low_dose, args.normal_dose], list(self.folders(args)), skip_unpaired=args.skip_unpaired
        )
        return FoundCases(cases, {}, "CT")


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        MsdLayout(),
        GlobLayout(),
        AcdcLayout(),
        BratsSynthesisLayout(),
        BratsInpaintingLayout(),
        DenoisingLayout(),
    )
}
