"""The write-ahead side of the cache: the writer's lock and the journal of finished batches.

HDF5 files are not safe to modify in place when a process can be killed at any moment,
so a run never does. Each batch of features is written as soon as it is computed to its
own small ``.npz`` file in the journal (written aside, then renamed into place, so a
batch file is either whole or absent). The HDF5 cache is then rewritten aside and
renamed over the old one (see `store.write_cache`). A run killed at any point leaves the
old cache intact and every finished batch in the journal; the next run takes them up.

Layout: ``<cache>.journal/<fingerprint>/batch-000001.npz`` with arrays ``key`` (bytes)
and ``features``. Features are keyed by content only, which is all they depend on: an
image's key is its SHA-256, a view's key adds the augmentation and view (`view_key`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import numpy as np

from extract.errors import CacheBusyError, CacheError


class Journal:
    """Batches of features computed for one feature configuration, not yet in the cache."""

    def __init__(self, cache_path: Path, fingerprint: str):
        self.folder = Path(f"{cache_path}.journal") / fingerprint
        self.index: dict[str, tuple[str, int]] = {}  # key -> (batch file name, row)
        self._next = 1
        self._loaded: tuple[str, np.ndarray] | None = None

    def open(self) -> "Journal":
        """Index the batches an earlier, interrupted run left behind."""
        if not self.folder.is_dir():
            return self
        for stale in self.folder.glob("*.tmp"):
            stale.unlink()  # a batch whose writing was interrupted: never renamed, never counted
        for batch in sorted(self.folder.glob("batch-*.npz")):
            try:
                with np.load(batch, allow_pickle=False) as arrays:
                    keys = arrays["key"]
            except (OSError, ValueError, KeyError):
                batch.unlink()  # cannot happen with rename-into-place; recomputed if it does
                continue
            for row, key in enumerate(keys):
                self.index[key.decode()] = (batch.name, row)
            self._next = max(self._next, int(batch.stem.split("-")[1]) + 1)
        return self

    def __len__(self) -> int:
        return len(self.index)

    def append(self, keys: list[str], features: np.ndarray) -> None:
        """Write one batch durably, then index it."""
        name = f"batch-{self._next:06d}.npz"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CacheError(f"Cannot make the journal folder {str(self.folder)!r} ({error.strerror}).") from error
        self._next += 1
        temporary = self.folder / (name + ".tmp")
        try:
            with open(temporary, "wb") as file:
                np.savez(file, key=np.array(keys, dtype=bytes), features=features)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.folder / name)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise CacheError(
                f"Could not write a batch to {str(self.folder)!r} ({error.strerror or error}); the cache and "
                f"the batches before this one are kept. Free some space (or choose another --cache) and run again."
            ) from error
        for row, key in enumerate(keys):
            self.index[key] = (name, row)

    def features(self, key: str) -> np.ndarray:
        """The features of one image or view, by key (batches are read one at a time)."""
        name, row = self.index[key]
        if self._loaded is None or self._loaded[0] != name:
            with np.load(self.folder / name, allow_pickle=False) as arrays:
                self._loaded = (name, arrays["features"])
        return self._loaded[1][row]

    def clear(self) -> None:
        """Forget every batch: call once they are safely in the cache."""
        shutil.rmtree(self.folder, ignore_errors=True)
        parent = self.folder.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
        self.index.clear()
        self._loaded = None


def view_key(sha256: str, augmentation: str, view: int) -> str:
    """The journal key of view `view` of an image, for the augmentation with that fingerprint."""
    return f"{sha256}/{augmentation}/{view}"


class WriterLock:
    """One writer per cache: an exclusive `flock` on ``<cache>.lock``, which the kernel
    releases when the process ends however it ends, so a killed run leaves no stale lock."""

    def __init__(self, cache_path: Path):
        self.path = Path(f"{cache_path}.lock")
        self._file = None

    def __enter__(self) -> "WriterLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = open(self.path, "a+")
        except OSError as error:
            raise CacheError(
                f"Cannot write the cache folder {str(self.path.parent)!r} ({error.strerror}); "
                f"choose a writable place with --cache PATH."
            ) from error
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise CacheBusyError(
                f"The cache {str(self.path)[:-5]!r} is being written by {holder}; "
                f"wait for it to finish or use another --cache."
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"process {os.getpid()}")
        file.flush()
        self._file = file
        return self

    def __exit__(self, *exc_info) -> None:
        self._file.close()  # closing releases the lock; the file stays for the next run
