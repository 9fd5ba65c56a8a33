"""What a run must do, as pure functions of the folder and the catalog.

What is computed is decided by content: an image whose path, size and modification time
match its cached row is not even read (`to_read`); any other image is read and hashed, and
goes through VGG16 only if no stored row or batch has its SHA-256. The rows to store are
then `catalog_rows` of what was read. With augmented views, each training image also
needs views 1..K, known by (SHA-256, view) (`view_table`). `plan` makes a run's `Plan`;
`next_state` is what a commit stores. Before any of it, `check_label_source` refuses a run
that would relabel the cache's images without being asked to.

A run plans over every file of the folder, so these work on columns (`CatalogRows`, and
the listing's sizes and times as arrays): the catalog's rows are found by path through
one index, and no object is made per row that is kept as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from extract.augment import METHOD, Augmentation
from extract.state import CatalogRows, ConfigState, ViewTable
from extract.errors import UsageError
from extract.layout import ImageFile
from extract.reader import ViewRequest
from extract.schema import now
from extract.shards import view_key
from extract.sources import Shard, shard_of


def to_read(images: Sequence[ImageFile], cached: CatalogRows,
            missing_views: Callable[[ImageFile, str], list] | None = None) -> list[ImageFile]:
    """The images that may have changed, or still lack views (`missing_views`, when views
    are made): every other one keeps its row unread."""
    at = cached.find([image.path for image in images])
    unchanged = _same_file(images, cached, at)
    if missing_views is None:
        return [image for image, keep in zip(images, unchanged.tolist()) if not keep]
    return [image for image, keep, row in zip(images, unchanged.tolist(), at.tolist())
            if not keep or missing_views(image, cached.sha256[row])]


def shards_to_read(shards: Sequence[Shard], cached: CatalogRows,
                   missing_views: Callable[[ImageFile, str], list] | None = None) -> tuple[list[ImageFile], list[Shard]]:
    """The samples of the shards that keep their rows unread (as the catalog has them), and
    the shards to read. A shard is kept when it has rows and every one carries its size and
    stamp: a shard read to its end with no failure stores its rows so (`shard_rows`); a new
    or changed one, one read in part or with failures, or one whose samples lack views, is read."""
    if not shards:
        return [], []
    by_path = {shard.path: shard for shard in shards}
    rows: dict[str, list[int]] = {}
    for row, path in enumerate(cached.path.tolist()):
        shard = shard_of(path, by_path.__contains__)
        if shard is not None:
            rows.setdefault(shard, []).append(row)
    kept, reading = [], []
    for shard in shards:
        at = rows.get(shard.path)
        same = at is not None and shard.stamp != -1 and bool(
            np.all((cached.size[at] == shard.size) & (cached.mtime_ns[at] == shard.stamp)))
        taken = cached.take(at) if same else CatalogRows()
        samples = [ImageFile(*row) for row in zip(taken.path.tolist(), taken.label.tolist(), taken.split.tolist(),
                                                  taken.size.tolist(), taken.mtime_ns.tolist())]
        if missing_views and samples:
            same = not any(missing_views(image, sha256) for image, sha256 in zip(samples, taken.sha256.tolist()))
        if same:
            kept += samples
        else:
            reading.append(shard)
    return kept, reading


def shard_rows(shard: Shard, samples: list[ImageFile], complete: bool) -> list[ImageFile]:
    """The samples read of a shard as they are to be stored: with the shard's size and stamp
    when it was read to its end with no failure (next run keeps them unread), else with stamp -1
    (next run reads the shard again; only what is not stored is computed)."""
    stamp = shard.stamp if complete else -1
    return [image._replace(size=shard.size, mtime_ns=stamp) for image in samples]


def catalog_rows(images: Sequence[ImageFile], cached: CatalogRows, read: dict[str, str], failed: set[str]) -> CatalogRows:
    """The rows to store, in the order of `images`: each image read (path -> its SHA-256,
    features stored) with its label and split; an image not read (unchanged, or not reached
    by an interrupted run) keeps its cached row, and its cached size and time, to be checked
    again next time. Failed, deleted and not-yet-computed images have no row."""
    count = len(images)
    paths = [image.path for image in images]
    at = cached.find(paths)
    fresh = np.fromiter(map(read.__contains__, paths), dtype=bool, count=count) if read else np.zeros(count, bool)
    kept = at >= 0
    if read or failed:
        kept &= ~fresh & ~np.fromiter(map(failed.__contains__, paths), dtype=bool, count=count)
    stored = fresh | kept
    sha256 = np.empty(count, dtype=object)
    sha256[kept] = cached.sha256[at[kept]]
    size, mtime_ns = np.empty(count, np.int64), np.empty(count, np.int64)
    size[kept], mtime_ns[kept] = cached.size[at[kept]], cached.mtime_ns[at[kept]]
    for row in np.flatnonzero(fresh).tolist():
        image = images[row]
        sha256[row], size[row], mtime_ns[row] = read[image.path], image.size, image.mtime_ns
    labels = [image.label for image in images]
    splits = [image.split for image in images]
    rows = CatalogRows(paths, sha256, labels, splits, size, mtime_ns)
    return rows if stored.all() else rows.take(stored)


def view_table(rows: CatalogRows, cached: ViewTable | None, name: str, views_per_image: int, attrs: dict,
               known: Callable[[str], bool]) -> ViewTable:
    """The views table to store: every stored view of the training rows' images, the
    cached ones first. Views numbered above `views_per_image` stay (a later, larger
    --augment uses them); views of images no longer in training go."""
    training = set(rows.sha256[rows.split == "train"].tolist())
    keys = [key for key in (cached.keys if cached else []) if key[0] in training]
    have = set(keys)
    keys += [
        (sha256, view) for sha256 in sorted(training) for view in range(1, views_per_image + 1)
        if (sha256, view) not in have and known(view_key(sha256, name, view))
    ]
    return ViewTable(attrs, keys)


def choose_views(attrs: dict, augment: int | None, augmentation: Augmentation) -> tuple[Augmentation, int]:
    """The augmentation and views per image a run keeps the cache to: `augment` if given,
    else the views the stored configuration (`attrs`) uses, else none."""
    if augment is not None:
        return augmentation, augment
    if not attrs.get("views"):
        return augmentation, 0
    stored = {key: value for key, value in attrs["augmentation"].items() if key != "method"}
    if attrs["augmentation"].get("method") != METHOD:
        raise UsageError(
            f"The cache's views were made by {attrs['augmentation'].get('method')!r}, which this version "
            f"does not make; pass --augment K to make new ones (or --augment 0 to stop using views)."
        )
    return Augmentation(**stored), int(attrs["views_per_image"])


def label_source(layout: str, labels: str | None) -> str:
    """Where a configuration's labels come from, as the option that asks for it:
    `--labels '/real/path.csv'` (layout "csv") or `--layout classes` (folders)."""
    return f"--labels {labels!r}" if layout == "csv" else f"--layout {layout}"


def check_label_source(attrs: dict, layout: str, labels: str | None, chosen: bool) -> str | None:
    """The label source the stored configuration (`attrs`: its `layout` and `labels`) has, if
    this run's (`layout`, the real path of its `labels` CSV) is another; None if the same.
    Another one is refused (UsageError) unless the run `chosen` it by --labels or by a
    --layout other than auto: else a re-run that forgot --labels would replace every label of
    the CSV with folder names, and a folder reorganised under a detected layout would change
    every label in silence. The same CSV, edited, is the same source: its rows are read anew.
    A configuration that records no layout (new; not written by extract-features) has none
    to keep: every catalog this project wrote records one."""
    stored = attrs.get("layout")
    if not stored:
        return None
    old, new = label_source(stored, attrs.get("labels")), label_source(layout, labels)
    if old == new:
        return None
    if not chosen:
        raise UsageError(
            f"The cache's labels for these features come from {old}; this run, given neither --labels nor "
            f"--layout, would replace them with those of {new} (detected). Pass {old} to keep them, "
            f"or {new} to relabel."
        )
    return old


@dataclass
class Plan:
    """What a run is to do, decided before it reads anything: the images to read (the
    others keep their rows unread), and the views each training image still needs."""

    cached: CatalogRows  # the stored rows (after repair)
    augmentation: Augmentation
    views_per_image: int
    known: Callable[[str], bool]  # whether a key's features are stored (a shard, a pending batch)
    reading: list[ImageFile] = field(default_factory=list)
    shards: list[Shard] = field(default_factory=list)  # the shards to read (their samples are found as they are)
    kept: list[ImageFile] = field(default_factory=list)  # the samples of the shards not read, as stored

    def missing_views(self, image: ImageFile, sha256: str) -> list[int]:
        """The view numbers still to compute for an image (only training images have views)."""
        if not self.views_per_image or image.split != "train":
            return []
        name = self.augmentation.fingerprint
        return [view for view in range(1, self.views_per_image + 1) if not self.known(view_key(sha256, name, view))]

    def views(self) -> ViewRequest | None:
        """What the reader is to make of the views (None: no views in use)."""
        return ViewRequest(self.augmentation, self.missing_views, self.views_per_image) if self.views_per_image else None

    def cached_sha256(self, path: str) -> str | None:
        return self.cached.sha256_of(path)


def plan(images: list[ImageFile], cached: CatalogRows, attrs: dict, augment: int | None,
         augmentation: Augmentation, known: Callable[[str], bool], shards: Sequence[Shard] = ()) -> Plan:
    """The run's plan for the folder's `images` and `shards` against the stored configuration
    (its rows `cached` and `attrs`; `known` tells stored keys): see `Plan`."""
    augmentation, views_per_image = choose_views(attrs, augment, augmentation)
    run = Plan(cached, augmentation, views_per_image, known)
    missing = run.missing_views if views_per_image else None
    run.reading = to_read(images, cached, missing)
    if shards and not _placed_alike(attrs, shards[0]):
        run.shards = list(shards)  # every sample placed anew: read again (nothing is computed again)
    else:
        run.kept, run.shards = shards_to_read(shards, cached, missing)
    return run


def _placed_alike(attrs: dict, shard: Shard) -> bool:
    """Whether the stored samples were given their labels and splits as this run gives them
    (the same layout and validation share): else their stored labels and splits are stale."""
    if not attrs:
        return True
    layout = "shards" if shard.labelled else "unlabeled"
    return attrs.get("layout") == layout and (not shard.labelled or attrs.get("validation_percent") == shard.validation_percent)


def next_state(images: list[ImageFile], run: Plan, read: dict[str, str], failures: list[tuple[str, str]],
               stored: ConfigState, attrs: dict) -> ConfigState:
    """What the cache is to hold after the run so far: the rows of the images read (`read`,
    path -> SHA-256 of those whose features are stored) and of those not read, the failures,
    the views table in use (a new or changed one time-stamped) and the configuration's `attrs`."""
    rows = catalog_rows(images, run.cached, read, {path for path, _ in failures})
    views = dict(stored.views)
    if run.views_per_image:
        name = run.augmentation.fingerprint
        table_attrs = dict(run.augmentation.identity(), fingerprint=name, views_per_image=run.views_per_image)
        old = views.get(name)
        table = view_table(rows, old, name, run.views_per_image, table_attrs, run.known)
        if old is None or table.keys != old.keys or changed(old.attrs, table_attrs):
            table.attrs["updated"] = now()
            views[name] = table
    return ConfigState(attrs=attrs, rows=rows, failures=failures, views=views)


def changed(old: dict, new: dict, also_ignored=()) -> bool:
    """Whether two sets of attributes differ in more than their time stamps (and `also_ignored`)."""
    ignore = ("updated", *also_ignored)
    return {k: v for k, v in old.items() if k not in ignore} != {k: v for k, v in new.items() if k not in ignore}


def row_changes(rows: CatalogRows, original: CatalogRows) -> dict[str, int]:
    """How `rows` differ from the `original` ones, by path: new, changed (another SHA-256),
    unchanged, and removed (in `original` only)."""
    at = original.find(rows.path)
    found = at >= 0
    changed = int(np.count_nonzero(original.sha256[at[found]] != rows.sha256[found]))
    present = int(np.count_nonzero(found))
    return {"new": len(rows) - present, "changed": changed, "unchanged": present - changed,
            "removed": len(original) - present}


def _same_file(images: Sequence[ImageFile], cached: CatalogRows, at: np.ndarray) -> np.ndarray:
    """Whether each image has a cached row (`at`: its row number, or -1) of its size and time."""
    count = len(images)
    found = at >= 0
    size = np.fromiter((image.size for image in images), dtype=np.int64, count=count)
    mtime_ns = np.fromiter((image.mtime_ns for image in images), dtype=np.int64, count=count)
    where = at[found]
    same = found.copy()
    same[found] = (cached.size[where] == size[found]) & (cached.mtime_ns[where] == mtime_ns[found])
    return same
