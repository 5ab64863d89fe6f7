"""Source files of a dataset as cases: the `Case` every layout's finder returns (datasets/layouts.py),
and the file matching that several layouts share: case ids from glob wildcards, files paired by case id,
a volume file found by its name without extension.
"""

import glob
import os
import re
from dataclasses import dataclass, field

from util.cli import log

from .readers import VOLUME_FILE_EXTENSIONS, InputError, Source


@dataclass
class Case:
    """One case: its id, its volume per folder (role), and its split where the source has one (None:
    drawn later)."""

    case_id: str
    sources: dict[str, Source]
    split: str | None = None
    notes: dict = field(default_factory=dict)


def strip_extension(name):
    for extension in VOLUME_FILE_EXTENSIONS:
        if name.lower().endswith(extension):
            return name[: -len(extension)]
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
            raise InputError(
                f"{what} glob '{pattern}': {found[case_id]} and {path} both give case id "
                f"'{case_id}'; make the pattern more specific"
            )
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
    problems = [
        f"case '{case_id}': no {role} file (glob '{pattern}')"
        for case_id in all_ids
        for role, pattern in zip(roles, patterns)
        if case_id not in by_role[role]
    ]
    if problems and not skip_unpaired:
        raise problem_list_error("files do not pair up by case id (--skip_unpaired leaves such cases out):", problems)
    paired = [case_id for case_id in all_ids if all(case_id in by_role[role] for role in roles)]
    if problems:
        log(
            f"note: {len(all_ids) - len(paired)} of {len(all_ids)} case ids lack a partner file and are "
            f"left out (--skip_unpaired), e.g. {problems[0]}"
        )
    if not paired:
        raise InputError(f"{root}: no case has all of {', '.join(roles)}")
    hdf5_keys = hdf5_keys or {}
    return [
        Case(
            case_id,
            {
                role: Source(by_role[role][case_id], _hdf5_key(by_role[role][case_id], hdf5_keys.get(role)))
                for role in roles
            },
            split,
        )
        for case_id in paired
    ]


def _hdf5_key(path, key):
    return key if path.lower().endswith((".h5", ".hdf5")) else None


def volume_path(folder, stem):
    """The volume file <folder>/<stem>.<any volume extension>, or None."""
    for extension in VOLUME_FILE_EXTENSIONS:
        path = os.path.join(folder, stem + extension)
        if os.path.exists(path):
            return path
    return None
