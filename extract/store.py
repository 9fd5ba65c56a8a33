"""The HDF5 feature cache: the one module that knows its schema.

    /                          attrs: format, format_version, last_config, created, updated
    /configs/<fingerprint>/    one group per feature configuration; attrs describe it
        features     (N, *feature_shape) float32 | float16, chunked, gzip + fletcher32
        path         (N,) utf-8   relative to the data folder, "/"-separated
        sha256       (N,) S64     SHA-256 of the file's bytes, hex
        label        (N,) utf-8   class name, "" when unlabeled
        split        (N,) utf-8   train | validation | test | unlabeled
        size         (N,) int64   file size and modification time, for the quick
        mtime_ns     (N,) int64   "unchanged?" check on re-runs
        class_names  (C,) utf-8   sorted labels present in the rows
        failures/path, failures/reason   files that could not be read, with why
        views/<augmentation>/    augmented views of training images (extract-features --augment);
                                 attrs: the transforms, seed, views_per_image (K)
            features (M, *feature_shape)   as above
            sha256   (M,) S64     the image the view was made from, by content
            view     (M,) int64   view number, 1..; the image itself is view 0, in `features`

Row order means nothing; rows are identified by `path`. Plain h5py reads all of it.
Views are not rows: `features` holds one row per image, and a view belongs to the
training rows with its `sha256`. The group attribute `views` names the views in use;
views numbered above its `views_per_image` are kept for a later, larger --augment.
The file is never modified in place: `write_cache` writes a new file beside it and
renames it over the old one, so a reader (or a killed writer) never sees half a write.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from extract.chunks import write_rows
from extract.errors import CacheError

FORMAT = "bottleneck-features"
FORMAT_VERSION = 1
COLUMNS = ("path", "sha256", "label", "split", "size", "mtime_ns")
_TEXT = h5py.string_dtype("utf-8")
_COLUMN_TYPES = {"path": _TEXT, "sha256": "S64", "label": _TEXT, "split": _TEXT, "size": "int64", "mtime_ns": "int64"}
_CHUNK_BYTES = 512 * 1024
_TEXT_CHUNK_ROWS = 4096


@dataclass
class Rows:
    """The rows a cache group is to hold, column by column. `source[i]` says where row i's
    features come from: a row number of the group being replaced, or -1 for the journal."""

    path: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    label: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    mtime_ns: list[int] = field(default_factory=list)
    source: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.path)

    def add(self, path, sha256, label, split, size, mtime_ns, source) -> None:
        for column, value in zip(COLUMNS + ("source",), (path, sha256, label, split, size, mtime_ns, source)):
            getattr(self, column).append(value)


@dataclass
class ViewRows:
    """The views a views table is to hold; `source` as in `Rows`."""

    sha256: list[str] = field(default_factory=list)
    view: list[int] = field(default_factory=list)
    source: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.view)


@dataclass
class ViewSet:
    """One views table to write: its name (the augmentation's fingerprint), attributes, rows."""

    name: str
    attrs: dict
    rows: ViewRows
    keys: list[str]  # journal key of each row


@dataclass
class Views:
    """Augmented views of a split's images, as `FeatureCache.views` reads them."""

    features: np.ndarray
    row: np.ndarray  # the image's row number in the configuration
    view: np.ndarray  # view number, 1..views_per_image
    augmentation: dict
    views_per_image: int


def package_versions(packages) -> dict[str, str]:
    """Installed versions by distribution name ("unknown" when not installed)."""
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def open_cache(path) -> h5py.File:
    """Open a cache read-only, refusing anything that is not a cache this code understands."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"No feature cache at {str(path)!r}; run extract-features first.")
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise CacheError(
            f"{str(path)!r} is not a readable feature cache ({error}); run extract-features "
            f"with --rebuild to move it aside and start a new one."
        ) from error
    found, version = file.attrs.get("format"), file.attrs.get("format_version")
    if found != FORMAT or "configs" not in file:
        file.close()
        raise CacheError(f"{str(path)!r} is an HDF5 file but not a feature cache (format {found!r}).")
    if version > FORMAT_VERSION:
        file.close()
        raise CacheError(
            f"{str(path)!r} has cache format {version}, newer than this version reads "
            f"({FORMAT_VERSION}); upgrade the package."
        )
    return file


def list_configs(path) -> list[dict]:
    """Every feature configuration in a cache: its attributes plus `fingerprint` and `rows`."""
    with open_cache(path) as file:
        return [
            dict(_attrs(group), fingerprint=name, rows=len(group["path"]))
            for name, group in file["configs"].items()
        ]


class FeatureCache:
    """Read one feature configuration of a cache as numpy arrays.

        with FeatureCache("cache/features.h5") as cache:
            X, y = cache.features("train"), cache.label_indices("train")

    `config` picks a configuration by fingerprint (or a unique prefix of one); by default,
    the one the last extract-features run wrote. Every column method takes `split=`.
    """

    def __init__(self, path="cache/features.h5", config: str | None = None):
        self.path = Path(path)
        self._file = open_cache(self.path)
        try:
            self.fingerprint = _choose_config(self._file, config, self.path)
        except CacheError:
            self._file.close()
            raise
        with self._reading():
            self._group = self._file["configs"][self.fingerprint]
            self.config = _attrs(self._group)
            self.class_names = self._group["class_names"].asstr()[:]
            self.feature_shape = tuple(self._group["features"].shape[1:])
            self._splits = self._group["split"].asstr()[:]

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __len__(self) -> int:
        return len(self._splits)

    def split_sizes(self) -> dict[str, int]:
        names, counts = np.unique(self._splits, return_counts=True)
        return {str(name): int(count) for name, count in zip(names, counts)}

    def features(self, split: str | None = None) -> np.ndarray:
        return self.column("features", split)

    def paths(self, split: str | None = None) -> np.ndarray:
        return self.column("path", split)

    def labels(self, split: str | None = None) -> np.ndarray:
        return self.column("label", split)

    def label_indices(self, split: str | None = None) -> np.ndarray:
        """Labels as positions in `class_names`; -1 for unlabeled rows."""
        return self._positions(self.labels(split))

    def sha256(self, split: str | None = None) -> np.ndarray:
        return self.column("sha256", split).astype(str)

    def splits(self, split: str | None = None) -> np.ndarray:
        return self._splits if split is None else self._splits[self._splits == split]

    def features_at(self, rows) -> np.ndarray:
        """The features of the given row numbers, in that order (each chunk read once)."""
        with self._reading():
            return _read_rows(self._group["features"], np.asarray(rows, dtype=np.int64))

    def column(self, name: str, split: str | None = None) -> np.ndarray:
        """Any per-row dataset of the group (see the schema above), optionally one split's rows."""
        with self._reading():
            dataset = self._group[name]
            reader = dataset.asstr() if dataset.dtype == _TEXT else dataset
            if split is None:
                return reader[:]
            keep = self._splits == split
            step = dataset.chunks[0] if dataset.chunks else len(keep) or 1
            parts = [reader[start : start + step][keep[start : start + step]] for start in range(0, len(keep), step)]
            return np.concatenate(parts) if parts else reader[:0]

    def views(self, split: str = "train", augmentation: str | None = None) -> Views | None:
        """The augmented views in use for the rows of `split` (views are only made for
        training images), sorted by row then view; None if the configuration has none.
        `augmentation` reads another views table (see `view_tables`) instead."""
        name = augmentation or self.config.get("views")
        with self._reading():
            table = self._group.get(f"views/{name}") if name else None
            if table is None:
                if augmentation:
                    raise CacheError(f"Expected a views table of {str(self.path)!r}; received {augmentation!r}.")
                return None
            per_image = int(table.attrs["views_per_image"])
            hashes, rows_of = self.sha256(), {}
            for row in np.flatnonzero(self._splits == split):
                rows_of.setdefault(hashes[row], []).append(row)
            found = sorted(
                (row, view, entry)
                for (sha256, view), entry in self.view_index(name).items()
                if view <= per_image for row in rows_of.get(sha256, ())
            )
            row, view, entry = (np.array(column, dtype=np.int64) for column in zip(*found)) if found else (np.empty(0, np.int64),) * 3
            features = _read_rows(table["features"], entry)
        return Views(features, row, view, _attrs(table), per_image)

    def view_tables(self) -> list[dict]:
        """Every views table of the configuration: its attributes plus `views` (its size)."""
        with self._reading():
            tables = self._group.get("views", {})
            return [dict(_attrs(tables[name]), fingerprint=name, views=len(tables[name]["view"])) for name in tables]

    def view_index(self, name: str) -> dict[tuple[str, int], int]:
        """Every view in the views table `name` (an augmentation's fingerprint), whatever
        image it belongs to: (sha256, view) -> row of the table. Empty if there is none."""
        with self._reading():
            table = self._group.get(f"views/{name}")
            if table is None:
                return {}
            return {(sha256.decode(), int(view)): row for row, (sha256, view) in enumerate(zip(table["sha256"][:], table["view"][:]))}

    def failures(self) -> list[tuple[str, str]]:
        with self._reading():
            table = self._group["failures"]
            return list(zip(table["path"].asstr()[:], table["reason"].asstr()[:]))

    def iter_batches(self, split: str | None = None, batch_size: int = 4096) -> Iterator[tuple]:
        """(features, label_indices, paths) a block at a time, without loading the whole file."""
        for start in range(0, len(self), batch_size):
            rows = slice(start, start + batch_size)
            keep = slice(None) if split is None else self._splits[rows] == split
            with self._reading():
                labels = self._group["label"].asstr()[rows][keep]
                batch = (self._group["features"][rows][keep], self._positions(labels), self._group["path"].asstr()[rows][keep])
            yield batch

    @contextlib.contextmanager
    def _reading(self):
        """A damaged file (a garbled chunk fails its Fletcher-32 checksum) is a CacheError."""
        try:
            yield
        except (OSError, KeyError) as error:
            raise CacheError(
                f"The cache {str(self.path)!r} is damaged ({_reason(error)}); "
                f"run extract-features with --rebuild, which moves it aside and starts a new one."
            ) from error

    def _positions(self, labels: np.ndarray) -> np.ndarray:
        lookup = {name: position for position, name in enumerate(self.class_names)}
        return np.array([lookup.get(label, -1) for label in labels], dtype=np.int64)


def write_cache(path, fingerprint: str, attrs: dict, rows: Rows, failures, journal, views: ViewSet | None = None) -> None:
    """Write the cache anew with group `fingerprint` holding `rows` (features from the old
    group or the journal), `failures` and the views table `views`; other groups and other
    views tables are copied unchanged. Atomic: the new file is written aside, flushed to
    disk, then renamed over the old one."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with contextlib.ExitStack() as stack:
            old = stack.enter_context(open_cache(path)) if path.exists() else None
            # No chunk cache: each block goes to disk as it is written, so a full disk fails
            # there, as an exception, not later inside HDF5's close.
            new = stack.enter_context(h5py.File(temporary, "w", rdcc_nbytes=0))
            new.attrs.update(
                format=FORMAT, format_version=FORMAT_VERSION, last_config=fingerprint,
                created=old.attrs["created"] if old else now(), updated=now(),
            )
            configs = new.create_group("configs")
            for name in old["configs"] if old else ():
                if name != fingerprint:
                    old.copy(old["configs"][name], configs, name=name)  # raw chunks, no recompression
            previous = old["configs"].get(fingerprint) if old else None
            group = _write_rows(configs, fingerprint, previous, rows, journal, attrs)
            _write_tables(group, rows, failures)
            _write_views(group, previous, views, journal, attrs)
            new.flush()
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except (OSError, RuntimeError) as error:  # h5py reports some failed writes as RuntimeError
        raise CacheError(
            f"Could not write the cache {str(path)!r} ({_reason(error)}); "
            f"it is unchanged. Free some space or choose another place with --cache."
        ) from error
    finally:
        temporary.unlink(missing_ok=True)


def _write_rows(configs, fingerprint, previous, rows: Rows, journal, attrs: dict):
    """Create the group for `rows`, with `attrs`."""
    columns = {column: (getattr(rows, column), _COLUMN_TYPES[column]) for column in COLUMNS}
    group = _write_table(configs, fingerprint, previous, columns, rows.source, rows.sha256, journal, attrs)
    for key, value in attrs.items():
        if value is None:
            group.attrs.pop(key, None)  # e.g. validation_percent, for another layout
        else:
            group.attrs[key] = value
    return group


def _write_views(group, previous, views: ViewSet | None, journal, attrs: dict) -> None:
    """Write the views table in use; keep every other one (copied from `previous` unless
    the group was copied whole, views included)."""
    tables = group.require_group("views")
    for name in previous["views"] if previous is not None and "views" in previous else ():
        if name not in tables and (views is None or name != views.name):
            previous.file.copy(previous["views"][name], tables, name=name)
    if views is None:
        return
    old = previous.get(f"views/{views.name}") if previous is not None else None
    columns = {"sha256": (views.rows.sha256, "S64"), "view": (views.rows.view, "int64")}
    table = _write_table(tables, views.name, old, columns, views.rows.source, views.keys, journal, attrs)
    table.attrs.update(views.attrs)


def _write_table(parent, name: str, previous, columns: dict, source: list[int], keys: list[str], journal, attrs: dict):
    """Create `parent[name]` holding `columns` (name -> (values, dtype)) and `features`,
    row i from `previous` row `source[i]` or, when that is -1, from the journal's `keys[i]`.
    When the rows only append to `previous`, copy its chunks as they are and add the new
    rows; otherwise write every row."""
    shape, dtype = tuple(attrs["feature_shape"]), attrs["dtype"]
    count = len(source)
    kept = len(previous["features"]) if previous is not None else 0
    if previous is not None and source[:kept] == list(range(kept)):
        if name not in parent:
            previous.file.copy(previous, parent, name=name)
        group = parent[name]
        for dataset in (*columns, "features"):
            group[dataset].resize(count, axis=0)
    else:
        kept = 0
        if name in parent:
            del parent[name]
        group = parent.create_group(name)
        row_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        chunk_rows = max(1, min(_TEXT_CHUNK_ROWS, _CHUNK_BYTES // row_bytes))
        group.create_dataset(
            "features", shape=(count, *shape), maxshape=(None, *shape), dtype=dtype,
            chunks=(chunk_rows, *shape), compression="gzip", compression_opts=1, fletcher32=True,
        )
        for column, (_, column_type) in columns.items():
            group.create_dataset(
                column, shape=(count,), maxshape=(None,), dtype=column_type,
                chunks=(_TEXT_CHUNK_ROWS,), **({} if column_type == _TEXT else {"compression": "gzip"}),
            )
    for column, (values, column_type) in columns.items():
        group[column][:] = np.array(values, dtype=object if column_type == _TEXT else column_type)
    features = group["features"]

    def gather(start: int, stop: int) -> np.ndarray:
        return _gather(source[start:stop], keys[start:stop], previous, journal, shape, dtype)

    write_rows(features, kept, count, gather)  # new chunks compressed on every core
    return group


def _gather(source: list[int], keys: list[str], previous, journal, shape, dtype) -> np.ndarray:
    block = np.empty((len(source), *shape), dtype=dtype)
    sources = np.asarray(source)
    from_cache = np.flatnonzero(sources >= 0)
    if len(from_cache):
        block[from_cache] = _read_rows(previous["features"], sources[from_cache])
    for position in np.flatnonzero(sources < 0):
        block[position] = journal.features(keys[position])
    return block


def _read_rows(dataset, wanted: np.ndarray) -> np.ndarray:
    """dataset[wanted] for any row numbers, reading each needed chunk once."""
    order = np.argsort(wanted, kind="stable")
    ordered = wanted[order]
    result = np.empty((len(wanted), *dataset.shape[1:]), dtype=dataset.dtype)
    step = dataset.chunks[0]
    for chunk_start in np.unique(ordered // step) * step:
        inside = (ordered >= chunk_start) & (ordered < chunk_start + step)
        result[order[inside]] = dataset[chunk_start : chunk_start + step][ordered[inside] - chunk_start]
    return result


def _write_tables(group, rows: Rows, failures) -> None:
    for name in ("class_names", "failures"):
        if name in group:
            del group[name]
    group.create_dataset("class_names", data=np.array(sorted(set(rows.label) - {""}), dtype=object), dtype=_TEXT)
    table = group.create_group("failures")
    table.create_dataset("path", data=np.array([path for path, _ in failures], dtype=object), dtype=_TEXT)
    table.create_dataset("reason", data=np.array([reason for _, reason in failures], dtype=object), dtype=_TEXT)


def _reason(error: Exception) -> str:
    """The cause of an I/O error in a few words (HDF5's own messages run over many lines)."""
    found = re.search(r"errno = (\d+)", str(error))
    if found:
        return os.strerror(int(found.group(1)))
    return " ".join(str(getattr(error, "strerror", None) or error).split())[:200]


def _choose_config(file: h5py.File, wanted: str | None, path: Path) -> str:
    names = list(file["configs"])
    if wanted is None:
        last = file.attrs.get("last_config")
        if last in names:
            return last
        if len(names) == 1:
            return names[0]
        raise CacheError(f"{str(path)!r} holds several feature configurations; pick one ({', '.join(names)}).")
    matches = [name for name in names if name.startswith(wanted)]
    if len(matches) != 1:
        raise CacheError(
            f"Expected a feature configuration of {str(path)!r} ({', '.join(names) or 'none'}); "
            f"received {wanted!r}, which matches {len(matches)}."
        )
    return matches[0]


def _attrs(group) -> dict:
    """Group attributes as plain Python values."""
    values = {}
    for key, value in group.attrs.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        values[key] = value
    for key in ("identity", "augmentation"):
        if key in values:
            values[key] = json.loads(values[key])
    return values
