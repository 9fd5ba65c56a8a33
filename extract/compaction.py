"""After a run's last commit: delete the shards nothing points at, then compact.

Compaction rewrites only the shards it chooses: one whose live rows are under half its
rows, and the small ones (under `SMALL_SHARD_BYTES`) once there are `MERGE_SMALL_AT` of
them, merged into shards of at most `TARGET_SHARD_BYTES`. The new shards are committed
before the old ones are deleted, so a kill at any moment leaves a cache that reads right
(the next run's `recovery` tidies up what it left).
"""

from __future__ import annotations

import contextlib

import h5py
import numpy as np

from extract.catalog import read_rows
from extract.state import ConfigState
from extract.commit import referenced, write_catalog
from extract.shards import TARGET_SHARD_BYTES, view_key
from extract.writer import Writer

SMALL_SHARD_BYTES = TARGET_SHARD_BYTES // 8
MERGE_SMALL_AT = 8
LIVE_SHARE = 0.5  # a shard with fewer live rows than this share of its rows is rewritten


def compact(writer: Writer, how: str = "auto") -> int:
    """Delete the shards nothing points at, then compact ("auto": past the thresholds;
    "full": every shard with a dead row, and every small one; "never"). Returns the
    number of rows compaction rewrote."""
    state, stored = writer.state, writer.stored
    if not state.attrs:  # never committed: every shard here is still to be adopted
        return 0
    if how == "auto" and not (writer.changed or stored.leftovers):  # nothing written, nothing left over
        return 0
    used = referenced(state)
    for path in [path for path in state.shards if path not in used] + stored.discard:
        with contextlib.suppress(OSError):  # a damaged shard may be unreadable, even to delete
            (writer.base / path).unlink(missing_ok=True)
        state.shards.pop(path, None)
    stored.discard = []
    state.located = {key: place for key, place in state.located.items() if place[0] in state.shards}
    if not writer.folder.is_dir() or how == "never" or not state.shards:
        return 0
    return _rewrite(writer, full=how == "full")


def _rewrite(writer: Writer, full: bool) -> int:
    state = writer.state
    live: dict[str, dict[int, str]] = {path: {} for path in state.shards}
    for key in _keys(state):
        path, row = state.located[key]
        live[path][row] = key
    shards = state.shards
    chosen = [path for path in shards if len(live[path]) < shards[path].rows * (1 if full else LIVE_SHARE)]
    small = [path for path in shards if path not in chosen and shards[path].bytes < SMALL_SHARD_BYTES]
    if len(small) >= (2 if full else MERGE_SMALL_AT):
        chosen += small
    if not chosen or (len(chosen) == 1 and len(live[chosen[0]]) == shards[chosen[0]].rows):
        return 0
    moving = [(path, row, live[path][row]) for path in chosen for row in sorted(live[path])]
    handles = {path: h5py.File(writer.base / path, "r") for path in chosen}
    try:
        for piece in _pieces(moving, {path: shards[path].bytes / max(1, shards[path].rows) for path in chosen}):
            writer.write_shard([key for _, _, key in piece], lambda a, b, piece=piece: _gather(handles, piece[a:b]))
    finally:
        for handle in handles.values():
            handle.close()
    write_catalog(writer.path, {writer.fingerprint: state}, writer.stored.last_config or writer.fingerprint)
    for path in chosen:
        (writer.base / path).unlink(missing_ok=True)
        del state.shards[path]
    return len(moving)


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
