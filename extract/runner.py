"""Stage 1 end to end: list the folder, decide what needs computing, compute each new
image once, journal every batch, then write the cache.

What is computed is decided by content: an image whose path, size and modification time
match its cached row is not even read; any other image is read and hashed, and goes
through VGG16 only if no cached row or journaled batch has its SHA-256. With augmented
views (`augment=K`), each training image also needs views 1..K, known by (SHA-256, view);
an image read only for its missing views is not computed again.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from extract import __version__
from extract.augment import METHOD, Augmentation
from extract.backbone import PREPROCESSING, Backbone, FeatureConfig, fingerprint
from extract.errors import UsageError
from extract.journal import Journal, WriterLock, view_key
from extract.layout import ImageFile, Scan, scan_folder
from extract.reader import ViewRequest, load, load_all
from extract.store import FeatureCache, Rows, ViewRows, ViewSet, now, open_cache, package_versions, write_cache

DEFAULT_CACHE = "cache/features.h5"
VERSIONED = ("keras", "tensorflow", "h5py", "pillow", "numpy")  # recorded with every configuration


@dataclass
class ExtractSummary:
    """What a run did. Counts are of images; `computed` went through VGG16 in this run."""

    cache: str
    fingerprint: str
    data_dir: str
    layout: str
    feature_shape: list[int]
    precision: str = "float32"
    rows: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: int = 0
    skipped: int = 0
    computed: int = 0
    reused: int = 0  # features found by content (a moved or copied file, an interrupted run)
    views_per_image: int = 0  # augmented views in use per training image (0: none)
    views: int = 0  # views cached for the training images
    views_computed: int = 0
    augmentation: dict | None = None
    seconds: float = 0.0
    images_per_second: float = 0.0  # images and views computed, over the reading-and-computing time
    device: str | None = None  # None when nothing needed VGG16
    class_names: list[str] = field(default_factory=list)
    split_sizes: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Cached:
    row: int
    sha256: str
    label: str
    split: str
    size: int
    mtime_ns: int


def extract_features(
    data_dir,
    cache=DEFAULT_CACHE,
    *,
    input_size: int = 224,
    interpolation: str = "bilinear",
    pooling: str = "none",
    weights: str = "imagenet",
    seed: int = 0,
    precision: str = "float32",
    dtype: str = "float32",
    decode: str = "exact",
    layout: str = "auto",
    validation_percent: float = 20.0,
    augment: int | None = None,
    augmentation: Augmentation | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    save_every: float = 60.0,
    rebuild: bool = False,
    progress: bool = True,
) -> ExtractSummary:
    """Run every new or changed image of `data_dir` once through the frozen VGG16 base and
    cache its features in the HDF5 file `cache`. The keyword arguments mirror the
    `extract-features` options. The cache is saved every `save_every` seconds and at the
    end; Ctrl-C saves every finished batch, then re-raises KeyboardInterrupt.

    `augment=K` also caches K augmented views of every training image, made as
    `augmentation` says (default: the seed's transforms, seeded by `seed`); `augment=None`
    keeps the views the cache already uses, `augment=0` stops using them (they are kept)."""
    started = time.perf_counter()
    config = FeatureConfig(input_size, interpolation, pooling, str(weights), seed, precision, dtype, decode)
    config.validate()
    for name, value in (("--batch-size", batch_size), ("--workers", workers)):
        if value is not None and value < 1:
            raise UsageError(f"Expected {name} >= 1; received {value}.")
    if augment is not None and augment < 0:
        raise UsageError(f"Expected --augment K with K >= 0; received {augment}.")
    if augmentation is not None and augment is None:
        raise UsageError("Transform options (--shear, --zoom, --flip, --rotation, --shift) need --augment K.")
    augmentation = augmentation or Augmentation(seed=seed)
    augmentation.validate()
    scan = scan_folder(data_dir, layout, validation_percent)
    identity = config.identity()
    cache = Path(cache)
    with WriterLock(cache):
        _clean_leftovers(cache, rebuild)
        run = _Run(scan, config, identity, cache, validation_percent, (augment, augmentation), save_every)
        try:
            run.compute(batch_size, workers or max(2, min(8, os.cpu_count() or 1)), progress)
        except KeyboardInterrupt:
            run.save()
            raise  # the journal stays: it may hold batches for images this run did not reach
        run.finish()
    run.summary.seconds = round(time.perf_counter() - started, 3)
    return run.summary


class _Run:
    """One run's decisions, row by row, and the saving of them.

    `original` is the cache group as the run found it (for the counts); `cached` is the
    group as last saved, which checkpoints move forward; `decided` holds what this run
    learned since then: path -> (sha256, source of its features). `cached_views` is the
    views table in use as last saved: (sha256, view) -> row."""

    def __init__(self, scan: Scan, config: FeatureConfig, identity: dict, cache: Path, validation_percent, augment, save_every):
        self.scan, self.config, self.identity, self.cache = scan, config, identity, cache
        self.save_every = save_every
        self.key = fingerprint(identity)
        self.validation_percent = validation_percent
        self.original, self.stored_failures, self.attrs, self.last_config = _read_cached(cache, self.key)
        data_root = str(scan.root.resolve())
        if self.attrs and self.attrs.get("data_dir") != data_root:
            raise UsageError(
                f"The cache {str(cache)!r} holds these features for {self.attrs.get('data_dir')!r}, "
                f"not {data_root!r}; use another --cache for another data set."
            )
        self.summary = ExtractSummary(
            str(cache), self.key, data_root, scan.layout, list(config.feature_shape), config.precision,
            skipped=len(scan.skipped),
        )
        self.augmentation, self.views_per_image = self._choose_views(*augment)
        self.cached_views = _read_views(cache, self.key, self.augmentation.fingerprint) if self.views_per_image and self.attrs else {}
        self.journal = Journal(cache, self.key).open()
        self.failures: list[tuple[str, str]] = list(scan.failures)
        self.backbone: Backbone | None = None
        self.waiting: dict[str, np.ndarray] = {}  # journal key -> pixels, for the next batch
        self.waiting_paths: dict[str, list[str]] = {}  # sha256 -> paths whose features it will be
        self._now_cached(self.original)
        self.reading = [
            image for image in scan.images
            if not ((entry := self.cached.get(image.path)) and (entry.size, entry.mtime_ns) == (image.size, image.mtime_ns))
            or self.missing_views(image, entry.sha256)
        ]
        self.last_save = time.monotonic()

    def _choose_views(self, augment: int | None, augmentation: Augmentation) -> tuple[Augmentation, int]:
        """The augmentation and views per image this run keeps the cache to."""
        if augment is not None:
            return augmentation, augment
        if not self.attrs.get("views"):
            return augmentation, 0
        stored = {key: value for key, value in self.attrs["augmentation"].items() if key != "method"}
        if self.attrs["augmentation"].get("method") != METHOD:
            raise UsageError(
                f"The cache's views were made by {self.attrs['augmentation'].get('method')!r}, which this version "
                f"does not make; pass --augment K to make new ones (or --augment 0 to stop using views)."
            )
        return Augmentation(**stored), int(self.attrs["views_per_image"])

    def missing_views(self, image: ImageFile, sha256: str) -> list[int]:
        """The view numbers still to compute for an image (only training images have views)."""
        if not self.views_per_image or image.split != "train":
            return []
        name = self.augmentation.fingerprint
        return [
            view for view in range(1, self.views_per_image + 1)
            if (sha256, view) not in self.cached_views and view_key(sha256, name, view) not in self.journal.index
        ]

    def compute(self, batch_size: int, workers: int, progress: bool) -> None:
        """Read every image that may have changed or lacks views; run the unknown ones
        (and missing views) through VGG16, saving the cache every `save_every` seconds."""
        known = self.by_sha.keys() | self.journal.index.keys()
        views = ViewRequest(self.augmentation, self.missing_views) if self.views_per_image else None
        size, interpolation, draft = self.config.input_size, self.config.interpolation, self.config.decode == "draft"
        started = time.perf_counter()
        bar = tqdm(total=len(self.reading), unit="img", desc="extracting", disable=None if progress else True)
        with bar:
            for loaded in load_all(
                self.scan.root, self.reading, size, interpolation, known, workers,
                prefetch=2 * batch_size, views=views, draft=draft,
            ):
                path = loaded.image.path
                if not loaded.error and not self._decide(path, loaded.sha256):
                    if loaded.pixels is None:
                        # known when read, gone since (a checkpoint dropped the deleted file that had it)
                        loaded = load(self.scan.root, loaded.image, size, interpolation, views=views, draft=draft)
                    if not loaded.error:
                        self.waiting_paths.setdefault(loaded.sha256, []).append(path)
                        self._queue(loaded.sha256, loaded.pixels, batch_size)
                if loaded.error:
                    self.failures.append((path, loaded.error))
                for view, pixels in loaded.views.items():
                    self._queue(view_key(loaded.sha256, self.augmentation.fingerprint, view), pixels, batch_size)
                bar.update()
            if self.waiting:
                self._run_batch()
        elapsed = time.perf_counter() - started
        if self.summary.computed + self.summary.views_computed and elapsed > 0:
            self.summary.images_per_second = round((self.summary.computed + self.summary.views_computed) / elapsed, 2)

    def _queue(self, key: str, pixels: np.ndarray, batch_size: int) -> None:
        if key not in self.waiting and key not in self.journal.index:
            self.waiting[key] = pixels
            if len(self.waiting) == batch_size:
                self._run_batch()

    def _run_batch(self) -> None:
        if self.backbone is None:
            self.backbone = Backbone(self.config)
            self.summary.device = self.backbone.device
            if not self.cache.exists():
                self.save()  # from now on there is a cache that opens, whatever happens
        keys = list(self.waiting)
        features = self.backbone(np.stack([self.waiting[key] for key in keys]))
        self.journal.append(keys, features)
        self.waiting.clear()
        for key in keys:
            if "/" in key:  # a view
                self.summary.views_computed += 1
                continue
            self.summary.computed += 1
            for path in self.waiting_paths.pop(key, ()):
                self.decided[path] = (key, -1)
        if time.monotonic() - self.last_save >= self.save_every:
            self.save()

    def _decide(self, path: str, sha256: str) -> bool:
        """Take the features an image already has (its own row, the journal, or another
        row); False if they are no longer anywhere."""
        entry = self.cached.get(path)
        if entry and entry.sha256 == sha256:
            self.decided[path] = (sha256, entry.row)
        elif sha256 in self.journal.index or sha256 in self.by_sha:
            self.summary.reused += 1
            self.decided[path] = (sha256, -1 if sha256 in self.journal.index else self.by_sha[sha256])
        else:
            return False
        return True

    def rows(self) -> Rows:
        """The rows to store. Cached rows that keep their features come first, in their old
        order (so an unchanged cache is only appended to). An image not read because the
        run was interrupted keeps its old row, and its old size and time, to be re-checked."""
        kept, moved = [], []
        failed = {path for path, _ in self.failures}
        for image in self.scan.images:
            entry = self.cached.get(image.path)
            if image.path in self.decided:
                sha256, source = self.decided[image.path]
                row = (image.path, sha256, image.label, image.split, image.size, image.mtime_ns, source)
            elif entry and image.path not in failed:
                row = (image.path, entry.sha256, image.label, image.split, entry.size, entry.mtime_ns, entry.row)
            else:
                continue
            (kept if entry and row[-1] == entry.row else moved).append(row)
        rows = Rows()
        for row in sorted(kept, key=lambda row: row[-1]) + moved:
            rows.add(*row)
        return rows

    def view_set(self, rows: Rows) -> ViewSet | None:
        """The views table to store: every cached or journaled view of the training rows'
        images, cached ones first in their old order. Views numbered above the views per
        image stay (a later, larger --augment uses them); views of other images go."""
        if not self.views_per_image:
            return None
        name = self.augmentation.fingerprint
        training = {sha256 for sha256, split in zip(rows.sha256, rows.split) if split == "train"}
        table = ViewRows()
        for (sha256, view), row in sorted(self.cached_views.items(), key=lambda item: item[1]):
            if sha256 in training:
                table.sha256.append(sha256), table.view.append(view), table.source.append(row)
        for sha256 in sorted(training):
            for view in range(1, self.views_per_image + 1):
                if (sha256, view) not in self.cached_views and view_key(sha256, name, view) in self.journal.index:
                    table.sha256.append(sha256), table.view.append(view), table.source.append(-1)
        attrs = dict(self.augmentation.identity(), fingerprint=name, views_per_image=self.views_per_image, updated=now())
        keys = [view_key(sha256, name, view) for sha256, view in zip(table.sha256, table.view)]
        return ViewSet(name, attrs, table, keys)

    def save(self, rows: Rows | None = None, views: ViewSet | None = None) -> None:
        """Write the cache as this run knows it now (atomically; see store.write_cache).
        `rows` and `views`, when given, are `rows()` and `view_set(rows)` already made."""
        rows = self.rows() if rows is None else rows
        views = self.view_set(rows) if views is None else views
        attrs = dict(
            self.identity,
            fingerprint=self.key,
            identity=json.dumps(self.identity, sort_keys=True),
            preprocessing=PREPROCESSING,
            weights_path=None if self.config.weights in ("imagenet", "random") else str(Path(self.config.weights).resolve()),
            data_dir=self.summary.data_dir,
            layout=self.scan.layout,
            validation_percent=self.validation_percent if self.scan.layout == "classes" else None,
            views=views.name if views else None,
            views_per_image=self.views_per_image or None,
            augmentation=json.dumps(self.augmentation.identity(), sort_keys=True) if views else None,
            created=self.attrs.get("created") or now(),
            updated=now(),
            extract_version=__version__,
            **{f"{name}_version": version for name, version in package_versions(VERSIONED).items()},
        )
        failures = sorted(self.failures)
        write_cache(self.cache, self.key, attrs, rows, failures, self.journal, views)
        self.attrs, self.stored_failures, self.last_config = attrs, failures, self.key
        self._now_cached({
            path: _Cached(row, *values)
            for row, (path, *values) in enumerate(zip(rows.path, rows.sha256, rows.label, rows.split, rows.size, rows.mtime_ns))
        })
        if views:
            self.cached_views = {(sha256, view): row for row, (sha256, view) in enumerate(zip(views.rows.sha256, views.rows.view))}
        self.last_save = time.monotonic()

    def finish(self) -> None:
        """Save unless the cache already holds exactly this; then drop the journal."""
        rows = self.rows()
        stored = [(path, e.sha256, e.label, e.split, e.size, e.mtime_ns, e.row) for path, e in self.cached.items()]
        current = list(zip(rows.path, rows.sha256, rows.label, rows.split, rows.size, rows.mtime_ns, rows.source))
        views = self.view_set(rows)
        views_changed = (
            (views.name if views else None, self.views_per_image) != (self.attrs.get("views"), self.attrs.get("views_per_image") or 0)
            or (views is not None and views.rows.source != list(range(len(self.cached_views))))
        )
        if current != stored or sorted(self.failures) != self.stored_failures or self.last_config != self.key or views_changed:
            self.save(rows, views)
        self._count(rows)
        self.journal.clear()

    def _now_cached(self, cached: dict) -> None:
        self.cached = cached
        self.by_sha = {entry.sha256: entry.row for entry in cached.values()}
        self.decided: dict[str, tuple[str, int]] = {}

    def _count(self, rows: Rows) -> None:
        summary, original = self.summary, self.original
        stored = dict(zip(rows.path, rows.sha256))
        summary.new = sum(path not in original for path in stored)
        summary.changed = sum(path in original and original[path].sha256 != sha for path, sha in stored.items())
        summary.unchanged = len(stored) - summary.new - summary.changed
        summary.removed = sum(path not in stored for path in original)
        summary.failures = sorted(self.failures)
        summary.failed = len(self.failures)
        summary.rows = len(rows)
        summary.class_names = sorted(set(rows.label) - {""})
        summary.split_sizes = {split: rows.split.count(split) for split in sorted(set(rows.split))}
        if self.views_per_image:
            summary.views_per_image = self.views_per_image
            summary.augmentation = self.augmentation.identity()
            summary.views = sum(view <= self.views_per_image for _, view in self.cached_views)


def _read_cached(cache: Path, key: str):
    """The rows (by path, in row order), failures and attributes cached for this
    configuration, and the configuration the cache's last run wrote."""
    if not cache.exists():
        return {}, [], {}, None
    with open_cache(cache) as file:  # refuses a damaged or foreign file before any work is done
        present, last_config = key in file["configs"], file.attrs.get("last_config")
    if not present:
        return {}, [], {}, last_config
    with FeatureCache(cache, key) as stored:
        columns = zip(*(stored.column(name) for name in ("path", "sha256", "label", "split", "size", "mtime_ns")))
        cached = {
            path: _Cached(row, sha256.decode(), label, split, int(size), int(mtime_ns))
            for row, (path, sha256, label, split, size, mtime_ns) in enumerate(columns)
        }
        return cached, sorted(stored.failures()), stored.config, last_config


def _read_views(cache: Path, key: str, name: str) -> dict[tuple[str, int], int]:
    """The rows of one views table of a configuration: (sha256, view) -> row."""
    if not cache.exists():
        return {}
    with FeatureCache(cache, key) as stored:
        return stored.view_index(name)


def _clean_leftovers(cache: Path, rebuild: bool) -> None:
    """Remove temporary files of a writer that was killed; with `rebuild`, move the cache
    aside (never delete it) so the run starts a new one."""
    for leftover in cache.parent.glob(f"{cache.name}.tmp-*"):
        leftover.unlink()
    if rebuild and cache.exists():
        aside = cache.with_name(f"{cache.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(cache, aside)  # the journal stays: its batches are valid for any cache
