"""Finding cases in the source layouts. Each finder returns a list of `Case`: an id, the volumes of the
case by role (the role is also the output folder name), and the split when the source defines one
(None: assigned later by a seeded random draw).

Roles per task:
    segmentation   image, label
    synthesis      <source contrast>, <target contrast>   (e.g. t1c, t2w)
    inpainting     image (voided slice), target (healthy image), mask (region to fill)
    denoising      image (low dose), target (normal dose)
"""
import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Optional

from .readers import DICOM_FILE_EXTENSIONS, PICTURE_EXTENSIONS, InputError, Source

# nnU-Net's 2D datasets (imagesTr/<case>_0000.png) are found like the volumes.
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".mhd", ".mha", ".h5", ".hdf5") + PICTURE_EXTENSIONS + DICOM_FILE_EXTENSIONS
NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
DEFAULT_SOURCE_SPLITS = {"Tr": "train", "Va": "test", "Val": "test", "Ts": "test"}
MR_CHANNEL_NAMES = {"MRI", "MR", "T1", "T1W", "T1C", "T1GD", "T2", "T2W", "FLAIR", "ADC", "DWI", "PD",
                    "T1CE", "T2F", "T1N", "CINE", "LGE", "MPRAGE"}


@dataclass
class Case:
    case_id: str
    sources: Dict[str, Source]
    split: Optional[str] = None
    notes: dict = field(default_factory=dict)


def strip_extension(name):
    for extension in VOLUME_EXTENSIONS:
        if name.lower().endswith(extension):
            return name[:-len(extension)]
    return name


def problem_list_error(header, problems, shown=20):
    lines = problems[:shown] + ([f"... and {len(problems) - shown} more"] if len(problems) > shown else [])
    return InputError(header + "\n  " + "\n  ".join(lines))


# ---------------------------------------------------------------- glob patterns with case ids

def wildcard_regex(pattern):
    """A regex for a glob pattern whose groups capture what each run of wildcards matched.
    `**/` matches any number of folders and captures nothing."""
    parts, index = [], 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            parts.append("(?:.*/)?")
            index += 3
            continue
        run_start = index
        while index < len(pattern) and pattern[index] in "*?[":
            if pattern[index] == "[":
                index = pattern.index("]", index) + 1
            else:
                index += 1
        if index > run_start:
            run = pattern[run_start:index]
            run = re.sub(r"\[!", "[^", run).replace("*", "[^/]*").replace("?", "[^/]")
            parts.append(f"({run})")
        else:
            parts.append(re.escape(pattern[index]))
            index += 1
    return re.compile("".join(parts))


def glob_by_case(root, pattern, what):
    """{case id: path} for the files (or folders) a glob relative to root matches. The case id is
    what the wildcards matched, joined by '_': 'img/img*.nii.gz' gives img0001.nii.gz -> '0001'."""
    regex = wildcard_regex(pattern)
    if not regex.groups:
        raise InputError(f"{what} glob '{pattern}' has no wildcard (* ? [...]) to take case ids from")
    found = {}
    for path in sorted(glob.glob(os.path.join(root, pattern), recursive=True)):
        relative = os.path.relpath(path, root).replace(os.sep, "/")
        match = regex.fullmatch(relative)
        if match is None:
            continue
        case_id = "_".join(group for group in match.groups() if group)
        if case_id in found:
            raise InputError(f"{what} glob '{pattern}': {found[case_id]} and {path} both give case id "
                             f"'{case_id}'; make the pattern more specific")
        found[case_id] = path
    if not found:
        raise InputError(f"{what} glob '{pattern}' matches nothing under {root}")
    return found


def pair_globs(root, patterns, roles, split=None, hdf5_keys=None, skip_unpaired=False):
    """Cases whose files are given by one glob per role, matched by case id. A file without its
    partners is an error that lists them all, or with skip_unpaired a note (e.g. the radiographs of a
    set whose masks cover only some images)."""
    by_role = {role: glob_by_case(root, pattern, role) for role, pattern in zip(roles, patterns)}
    all_ids = sorted(set().union(*by_role.values()))
    problems = [f"case '{case_id}': no {role} file (glob '{pattern}')"
                for case_id in all_ids for role, pattern in zip(roles, patterns)
                if case_id not in by_role[role]]
    if problems and not skip_unpaired:
        raise problem_list_error("files do not pair up by case id (--skip_unpaired leaves such cases "
                                 "out):", problems)
    paired = [case_id for case_id in all_ids if all(case_id in by_role[role] for role in roles)]
    if problems:
        print(f"note: {len(all_ids) - len(paired)} of {len(all_ids)} case ids lack a partner file and are "
              f"left out (--skip_unpaired), e.g. {problems[0]}")
    if not paired:
        raise InputError(f"{root}: no case has all of {', '.join(roles)}")
    hdf5_keys = hdf5_keys or {}
    return [Case(case_id, {role: Source(by_role[role][case_id], _hdf5_key(by_role[role][case_id],
                                                                          hdf5_keys.get(role)))
                           for role in roles}, split)
            for case_id in paired]


def _hdf5_key(path, key):
    return key if path.lower().endswith((".h5", ".hdf5")) else None


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
    return {name: strip_extension(name) for name in sorted(os.listdir(folder))
            if not name.startswith(".") and name.lower().endswith(VOLUME_EXTENSIONS)}


def _msd_images(folder, label_folder, channel):
    """{case id: path} of one images folder. nnU-Net names images <case>_XXXX (XXXX the channel) and
    labels <case>; the channel suffix is only taken as such when no label carries the full name, so
    MSD case ids that end in four digits stay intact."""
    stems = _volume_stems(folder)
    label_stems = set(_volume_stems(label_folder).values())
    nnunet_style = bool(stems) and all(NNUNET_CHANNEL.match(stem) and stem not in label_stems
                                       for stem in stems.values())
    images = {}
    for name, stem in stems.items():
        if nnunet_style:
            match = NNUNET_CHANNEL.match(stem)
            if int(match["channel"]) != channel:
                continue
            stem = match["case"]
        images[stem] = os.path.join(folder, name)
    return images


def _label_path(folder, case_id):
    for extension in VOLUME_EXTENSIONS:
        path = os.path.join(folder, case_id + extension)
        if os.path.exists(path):
            return path
    return None


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
            print(f"note: {image_folder} has no {os.path.basename(label_folder)} next to it; "
                  f"its images are not used")
            continue
        present.append(split)
        images = _msd_images(image_folder, label_folder, channel)
        if not images:
            problems.append(f"{image_folder}: no images (channel {channel})")
        for case_id, image_path in images.items():
            label_path = _label_path(label_folder, case_id)
            if label_path is None:
                problems.append(f"case '{case_id}': {image_path} has no label in {label_folder}")
                continue
            cases.append(Case(case_id, {"image": Source(image_path), "label": Source(label_path)}, split,
                              {"source_folder": "images" + suffix}))
        orphans = sorted(set(_volume_stems(label_folder).values()) - set(images))
        problems += [f"case '{case_id}': label in {label_folder} has no image in {image_folder}"
                     for case_id in orphans]
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
        label_path = _label_path(os.path.dirname(image_path), case_id + "_gt")
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
    return [folder for folder in folders if os.path.isdir(folder) and
            os.path.exists(_brats_file(folder, required_suffix))]


def _brats_file(folder, suffix):
    case_id = os.path.basename(os.path.normpath(folder))
    return os.path.join(folder, f"{case_id}-{suffix}.nii.gz")


def find_brats_cases(root, roles_to_suffixes, fallbacks=None):
    """BraTS 2023 folders. roles_to_suffixes: {role: file suffix}; fallbacks: {role: [more suffixes
    tried in order when the first is absent]}. Missing files are errors that name the case."""
    fallbacks = fallbacks or {}
    first_role, first_suffix = next(iter(roles_to_suffixes.items()))
    folders = _brats_case_folders(root, first_suffix)
    if not folders:
        raise InputError(f"{root}: no BraTS case folders with <case>-{first_suffix}.nii.gz found")
    cases, problems = [], []
    for folder in folders:
        case_id = os.path.basename(os.path.normpath(folder))
        sources = {}
        for role, suffix in roles_to_suffixes.items():
            candidates = [suffix] + list(fallbacks.get(role, []))
            path = next((_brats_file(folder, s) for s in candidates
                         if os.path.exists(_brats_file(folder, s))), None)
            if path is None:
                names = " or ".join(f"{case_id}-{s}.nii.gz" for s in candidates)
                problems.append(f"case '{case_id}': no {names}")
            else:
                sources[role] = Source(path)
        cases.append(Case(case_id, sources))
    if problems:
        raise problem_list_error(f"{root}: incomplete BraTS cases:", problems)
    return cases
