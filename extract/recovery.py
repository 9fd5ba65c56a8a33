"""Before a run writes: one configuration as stored, and what a killed run left of it.

`open_stored` reads the configuration's state from the catalog (refusing a damaged or
foreign file before any work is done) and takes up what an interrupted run left: complete
shards no catalog points at yet (adopted, or deleted when every row of theirs is stored
elsewhere) and partial ones (deleted). `check` then refuses damaged shards, naming the
first and the way out, or, with --repair, forgets their rows so that the run computes
them again. Both hand a `Stored` down to the writer.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from extract.catalog import catalog_errors, checked_group, open_cache
from extract.state import ConfigState, damage_message, damaged_shards, load_state
from extract.errors import CacheError, CatalogDamagedError, UsageError
from extract.files import NotRegularFile, open_regular, read_bounded
from extract.schema import FORMAT_VERSION, OWNER_FILE, shards_folder
from extract.shards import ShardInfo, advice, read_keys, reason, view_key


@dataclass
class Stored:
    """One configuration of a cache as a run finds it (with `rebuild`, as nothing: the old
    cache is not read at all, and moved aside only at the first write)."""

    path: Path  # the catalog
    fingerprint: str
    rebuild: bool = False
    version: int = FORMAT_VERSION  # the catalog's format (1: upgraded at the first commit)
    last_config: str | None = None  # the configuration the catalog's last commit wrote
    state: ConfigState = field(default_factory=ConfigState)
    damaged: list[tuple[ShardInfo, str]] = field(default_factory=list)  # shards found unreadable at open
    relocated: bool = False  # where features are differs from what the catalog says (the next commit re-points)
    leftovers: bool = False  # an interrupted run left shards or partial files (compaction looks again)
    discard: list[str] = field(default_factory=list)  # damaged shards, deleted after the commit that drops them
    salvaged: tuple[str, Path] | None = None  # a damaged catalog's message and where --repair moved it

    @property
    def base(self) -> Path:
        """The shards folder: shard paths are relative to it."""
        return shards_folder(self.path)

    @property
    def folder(self) -> Path:
        return self.base / self.fingerprint


def open_stored(path: Path, fingerprint: str, rebuild: bool = False, repair: bool = False) -> Stored:
    """The configuration `fingerprint` of the cache `path`, with what a killed run left taken
    up. With `repair`, a damaged catalog is moved aside (`set_aside`) and the configuration
    rebuilt from its shards: each holds the content keys of its rows, so only what no
    intact shard holds is computed again."""
    stored = Stored(path, fingerprint, rebuild and (path.exists() or shards_folder(path).exists()))
    if not stored.rebuild:  # a rebuild moves this name's folder (or link) aside, deleting nothing
        check_owner(path)
    if path.exists() and not stored.rebuild:
        try:
            _read_catalog(stored)
        except CatalogDamagedError as error:
            if not repair:
                raise
            stored.salvaged = (str(error), set_aside(path))
    stored.damaged = damaged_shards(path, stored.state)
    if stored.version >= 2 and not stored.rebuild:
        try:
            _adopt(stored)
        except OSError as error:
            raise CacheError(
                f"Cannot read the shard folder {str(stored.folder)!r} ({error.strerror or error}); "
                f"make it readable and writable, or choose another place with --cache."
            ) from error
    return stored


def _read_catalog(stored: Stored) -> None:
    """The configuration as the catalog records it, refusing a damaged or foreign file
    before any work is done."""
    path, fingerprint = stored.path, stored.fingerprint
    with open_cache(path) as file:
        stored.version = int(file.attrs["format_version"])
        stored.last_config = file.attrs.get("last_config")
        if fingerprint in file["configs"]:
            checked_group(file, fingerprint, path)
        with catalog_errors(path):  # a group lacks a column, or one is garbled
            stored.state = load_state(file, fingerprint)
            stored.relocated = _stale_links(file["configs"].get(fingerprint), stored.base.name)


def set_aside(catalog: Path) -> Path:
    """Move a damaged catalog aside (`<catalog>.damaged-TIME`: kept, never deleted; its
    other configurations' shards stay where they are and are adopted by their next run)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = next(place for number in range(1, 1000)
                 if not (place := catalog.with_name(f"{catalog.name}.damaged-{stamp}" + (f"-{number}" if number > 1 else ""))).exists())
    try:
        os.rename(catalog, aside)
    except OSError as error:
        raise CacheError(
            f"Could not move the damaged catalog {str(catalog)!r} aside for --repair ({error.strerror or error}); "
            f"make its folder writable, or move it away yourself and run again."
        ) from error
    return aside


OWNER_BYTES = 65536  # far beyond any path (PATH_MAX is 4096 on Linux); more is not an OWNER this code wrote


def check_owner(catalog: Path) -> None:
    """Refuse a shards folder that is another cache's too (a copied cache whose `.shards` is
    a link to the original's, or two catalogs linked to one folder): a run deletes the
    shards its own catalog does not point at, which would be the other's. The folder's
    owner is the catalog named in its `OWNER_FILE` (`claim_shards`): it is another's while
    that catalog exists and that folder is its shards folder too."""
    catalog = Path(os.path.realpath(catalog))
    base = shards_folder(catalog)
    try:
        with open_regular(base / OWNER_FILE) as file:
            data = read_bounded(file, OWNER_BYTES)
    except (FileNotFoundError, NotADirectoryError, NotRegularFile):
        return  # no owner yet, or none this code wrote (a FIFO, a folder): the next commit claims it
    except OSError as error:
        raise CacheError(f"Cannot read {str(base / OWNER_FILE)!r} ({error.strerror or error}); make the "
                         f"shards folder readable, or choose another place with --cache.") from error
    if len(data) > OWNER_BYTES:
        return  # not a path this code wrote (a huge or sparse file): the next commit replaces it
    owner = Path(os.fsdecode(data.rstrip(b"\n")))
    if owner == catalog or not owner.is_file():
        return
    try:
        shared = os.path.samefile(shards_folder(owner), base)
    except OSError:
        return  # the owner has no shards folder (any more): a moved or copied cache, free to claim this one
    if shared:
        raise UsageError(
            f"The shards folder {str(base)!r} is also that of the cache {str(owner)!r} (a link, or a copy sharing "
            f"it), and a run deletes the shards its own catalog does not name; give this cache a folder of its "
            f"own (copy the folder, not a link to it), or run with --rebuild to start it anew. Nothing was changed."
        )


def claim_shards(catalog: Path) -> None:
    """Record `catalog` as the owner of its shards folder (after a commit: the folder is
    its own, `check_owner` passed), unless it is already; written aside and renamed."""
    catalog = Path(os.path.realpath(catalog))
    base = shards_folder(catalog)
    marker, data = base / OWNER_FILE, os.fsencode(str(catalog)) + b"\n"
    try:
        if not base.is_dir() or (marker.is_file() and marker.stat().st_size == len(data)
                                 and marker.read_bytes() == data):  # the size first: never a huge one read
            return
        temporary = base / f"{OWNER_FILE}.tmp"
        temporary.write_bytes(data)
        os.replace(temporary, marker)
    except OSError as error:
        raise CacheError(
            f"Could not write {str(marker)!r} ({error.strerror or error}); the cache is committed. {advice(error)}."
        ) from error


def check(stored: Stored, repair: bool) -> int:
    """Refuse damaged shards, naming the first and the way out; with `repair`, read every
    shard whole (each chunk's checksum) and forget the rows of damaged ones, so that the
    run computes them again. A damaged shard whose every row was found in a shard left
    behind (see `_adopt`) is dropped quietly. Returns the number of keys forgotten."""
    state = stored.state
    damaged = list(stored.damaged)
    if repair:
        damaged += [(shard, why) for shard in state.shards.values() if shard not in dict(damaged)
                    for why in [_unreadable(stored.base / shard.path)] if why]
    if not damaged:  # every row's features are where the catalog says
        stored.discard = []
        return 0
    counts = {}
    for path, _ in state.located.values():
        counts[path] = counts.get(path, 0) + 1
    needed = [(shard, why) for shard, why in damaged if counts.get(shard.path)]
    if needed and not repair:
        shard, why = needed[0]
        raise CacheError(damage_message(stored.path, shard.path, why, counts[shard.path]))
    stored.discard = [shard.path for shard, _ in damaged]  # deleted once the repaired catalog is committed
    stored.relocated |= bool(damaged)
    lost = {shard.path for shard, _ in damaged}
    forgotten = [key for key, (path, _) in state.located.items() if path in lost]
    for key in forgotten:
        del state.located[key]
    for path in lost:
        del state.shards[path]
    kept = np.fromiter(map(state.located.__contains__, state.rows.sha256), dtype=bool, count=len(state.rows))
    if not kept.all():
        state.rows = state.rows.take(kept)
    for name, table in state.views.items():
        table.keys = [(sha256, view) for sha256, view in table.keys if view_key(sha256, name, view) in state.located]
    return len(forgotten)


def _adopt(stored: Stored) -> None:
    """Take up the complete shards of this configuration that an interrupted run wrote
    and no catalog points at; delete those whose every row is stored in a sound shard
    (a compaction's, a replaced one), and partial ones. A shard found here also stands
    in for a damaged one for the rows they share. Files that are not shards of this
    configuration are left alone."""
    for partial in stored.folder.glob("*.h5.tmp"):
        if partial.is_file():  # regular files only: never open a FIFO or a device
            partial.unlink()
            stored.leftovers = True  # an interrupted checkpoint or compaction: see to compaction again
    damaged = {shard.path for shard, _ in stored.damaged}
    state = stored.state
    located = state.located
    for file in sorted(stored.folder.glob("*.h5")):
        path = os.path.relpath(file, stored.base)
        if path in state.shards or not file.is_file():
            continue
        try:
            keys, identity = read_keys(file, stored.fingerprint)
        except (OSError, KeyError, ValueError):
            continue  # not a shard of this configuration (or not a shard): not ours to take or delete
        stored.leftovers = True
        if all(key in located and located[key][0] not in damaged for key in keys):
            file.unlink()  # a compaction's or a replaced shard's rows, all stored elsewhere
            continue
        state.shards[path] = ShardInfo(path, len(keys), file.stat().st_size, identity)
        for row, key in enumerate(keys):
            if key not in located or located[key][0] in damaged:
                stored.relocated |= key in located
                located[key] = (path, row)


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
