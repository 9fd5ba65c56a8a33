"""The one writer of a configuration during a run (it holds the cache's lock).

It starts from what `recovery.open_stored` found (the configuration as stored, with a
killed run's shards taken up) and the pending batches a killed run left. During the run
it keeps, for every content key, where its features are. A commit writes the pending
batches as one new shard, then the catalog. What nothing points at any more, and the
shards that became sparse or small, are `compaction`'s, after the last commit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from extract.catalog import open_cache
from extract.state import ConfigState, load_state
from extract.commit import upgrade_v1, write_catalog
from extract.errors import CacheError
from extract.recovery import Stored, claim_shards
from extract.schema import shards_folder
from extract.shards import Pending, ShardInfo, advice, write_shard


class Writer:
    """Every write of one configuration: pending batches, shards, the catalog's commits."""

    def __init__(self, stored: Stored):
        self.stored = stored
        self.path, self.fingerprint = stored.path, stored.fingerprint
        self.base, self.folder = stored.base, stored.folder
        self.state = stored.state
        self.changed = False  # whether this writer wrote a shard or committed
        self.catalog_seconds = 0.0  # what the last catalog write took
        self.pending = Pending(self.folder / "pending")
        self.pending_bytes = 0
        if not stored.rebuild:
            try:
                self.pending.open()
            except OSError as error:
                raise CacheError(
                    f"Cannot read the shard folder {str(self.folder)!r} ({error.strerror or error}); "
                    f"make it readable and writable, or choose another place with --cache."
                ) from error

    @property
    def new(self) -> bool:
        """Whether there is no catalog of this writer's yet (none, or one a rebuild replaces)."""
        return self.stored.rebuild or not self.path.exists()

    def begin(self) -> None:
        """Before the first write of a rebuild: move the old cache aside."""
        if self.stored.rebuild:
            move_aside(self.path)
            self.stored.rebuild = False

    def knows(self, key: str) -> bool:
        """Whether the features of `key` are stored (in a shard or a pending batch)."""
        return key in self.state.located or key in self.pending

    def append(self, keys: list[str], features: np.ndarray) -> None:
        self.begin()
        self.pending.append(keys, features)
        self.pending_bytes += features.nbytes

    def take_shard(self, shard: ShardInfo, keys: list[str]) -> None:
        """Take up a shard of this configuration written by another process (a Ray task)
        for this run: its keys are stored there unless stored already."""
        self.state.shards[shard.path] = shard
        for row, key in enumerate(keys):
            self.state.located.setdefault(key, (shard.path, row))
        self.changed = True

    def write_shard(self, keys: list[str], rows) -> None:
        """One new shard of `keys` (`rows(a, b)` gives their features a..b); they are stored there from now on."""
        shape, dtype = tuple(self.state.attrs["feature_shape"]), self.state.attrs["dtype"]
        shard = write_shard(self.folder, self.base, self.fingerprint, keys, rows, shape, dtype)
        self.state.shards[shard.path] = shard
        for row, key in enumerate(keys):
            self.state.located[key] = (shard.path, row)

    def commit(self, state: ConfigState) -> None:
        """Store `state` (rows, failures, views, attrs; where features are is the writer's):
        pending batches become a shard, then the catalog is replaced."""
        self.begin()
        stored = self.stored
        if stored.version < 2:
            upgrade_v1(self.path)
            stored.version = 2
            with open_cache(self.path) as file:
                self.state.shards.update(load_state(file, self.fingerprint).shards)
        self.state.attrs, self.state.rows, self.state.failures, self.state.views = (
            state.attrs, state.rows, state.failures, state.views)
        self.flush()
        started = time.perf_counter()
        write_catalog(self.path, {self.fingerprint: self.state}, self.fingerprint)
        claim_shards(self.path)
        self.catalog_seconds = time.perf_counter() - started
        stored.last_config, stored.relocated, self.changed = self.fingerprint, False, True

    def flush(self) -> None:
        """Write the pending batches as one new shard (a checkpoint between commits: the
        catalog does not point at it yet, and after a kill the next run adopts it)."""
        self.begin()
        self.pending.open()  # a batch a Ctrl-C cut off after it reached the disk is in it too
        new = [key for key in self.pending.index if key not in self.state.located]
        if new:
            self.write_shard(new, lambda a, b: np.stack([self.pending.features(key) for key in new[a:b]]))
            self.changed = True
        self.pending.clear()
        self.pending_bytes = 0


def move_aside(cache: Path) -> Path:
    """Move a cache and its shards aside together, as `<cache>.replaced-TIME/` (never
    deleted: a rebuild keeps what it replaces). Returns the folder they are in."""
    shards = shards_folder(cache)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = next(folder for number in range(1, 1000)
                 if not (folder := cache.with_name(f"{cache.name}.replaced-{stamp}" + (f"-{number}" if number > 1 else ""))).exists())
    try:
        aside.mkdir()
        for part in (cache, shards):  # pending batches go too: a rebuild starts from nothing
            if part.exists():
                os.rename(part, aside / part.name)
    except OSError as error:
        raise CacheError(
            f"Could not move the cache {str(cache)!r} aside for --rebuild ({error.strerror or error}); "
            f"{advice(error)}."
        ) from error
    return aside
