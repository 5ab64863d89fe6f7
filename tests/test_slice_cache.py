"""The decoded-slice cache (datasets.slice_cache): slices come back as their files decode, it never
holds more than its budget, and the DataLoader workers a process forks, epoch after epoch, share what
any of them decoded."""

import pickle
import threading

import numpy as np
import pytest
import torch

from datasets import slice_cache
from datasets.canvas import InContextDataset
from datasets.manifest import read_png
from datasets.mixture import Mixture
from datasets.slice_cache import SliceCache
from tests.helpers import CANVAS, SLICE, policy, save_png

SIDE = 40  # 1600 bytes per 8-bit slice


@pytest.fixture
def slices(tmp_path):
    """Six 8-bit slice files and one 16-bit label file, each with its own pixels."""
    rng = np.random.default_rng(0)
    paths = [save_png(tmp_path / f"{i}.png", rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)) for i in range(6)]
    wide = rng.integers(0, 1000, (SIDE, SIDE)).astype(np.uint16)
    paths.append(save_png(tmp_path / "labels16.png", wide))
    return paths


class CountingRead:
    """read_png that counts its calls per path (in this process)."""

    def __init__(self):
        self.calls = {}

    def __call__(self, path):
        self.calls[path] = self.calls.get(path, 0) + 1
        return read_png(path)


def test_slices_come_back_as_decoded_and_read_only(slices):
    cache = SliceCache(slices, budget_bytes=2**20)
    for _ in range(2):
        for path in slices:
            array = cache.read(path)
            expected = read_png(path)
            assert array.dtype == expected.dtype and np.array_equal(array, expected)
            assert not array.flags.writeable  # a shared slice: Augment's crops are views of it
    assert read_png(slices[-1]).dtype == np.uint16  # 16-bit labels are kept as they are
    assert cache.cached_slices() == len(slices)
    assert cache.used_bytes() == 6 * SIDE * SIDE + 2 * SIDE * SIDE


def test_the_cache_never_holds_more_than_its_budget(slices):
    read = CountingRead()
    budget = int(3.5 * SIDE * SIDE)  # room for three 8-bit slices, not four
    cache = SliceCache(slices, budget_bytes=budget, read=read)
    for _ in range(3):
        for path in slices:
            assert np.array_equal(cache.read(path), read_png(path))
    assert cache.used_bytes() == 3 * SIDE * SIDE <= budget
    assert len(cache._data) == budget and cache.cached_slices() == 3
    # The first three were stored when first read and never decoded again; the others, for which
    # there was no room, are decoded at every read rather than kept anywhere else.
    assert [read.calls[path] for path in slices] == [1, 1, 1, 3, 3, 3, 3]


def test_a_dataset_keeps_its_decoded_slices_within_its_budget(mixed):
    data = InContextDataset(Mixture.of([mixed]), policy(), input_size=CANVAS, slice_cache_bytes=5 * SLICE * SLICE)
    for index in range(40):
        data[index]
    cache = data.slice_cache
    assert cache.cached_slices() == 5 and cache.used_bytes() == 5 * SLICE * SLICE == len(cache._data)
    # The default budget (2 GiB) is mapped only as far as the listed files could need it, 2 bytes a pixel.
    default = InContextDataset(Mixture.of([mixed]), policy(), input_size=CANVAS)
    assert default.slice_cache.budget_bytes == 2 * 2 * default.num_slices * SLICE * SLICE


def test_no_budget_and_unlisted_files_are_decoded_every_time(slices):
    read = CountingRead()
    cache = SliceCache(slices[:2], budget_bytes=0, read=read)
    listed = SliceCache(slices[:2], budget_bytes=2**20, read=read)
    for _ in range(2):
        cache.read(slices[0])
        listed.read(slices[3])
    assert read.calls == {slices[0]: 2, slices[3]: 2}
    assert cache.cached_slices() == listed.cached_slices() == 0
    with pytest.raises(ValueError, match="budget_bytes"):
        SliceCache(slices, budget_bytes=-1)


class ReadOnce(torch.utils.data.Dataset):
    """Items that read one slice each through the cache: its pixel sum."""

    def __init__(self, cache, paths):
        self.cache, self.paths = cache, paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return torch.from_numpy(self.cache.read(self.paths[index]).astype(np.int64)).sum()


def logging_read(log):
    """read_png that logs every decode to a file, which the worker processes share (the test cannot
    see their own counters)."""

    def read(path):
        with open(log, "a") as handle:
            handle.write(path + "\n")
        return read_png(path)

    return read


def test_workers_of_every_epoch_share_one_cache(slices, tmp_path):
    log = tmp_path / "decoded.txt"
    cache = SliceCache(slices, budget_bytes=2**20, read=logging_read(log))
    expected = [int(read_png(path).astype(np.int64).sum()) for path in slices]

    def epoch(paths):
        loader = torch.utils.data.DataLoader(
            ReadOnce(cache, paths), batch_size=None, num_workers=2, multiprocessing_context="fork"
        )
        return [int(total) for total in loader]

    assert epoch(slices) == expected  # each file read once, by one of two workers
    assert sorted(log.read_text().split()) == sorted(slices)
    # Fresh workers (a new epoch's) read every file three times, and decode none of them.
    assert epoch(slices * 3) == expected * 3
    assert sorted(log.read_text().split()) == sorted(slices)
    # What the workers stored is in this process's view too.
    cache._read = None  # a decode would now fail
    assert [int(cache.read(path).astype(np.int64).sum()) for path in slices] == expected
    assert cache.cached_slices() == len(slices)


def test_a_pickled_cache_starts_empty_with_the_same_budget(slices):
    """What a worker started by spawn or forkserver gets: its own cache, not a broken shared one."""
    cache = SliceCache(slices, budget_bytes=5 * SIDE * SIDE)
    cache.read(slices[0])
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.budget_bytes == cache.budget_bytes and copy.cached_slices() == 0
    assert np.array_equal(copy.read(slices[1]), read_png(slices[1])) and copy.cached_slices() == 1
    assert cache.cached_slices() == 1  # the original does not see the copy's


def test_a_held_lock_means_decoding_without_the_cache_not_waiting(slices, monkeypatch):
    """A worker killed inside the lock must not stop the others."""
    monkeypatch.setattr(slice_cache, "LOCK_TIMEOUT_S", 0.05)
    cache = SliceCache(slices, budget_bytes=2**20)
    cache._lock.acquire()
    try:
        result = []
        reader = threading.Thread(target=lambda: result.append(cache.read(slices[0])))
        reader.start()
        reader.join(timeout=10)
        assert not reader.is_alive() and np.array_equal(result[0], read_png(slices[0]))
    finally:
        cache._lock.release()
    assert cache.cached_slices() == 0
