"""One configuration as a catalog records it, as plain values: its rows (as numpy
columns, `CatalogRows`), failures, views tables, where each content key's features are and
the shards they are in (`ConfigState`); `load_state` reads it from an open catalog, and
`damaged_shards` says which of its shards cannot be trusted. The format is `schema`'s.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from extract.schema import COLUMNS, LOCATION_COLUMNS, SHARD_TABLE, VIEW_COLUMNS, read_attrs, read_column, shards_folder, unsealed
from extract.shards import ShardInfo, problem, view_key

Location = tuple[str, int]  # (shard path relative to the shards folder, row in it)


class Row(NamedTuple):
    """One image row of a configuration; its features are those of its `sha256`."""

    sha256: str
    label: str
    split: str
    size: int
    mtime_ns: int


class CatalogRows:
    """The image rows of a configuration as columns, row i across them: `path`, `sha256`,
    `label`, `split` (object arrays of str) and `size`, `mtime_ns` (int64), as the catalog
    stores them. A run reads, plans, compares, counts and writes them column-wise, with no
    Python object per row; `CatalogRows.of` takes the rows as a mapping of path -> `Row`."""

    COLUMNS = tuple(COLUMNS)  # the catalog's per-row columns, in its order: path first
    __slots__ = (*COLUMNS, "_index")

    def __init__(self, path=(), sha256=(), label=(), split=(), size=(), mtime_ns=()):
        self.path, self.sha256, self.label, self.split = (_strings(column) for column in (path, sha256, label, split))
        self.size, self.mtime_ns = np.asarray(size, dtype=np.int64), np.asarray(mtime_ns, dtype=np.int64)
        if len({len(getattr(self, name)) for name in self.COLUMNS}) > 1:
            raise ValueError("CatalogRows: every column must have one value per row")
        self._index: dict[str, int] | None = None

    @classmethod
    def of(cls, rows: dict[str, Row]) -> "CatalogRows":
        return cls(list(rows), *(zip(*rows.values()) if rows else ((),) * len(Row._fields)))

    def __len__(self) -> int:
        return len(self.path)

    def __iter__(self):
        """The paths, as a dict of rows by path would give them."""
        return iter(self.path.tolist())

    def __eq__(self, other) -> bool:
        """The same rows, in any order."""
        if not isinstance(other, CatalogRows):
            return NotImplemented
        if len(self) != len(other):
            return False
        at = other.find(self.path)
        return bool((at >= 0).all()) and all(
            np.array_equal(getattr(self, name), getattr(other, name)[at]) for name in self.COLUMNS[1:])

    __hash__ = None

    def find(self, paths) -> np.ndarray:
        """The row number of each of `paths` (-1 where there is none)."""
        index = self.index
        return np.fromiter(map(index.get, paths, itertools.repeat(-1)), dtype=np.int64, count=len(paths))

    @property
    def index(self) -> dict[str, int]:
        """path -> row number, made once, when first needed."""
        if self._index is None:
            self._index = dict(zip(self.path.tolist(), range(len(self))))
        return self._index

    def take(self, rows) -> "CatalogRows":
        """The rows at the given row numbers (or boolean mask), in that order."""
        return CatalogRows(*(getattr(self, name)[rows] for name in self.COLUMNS))

    def sha256_of(self, path: str) -> str | None:
        row = self.index.get(path)
        return None if row is None else self.sha256[row]

    def row(self, path: str) -> Row | None:
        """One row as a `Row` (for a look at one image, not for a loop over all)."""
        row = self.index.get(path)
        return None if row is None else Row(self.sha256[row], self.label[row], self.split[row],
                                            int(self.size[row]), int(self.mtime_ns[row]))


def _strings(column) -> np.ndarray:
    """A column of text as a 1-D object array (its str values as they are)."""
    if isinstance(column, np.ndarray):
        return column if column.dtype == object else column.astype(str).astype(object)
    array = np.empty(len(column), dtype=object)
    array[:] = list(column)
    return array


@dataclass
class ViewTable:
    """The views of one augmentation: (sha256, view) pairs, and the table's attributes."""

    attrs: dict
    keys: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class ConfigState:
    """All a catalog says of one configuration, as plain values: its rows (as columns),
    failures, views tables, where each content key's features are, and the shards they are in."""

    attrs: dict = field(default_factory=dict)
    rows: CatalogRows = field(default_factory=CatalogRows)  # a mapping of path -> Row is taken too (CatalogRows.of)
    failures: list[tuple[str, str]] = field(default_factory=list)
    views: dict[str, ViewTable] = field(default_factory=dict)
    located: dict[str, Location] = field(default_factory=dict)
    shards: dict[str, ShardInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.rows, CatalogRows):
            self.rows = CatalogRows.of(self.rows)


def v1_shard(fingerprint: str, table: str | None = None) -> str:
    """The shard a version-1 group's features (or views table's) become when upgraded."""
    name = "v1-features.h5" if table is None else f"v1-views-{table}.h5"
    return f"{fingerprint}/{name}"


def load_state(file: h5py.File, fingerprint: str) -> ConfigState:
    """The state of configuration `fingerprint` of an open catalog (empty if absent).
    For format version 1, features are located where the upgrade will put them."""
    group = file["configs"].get(fingerprint)
    if group is None:
        return ConfigState()
    state = ConfigState(attrs=read_attrs(group))
    version = int(file.attrs["format_version"])
    if version >= 2:
        state.shards = shard_table(group)
    shards = list(state.shards)
    columns = {name: read_column(group, name) for name in CatalogRows.COLUMNS}
    state.rows = CatalogRows(**dict(columns, sha256=_text(columns["sha256"])))
    state.located.update(_locations(group, state.rows.sha256.tolist(), shards, v1_shard(fingerprint)))
    failures = group["failures"]
    state.failures = sorted(zip(failures["path"].asstr()[:], failures["reason"].asstr()[:]))
    for name, table in group.get("views", {}).items():
        hashes, views = _text(table["sha256"][:]).tolist(), table["view"][:].tolist()
        state.views[name] = ViewTable(read_attrs(table), list(zip(hashes, views)))
        keys = [view_key(sha256, name, view) for sha256, view in zip(hashes, views)]
        state.located.update(_locations(table, keys, shards, v1_shard(fingerprint, name)))
    return state


def _text(values: np.ndarray) -> np.ndarray:
    """A fixed-size ASCII column (SHA-256 hex digests) as an object array of str."""
    return values.astype(f"U{values.dtype.itemsize}").astype(object)


def shard_table(group) -> dict[str, ShardInfo]:
    """A format-2 group's `shards/` table, by path, in stored order."""
    table = group["shards"]
    return {
        path: ShardInfo(path, int(rows), int(size), uuid.decode())
        for path, rows, size, uuid in zip(table["path"].asstr()[:], table["rows"][:], table["bytes"][:], table["uuid"][:])
    }


def _locations(group, keys: list[str], shards: list[str], v1_path: str) -> dict[str, Location]:
    if "shard" not in group:  # format version 1: row i of the group's own features
        return {key: (v1_path, row) for row, key in enumerate(keys)}
    return dict(zip(keys, zip(map(shards.__getitem__, group["shard"][:].tolist()), group["shard_row"][:].tolist())))


def catalog_problem(group) -> str | None:
    """What is wrong with a configuration's group of a catalog, in a few words; None if
    nothing. Its digest (attributes and stored values: a flipped byte, a changed path or
    shard_row), then what a digest cannot vouch for in a catalog written before digests:
    columns of one length, and every row pointing inside a shard the table lists. Costs
    a read of the group's columns (see docs/performance.md)."""
    if unsealed(group):
        return "its checksum does not match: a value or attribute changed"
    tables = [("rows", group, COLUMNS), *((f"views table {name}", table, VIEW_COLUMNS)
                                         for name, table in group.get("views", {}).items())]
    located = "shards" in group
    if located:
        found = _lengths(group["shards"], SHARD_TABLE)
        if found:
            return f"its shards table has columns of different lengths ({found})"
        sizes = group["shards/rows"][:]
    for what, table, columns in tables:
        found = _lengths(table, {**columns, **(LOCATION_COLUMNS if located else {}), "features": None})
        if found:
            return f"its {what} have columns of different lengths ({found})"
        if located:
            shard, shard_row = table["shard"][:], table["shard_row"][:]
            if len(shard) and not (0 <= shard.min() and shard.max() < len(sizes)):
                return f"its {what} point at shards it does not list (shard {int(shard.min())}..{int(shard.max())} of {len(sizes)})"
            if len(shard) and not ((shard_row >= 0) & (shard_row < sizes[shard])).all():
                return f"its {what} point at rows outside their shards (shard_row)"
    return None


def _lengths(table, columns) -> str | None:
    """The columns' lengths in words if they differ; None if they are all one."""
    lengths = {name: len(table[name]) for name in columns}
    return None if len(set(lengths.values())) <= 1 else ", ".join(f"{name} {n}" for name, n in lengths.items())


def damaged_shards(catalog: Path, state: ConfigState) -> list[tuple[ShardInfo, str]]:
    """The shards of a state that are missing, truncated or not this cache's, with why."""
    found = ((shard, problem(shards_folder(catalog), shard)) for shard in state.shards.values())
    return [(shard, why) for shard, why in found if why]


def damage_message(catalog: Path, shard: str, why: str, rows: int | None = None) -> str:
    what = f"its {rows} rows" if rows is not None else "the rows whose features it holds"
    return (
        f"The shard {str(shards_folder(catalog) / shard)!r} of the cache {str(catalog)!r} is {why}; "
        f"run extract-features with --repair "
        f"to drop {what} and compute only them again, or with --rebuild to start a new cache."
    )


def catalog_damage(catalog: Path, why: str) -> str:
    return (
        f"The catalog of the cache {str(catalog)!r} is damaged ({why}); run extract-features with --repair "
        f"to rebuild it from its intact shards (only what they lack is computed again), or with --rebuild "
        f"to start a new cache."
    )
