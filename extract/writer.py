"""The one writer of a configuration during a run (it holds the cache's lock).

At the start it takes up whatever an interrupted run left: complete shards no catalog
points at yet (adopted, or deleted when every row of theirs is stored elsewhere) and
pending batches. During the run it keeps, for every content key, where its features are.
A commit writes the pending batches as one new shard, then the catalog. After the last
commit it deletes the shards nothing points at any more and compacts.

Compaction rewrites only the shards it chooses: one whose live rows are under half its
rows, and the small ones (under `SMALL_SHARD_BYTES`) once there are `MERGE_SMALL_AT` of
them, merged into shards of at most `TARGET_SHARD_BYTES`. The new shards are committed
before the old ones are deleted, so a kill at any moment leaves a cache that reads right.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import h5py
import numpy as np

from extract.catalog import ConfigState, damage_message, damaged_shards, load_state, open_cache, read_rows
from extract.commit import referenced, upgrade_v1, write_catalog
from extract.errors import CacheError
from extract.schema import FORMAT_VERSION, shards_folder
from extract.shards import Pending, ShardInfo, advice, read_keys, reason, view_key, write_shard

TARGET_SHARD_BYTES = 128 * 2**20  # a run's pending batches become a shard at least this often
SMALL_SHARD_BYTES = TARGET_SHARD_BYTES // 8
MERGE_SMALL_AT = 8
LIVE_SHARE = 0.5  # a shard with fewer live rows than this share of its rows is rewritten


class Writer:
    """One configuration's state as stored, and every write of it."""

    def __init__(self, path: Path, fingerprint: str, rebuild: bool = False):
        self.path, self.fingerprint = path, fingerprint
        self.base = shards_folder(path)  # shard paths are relative to it
        self.folder = self.base / fingerprint
        self.version, self.last_config, self.state = FORMAT_VERSION, None, ConfigState()
        # With `rebuild`, the old cache is read not at all, and moved aside only at the first
        # write (`begin`): until then (TensorFlow's start takes seconds) it stays in place.
        self.rebuild = rebuild and (path.exists() or self.base.exists())
        self.changed = False  # whether this writer committed, or found what an interrupted run left
        self.relocated = False  # whether where features are differs from what the catalog says
        self.discard: list[str] = []  # damaged shards, deleted after the commit that drops them
        self.catalog_seconds = 0.0  # what the last catalog write took
        if path.exists() and not self.rebuild:
            with open_cache(path) as file:  # refuses a damaged or foreign file before any work is done
                self.version = int(file.attrs["format_version"])
                self.last_config = file.attrs.get("last_config")
                try:
                    self.state = load_state(file, fingerprint)
                    self.relocated = _stale_links(file["configs"].get(fingerprint), self.base.name)
                except (KeyError, ValueError, TypeError, OSError) as error:  # a group lacks a column, or one is garbled
                    raise CacheError(
                        f"The cache {str(path)!r} is damaged ({reason(error)}); run extract-features with "
                        f"--rebuild, which moves it aside and starts a new one."
                    ) from error
        self.damaged = damaged_shards(self.path, self.state)
        try:
            self.pending = Pending(self.folder / "pending")
            self.pending_bytes = 0
            if not self.rebuild:
                self.pending.open()
            if self.version >= 2 and not self.rebuild:
                self._adopt()
        except OSError as error:
            raise CacheError(
                f"Cannot read the shard folder {str(self.folder)!r} ({error.strerror or error}); "
                f"make it readable and writable, or choose another place with --cache."
            ) from error

    @property
    def new(self) -> bool:
        """Whether there is no catalog of this writer's yet (none, or one a rebuild replaces)."""
        return self.rebuild or not self.path.exists()

    def begin(self) -> None:
        """Before the first write of a rebuild: move the old cache aside."""
        if self.rebuild:
            move_aside(self.path)
            self.rebuild = False

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

    def check(self, repair: bool) -> int:
        """Refuse damaged shards, naming the first and the way out; with `repair`, read
        every shard whole (each chunk's checksum) and forget the rows of damaged ones, so
        that the run computes them again. A damaged shard whose every row was found in a
        shard left behind (see `_adopt`) is dropped quietly. Returns the number of keys forgotten."""
        damaged = list(self.damaged)
        if repair:
            damaged += [(shard, why) for shard in self.state.shards.values() if shard not in dict(damaged)
                        for why in [_unreadable(self.base / shard.path)] if why]
        if not damaged:  # every row's features are where the catalog says
            self.discard = []
            return 0
        counts = {}
        for path, _ in self.state.located.values():
            counts[path] = counts.get(path, 0) + 1
        needed = [(shard, why) for shard, why in damaged if counts.get(shard.path)]
        if needed and not repair:
            shard, why = needed[0]
            raise CacheError(damage_message(self.path, shard.path, why, counts[shard.path]))
        self.discard = [shard.path for shard, _ in damaged]  # deleted once the repaired catalog is committed
        self.relocated |= bool(damaged)
        lost = {shard.path for shard, _ in damaged}
        forgotten = [key for key, (path, _) in self.state.located.items() if path in lost]
        for key in forgotten:
            del self.state.located[key]
        for path in lost:
            del self.state.shards[path]
        rows = self.state.rows
        stored = np.fromiter(map(self.state.located.__contains__, rows.sha256), dtype=bool, count=len(rows))
        if not stored.all():
            self.state.rows = rows.take(stored)
        for name, table in self.state.views.items():
            table.keys = [(sha256, view) for sha256, view in table.keys if view_key(sha256, name, view) in self.state.located]
        return len(forgotten)

    def commit(self, state: ConfigState) -> None:
        """Store `state` (rows, failures, views, attrs; where features are is the writer's):
        pending batches become a shard, then the catalog is replaced."""
        self.begin()
        if self.version < 2:
            upgrade_v1(self.path)
            self.version = 2
            with open_cache(self.path) as file:
                self.state.shards.update(load_state(file, self.fingerprint).shards)
        self.state.attrs, self.state.rows, self.state.failures, self.state.views = (
            state.attrs, state.rows, state.failures, state.views)
        self.flush()
        started = time.perf_counter()
        write_catalog(self.path, {self.fingerprint: self.state}, self.fingerprint)
        self.catalog_seconds = time.perf_counter() - started
        self.last_config, self.changed, self.relocated = self.fingerprint, True, False

    def flush(self) -> None:
        """Write the pending batches as one new shard (a checkpoint between commits: the
        catalog does not point at it yet, and after a kill the next writer adopts it)."""
        self.begin()
        self.pending.open()  # a batch a Ctrl-C cut off after it reached the disk is in it too
        new = [key for key in self.pending.index if key not in self.state.located]
        if new:
            self._write_shard(new, lambda a, b: np.stack([self.pending.features(key) for key in new[a:b]]))
            self.changed = True
        self.pending.clear()
        self.pending_bytes = 0

    def finish(self, compact: str = "auto") -> int:
        """After the last commit: delete the shards nothing points at, then compact
        ("auto": past the thresholds; "full": every shard with a dead row, and every small
        one; "never"). Returns the number of rows compaction rewrote."""
        if not self.state.attrs:  # never committed: every shard here is still to be adopted
            return 0
        if compact == "auto" and not self.changed:  # nothing written, nothing left over: no threshold newly passed
            return 0
        used = referenced(self.state)
        for path in [path for path in self.state.shards if path not in used] + self.discard:
            with contextlib.suppress(OSError):  # a damaged shard may be unreadable, even to delete
                (self.base / path).unlink(missing_ok=True)
            self.state.shards.pop(path, None)
        self.discard = []
        self.state.located = {key: place for key, place in self.state.located.items() if place[0] in self.state.shards}
        if not self.folder.is_dir() or compact == "never" or not self.state.shards:
            return 0
        return self._compact(full=compact == "full")

    def _compact(self, full: bool) -> int:
        live: dict[str, dict[int, str]] = {path: {} for path in self.state.shards}
        for key in _keys(self.state):
            path, row = self.state.located[key]
            live[path][row] = key
        shards = self.state.shards
        chosen = [path for path in shards if len(live[path]) < shards[path].rows * (1 if full else LIVE_SHARE)]
        small = [path for path in shards if path not in chosen and shards[path].bytes < SMALL_SHARD_BYTES]
        if len(small) >= (2 if full else MERGE_SMALL_AT):
            chosen += small
        if not chosen or (len(chosen) == 1 and len(live[chosen[0]]) == shards[chosen[0]].rows):
            return 0
        moving = [(path, row, live[path][row]) for path in chosen for row in sorted(live[path])]
        handles = {path: h5py.File(self.base / path, "r") for path in chosen}
        try:
            for piece in _pieces(moving, {path: shards[path].bytes / max(1, shards[path].rows) for path in chosen}):
                self._write_shard([key for _, _, key in piece], lambda a, b, piece=piece: _gather(handles, piece[a:b]))
        finally:
            for handle in handles.values():
                handle.close()
        write_catalog(self.path, {self.fingerprint: self.state}, self.last_config or self.fingerprint)
        for path in chosen:
            (self.base / path).unlink(missing_ok=True)
            del self.state.shards[path]
        return len(moving)

    def _write_shard(self, keys: list[str], rows) -> None:
        shape, dtype = tuple(self.state.attrs["feature_shape"]), self.state.attrs["dtype"]
        shard = write_shard(self.folder, self.base, self.fingerprint, keys, rows, shape, dtype)
        self.state.shards[shard.path] = shard
        for row, key in enumerate(keys):
            self.state.located[key] = (shard.path, row)

    def _adopt(self) -> None:
        """Take up the complete shards of this configuration that an interrupted run wrote
        and no catalog points at; delete those whose every row is stored in a sound shard
        (a compaction's, a replaced one), and partial ones. A shard found here also stands
        in for a damaged one for the rows they share. Files that are not shards of this
        configuration are left alone."""
        for partial in self.folder.glob("*.h5.tmp"):
            if partial.is_file():  # regular files only: never open a FIFO or a device
                partial.unlink()
                self.changed = True  # an interrupted checkpoint or compaction: see to compaction again
        damaged = {shard.path for shard, _ in self.damaged}
        located = self.state.located
        for file in sorted(self.folder.glob("*.h5")):
            path = os.path.relpath(file, self.base)
            if path in self.state.shards or not file.is_file():
                continue
            try:
                keys, identity = read_keys(file, self.fingerprint)
            except (OSError, KeyError, ValueError):
                continue  # not a shard of this configuration (or not a shard): not ours to take or delete
            self.changed = True
            if all(key in located and located[key][0] not in damaged for key in keys):
                file.unlink()  # a compaction's or a replaced shard's rows, all stored elsewhere
                continue
            self.state.shards[path] = ShardInfo(path, len(keys), file.stat().st_size, identity)
            for row, key in enumerate(keys):
                if key not in located or located[key][0] in damaged:
                    self.relocated |= key in located
                    located[key] = (path, row)


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


def _keys(state: ConfigState) -> set[str]:
    keys = set(state.rows.sha256.tolist())
    return keys | {view_key(sha256, name, view) for name, table in state.views.items() for sha256, view in table.keys}


def _pieces(moving: list, row_bytes: dict[str, float]):
    """`moving` cut into runs of at most TARGET_SHARD_BYTES (estimated from the old shards)."""
    piece, size = [], 0.0
    for item in moving:
        if piece and size + row_bytes[item[0]] > TARGET_SHARD_BYTES:
            yield piece
            piece, size = [], 0.0
        piece.append(item)
        size += row_bytes[item[0]]
    if piece:
        yield piece


def _gather(handles: dict, items: list) -> np.ndarray:
    """The features of (shard path, row, key) items, in that order."""
    paths = np.array([path for path, _, _ in items])
    rows = np.array([row for _, row, _ in items], dtype=np.int64)
    first = handles[items[0][0]]["features"]
    block = np.empty((len(items), *first.shape[1:]), dtype=first.dtype)
    for path in np.unique(paths):
        inside = paths == path
        block[inside] = read_rows(handles[str(path)]["features"], rows[inside])
    return block


def _stale_links(group, folder: str) -> bool:
    """Whether the virtual datasets of a catalog group name another shards folder than
    `folder` (the catalog and its folder were renamed, or copied): the next commit re-points them."""
    if group is None or not group["features"].is_virtual:
        return False
    mappings = group["features"].id.get_create_plist()  # the first mapping tells: all name one folder
    return bool(mappings.get_virtual_count()) and not (
        mappings.get_virtual_filename(0).replace("%%", "%").startswith(f"{folder}/"))


def _unreadable(path: Path) -> str | None:
    """Why a shard's features cannot all be read (a chunk fails its checksum); None if they can."""
    try:
        with h5py.File(path, "r") as file:
            features = file["features"]
            step = features.chunks[0] if features.chunks else max(1, len(features))
            for start in range(0, len(features), step):
                features[start : start + step]
    except (OSError, KeyError) as error:
        return f"damaged ({reason(error)})"
    return None
