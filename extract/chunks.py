"""Compress a dataset's chunks on every core, then hand them to HDF5 as they are.

HDF5 runs a dataset's filters (deflate, Fletcher-32) in the thread that writes, one chunk
after another, and h5py holds one lock over all of HDF5, so neither two threads nor two
shards written at once compress in parallel: for unpooled VGG16 maps that is about 1.8 ms
an image, the largest cost of a run after the network itself. `write_rows` encodes whole
chunks exactly as those filters would, on a pool of threads (zlib releases the GIL), and
writes the bytes with H5Dwrite_chunk. Readers see an ordinary dataset; HDF5 verifies each chunk's
Fletcher-32 checksum on every read, and a test checks ours against HDF5's own.
"""

from __future__ import annotations

import os
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
from h5py import h5z

_BLOCK = 360  # words summed before HDF5 folds its Fletcher-32 sums (H5checksum.c)


def write_rows(dataset, count: int, rows: Callable[[int, int], np.ndarray], workers: int | None = None) -> None:
    """`dataset[:count] = rows(0, count)`, a chunk at a time, with `rows` called in order
    on this thread and each chunk compressed on a pool of threads. `dataset` must be a new
    dataset chunked by whole rows with deflate and Fletcher-32 (as `shards.write_shard`
    makes it)."""
    step = dataset.chunks[0]
    level = _deflate_level(dataset)
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chunks") as pool:
        pending: deque = deque()
        for begin in range(0, count, step):
            block = np.asarray(rows(begin, min(begin + step, count)), dtype=dataset.dtype)
            if len(block) < step:  # HDF5 stores whole chunks: pad the last one
                block = np.concatenate([block, np.zeros((step - len(block), *block.shape[1:]), block.dtype)])
            pending.append((begin, pool.submit(encode, block, level)))
            if len(pending) > 2 * workers:
                _write_next(dataset, pending)
        while pending:
            _write_next(dataset, pending)


def encode(block: np.ndarray, level: int) -> bytes:
    """One chunk's bytes as HDF5 stores them: deflated, with HDF5's Fletcher-32 checksum
    appended (little-endian)."""
    data = zlib.compress(block.tobytes(), level)
    return data + fletcher32(data).to_bytes(4, "little")


def fletcher32(data: bytes) -> int:
    """HDF5's Fletcher-32 (H5_checksum_fletcher32): big-endian 16-bit words; both sums
    wrap at 32 bits and are folded to 16 after every 360 words, and at the end."""
    words = np.frombuffer(data, ">u2", count=len(data) // 2).astype(np.uint64)
    full = len(words) - len(words) % _BLOCK
    blocks = [words[:full].reshape(-1, _BLOCK)] + ([words[full:][None]] if full < len(words) else [])
    sum1 = sum2 = 0
    for group in blocks:
        length = group.shape[1]
        # Within a block: sum1 += w_i; sum2 += sum1, so sum2 gains length * sum1 + sum((length - i) * w_i).
        weighted = (group * np.arange(length, 0, -1, dtype=np.uint64)).sum(axis=1).tolist()
        for total, weight in zip(group.sum(axis=1).tolist(), weighted):
            sum2 = _fold((sum2 + length * sum1 + weight) & 0xFFFFFFFF)
            sum1 = _fold((sum1 + total) & 0xFFFFFFFF)
    if len(data) % 2:
        sum1 = (sum1 + (data[-1] << 8)) & 0xFFFFFFFF
        sum2 = _fold((sum2 + sum1) & 0xFFFFFFFF)
        sum1 = _fold(sum1)
    return (_fold(sum2) << 16) | _fold(sum1)


def _fold(value: int) -> int:
    return (value & 0xFFFF) + (value >> 16)


def _write_next(dataset, pending: deque) -> None:
    begin, encoded = pending.popleft()
    dataset.id.write_direct_chunk((begin,) + (0,) * (dataset.ndim - 1), encoded.result())


def _deflate_level(dataset) -> int:
    """The deflate level of a dataset whose filters are exactly deflate, Fletcher-32."""
    plist = dataset.id.get_create_plist()
    filters = [plist.get_filter(i) for i in range(plist.get_nfilters())]
    if dataset.chunks is None or dataset.chunks[1:] != dataset.shape[1:] or \
            [code for code, *_ in filters] != [h5z.FILTER_DEFLATE, h5z.FILTER_FLETCHER32]:
        raise ValueError(f"write_rows needs rows chunked whole with deflate and Fletcher-32; {dataset.name} is not.")
    return int(filters[0][2][0])
