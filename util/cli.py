"""The command line's one error path, and what job scripts ask about a training run.

Every entry point's main runs through `run_main`: a UsageError (a problem with the user's input: a
flag, a file, a folder) is printed as one line, `error: <message>`, on stderr, and the process exits
with status 2, argparse's own status for a bad command line, without a traceback. Parsers are made
with `ArgumentParser`, whose errors (an unknown flag, a bad choice) take that same path. Any other
exception is a bug and keeps its traceback.

Output goes through `log` (progress and results, stdout) and `warn` (`warning: ...`, stderr), both
flushed, as logs of cluster jobs are read while they run; in a distributed run only rank 0 speaks
(`set_rank`).

    sys.exit(run_main(main))                  in an entry point
    python -m util.cli finished OUTPUT_DIR    prints 'finished' or 'unfinished' (scripts/train_slurm.sh)

This module is imported by the data readers, so it imports torch only where a checkpoint is read.
"""

import argparse
import os
import sys
from dataclasses import dataclass

USAGE_ERROR_STATUS = 2
LAST_CHECKPOINT = "checkpoint-last.pth"  # util.checkpoint.LAST; that module imports this one


class UsageError(Exception):
    """A problem with the user's input, flag or file; the message names the flag or path and says
    what is wrong, in one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors raised as UsageError, so they leave through run_main like any other,
    and without abbreviated flags: `--context` must not quietly mean `--context_from`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def docstring_parser(doc: str, **kwargs) -> ArgumentParser:
    """An entry point's parser from its module docstring: the first paragraph as the description,
    the rest, as written, after the flags; `kwargs` go to the parser (e.g. prog)."""
    summary, details = doc.split("\n\n", 1)
    formatting = dict(description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter)
    return ArgumentParser(**formatting, **kwargs)


_speaks = True  # False on ranks other than 0 of a distributed run


def set_rank(rank: int):
    """Only rank 0 logs and warns; the others would repeat it world-size times."""
    global _speaks
    _speaks = rank == 0


def log(message: str = ""):
    """Progress and results, on stdout."""
    if _speaks:
        print(message, flush=True)


def warn(message: str):
    """Something the user should know that does not stop the run, on stderr."""
    if _speaks:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def run_main(main_function, argv=None) -> int:
    """main_function(argv)'s exit status: its return value when that is an int, else 0 (a main may
    return its result, as main_pretrain returns its progress). A UsageError becomes `error: <message>`
    on stderr and status 2."""
    try:
        result = main_function(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR_STATUS
    return result if isinstance(result, int) else 0


def first_line(error: BaseException) -> str:
    """An exception as one line: torch's loading errors run over many lines of advice."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# ---------------------------------------------------------------------------------------------------
# has a training run finished?


@dataclass(frozen=True)
class RecordedProgress:
    """How far a training run got and how far it was asked to go, as its last checkpoint says."""

    epoch: int  # epochs finished, or the epoch in progress when the run stopped mid-epoch
    global_step: int
    epochs: int  # the run's --epochs
    stop_after_steps: int  # the run's --stop_after_steps (0: none)

    @property
    def finished(self) -> bool:
        # An epoch end counts the epoch as done before writing, so `epoch` reaches `epochs` only then.
        asked_steps_done = bool(self.stop_after_steps) and self.global_step >= self.stop_after_steps
        return self.epoch >= self.epochs or asked_steps_done


def read_recorded_progress(output_dir: str) -> RecordedProgress:
    """The progress checkpoint-last.pth records; it is written at every epoch end and at every stop
    (a signal, --stop_after_steps, too many non-finite steps), so it is the run's latest word."""
    import torch  # only here: the data readers import this module and need no torch

    path = os.path.join(output_dir, LAST_CHECKPOINT)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: not found; the run wrote no checkpoint there (another --output_dir?)")
    try:
        # mmap: only the few numbers below are read, not gigabytes of weights and optimizer state.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # any unloadable file: say which and why
        raise UsageError(f"{path}: cannot be read as a checkpoint ({first_line(error)})") from error
    recorded_args = state.get("args") if isinstance(state, dict) else None
    if not isinstance(recorded_args, dict):
        raise UsageError(f"{path}: not a training checkpoint of this project (no 'args' dict)")
    fields = {
        "epoch": state.get("epoch"),
        "global_step": state.get("global_step"),
        "epochs": recorded_args.get("epochs"),
        "stop_after_steps": recorded_args.get("stop_after_steps", 0),
    }
    missing = sorted(name for name, value in fields.items() if not isinstance(value, int))
    if missing:
        raise UsageError(f"{path}: records no whole number for {', '.join(missing)}")
    return RecordedProgress(**fields)


def run_is_finished(output_dir: str) -> bool:
    """Whether the training run writing to output_dir has done what it was asked: all its epochs, or
    its --stop_after_steps. UsageError when its checkpoint-last.pth is missing or unreadable."""
    return read_recorded_progress(output_dir).finished


# ---------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m util.cli", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    finished = commands.add_parser(
        "finished",
        help="print 'finished' or 'unfinished': has the training run in OUTPUT_DIR done all "
        "its epochs (or its --stop_after_steps), by its checkpoint-last.pth",
    )
    finished.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's --output_dir")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log("finished" if run_is_finished(args.output_dir) else "unfinished")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
