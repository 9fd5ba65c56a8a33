"""The feature cache's format, in one place: names, columns, attributes, chunking.

A cache is a small HDF5 **catalog** (`features.h5`) and a folder of immutable HDF5
**shards** beside it (`features.h5.shards/<fingerprint>/<uuid>.h5`) that hold the features.

    catalog  /                     attrs: format, format_version (2), last_config, created, updated,
                                   digest (of the root's other attributes)
             /configs/<fingerprint>/   one group per feature configuration; attrs describe it
                 features     (N, *feature_shape)  a virtual dataset over the shards: row i is the
                                                   features of row i, wherever they are stored
                 path, sha256, label, split, size, mtime_ns     (N,)  one row per image
                 shard        (N,) int32   the row's shard, a position in shards/
                 shard_row    (N,) int64   the row's features in that shard
                 shards/path  (S,) utf-8   a shard file, relative to the shards folder
                 shards/rows, shards/bytes (S,) int64, shards/uuid (S,) S32   what it must be
                 class_names  (C,) utf-8
                 failures/path, failures/reason   files that could not be used, and why
                 views/<augmentation>/   augmented views: features (virtual), sha256, view,
                                         shard, shard_row; attrs: the transforms, views_per_image
                 attrs: the configuration, and `digest`: SHA-256 of every attribute and stored
                 value in the group (`digest`); every column Fletcher-32, text fixed-length
    shards folder  OWNER: the catalog whose folder it is (see recovery.check_owner)
    shard    /   attrs: format (SHARD_FORMAT), fingerprint, uuid, rows, created
                 features      (R, *feature_shape)  chunked, gzip level 1, Fletcher-32
                 sha256        (R,) S64   the content the row's features are of
                 view          (R,) int64 0 for the image itself, k for its augmented view k
                 augmentation  (R,) S16   the views' augmentation fingerprint, "" for view 0

A row of a shard is live while the catalog points at it. A commit writes the catalog anew
beside itself and renames it into place; shards are written whole and never modified, so a
change costs a new small shard and a new catalog, never a rewrite of the features.
Format version 1 kept `features` (a plain dataset) in the one file, with no shards; it is
read as it is and upgraded on the first write.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np

FORMAT = "bottleneck-features"
FORMAT_VERSION = 2
SHARD_FORMAT = "bottleneck-features-shard"
# The catalog's HDF5 file format: from 1.8's on, whose object headers carry checksums, so a
# flipped byte in an attribute's header is an error HDF5 reports, not a crash (as in 1.6's).
CATALOG_LIBVER = ("v108", "latest")
COMPACT_MAX = 1024  # attributes a catalog group keeps in its object header (see create_group)
DIGEST = "digest"  # the attribute holding a catalog group's SHA-256 (`digest`)
OWNER_FILE = "OWNER"  # in the shards folder: the real path of the catalog whose folder it is
TEXT = h5py.string_dtype("utf-8")
COLUMNS = {"path": TEXT, "sha256": "S64", "label": TEXT, "split": TEXT, "size": "int64", "mtime_ns": "int64"}
VIEW_COLUMNS = {"sha256": "S64", "view": "int64"}
LOCATION_COLUMNS = {"shard": "int32", "shard_row": "int64"}
SHARD_KEYS = {"sha256": "S64", "view": "int64", "augmentation": "S16"}
SHARD_TABLE = {"path": TEXT, "rows": "int64", "bytes": "int64", "uuid": "S32"}
CHUNK_BYTES = 512 * 1024  # feature chunks of about this size (h5py's advice: 10 KiB - 1 MiB)
TEXT_CHUNK_ROWS = 4096
COMPRESSION_LEVEL = 1  # gzip level: the maps compress to about 0.66 of raw at level 1, hardly less above


def shards_folder(catalog: Path) -> Path:
    """Where the shards of a catalog live: `<catalog>.shards/`."""
    return catalog.with_name(f"{catalog.name}.shards")


def feature_chunk_rows(feature_shape, dtype) -> int:
    row_bytes = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
    return max(1, min(TEXT_CHUNK_ROWS, CHUNK_BYTES // row_bytes))


def create_group(parent, path: str):
    """A catalog group (and any group above it that is missing) that keeps its attributes
    in its object header, which has a checksum, however many there are: past 8, HDF5 moves
    them to a heap whose blocks have none, where a flipped byte can crash a reader."""
    group = parent
    for name in path.split("/"):
        if name not in group:
            gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
            gcpl.set_attr_phase_change(COMPACT_MAX, COMPACT_MAX - 1)
            h5py.h5g.create(group.id, name.encode(), gcpl=gcpl)
        group = group[name]
    return group


def write_column(group, name: str, values, dtype) -> None:
    """One per-row column, chunked, every chunk with its Fletcher-32 checksum. Text (`TEXT`)
    is stored fixed-length, as wide as its longest value: HDF5 allows no filter on variable-
    length text, whose heap a flipped byte can make crash the reader. Numbers and text are
    gzip'd (level 1); hex hashes are not (they would only shrink by 0.44, at 40 MB/s)."""
    if dtype == TEXT:
        encoded = [str(value).encode("utf-8") for value in values]
        width = max([1, *map(len, encoded)])
        dtype = h5py.string_dtype("utf-8", width)
        array = np.array(encoded, dtype=dtype)
    else:
        array = np.array(values, dtype=dtype)
    options = {"fletcher32": True}
    if is_text(dtype) or array.dtype.kind != "S":
        options.update(compression="gzip", compression_opts=1)
    chunks = (min(TEXT_CHUNK_ROWS, len(array)),) if len(array) else None
    group.create_dataset(name, data=array, dtype=dtype, chunks=chunks, **(options if len(array) else {}))


def is_text(dtype) -> bool:
    """Whether a dataset's type is UTF-8 text: variable-length (caches before checksums) or fixed."""
    info = h5py.check_string_dtype(np.dtype(dtype))
    return info is not None and info.encoding == "utf-8"


def read_column(group, name: str) -> np.ndarray:
    dataset = group[name]
    return dataset.asstr()[:] if is_text(dataset.dtype) else dataset[:]


def read_attrs(group) -> dict:
    """Attributes as plain Python values (JSON-encoded ones decoded); the `digest` is the
    file's check on them, not one of them."""
    values = {}
    for key, value in group.attrs.items():
        if key == DIGEST:
            continue
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        values[key] = value
    for key in ("identity", "augmentation"):
        if key in values:
            values[key] = json.loads(values[key])
    return values


def write_attrs(group, attrs: dict) -> None:
    for key, value in attrs.items():
        if value is not None:
            group.attrs[key] = json.dumps(value, sort_keys=True) if isinstance(value, dict) else value


def digest(group, members: bool = True) -> str:
    """SHA-256 of what a catalog group says: every attribute but `digest` itself (by name,
    so an attribute added later is covered with no change here) and, with `members`,
    every group and dataset below it: names, types, shapes and stored values (a virtual
    dataset's values are its shards', checked apart). Values are read back as h5py gives
    them, so writing and checking agree whatever Python types were written."""
    hasher = hashlib.sha256()
    _hash_attrs(hasher, group)
    if members:
        group.visititems(lambda name, item: _hash_member(hasher, name, item))
    return hasher.hexdigest()


def seal(group, members: bool = True) -> None:
    """Record `digest(group)` in the group, as its last write."""
    group.attrs[DIGEST] = digest(group, members)


def unsealed(group, members: bool = True) -> bool:
    """Whether a sealed group no longer matches its digest (a group written before
    digests, which has none, is taken as it is)."""
    recorded = group.attrs.get(DIGEST)
    return recorded is not None and recorded != digest(group, members)


def _hash_attrs(hasher, item) -> None:
    for name in sorted(item.attrs):
        if name != DIGEST:
            hasher.update(_framed(name.encode()) + _framed(_value_bytes(item.attrs[name])))


def _hash_member(hasher, name: str, item) -> None:
    hasher.update(_framed(name.encode()))
    _hash_attrs(hasher, item)
    if isinstance(item, h5py.Dataset):
        hasher.update(_framed(f"{item.dtype.str}{item.shape}".encode()))
        if not item.is_virtual:
            hasher.update(_framed(_value_bytes(item[()])))


def _value_bytes(value) -> bytes:
    """A value's bytes, the same for the same value however h5py returns it."""
    array = np.asarray(value)
    if array.dtype.kind == "S":  # fixed-size text (hex digests): as stored
        return array.tobytes()
    if array.dtype.kind in "OU":  # text: each value framed, so no two lists of strings collide
        return b"".join(_framed(item.encode("utf-8", "surrogateescape") if isinstance(item, str) else bytes(item))
                        for item in array.ravel().tolist())
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def _framed(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data


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
