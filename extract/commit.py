"""Writing the cache: the writer's lock, the atomic commit of a catalog, the upgrade of a
format-1 cache, and `Writer`, which keeps one configuration's state through a run.

A commit writes the whole catalog (small: the per-row columns and where each row's
features are) beside itself and renames it into place. Shards are written before the
catalog that points at them, so a reader, or the next run after a kill, never sees a row
whose features are not complete on disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
import uuid
from operator import itemgetter
from pathlib import Path

import h5py
import numpy as np

from extract.catalog import open_cache
from extract.state import ConfigState, load_state, v1_shard
from extract.errors import CacheBusyError, CacheError
from extract.files import owned_prefix
from extract.schema import (
    CATALOG_LIBVER, COLUMNS, FORMAT, FORMAT_VERSION, LOCATION_COLUMNS, SHARD_TABLE, TEXT, VIEW_COLUMNS, create_group,
    now, seal, shards_folder, write_attrs, write_column,
)
from extract.shards import ShardInfo, advice, reason, sync, view_key, write_keys


class WriterLock:
    """One writer per cache: an exclusive `flock` on ``<cache>.lock``, which the kernel
    releases when the process ends however it ends, so a killed run leaves no stale lock."""

    def __init__(self, cache_path: Path):
        self.path = Path(f"{cache_path}.lock")
        self._file = None

    def __enter__(self) -> "WriterLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Without blocking (a FIFO put there would block the open forever) and without
            # following a link (the process id is written into it: never into another file).
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise CacheError(
                    f"The lock file {str(self.path)!r} is a symbolic link; remove it (it is remade) and run again."
                ) from error
            raise CacheError(
                f"Cannot write the cache folder {str(self.path.parent)!r} ({error.strerror}); "
                f"choose a writable place with --cache PATH."
            ) from error
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            raise CacheError(f"The lock file {str(self.path)!r} is not a regular file; remove it (it is remade) and run again.")
        file = os.fdopen(descriptor, "r+")
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


def write_catalog(path: Path, states: dict[str, ConfigState], last_config: str) -> None:
    """Commit: write the catalog anew with the configurations in `states`; every other
    configuration is copied from the current catalog as it is. Atomic: written aside,
    flushed to disk, then renamed over the old one. It is written inside a folder of its own
    (`commit_prefix`, then its owner: `files.owned_prefix`), never under a name a user's file
    could have, so that cleaning up after a killed writer can tell it from anything else
    beside the catalog, and from a live writer's."""
    workspace = None
    try:
        workspace = Path(tempfile.mkdtemp(prefix=owned_prefix(commit_prefix(path)), dir=path.parent))
        temporary = workspace / path.name
        with contextlib.ExitStack() as stack:
            old = stack.enter_context(open_cache(path)) if path.exists() else None
            new = stack.enter_context(h5py.File(temporary, "w", libver=CATALOG_LIBVER))
            new.attrs.update(
                format=FORMAT, format_version=FORMAT_VERSION, last_config=last_config,
                created=old.attrs.get("created", now()) if old else now(), updated=now(),
            )
            configs = create_group(new, "configs")
            for name in old["configs"] if old else ():
                if name not in states:
                    if int(old.attrs["format_version"]) < 2:
                        raise RuntimeError("a format-1 catalog is upgraded whole (upgrade_v1), not copied")
                    old.copy(old["configs"][name], configs, name=name)
            for name, state in states.items():
                _write_config(create_group(configs, name), state, shards_folder(path).name)
            seal(new, members=False)
        sync(temporary)
        os.replace(temporary, path)
        sync(path.parent)
    except (OSError, RuntimeError) as error:  # h5py reports some failed writes as RuntimeError
        raise CacheError(
            f"Could not write the cache {str(path)!r} ({reason(error)}); it is unchanged. {advice(error)}."
        ) from error
    finally:
        if workspace is not None:
            remove_commit_folder(workspace, path)


def commit_prefix(catalog: Path) -> str:
    """The name a commit's folder starts with, before its owner's tag and mkdtemp's 8
    characters (hidden: `.features.h5.commit-<host>-<pid>-XXXXXXXX`)."""
    return f".{catalog.name}.commit-"


def remove_commit_folder(folder: Path, catalog: Path) -> bool:
    """Remove a commit's folder, if it is one: a real folder (not a link) named by
    `commit_prefix`, holding nothing but a file named as the catalog. Anything else, a
    user's file or folder however named, is left alone. Returns whether it was removed."""
    try:
        if not (folder.name.startswith(commit_prefix(catalog)) and stat.S_ISDIR(os.lstat(folder).st_mode)):
            return False
        entries = list(os.scandir(folder))
        if any(entry.name != catalog.name or not entry.is_file(follow_symlinks=False) for entry in entries):
            return False
        for entry in entries:
            os.unlink(entry.path)
        os.rmdir(folder)
    except OSError:
        return False
    return True


def _write_config(group, state: ConfigState, folder: str) -> None:
    """One configuration's group; `folder` is the shards folder's name, beside the catalog."""
    shape, dtype = tuple(state.attrs["feature_shape"]), state.attrs["dtype"]
    used = referenced(state)
    shards = [info for path, info in state.shards.items() if path in used]
    number = {info.path: position for position, info in enumerate(shards)}
    rows = state.rows
    order, location = _on_disk_order(state, number, rows.sha256.tolist())
    columns = {name: getattr(rows, name)[order] for name in COLUMNS}
    _write_table(group, columns, COLUMNS, location, shards, folder, shape, dtype)
    write_column(group, "class_names", sorted(set(rows.label.tolist()) - {""}), TEXT)
    failures = create_group(group, "failures")
    write_column(failures, "path", [path for path, _ in state.failures], TEXT)
    write_column(failures, "reason", [why for _, why in state.failures], TEXT)
    table = create_group(group, "shards")
    for name, column_type in SHARD_TABLE.items():
        write_column(table, name, [getattr(info, name) for info in shards], column_type)
    for name, views in state.views.items():
        order, location = _on_disk_order(state, number, [view_key(sha256, name, view) for sha256, view in views.keys])
        keys = [views.keys[i] for i in order]
        table = create_group(group, f"views/{name}")
        columns = {"sha256": [sha256 for sha256, _ in keys], "view": [view for _, view in keys]}
        _write_table(table, columns, VIEW_COLUMNS, location, shards, folder, shape, dtype)
        write_attrs(table, views.attrs)
    write_attrs(group, state.attrs)
    seal(group)  # last: it covers every value and attribute written above


def _on_disk_order(state: ConfigState, number: dict, keys: list[str]) -> tuple[np.ndarray, tuple]:
    """Rows are stored in the order of their features on disk, so that the virtual dataset
    needs few mappings (one per run of rows that follow each other in a shard): the order
    of `keys`, and (shard number, row in it) of each in that order. Rows of the same
    content (copies of a file) take turns: every key's first row in disk order, then every
    second row, and so on; one after the other, each copy would need a mapping of its own."""
    located = list(map(state.located.__getitem__, keys))
    count = len(keys)
    shard = np.fromiter(map(number.__getitem__, map(itemgetter(0), located)), dtype=np.int32, count=count)
    shard_row = np.fromiter(map(itemgetter(1), located), dtype=np.int64, count=count)
    order = np.lexsort((shard_row, shard))
    if count:
        place_shard, place_row = shard[order], shard_row[order]
        first = np.ones(count, dtype=bool)
        first[1:] = (place_shard[1:] != place_shard[:-1]) | (place_row[1:] != place_row[:-1])
        copy = np.empty(count, dtype=np.int64)  # 0 for a key's first row, 1 for its second, ...
        copy[order] = np.arange(count) - np.flatnonzero(first)[np.cumsum(first) - 1]
        if copy.any():
            order = np.lexsort((shard_row, shard, copy))
    return order, (shard[order], shard_row[order])


def _write_table(group, columns: dict, types: dict, location, shards: list[ShardInfo], folder: str, shape, dtype) -> None:
    for name, values in columns.items():
        write_column(group, name, values, types[name])
    for (name, column_type), values in zip(LOCATION_COLUMNS.items(), location):
        write_column(group, name, values, column_type)
    _write_virtual(group, *location, shards, folder, shape, dtype)


def _write_virtual(group, shard: np.ndarray, shard_row: np.ndarray, shards: list[ShardInfo], folder: str, shape, dtype) -> None:
    """`features`: one virtual dataset of the rows' features, a mapping per run of rows
    that lie one after another in one shard. Source paths are relative to the catalog's
    folder (`folder`/`shard path`), so catalog and shards read from anywhere together.
    Mappings are set through h5py's low-level calls (`VirtualSource[...]` copies the
    source for each one: ten times slower, and a cache may need many)."""
    count = len(shard_row)
    if not count:
        group.create_dataset("features", shape=(0, *shape), dtype=dtype)
        return
    layout = h5py.VirtualLayout(shape=(count, *shape), dtype=dtype)
    breaks = np.flatnonzero((np.diff(shard) != 0) | (np.diff(shard_row) != 1)) + 1
    rest = (0,) * len(shape)
    target = h5py.h5s.create_simple((count, *shape))
    sources = {}  # shard number -> (its file name, relative to the catalog, and its dataspace)
    for start, stop in zip([0, *breaks.tolist()], [*breaks.tolist(), count]):
        number = int(shard[start])
        if number not in sources:  # "%" would start a printf-style pattern in HDF5's source names
            info = shards[number]
            sources[number] = (f"{folder}/{info.path}".replace("%", "%%").encode(), h5py.h5s.create_simple((info.rows, *shape)))
        name, space = sources[number]
        target.select_hyperslab((start, *rest), (stop - start, *shape))
        space.select_hyperslab((int(shard_row[start]), *rest), (stop - start, *shape))
        layout.dcpl.set_virtual(target, name, b"features", space)
    group.create_virtual_dataset("features", layout, fillvalue=np.nan)


def referenced(state: ConfigState) -> set[str]:
    """The shards that rows or views tables point at."""
    keys = set(state.rows.sha256.tolist())
    keys.update(view_key(sha256, name, view) for name, table in state.views.items() for sha256, view in table.keys)
    return {state.located[key][0] for key in keys}


def upgrade_v1(path: Path) -> None:
    """Turn a format-1 cache into a catalog and shards, every configuration and views table
    at once. A format-1 features dataset is copied into its shard as it is stored (raw
    chunks, no recompression); the shard's row i is the old row i."""
    try:
        with open_cache(path) as old:
            states = {name: load_state(old, name) for name in old["configs"]}
            last_config = old.attrs.get("last_config", "")
            for name, state in states.items():
                group = old["configs"][name]
                tables = [(None, group, [sha256.decode() for sha256 in group["sha256"][:]])]
                for table_name, table in group.get("views", {}).items():
                    keys = [view_key(sha256.decode(), table_name, int(view)) for sha256, view in zip(table["sha256"][:], table["view"][:])]
                    tables.append((table_name, table, keys))
                for table_name, table, keys in tables:
                    shard = v1_shard(name, table_name)
                    state.shards[shard] = _copy_v1(table, shards_folder(path) / shard, shards_folder(path), name, keys)
    except (OSError, RuntimeError) as error:
        raise CacheError(
            f"Could not upgrade the cache {str(path)!r} to shards ({reason(error)}); it is unchanged. "
            f"{advice(error)}."
        ) from error
    write_catalog(path, states, last_config)


def _copy_v1(table, target: Path, base: Path, fingerprint: str, keys: list[str]) -> ShardInfo:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    with h5py.File(temporary, "w") as shard:
        table.file.copy(table["features"], shard, name="features")
        identity = uuid.uuid4().hex
        write_keys(shard, fingerprint, keys, identity)
    sync(temporary)
    os.replace(temporary, target)
    return ShardInfo(os.path.relpath(target, base), len(keys), target.stat().st_size, identity)
