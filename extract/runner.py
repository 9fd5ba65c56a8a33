"""Stage 1 end to end: `extract_features` plans the run from the folder and the catalog,
lets the engine compute what is missing, commits at checkpoints and at the end, compacts,
and sums up what it did. See `plan` for what is computed and `writer` for how it is kept.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from extract._version import __version__
from extract.augment import METHOD, Augmentation
from extract.catalog import ConfigState, list_configs
from extract.commit import WriterLock
from extract.config import (
    OPTIONS, PREPROCESSING, FeatureConfig, check_range, describe, fingerprint, option_differences, option_value,
    path_text,
)
from extract.engine import Engine
from extract.errors import CacheError, UsageError
from extract.labels import read_labels
from extract.layout import ImageFile, Scan, not_regular, scan_folder
from extract.plan import catalog_rows, to_read, view_table
from extract.cluster import check_engine
from extract.ray_engine import RayEngine
from extract.reader import ViewRequest
from extract.schema import now, package_versions
from extract.shards import view_key
from extract.writer import Writer

DEFAULT_CACHE = "cache/features.h5"
VERSIONED = ("keras", "tensorflow", "jax", "torch", "h5py", "pillow", "numpy")  # recorded with every configuration
# What computed the features (backends, package versions): recorded when a run writes, but
# no reason to write by itself, so that an unchanged re-run writes nothing after an upgrade.
PROVENANCE = ("backends", "extract_version", *(f"{name}_version" for name in VERSIONED))
COMPACTIONS = ("auto", "full", "never")
# Bounds of the numeric options: past them a run only exhausts memory or never ends.
LIMITS = {
    "--batch-size": (1, 1024),  # see also BATCH_PIXELS
    "--workers": (1, 64),  # threads reading and decoding; more only contend for the cores
    "--save-every": (0, 86400),  # seconds: at least one checkpoint a day
    "--augment": (0, 100),  # views per training image; 100 already makes the run 101 times as long
    "--ray-actors": (1, 1024),  # backbone actors of --engine ray (one per GPU)
}
BATCH_PIXELS = 32 * 1024**2  # pixels of one batch: the default 32 images up to 1024 px, fewer above 181 px
CATALOG_SHARE = 0.05  # at most this share of a run's time goes to catalog commits at its checkpoints


@dataclass
class ExtractSummary:
    """What a run did. Counts are of images; `computed` went through VGG16 in this run."""

    cache: str
    fingerprint: str
    data_dir: str
    layout: str
    feature_shape: list[int]
    precision: str = "float32"
    configuration: str = ""  # the configuration in words (config.describe)
    options: dict[str, str] = field(default_factory=dict)  # its options' values: {"--input-size": "224", ...}
    new_configuration: bool = False  # this run added the configuration to the cache
    other_configurations: int = 0  # configurations in the cache besides this one
    nearest_configuration: str | None = None  # of those, the one closest to a new configuration
    differences: dict[str, list[str]] = field(default_factory=dict)  # option -> [this value, the nearest's]
    labels: str | None = None  # the labels file (layout "csv")
    not_in_labels: int = 0  # images skipped (counted in `skipped`) because the labels file does not name them
    labels_missing: list[str] = field(default_factory=list)  # what the labels file names but is no image in the folder
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
    images_per_second: float = 0.0  # images and views computed a second once the network was up (local engine)
    start_seconds: float | None = None  # building the network and its first batch (local engine)
    save_seconds: float = 0.0  # writing shards and committing the catalog, compaction included
    compacted: int = 0  # rows compaction rewrote into new shards
    compaction_error: str | None = None  # why compaction could not run (the run's commit stands)
    repaired: int = 0  # features forgotten by --repair (in damaged shards), computed again
    device: str | None = None  # None when nothing needed VGG16
    backend: str | None = None  # the Keras backend that computed (None when nothing needed VGG16)
    engine: str = "local"  # "ray": read and computed by a Ray Data job
    class_names: list[str] = field(default_factory=list)
    split_sizes: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


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
    labels=None,
    augment: int | None = None,
    augmentation: Augmentation | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    save_every: float = 60.0,
    rebuild: bool = False,
    repair: bool = False,
    compact: str = "auto",
    engine: str = "local",
    ray_address: str | None = None,
    ray_actors: int | None = None,
    progress: bool = True,
) -> ExtractSummary:
    """Run every new or changed image of `data_dir` once through the frozen VGG16 base and
    cache its features in the HDF5 cache `cache`. The keyword arguments mirror the
    `extract-features` options. Every `save_every` seconds the finished batches become a
    shard (a checkpoint; the catalog is committed with it while that takes under
    `CATALOG_SHARE` of the run); the end commits all; Ctrl-C commits every finished batch,
    then re-raises KeyboardInterrupt.

    `augment=K` also caches K augmented views of every training image, made as
    `augmentation` says (default: the blog recipe's transforms, seeded by `seed`); `augment=None`
    keeps the views the cache already uses, `augment=0` stops using them (they are kept).
    A link to a cache is written through (the real file, under its lock); `rebuild=True`
    moves the old cache aside only at the run's first write, so until then it is in place.
    `repair=True` reads every shard whole and computes again the rows of damaged ones;
    `compact` is "auto" (past the thresholds), "full" or "never".

    `engine="ray"` runs the reading and computing as one Ray Data job (see `ray_engine`):
    on the cluster at `ray_address` (else RAY_ADDRESS, else a Ray started here for the
    run), with `ray_actors` backbone actors (default: one per GPU, or one).

    `labels` is the path of a labels CSV (see `labels`): only the images it names are
    extracted, with its labels and splits; the layout is then "csv". A cache inside
    `data_dir` is fine: its files are never taken for images or class folders."""
    started = time.perf_counter()
    config = FeatureConfig(input_size, interpolation, pooling, str(weights), seed, precision, dtype, decode)
    config.validate()
    for name, value in (("--batch-size", batch_size), ("--workers", workers), ("--save-every", save_every),
                        ("--augment", augment)):
        if value is not None:
            check_range(name, value, *LIMITS[name])
    if batch_size * input_size**2 > BATCH_PIXELS:
        raise UsageError(
            f"Expected --batch-size x --input-size² at most 32 x 1024² (VGG16's first layer alone then holds "
            f"8.6 GB); received {batch_size} x {input_size}². Lower --batch-size."
        )
    if augmentation is not None and augment is None:
        raise UsageError("Transform options (--shear, --zoom, --flip, --rotation, --shift) need --augment K.")
    check_engine(engine, ray_address, ray_actors)
    if ray_actors is not None:
        check_range("--ray-actors", ray_actors, *LIMITS["--ray-actors"])
    if compact not in COMPACTIONS:
        raise UsageError(f"Expected --compact to be one of {', '.join(COMPACTIONS)}; received {compact!r}.")
    augmentation = augmentation or Augmentation(seed=seed)
    augmentation.validate()
    path_text("DATA_DIR", Path(data_dir).resolve())
    shown = path_text("--cache", cache)
    if labels is not None and layout != "auto":
        raise UsageError(
            f"--labels gives every image its label and split; received --layout {layout} as well. Drop one of them."
        )
    named = None if labels is None else read_labels(path_text("--labels", labels))
    cache = _real_cache(cache)
    scan = scan_folder(data_dir, layout, validation_percent, named, cache)
    with WriterLock(cache):
        _clean_leftovers(cache)
        run = _Run(scan, config, cache, validation_percent, (augment, augmentation), repair, rebuild)
        run.summary.cache, run.summary.engine = shown, engine
        if labels is not None:
            run.summary.labels, run.labels = str(labels), str(Path(labels).resolve())
        run.engine = (
            Engine(config, run.writer, run.cached_sha256, run.checkpoint, save_every, batch_size) if engine == "local"
            else RayEngine(config, run.writer, run.cached_sha256, run.checkpoint, save_every, batch_size,
                           ray_address, ray_actors)
        )
        try:
            run.engine.run(scan.root, run.reading, run.view_request(), run.view_key,
                       workers or max(2, min(8, os.cpu_count() or 1)), progress)
        except KeyboardInterrupt:
            if not run.writer.rebuild:  # a rebuild not begun has nothing to keep: the old cache stays
                run.commit()
            raise  # pending batches stay: they may hold images this run did not reach
        run.finish(compact)
    run.summary.seconds = round(time.perf_counter() - started, 3)
    return run.summary


class _Run:
    """One run's decisions, and the committing of them."""

    def __init__(self, scan: Scan, config: FeatureConfig, cache: Path, validation_percent, augment, repair: bool,
                 rebuild: bool):
        self.scan, self.config, self.validation_percent = scan, config, validation_percent
        self.identity = config.identity()
        self.key = fingerprint(self.identity)
        self.writer = Writer(cache, self.key, rebuild)
        self.stored = self.writer.state
        self.original = dict(self.stored.rows)  # as the run found them, for the counts
        data_root = str(scan.root.resolve())
        if self.stored.attrs and self.stored.attrs.get("data_dir") != data_root:
            raise UsageError(
                f"The cache {str(cache)!r} holds these features for {self.stored.attrs.get('data_dir')!r}, "
                f"not {data_root!r}; use another --cache for another data set."
            )
        self.labels: str | None = None  # the labels file's real path, recorded with the configuration
        self.summary = ExtractSummary(
            str(cache), self.key, data_root, scan.layout, list(config.feature_shape), config.precision,
            skipped=len(scan.skipped), not_in_labels=scan.not_in_labels, labels_missing=list(scan.missing),
        )
        self._compare(cache)
        self.summary.repaired = self.writer.check(repair)
        self.cached = dict(self.stored.rows)  # after repair: rows whose features are gone are read again
        self.augmentation, self.views_per_image = self._choose_views(*augment)
        self.engine: Engine | RayEngine | None = None
        self.committed_at = time.monotonic()  # when the catalog was last committed (or the run began)
        self.reading = to_read(scan.images, self.cached, self.missing_views)

    def _compare(self, cache: Path) -> None:
        """Name the configuration in the summary, and, for one new beside others in the
        cache, the options in which it differs from the nearest of them."""
        facts = dict(self.identity, weights_path=self._weights_path())
        summary = self.summary
        summary.configuration = describe(facts)
        summary.options = {option: value for option in OPTIONS
                           if option.startswith("--") and (value := option_value(option, facts))}
        summary.new_configuration = not self.stored.attrs
        others = [] if self.writer.rebuild or not cache.exists() else [
            found for found in list_configs(cache) if found["fingerprint"] != self.key]
        summary.other_configurations = len(others)
        if summary.new_configuration and others:
            nearest = min(others, key=lambda found: (len(option_differences(facts, found)), -found["rows"]))
            summary.nearest_configuration = nearest["fingerprint"]
            summary.differences = {option: list(values) for option, values in option_differences(facts, nearest).items()}

    def _weights_path(self) -> str | None:
        weights = self.config.weights
        return None if weights in ("imagenet", "random") else str(Path(weights).resolve())

    def _choose_views(self, augment: int | None, augmentation: Augmentation) -> tuple[Augmentation, int]:
        """The augmentation and views per image this run keeps the cache to."""
        attrs = self.stored.attrs
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

    def view_key(self, sha256: str, view: int) -> str:
        return view_key(sha256, self.augmentation.fingerprint, view)

    def missing_views(self, image: ImageFile, sha256: str) -> list[int]:
        """The view numbers still to compute for an image (only training images have views)."""
        if not self.views_per_image or image.split != "train":
            return []
        return [view for view in range(1, self.views_per_image + 1) if not self.writer.knows(self.view_key(sha256, view))]

    def view_request(self) -> ViewRequest | None:
        return ViewRequest(self.augmentation, self.missing_views, self.views_per_image) if self.views_per_image else None

    def cached_sha256(self, path: str) -> str | None:
        row = self.cached.get(path)
        return row.sha256 if row else None

    def state(self) -> ConfigState:
        """What the cache is to hold now (where features are is the writer's business)."""
        engine = self.engine
        failures = sorted(self.scan.failures + engine.failures)
        read = {path: sha256 for path, sha256 in engine.read.items() if self.writer.knows(sha256)}
        rows = catalog_rows(self.scan.images, self.cached, read, {path for path, _ in failures})
        views = dict(self.stored.views)
        in_use = None
        if self.views_per_image:
            in_use = self.augmentation.fingerprint
            table_attrs = dict(self.augmentation.identity(), fingerprint=in_use, views_per_image=self.views_per_image)
            old = views.get(in_use)
            table = view_table(rows, old, in_use, self.views_per_image, table_attrs, self.writer.knows)
            if old is None or table.keys != old.keys or _changed(old.attrs, table_attrs):
                table.attrs["updated"] = now()
                views[in_use] = table
        attrs = dict(
            self.identity,
            fingerprint=self.key,
            identity=self.identity,
            preprocessing=PREPROCESSING,
            weights_path=self._weights_path(),
            data_dir=self.summary.data_dir,
            layout=self.scan.layout,
            labels=self.labels,
            validation_percent=self.validation_percent if self.scan.layout in ("classes", "csv") else None,
            views=in_use,
            views_per_image=self.views_per_image or None,
            augmentation=self.augmentation.identity() if in_use else None,
            backends=self.backends(),
            created=self.stored.attrs.get("created") or now(),
            extract_version=__version__,
            **{f"{name}_version": version for name, version in package_versions(VERSIONED).items()},
        )
        attrs = {name: value for name, value in attrs.items() if value is not None}
        return ConfigState(attrs=attrs, rows=rows, failures=failures, views=views)

    def backends(self) -> str | None:
        """The Keras backends that computed this configuration's features, in order of first
        use, comma-separated (a cache made before backends were recorded was TensorFlow's)."""
        stored = self.stored.attrs.get("backends") or ("tensorflow" if self.stored.rows else "")
        backends = [name for name in stored.split(",") if name]
        if self.engine.backend and self.engine.backend not in backends:
            backends.append(self.engine.backend)
        return ",".join(backends) or None

    def commit(self, state: ConfigState | None = None) -> None:
        """Store the run as it is now (`state()`, unless given): pending batches become a
        shard, then the catalog is replaced (atomic; see writer.Writer.commit)."""
        started = time.perf_counter()
        state = state or self.state()
        state.attrs["updated"] = now()
        self.writer.commit(state)
        self.committed_at = time.monotonic()
        self.summary.save_seconds += time.perf_counter() - started

    def checkpoint(self) -> None:
        """During the run: the finished batches become a shard, at a cost in proportion to
        their rows. The catalog, whose cost grows with the cache, is committed too only
        while that keeps its writing under `CATALOG_SHARE` of the time between commits
        (and always while there is none: from then on there is a cache that opens)."""
        writer = self.writer
        if writer.new or time.monotonic() - self.committed_at >= writer.catalog_seconds / CATALOG_SHARE:
            self.commit()
            return
        started = time.perf_counter()
        writer.flush()
        self.summary.save_seconds += time.perf_counter() - started

    def finish(self, compact: str) -> None:
        """Commit unless the cache already holds exactly this; then clean up and compact."""
        state, stored = self.state(), self.stored
        unchanged = (
            state.rows == stored.rows and state.failures == stored.failures and not self.writer.pending
            and not self.writer.relocated
            and self.writer.last_config == self.key and not _changed(stored.attrs, state.attrs, PROVENANCE)
            and {name: table.keys for name, table in state.views.items()} == {name: table.keys for name, table in stored.views.items()}
        )
        if not unchanged:
            self.commit(state)
        started = time.perf_counter()
        try:
            self.summary.compacted = self.writer.finish(compact)
        except CacheError as error:  # the run is committed; compaction is tried again next time
            self.summary.compaction_error = str(error)
        self.summary.save_seconds = round(self.summary.save_seconds + time.perf_counter() - started, 3)
        self._count(self.writer.state)

    def _count(self, state: ConfigState) -> None:
        summary, engine = self.summary, self.engine
        rows = state.rows
        summary.new = sum(path not in self.original for path in rows)
        summary.changed = sum(path in self.original and self.original[path].sha256 != row.sha256 for path, row in rows.items())
        summary.unchanged = len(rows) - summary.new - summary.changed
        summary.removed = sum(path not in rows for path in self.original)
        summary.failures = list(state.failures)
        summary.failed = len(state.failures)
        summary.rows = len(rows)
        summary.class_names = sorted({row.label for row in rows.values()} - {""})
        splits = [row.split for row in rows.values()]
        summary.split_sizes = {split: splits.count(split) for split in sorted(set(splits))}
        summary.computed, summary.views_computed, summary.reused = engine.computed, engine.views_computed, engine.reused
        summary.device, summary.backend, summary.images_per_second = engine.device, engine.backend, engine.images_per_second
        summary.start_seconds = None if engine.start_seconds is None else round(engine.start_seconds, 3)
        if self.views_per_image:
            summary.views_per_image = self.views_per_image
            summary.augmentation = self.augmentation.identity()
            table = state.views.get(self.augmentation.fingerprint)
            summary.views = sum(view <= self.views_per_image for _, view in table.keys) if table else 0


def _changed(old: dict, new: dict, also_ignored=()) -> bool:
    """Whether two sets of attributes differ in more than their time stamps (and `also_ignored`)."""
    ignore = ("updated", *also_ignored)
    return {k: v for k, v in old.items() if k not in ignore} != {k: v for k, v in new.items() if k not in ignore}


def _real_cache(cache) -> Path:
    """The cache's real path (a link to a catalog is written through, under the real file's
    lock), refusing a folder. Inside the data folder is fine: the listing leaves its files out."""
    real = Path(os.path.realpath(cache))
    if real.is_dir():
        raise UsageError(
            f"Expected --cache to be the path of a cache file; {str(cache)!r} is a folder. "
            f"Pass a file path such as {str(Path(cache) / 'features.h5')!r}."
        )
    why = real.exists() and not_regular(real.stat().st_mode)
    if why:
        raise UsageError(f"Expected --cache to be the path of a cache file; {str(cache)!r} is {why}.")
    return real


def _clean_leftovers(cache: Path) -> None:
    """Remove the temporary catalogs of a writer that was killed (names made by
    commit.write_catalog: exactly `<cache>.tmp-<process id>`)."""
    prefix = f"{cache.name}.tmp-"
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(cache.parent):
            if entry.name.startswith(prefix) and entry.name[len(prefix):].isdigit() and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
