"""Reading the cache: its catalog (`open_cache`, `list_configs`) and `FeatureCache`
(a configuration's state as plain values is `state`'s).

The format is `schema`'s. `FeatureCache` reads the features from the shards themselves
(each needed chunk once), after checking that every shard the catalog points at is there,
whole and its own: a virtual dataset would read fill values for a missing one, silently.
A catalog of format version 1 (features inside it, no shards) is read as it is.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from extract.errors import CacheError, CatalogDamagedError
from extract.schema import FORMAT, FORMAT_VERSION, read_attrs, read_column, shards_folder, unsealed
from extract.shards import problem, reason
from extract.state import catalog_damage, catalog_problem, damage_message, shard_table

_OPEN_SHARDS = 64  # shard files a FeatureCache keeps open at once


@dataclass
class Views:
    """Augmented views of a split's images, as `FeatureCache.views` reads them."""

    features: np.ndarray | None  # None when read with features=False (see `entry`)
    row: np.ndarray  # the image's row number in the configuration
    view: np.ndarray  # view number, 1..views_per_image
    augmentation: dict
    views_per_image: int
    entry: np.ndarray | None = None  # each view's row in its views table (`features_at(entry, views=name)`)
    name: str | None = None  # the views table: its augmentation's fingerprint


def open_cache(path) -> h5py.File:
    """Open a catalog read-only, refusing anything that is not a cache this code understands
    (its root attributes checked against their digest)."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise CacheError(f"{str(path)!r} is a folder, not a feature cache; pass the cache's file with --cache.")
        raise CacheError(f"No feature cache at {str(path)!r}; run extract-features first.")
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise CatalogDamagedError(
            f"{str(path)!r} is not a readable feature cache ({reason(error)}); run extract-features "
            f"with --rebuild to move it aside and start a new one (--repair, when it is a damaged catalog "
            f"beside its shards, rebuilds it from them)."
        ) from error
    try:
        with catalog_errors(path):
            _check_root(file, path)
    except CacheError:
        file.close()
        raise
    return file


def _check_root(file: h5py.File, path: Path) -> None:
    found, version = file.attrs.get("format"), file.attrs.get("format_version")
    known = isinstance(version, (int, np.integer))
    if found == FORMAT and known and version > FORMAT_VERSION:  # first: a newer format may seal otherwise
        raise CacheError(
            f"{str(path)!r} has cache format {version}, newer than this version reads "
            f"({FORMAT_VERSION}); upgrade the package."
        )
    if unsealed(file, members=False):  # before the format: a changed `format` is damage, not another file
        raise CatalogDamagedError(catalog_damage(path, "its checksum does not match: an attribute changed"))
    if found != FORMAT:
        raise CacheError(
            f"{str(path)!r} is an HDF5 file but not a feature cache (format {found!r}); "
            f"pass the cache extract-features wrote, or --rebuild to move this file aside."
        )
    if not known or not isinstance(file.get("configs"), h5py.Group):
        missing = "its format_version" if not known else "its configs group"
        raise CatalogDamagedError(
            f"{str(path)!r} is named a feature cache but lacks {missing}: damaged, or not written by "
            f"extract-features; run extract-features with --repair to rebuild it from its shards, or with "
            f"--rebuild to move it aside and start a new one."
        )


@contextlib.contextmanager
def catalog_errors(path: Path):
    """What HDF5, h5py or a garbled value raise on a damaged catalog, as one CacheError."""
    try:
        yield
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as error:
        raise CatalogDamagedError(catalog_damage(path, reason(error))) from error


def checked_group(file: h5py.File, fingerprint: str, path: Path) -> h5py.Group:
    """A configuration's group, refused if its digest or indices say it is damaged."""
    with catalog_errors(path):
        group = file["configs"][fingerprint]
        why = catalog_problem(group)
    if why:
        raise CatalogDamagedError(catalog_damage(path, why))
    return group


def list_configs(path) -> list[dict]:
    """Every feature configuration in a cache: its attributes plus `fingerprint` and `rows`."""
    path = Path(path)
    with open_cache(path) as file:
        names = list(file["configs"])
        groups = [checked_group(file, name, path) for name in names]
        with catalog_errors(path):
            return [dict(read_attrs(group), fingerprint=name, rows=len(group["path"])) for name, group in zip(names, groups)]


class FeatureCache:
    """Read one feature configuration of a cache as numpy arrays.

        with FeatureCache("cache/features.h5") as cache:
            X, y = cache.features("train"), cache.label_indices("train")

    `config` picks a configuration by fingerprint (or a unique prefix of one); by default,
    the one the last extract-features run wrote. Every column method takes `split=`.
    """

    def __init__(self, path="cache/features.h5", config: str | None = None):
        self.path = Path(os.path.realpath(path))  # through a link, the shards are beside the real file
        self._file = open_cache(self.path)
        self._catalog = _identity(self.path)  # a writer commits by replacing the file: see _reading
        self._open: dict[str, h5py.File] = {}
        self._where: dict[str, tuple] = {}  # table -> (shard, shard_row, sha256, view) of its rows
        self._keys: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # shard -> (sha256, view) of its rows
        try:
            with catalog_errors(self.path):
                self.fingerprint = _choose_config(self._file, config, self.path)
            self._group = checked_group(self._file, self.fingerprint, self.path)
            with self._reading():
                self.config = read_attrs(self._group)
                self.class_names = self._group["class_names"].asstr()[:]
                self.feature_shape = tuple(self._group["features"].shape[1:])
                self._splits = self._group["split"].asstr()[:]
                self._v1 = int(self._file.attrs["format_version"]) == 1
                self._shards = [] if self._v1 else self._group["shards/path"].asstr()[:].tolist()
                self._check_shards()
        except CacheError:
            self.close()
            raise

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for file in self._open.values():
            file.close()
        self._open.clear()
        self._file.close()

    def __len__(self) -> int:
        return len(self._splits)

    def split_sizes(self) -> dict[str, int]:
        names, counts = np.unique(self._splits, return_counts=True)
        return {str(name): int(count) for name, count in zip(names, counts)}

    def features(self, split: str | None = None) -> np.ndarray:
        rows = np.arange(len(self)) if split is None else np.flatnonzero(self._splits == split)
        return self.features_at(rows)

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

    def features_at(self, rows, views: str | None = None) -> np.ndarray:
        """The features of the given row numbers, in that order (each chunk read once);
        with `views` (a views table's name), of those rows of that table."""
        table = self._group
        if views is not None:
            with self._reading():
                table = self._group[f"views/{views}"]
        return self._features(table, np.asarray(rows, dtype=np.int64))

    def column(self, name: str, split: str | None = None) -> np.ndarray:
        """Any per-row dataset of the group (see the schema), optionally one split's rows."""
        with self._reading():
            values = read_column(self._group, name)
        return values if split is None else values[self._splits == split]

    def views(self, split: str = "train", augmentation: str | None = None, *, features: bool = True) -> Views | None:
        """The augmented views in use for the rows of `split` (views are only made for
        training images), sorted by row then view; None if the configuration has none.
        `augmentation` reads another views table (see `view_tables`) instead; with
        `features=False` only where each view is (read them later with `features_at`)."""
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
        return Views(self._features(table, entry) if features else None, row, view, read_attrs(table), per_image,
                     entry, name)

    def view_tables(self) -> list[dict]:
        """Every views table of the configuration: its attributes plus `views` (its size)."""
        with self._reading():
            tables = self._group.get("views", {})
            return [dict(read_attrs(tables[name]), fingerprint=name, views=len(tables[name]["view"])) for name in tables]

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
        labels, paths = self.labels(), self.paths()
        for start in range(0, len(self), batch_size):
            rows = np.arange(start, min(start + batch_size, len(self)))
            if split is not None:
                rows = rows[self._splits[rows] == split]
            yield self.features_at(rows), self._positions(labels[rows]), paths[rows]

    def _features(self, table, rows: np.ndarray) -> np.ndarray:
        """Features of rows of `table` (the configuration's group or a views table)."""
        if self._v1:  # format version 1: in the table itself
            with self._reading():
                return read_rows(table["features"], rows)
        if table.name not in self._where:
            with self._reading():
                view = table["view"][:] if "view" in table else np.zeros(len(table["sha256"]), np.int64)
                self._where[table.name] = table["shard"][:], table["shard_row"][:], table["sha256"][:], view
        shard, shard_row, sha256, view = (column[rows] for column in self._where[table.name])
        result = np.empty((len(rows), *self.feature_shape), dtype=table["features"].dtype)
        for number in np.unique(shard):
            inside = shard == number
            path = self._shards[number]
            with self._reading(path):
                result[inside] = read_rows(self._shard(path)["features"], shard_row[inside])
                keys, views = self._keys_in(path)
            if not (np.array_equal(keys[shard_row[inside]], sha256[inside])
                    and np.array_equal(views[shard_row[inside]], view[inside])):
                raise CatalogDamagedError(catalog_damage(self.path, f"rows point at other images' features in the shard {path!r}"))
        return result

    def _keys_in(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """The content key (sha256, view) of each row of a shard, read once: what a row
        served from it must match, so that a wrong `shard_row` never serves another
        image's features."""
        if path not in self._keys:
            shard = self._shard(path)
            self._keys[path] = shard["sha256"][:], shard["view"][:]
        return self._keys[path]

    def _shard(self, path: str) -> h5py.File:
        if path not in self._open:
            if len(self._open) >= _OPEN_SHARDS:
                self._open.pop(next(iter(self._open))).close()
            self._open[path] = h5py.File(shards_folder(self.path) / path, "r")
        return self._open[path]

    def _check_shards(self) -> None:
        if self._v1:
            return
        for path, shard in shard_table(self._group).items():
            why = problem(shards_folder(self.path), shard)
            if why:
                raise CacheError(damage_message(self.path, path, why, self._rows_in(self._shards.index(path))))
            self._shard(path)  # kept open (up to _OPEN_SHARDS): a later compaction may replace it

    def _rows_in(self, number: int) -> int:
        """Rows of the configuration and of its views tables whose features are in shard `number`."""
        tables = [self._group, *self._group.get("views", {}).values()]
        return int(sum(np.sum(table["shard"][:] == number) for table in tables))

    @contextlib.contextmanager
    def _reading(self, shard: str | None = None):
        """A damaged file (a garbled chunk fails its Fletcher-32 checksum) is a CacheError."""
        try:
            yield
        except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as error:
            if shard and _identity(self.path) != self._catalog:  # a shard closed to keep few open, then removed
                raise CacheError(
                    f"The cache {str(self.path)!r} changed while it was being read (another extract-features run "
                    f"committed, compacted or rebuilt it, and the shard {shard!r} is gone); run this command again."
                ) from error
            if shard:
                raise CacheError(damage_message(self.path, shard, f"damaged ({reason(error)})")) from error
            raise CatalogDamagedError(catalog_damage(self.path, reason(error))) from error

    def _positions(self, labels: np.ndarray) -> np.ndarray:
        lookup = {name: position for position, name in enumerate(self.class_names)}
        return np.array([lookup.get(label, -1) for label in labels], dtype=np.int64)


def _identity(path: Path) -> tuple | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_mtime_ns


def read_rows(dataset, wanted: np.ndarray) -> np.ndarray:
    """dataset[wanted] for any row numbers, reading each needed chunk once."""
    order = np.argsort(wanted, kind="stable")
    ordered = wanted[order]
    result = np.empty((len(wanted), *dataset.shape[1:]), dtype=dataset.dtype)
    step = dataset.chunks[0] if dataset.chunks else max(1, len(dataset))
    for chunk_start in np.unique(ordered // step) * step:
        inside = (ordered >= chunk_start) & (ordered < chunk_start + step)
        result[order[inside]] = dataset[chunk_start : chunk_start + step][ordered[inside] - chunk_start]
    return result


def _choose_config(file: h5py.File, wanted: str | None, path: Path) -> str:
    names = list(file["configs"])
    if wanted is None:
        last = file.attrs.get("last_config")
        if last in names:
            return last
        if len(names) == 1:
            return names[0]
        if not names:
            raise CacheError(f"{str(path)!r} holds no feature configuration yet; run extract-features first.")
        raise CacheError(f"{str(path)!r} holds several feature configurations; pick one ({', '.join(names)}).")
    matches = [name for name in names if name.startswith(wanted)]
    if len(matches) != 1:
        raise CacheError(
            f"Expected a feature configuration of {str(path)!r} ({', '.join(names) or 'none'}); "
            f"received {wanted!r}, which matches {len(matches)}."
        )
    return matches[0]

