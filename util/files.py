"""Writing files so that nothing is ever left half-written, and nothing lands outside its folder.

    with atomic_output('results.json', 'w') as handle:   # temporary file beside it, fsync, rename
        json.dump(results, handle)
    path = path_below(output_dir, 'predictions', dataset, case_id, '0012.png')   # refuses '..' and the like

A crash, a full disk or a kill at any moment leaves either the earlier file or the new one, never a
torn one, and the temporary file is removed on errors. OS errors (a read-only folder, a full disk)
become one-line UsageErrors that name the file.
"""

import contextlib
import errno
import os
import tempfile

from util.cli import UsageError


def fsync_folder(folder: str):
    """A rename lives in the folder's metadata: make it durable too."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def describe_os_error(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "the disk is full"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "no permission to write there (read-only folder?)"
    return error.strerror or str(error)


def _process_umask() -> int:
    """The umask, read once at import (setting it to read it back is not safe once threads run)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


UMASK = _process_umask()


@contextlib.contextmanager
def atomic_output(path: str, mode: str = "wb"):
    """A file handle whose contents replace `path` only once fully written and synced. The file gets
    the permissions a plain open() would give it (mkstemp's own are owner-only)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        os.fchmod(descriptor, 0o666 & ~UMASK)
    except OSError as error:
        raise UsageError(f"{path}: cannot write ({describe_os_error(error)})") from error
    try:
        with os.fdopen(descriptor, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_folder(folder)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise UsageError(f"{path}: cannot write ({describe_os_error(error)})") from error
        raise


def path_below(root: str, *parts: str) -> str:
    """root/parts..., refusing parts that are empty, absolute, or lead out of root ('..', links)."""
    for part in parts:
        if not part or os.path.isabs(part) or os.pardir in part.replace("\\", "/").split("/"):
            raise UsageError(f"{part!r}: not a plain name below {root}")
    path = os.path.join(root, *parts)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise UsageError(f"{path}: leads outside {root}")
    return path


def writable_folder(path: str, flag: str) -> str:
    """Creates `path` if needed and checks, with a probe file, that files can be written there: a
    read-only or full output folder is reported before any work, naming the flag."""
    try:
        os.makedirs(path, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        try:
            os.write(descriptor, b"probe")
        finally:
            os.close(descriptor)
            os.remove(probe)
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot write there ({describe_os_error(error)})") from error
    return path
