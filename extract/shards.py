"""Immutable shards, and the batches that become them.

A shard is one HDF5 file of features keyed by content (see `schema`): written whole under a
temporary name, flushed to disk, then renamed into place, and never modified after. So a
shard file is either complete or absent, and any complete shard can be adopted by the next
run whether or not a catalog ever pointed at it.

Features are keyed by content only, which is all they depend on: an image's key is its
SHA-256, a view's key adds the augmentation and the view number (`view_key`).

Between checkpoints, each finished batch is written at once to its own small file in
`<fingerprint>/pending/` (`Pending`, the write-ahead journal): uncompressed, renamed into
place when complete. A checkpoint turns the pending batches into one compressed shard.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from extract.chunks import write_rows
from extract.errors import CacheError
from extract.schema import COMPRESSION_LEVEL, SHARD_FORMAT, SHARD_KEYS, feature_chunk_rows, now

TARGET_SHARD_BYTES = 128 * 2**20  # a run's pending batches become a shard at least this often, compaction's at most


@dataclass(frozen=True)
class ShardInfo:
    """What the catalog records of a shard, to know it again: its path relative to the
    shards folder (`<fingerprint>/<uuid>.h5`), its row count, its size in bytes and the uuid written inside it."""

    path: str
    rows: int
    bytes: int
    uuid: str


def view_key(sha256: str, augmentation: str, view: int) -> str:
    """The key of view `view` of an image, for the augmentation with that fingerprint."""
    return f"{sha256}/{augmentation}/{view}"


def split_key(key: str) -> tuple[str, int, str]:
    """(sha256, view, augmentation) of a key; view 0 and augmentation "" for an image."""
    sha256, _, rest = key.partition("/")
    augmentation, _, view = rest.partition("/")
    return sha256, int(view or 0), augmentation


def write_shard(folder: Path, base: Path, fingerprint: str, keys: list[str],
                rows: Callable[[int, int], np.ndarray], feature_shape, dtype) -> ShardInfo:
    """Write one shard of `keys` and their features (`rows(a, b)` gives rows a..b) into
    `folder`; its path is recorded relative to `base`, the shards folder."""
    name = uuid.uuid4().hex
    path = folder / f"{name}.h5"
    temporary = folder / f"{name}.h5.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # No chunk cache: each chunk goes to disk as it is written, so a full disk fails
        # there, as an exception, not later inside HDF5's close.
        with h5py.File(temporary, "w", rdcc_nbytes=0) as file:
            write_keys(file, fingerprint, keys, name)
            chunk = min(max(1, len(keys)), feature_chunk_rows(feature_shape, dtype))
            features = file.create_dataset(
                "features", shape=(len(keys), *feature_shape), dtype=dtype, chunks=(chunk, *feature_shape),
                compression="gzip", compression_opts=COMPRESSION_LEVEL, fletcher32=True,
            )
            write_rows(features, len(keys), rows)  # compressed on every core
        sync(temporary)
        os.replace(temporary, path)
        sync(folder)
    except (OSError, RuntimeError) as error:  # h5py reports some failed writes as RuntimeError
        temporary.unlink(missing_ok=True)
        raise CacheError(
            f"Could not write a shard to {str(folder)!r} ({reason(error)}); the cache is unchanged. "
            f"{advice(error)}."
        ) from error
    except BaseException:  # a Ctrl-C, or `rows` failing: no partial shard is left behind
        temporary.unlink(missing_ok=True)
        raise
    return ShardInfo(os.path.relpath(path, base), len(keys), path.stat().st_size, name)


def write_keys(file: h5py.File, fingerprint: str, keys: list[str], identity: str) -> None:
    """A shard's key columns and attributes (everything but `features`)."""
    file.attrs.update(format=SHARD_FORMAT, fingerprint=fingerprint, uuid=identity, rows=len(keys), created=now())
    parts = [split_key(key) for key in keys]
    for position, (column, column_type) in enumerate(SHARD_KEYS.items()):
        file.create_dataset(column, data=np.array([part[position] for part in parts], dtype=column_type), dtype=column_type)


def read_keys(path: Path, fingerprint: str) -> tuple[list[str], str]:
    """The keys of a shard's rows, in row order, and its uuid. Raises OSError, KeyError or
    ValueError on a file that is not a complete shard of the configuration `fingerprint`."""
    with h5py.File(path, "r") as file:
        if (file.attrs.get("format"), file.attrs.get("fingerprint")) != (SHARD_FORMAT, fingerprint) \
                or len(file["features"]) != file.attrs["rows"]:
            raise ValueError(f"{path} is not a complete shard of configuration {fingerprint}")
        keys = [
            sha256.decode() if not view else view_key(sha256.decode(), augmentation.decode(), int(view))
            for sha256, view, augmentation in zip(file["sha256"][:], file["view"][:], file["augmentation"][:])
        ]
        return keys, str(file.attrs["uuid"])


def problem(base: Path, shard: ShardInfo) -> str | None:
    """What is wrong with a shard the catalog points at, in a few words; None if nothing.
    Checks presence, size and the uuid inside (a shard of another cache has its own)."""
    path = base / shard.path
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"unreadable: {error.strerror}"
    if size != shard.bytes:
        return f"{'truncated' if size < shard.bytes else 'not the same file'}: {size} bytes, {shard.bytes} expected"
    try:
        with h5py.File(path, "r") as file:
            found = file.attrs.get("uuid"), int(file.attrs.get("rows", -1))
    except OSError as error:
        return f"unreadable: {reason(error)}"
    if found != (shard.uuid, shard.rows):
        return "another cache's shard, not the one this catalog wrote"
    return None


class Pending:
    """Batches of features computed for one configuration and not yet in a shard."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.index: dict[str, tuple[str, int]] = {}  # key -> (batch file name, row)
        self._next = 1
        self._loaded: tuple[str, np.ndarray] | None = None
        self.discarded: list[str] = []  # damaged batches found by `open` and deleted
        self._indexed: set[str] = set()  # batches read whole once (see `open`), or written by this process

    def open(self) -> "Pending":
        """Index the batches an earlier, interrupted run left behind."""
        if not self.folder.is_dir():
            return self
        for stale in self.folder.glob("*.tmp"):
            if stale.is_file():  # regular files only: never open a FIFO or a device
                stale.unlink()  # a batch whose writing was interrupted: never renamed, never counted
        for batch in sorted(self.folder.glob("batch-*.npz")):
            if not re.fullmatch(r"batch-\d+\.npz", batch.name):
                continue  # not a name this code writes: left alone
            self._next = max(self._next, int(batch.stem.split("-")[1]) + 1)  # never a name taken (a folder too)
            if batch.name in self._indexed or not batch.is_file():
                continue  # indexed already, or not a regular file (a folder, a FIFO): never opened
            keys = _batch_keys(batch)
            if keys is None:
                batch.unlink()  # its images are computed again
                self.discarded.append(batch.name)
                continue
            for row, key in enumerate(keys):
                self.index.setdefault(key.decode(), (batch.name, row))
            self._indexed.add(batch.name)
        return self

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def append(self, keys: list[str], features: np.ndarray) -> None:
        """Write one batch durably, then index it."""
        name = f"batch-{self._next:06d}.npz"
        self._next += 1
        temporary = self.folder / (name + ".tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as file:
                np.savez(file, key=np.array(keys, dtype=bytes), features=features)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.folder / name)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise CacheError(
                f"Could not write a batch to {str(self.folder)!r} ({error.strerror or error}); the cache and "
                f"the batches before this one are kept. {advice(error)}, then run again."
            ) from error
        for row, key in enumerate(keys):
            self.index[key] = (name, row)
        self._indexed.add(name)

    def features(self, key: str) -> np.ndarray:
        """The features of one image or view, by key (batches are read one at a time)."""
        name, row = self.index[key]
        if self._loaded is None or self._loaded[0] != name:
            with np.load(self.folder / name, allow_pickle=False) as arrays:
                self._loaded = (name, arrays["features"])
        return self._loaded[1][row]

    def clear(self) -> None:
        """Forget every batch: call once they are all in a shard on disk."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.index.clear()
        self._indexed.clear()
        self._loaded = None


def _batch_keys(batch: Path) -> np.ndarray | None:
    """The keys of a pending batch, after reading it whole: each array's CRC-32 in the zip
    is checked as it is read, so a flipped byte or a truncation (a disk's damage, since a
    batch is renamed into place only once complete) shows here, not at the checkpoint
    that would read it. None for a damaged batch."""
    try:
        with np.load(batch, allow_pickle=False) as arrays:
            keys, features = arrays["key"], arrays["features"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return keys if keys.ndim == 1 and len(keys) == len(features) else None


def reason(error: Exception) -> str:
    """The cause of an I/O error in a few words (HDF5's own messages run over many lines)."""
    found = re.search(r"errno = (\d+)", str(error))
    if found:
        return os.strerror(int(found.group(1)))
    return " ".join(str(getattr(error, "strerror", None) or error).split())[:200]


def advice(error: Exception) -> str:
    """What to do about a failed write: permissions, or space."""
    if getattr(error, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS) or "ermission" in str(error):
        return "Make the cache's folder writable, or choose another place with --cache"
    return "Free some space, or choose another place with --cache"


def sync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
