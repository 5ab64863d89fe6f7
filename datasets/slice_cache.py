"""Decoded slices kept in memory shared by a training process and the DataLoader workers it forks, so
that each slice file is decoded once per run rather than once per canvas that shows it.

A canvas reads four PNG slices, and decoding them was the largest part of a worker's time (1-2 ms each
at 512x512). Workers are forked anew every epoch (datasets.canvas.InContextDataset.set_epoch), so a
cache private to a worker would be lost with it; this one lives in anonymous shared memory that the
training process maps before any worker starts: every worker of every epoch fills it and reads it.
Each training process (each DDP rank) has its own.

    cache = SliceCache(paths, budget_bytes=2**30)   # the slice files it may hold, and at most this many bytes
    array = cache.read(path)                         # the decoded slice (read-only), from memory when cached

Bounded: the pixels live in one mapping of exactly `budget_bytes` (and a table of 48 bytes per listed
file beside it); a slice is stored the first time it is read while there is room for it, and kept for
the run. There is no eviction: under random draws an LRU cache of the same size would hit about as
often (budget / total, when all slices are equally likely), and nothing is ever written twice.
Memory is taken only as slices are stored. A slice that does not fit, a file not listed in `paths`
and an array other than 2-D uint8 or uint16 are decoded at every read.

Processes change the shared table under one lock, which also orders their writes for the readers: a
process looks a slice up under the lock the first time it meets it and keeps its view afterwards. A
lock that cannot be had within a second (a worker killed inside it) means decoding without the cache,
never waiting for ever. Under the "spawn" or "forkserver" start methods a worker receives a pickled
dataset: its cache is then its own, empty, with the same budget.
"""

import mmap
import multiprocessing
from collections.abc import Callable, Sequence

import numpy as np

from .manifest import read_png

DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))  # what read_png returns for prepared slices
EMPTY, FILLING, READY, NO_ROOM = 0, 1, 2, 3  # a slice's state in the shared table
# One row of int64 per slice file: state, offset, rows, cols, dtype code.
STATE, OFFSET, ROWS, COLS, DTYPE, FIELDS = range(6)
LOCK_TIMEOUT_S = 1.0


class SliceCache:
    """See the module docstring. read() is what the dataset needs; used_bytes() and cached_slices()
    report what the shared memory holds, whichever process filled it."""

    def __init__(self, paths: Sequence[str], budget_bytes: int, read: Callable[[str], np.ndarray] = read_png):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.slots = {path: i for i, path in enumerate(dict.fromkeys(paths))}
        self._read = read
        self._map_shared()

    def _map_shared(self):
        self._views: dict[str, np.ndarray] = {}  # this process's views of the slices it found stored
        self._uncached: set[str] = set()  # slices this process found with no room for them
        self._data = mmap.mmap(-1, self.budget_bytes) if self.budget_bytes else None
        # The table, and one more row whose first field is the next free byte of the data.
        self._table_map = mmap.mmap(-1, 8 * FIELDS * (len(self.slots) + 1))
        table = np.frombuffer(self._table_map, dtype=np.int64).reshape(-1, FIELDS)
        self._table, self._next = table[:-1], table[-1:, 0]
        self._lock = multiprocessing.Lock()

    def __getstate__(self):
        """Pickled (a worker started by spawn or forkserver): the copy gets an empty cache of its own."""
        return {"budget_bytes": self.budget_bytes, "slots": self.slots, "_read": self._read}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._map_shared()

    def read(self, path: str) -> np.ndarray:
        """The decoded slice file, as `read` (read_png) returns it, but read-only."""
        view = self._views.get(path)
        if view is not None:
            return view
        slot = self.slots.get(path)
        if slot is None or self._data is None or path in self._uncached:
            return self._decode(path)
        if not self._lock.acquire(timeout=LOCK_TIMEOUT_S):
            return self._decode(path)
        try:
            row = self._table[slot]
            state = int(row[STATE])
            if state == READY:
                return self._keep(path, row)
            if state == EMPTY:
                row[STATE] = FILLING  # a process meeting it meanwhile decodes it on its own
        finally:
            self._lock.release()
        array = self._decode(path)
        if state == EMPTY:
            self._store(path, slot, array)
        elif state == NO_ROOM:
            self._uncached.add(path)
        return array

    def _decode(self, path: str) -> np.ndarray:
        array = self._read(path)
        array.flags.writeable = False
        return array

    def _store(self, path: str, slot: int, array: np.ndarray):
        """Copies a slice this process reserved (FILLING) into the data if there is room for it. Should
        the lock not come, the slice stays FILLING: never stored, decoded by whoever reads it."""
        offset = None
        if array.ndim == 2 and array.dtype in DTYPES:
            if not self._lock.acquire(timeout=LOCK_TIMEOUT_S):
                return
            try:
                if int(self._next[0]) + array.nbytes <= self.budget_bytes:
                    offset = int(self._next[0])
                    self._next[0] = offset + array.nbytes
            finally:
                self._lock.release()
        if offset is not None:
            np.frombuffer(self._data, np.uint8, array.nbytes, offset)[:] = array.reshape(-1).view(np.uint8)
        # Taking the lock and releasing it orders the copy above before the state below for any
        # process that reads the state under the lock.
        if not self._lock.acquire(timeout=LOCK_TIMEOUT_S):
            return
        try:
            row = self._table[slot]
            if offset is None:
                row[STATE] = NO_ROOM
            else:
                row[OFFSET], row[ROWS], row[COLS] = offset, array.shape[0], array.shape[1]
                row[DTYPE] = DTYPES.index(array.dtype)
                row[STATE] = READY
        finally:
            self._lock.release()
        if offset is None:
            self._uncached.add(path)
        else:
            self._keep(path, self._table[slot])

    def _keep(self, path: str, row: np.ndarray) -> np.ndarray:
        dtype = DTYPES[int(row[DTYPE])]
        shape = (int(row[ROWS]), int(row[COLS]))
        view = np.frombuffer(self._data, dtype, shape[0] * shape[1], int(row[OFFSET])).reshape(shape)
        view.flags.writeable = False
        self._views[path] = view
        return view

    def used_bytes(self) -> int:
        """Bytes of the shared data taken by stored slices (never more than budget_bytes)."""
        return int(self._next[0])

    def cached_slices(self) -> int:
        return int((self._table[:, STATE] == READY).sum())
