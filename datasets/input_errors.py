"""The errors of the volume readers, and the import of their optional packages.

Kept apart from datasets/readers.py so that the reader modules of single formats (datasets/dicom.py,
datasets/itk_images.py) can raise them without importing the module that dispatches to them. Every
other module imports them from datasets.readers.
"""

from util.cli import UsageError


class InputError(UsageError):
    """Bad input data; the message names the file or case and says what is wrong. A UsageError, so
    every entry point reports it as `error: <message>` without a traceback (util/cli.py)."""


class MissingExtraError(InputError):
    """An optional reader's package is not installed."""


def require_extra(module_name, pip_name, what):
    """The optional package `module_name`, imported; `what` names what it is needed for."""
    try:
        return __import__(module_name)
    except ImportError as error:
        raise MissingExtraError(
            f"reading {what} needs the optional package '{pip_name}': pip install {pip_name}"
        ) from error
