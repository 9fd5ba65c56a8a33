"""The labeled rows heads learn from: in memory when they fit, else read from the cache.

    rows = splits.train                      # a `Rows`: labels in memory, features maybe not
    for X, y in rows.batches(256, rows.shuffled(np.random.RandomState(0))):
        ...                                  # float32 (256, n_features), labels

A `Rows` knows where each of its rows is in the cache (a row of the configuration or of a
views table) and holds the features only once `load()`ed. Streamed, it reads a window of
rows at a time (each chunk of the cache once per window) and never holds more than two
windows; no read, window or pass holds more than `read_bytes` (under train-head, a quarter
of --memory-budget: `READ_SHARE`), so what streamed rows hold stays within the budget
however large a split is. Its order for an epoch is shuffled by blocks of consecutive rows
(rows stored together stay together, so a window reads few chunks), then within each
window; in memory, one block and one window hold every row: a plain shuffle, the same as
streamed rows that fit in one block. Batches are the same whether the features come from
memory or from the cache, for the same order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
from sklearn.preprocessing import StandardScaler

from extract import UsageError

BLOCK_BYTES = 4 * 2**20  # consecutive rows kept together when an epoch is shuffled
WINDOW_BYTES = 64 * 2**20  # rows read from the cache at once (and shuffled among themselves)
SCAN_BYTES = 32 * 2**20  # at most, rows a pass that is not a training step takes at once (moments, predictions)
BUDGET_SHARE = 0.5  # of the memory available when train-head starts: the default --memory-budget
READ_SHARE = 4  # streamed, one read holds at most 1/4 of --memory-budget: two windows and a pass stay within it
_IMAGE, _VIEW = 0, 1


@dataclass(frozen=True)
class Rows:
    """Labeled rows of one split, in a fixed order: the images, then the views of them.

    y: each row's label; images: the image each row shows (a view shares its image's);
    table, entry: where its features are: row `entry` of the configuration (table 0) or
    of the views table `views` (table 1); X: the features as float32, once loaded.
    """

    y: np.ndarray
    images: np.ndarray
    table: np.ndarray
    entry: np.ndarray
    n_features: int
    cache: object = None  # an open extract.FeatureCache; None once loaded
    views: str | None = None
    X: np.ndarray | None = None
    block_rows: int = 1
    window_rows: int = 1
    read_rows: int = 1  # the most rows one read or sample takes at once (every row, in memory)
    transform: object = None  # what the features read are passed through (see `through`), or None

    @classmethod
    def from_arrays(cls, X, y, images=None) -> "Rows":
        """Rows held in memory (`images`: which rows are views of one image)."""
        X = np.asarray(X, dtype=np.float32)
        images = np.arange(len(X)) if images is None else np.asarray(images)
        return cls(np.asarray(y), images, np.zeros(len(X), np.int8), np.arange(len(X)), X.shape[1], X=X,
                   block_rows=max(1, len(X)), window_rows=max(1, len(X)), read_rows=max(1, len(X)))

    @classmethod
    def in_cache(cls, cache, y, images, table, entry, views=None, read_bytes: int | None = None) -> "Rows":
        """Rows read from an open `FeatureCache` when they are needed, at most `read_bytes`
        of features at once (default: a window, WINDOW_BYTES)."""
        n_features = int(np.prod(cache.feature_shape))
        row_bytes = 4 * n_features
        read_bytes = WINDOW_BYTES if read_bytes is None else read_bytes
        window_bytes = min(WINDOW_BYTES, read_bytes)
        block = max(1, min(BLOCK_BYTES, window_bytes) // row_bytes)
        window = max(block, window_bytes // row_bytes // block * block)  # whole blocks
        return cls(np.asarray(y), np.asarray(images), np.asarray(table, np.int8), np.asarray(entry, np.int64),
                   n_features, cache, views, None, block, window, max(1, read_bytes // row_bytes))

    def __len__(self) -> int:
        return len(self.y)

    @property
    def scan_rows(self) -> int:
        """Rows a pass over all of them should take at once (at most 4,096 and 32 MB),
        whether they are in memory or not, so both give the same batches (streamed under a
        budget below 4 x 32 MB, fewer: at most `read_rows`)."""
        return max(1, min(4096, SCAN_BYTES // (4 * self.n_features), self.read_rows))

    @property
    def nbytes(self) -> int:
        """The features' size as float32, in memory or not."""
        return len(self) * self.n_features * 4

    def subset(self, positions) -> "Rows":
        positions = np.asarray(positions, dtype=np.int64)
        X = None if self.X is None else self.X[positions]
        whole = max(1, len(positions))
        return replace(self, y=self.y[positions], images=self.images[positions], table=self.table[positions],
                       entry=self.entry[positions], X=X, window_rows=self.window_rows if X is None else whole,
                       read_rows=self.read_rows if X is None else whole)

    def features(self, positions) -> np.ndarray:
        """float32 features of the rows at `positions`, in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.X is not None:
            return self.X[positions]
        read = self._read(positions)
        return read if self.transform is None else self.transform(read)

    def through(self, transform, n_features: int) -> "Rows":
        """The same rows with features `transform(features)` (float32 (n, k) -> float32
        (n, n_features)): computed now when they are in memory, else as they are read."""
        if self.X is None:
            if self.transform is not None:
                raise ValueError("Expected rows read as they are stored; these pass through a transform already.")
            return replace(self, transform=transform, n_features=n_features)
        X = np.empty((len(self), n_features), np.float32)
        for start in range(0, len(self), self.scan_rows):
            X[start:start + self.scan_rows] = transform(self.X[start:start + self.scan_rows])
        return replace(self, X=X, n_features=n_features)

    def _read(self, positions: np.ndarray) -> np.ndarray:
        """The stored features of the rows at `positions`, float32, flattened."""
        tables = self.table[positions]
        if len(positions) and (tables == tables[0]).all():  # one table: no second copy
            read = self.cache.features_at(self.entry[positions], views=self.views if tables[0] == _VIEW else None)
            return read.reshape(len(read), -1).astype(np.float32, copy=False)
        result = np.empty((len(positions), int(np.prod(self.cache.feature_shape))), dtype=np.float32)
        for table, views in ((_IMAGE, None), (_VIEW, self.views)):
            inside = tables == table
            if inside.any():
                read = self.cache.features_at(self.entry[positions[inside]], views=views)
                result[inside] = read.reshape(len(read), -1)
        return result

    def scaler(self) -> StandardScaler:
        """A StandardScaler fitted on every row, a pass of `partial_fit` a batch at a time
        (the same batches in memory or not)."""
        scaler = StandardScaler()
        for X, _ in self.batches(self.scan_rows):
            scaler.partial_fit(X)
        return scaler

    def load(self) -> "Rows":
        """The same rows with their features in memory (read a window at a time)."""
        if self.X is not None:
            return self
        X = np.empty((len(self), self.n_features), dtype=np.float32)
        for start in range(0, len(self), self.window_rows):
            X[start : start + self.window_rows] = self.features(np.arange(start, min(start + self.window_rows, len(self))))
        whole = max(1, len(self))
        return replace(self, X=X, cache=None, block_rows=whole, window_rows=whole, read_rows=whole, transform=None)

    def shuffled(self, random: np.random.RandomState, positions=None) -> np.ndarray:
        """`positions` (default: every row) in a random order: blocks of `block_rows`
        consecutive ones in random order, then each window of `window_rows` shuffled."""
        positions = np.arange(len(self)) if positions is None else np.asarray(positions)
        block_of = np.arange(len(positions)) // self.block_rows
        rank = np.argsort(random.permutation(block_of[-1] + 1 if len(positions) else 0))  # each block's place
        order = positions[np.argsort(rank[block_of], kind="stable")]
        for start in range(0, len(order), self.window_rows):
            window = order[start : start + self.window_rows]
            order[start : start + self.window_rows] = window[random.permutation(len(window))]
        return order

    def batches(self, batch_size: int, order=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(features, labels) of `batch_size` rows at a time, in `order` (default: as stored)."""
        reader = Reader(self, np.arange(len(self)) if order is None else np.asarray(order))
        for start in range(0, len(reader.order), batch_size):
            stop = min(start + batch_size, len(reader.order))
            yield reader.take(start, stop), self.y[reader.order[start:stop]]


class Reader:
    """The features of `order[start:stop]`, read from the cache a window at a time (the
    windows of `rows.window_rows` positions of the order), keeping at most two windows."""

    def __init__(self, rows: Rows, order: np.ndarray):
        self.rows, self.order, self._windows = rows, order, {}

    def take(self, start: int, stop: int) -> np.ndarray:
        rows = self.rows
        if rows.X is not None:
            return rows.X[self.order[start:stop]]
        step = rows.window_rows
        parts = []
        for window in range(start // step, (stop - 1) // step + 1):
            if window not in self._windows:
                self._windows = {key: value for key, value in self._windows.items() if key == window - 1}
                self._windows[window] = rows.features(self.order[window * step : (window + 1) * step])
            low, high = max(start, window * step) - window * step, min(stop, (window + 1) * step) - window * step
            parts.append(self._windows[window][low:high])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def memory_budget(value=None) -> int:
    """Bytes: `value` as a whole number of bytes or a size ("8G", "512M", "1.5GiB",
    "4000000"; K, M, G, T are powers of 1024), or by default BUDGET_SHARE of the memory
    available now (the container's limit counts)."""
    if value is None:
        return int(BUDGET_SHARE * available_memory())
    size = None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        if np.isfinite(value) and float(value).is_integer():
            size = int(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+)(\.[0-9]+)?\s*(?:([kmgt])(?:i?b?)|b)?\s*", value, re.IGNORECASE)
        if match and (match[3] or not match[2]):  # a fraction of a byte is not a size
            unit = 1024 ** (" kmgt".index((match[3] or " ").lower()))
            size = int(match[1]) * unit + int(float(f"0{match[2] or ''}") * unit)
    if size is None:
        raise UsageError(f"Expected --memory-budget as a size such as 8G, 512M or 4000000 (bytes); received {value!r}.")
    if not 1 <= size <= 2**60:
        raise UsageError(f"Expected --memory-budget between 1 byte and 1 EiB; received {value!r}.")
    return size


def available_memory() -> int:
    """Bytes the system could give now: MemAvailable, or less where a cgroup limits us."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # cgroup v2: this container's limit, less what it uses
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            text = limit.read().strip()
            if text != "max":
                available = min(available, int(text) - int(used.read()))
    except (OSError, ValueError):
        pass
    return max(available, 0)


def gigabytes(size: int) -> str:
    if size < 2**20:
        return f"{size:,} byte{'s' if size != 1 else ''}"
    return f"{size / 2**30:.2f} GB" if size >= 2**27 else f"{size / 2**20:.1f} MB"
