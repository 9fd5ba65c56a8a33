"""Stage 1 end to end, one step handing its result to the next:

    options -> configuration (`config`) -> the folder (`layout`)
      -> the cache as found (`recovery`: a killed run's shards adopted, damage refused or repaired)
      -> the plan (`plan`: what to read, which views are missing)
      -> the engine (`engine` or `ray_engine`: reading and computing; it yields at checkpoints)
      -> commits (`writer`: shards, then the catalog) -> `compaction` -> the summary (`summary`)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from extract import compaction
from extract._version import __version__
from extract.augment import Augmentation
from extract.catalog import list_configs
from extract.state import ConfigState
from extract.cluster import check_engine
from extract.commit import WriterLock, commit_prefix, remove_commit_folder
from extract.config import PREPROCESSING, FeatureConfig, fingerprint, path_text
from extract.engine import Engine
from extract.errors import CacheError, CatalogDamagedError, UsageError
from extract.files import stale_partials
from extract.labels import read_labels
from extract.files import not_regular
from extract.layout import ImageFile, Scan, scan_folder
from extract.reader import check_shards
from extract.sources.location import is_url
from extract.options import EXTRACT_FEATURES, TOP_LAYER, check_options
from extract.plan import Plan, changed, check_label_source, next_state, plan, shard_rows
from extract.progress import Checkpoints, Tally
from extract.ray_engine import RayEngine
from extract.recovery import check as check_stored, open_stored
from extract.schema import now, package_versions
from extract.summary import ExtractSummary, count, name_configuration
from extract.writer import Writer

DEFAULT_CACHE = "cache/features.h5"
VERSIONED = ("keras", "tensorflow", "jax", "torch", "h5py", "pillow", "numpy")  # recorded with every configuration
# What computed the features (backends, package versions): recorded when a run writes, but
# no reason to write by itself, so that an unchanged re-run writes nothing after an upgrade.
PROVENANCE = ("backends", "extract_version", *(f"{name}_version" for name in VERSIONED))
# The options' bounds and choices: options.EXTRACT_FEATURES.
BATCH_PIXELS = 32 * 1024**2  # pixels of one batch: the default 32 images up to 1024 px, fewer above 181 px
# A batch's features, as float32: a run holds them about three times over (the network's output,
# the copy it stores, the pending batch read back whole at a checkpoint), beside the network's own
# activations. Only a layer below block4 at a large input size comes near: block1_conv1 at 1024 px
# is 268 MB a row, 8.6 GB for 32 images (a 3.6 GB peak RSS for 8 images at 512 px, 1.3 GB over
# block5_pool's), so a batch of it at most 8 images.
BATCH_FEATURE_BYTES = 2 * 1024**3


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
    layer: str = TOP_LAYER,
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
    storage_options: dict | None = None,
    progress: bool = True,
) -> ExtractSummary:
    """Run every new or changed image of `data_dir` once through the frozen VGG16 base and
    cache its features in the HDF5 cache `cache`. The keyword arguments mirror the
    `extract-features` options. Every `save_every` seconds the finished batches become a
    shard (a checkpoint; the catalog is committed with it while that takes under
    `progress.CATALOG_SHARE` of the run); the end commits all; Ctrl-C commits every finished batch,
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

    `data_dir` may also be a shard file (a WebDataset .tar, a .parquet), a brace pattern of
    them (`shards/{000..099}.tar`) or an fsspec URL of any of these (s3://, gs://, https://),
    read with `storage_options` (fsspec's; credentials as s3fs and gcsfs read them): see
    `extract.sources`. A shard's samples are stored as `<shard>#<key>` rows.

    `labels` is the path of a labels CSV (see `labels`): only the images it names are
    extracted, with its labels and splits; the layout is then "csv". A run that would take
    labels from elsewhere than the configuration's last run did (another CSV, folders, another
    layout) must say so by `labels` or a `layout` other than "auto" (`plan.check_label_source`).
    A cache inside `data_dir` is fine: its files are never taken for images or class folders."""
    started = time.perf_counter()
    config = FeatureConfig(input_size, interpolation, pooling, str(weights), seed, precision, dtype, decode, layer)
    config.validate()
    check_options({"--layout": layout, "--validation-percent": validation_percent, "--augment": augment,
                   "--batch-size": batch_size, "--workers": workers, "--save-every": save_every, "--compact": compact,
                   "--ray-actors": ray_actors}, EXTRACT_FEATURES)
    if batch_size * input_size**2 > BATCH_PIXELS:
        raise UsageError(
            f"Expected --batch-size x --input-size² at most 32 x 1024² (VGG16's first layer alone then holds "
            f"8.6 GB); received {batch_size} x {input_size}². Lower --batch-size."
        )
    _check_batch_features(batch_size, config)
    if augmentation is not None and augment is None:
        raise UsageError("Transform options (--shear, --zoom, --flip, --rotation, --shift) need --augment K.")
    check_engine(engine, ray_address, ray_actors)
    augmentation = augmentation or Augmentation(seed=seed)
    augmentation.validate()
    path_text("DATA_DIR", data_dir if is_url(str(data_dir)) else os.path.realpath(data_dir))  # realpath: a link loop is no RuntimeError
    shown = path_text("--cache", cache)
    if labels is not None and layout != "auto":
        raise UsageError(
            f"--labels gives every image its label and split; received --layout {layout} as well. Drop one of them."
        )
    named = None if labels is None else read_labels(path_text("--labels", labels))
    labels_path = None if labels is None else os.path.realpath(labels)  # as the cache records it
    cache = _real_cache(cache)
    scan = scan_folder(data_dir, layout, validation_percent, named, cache, storage_options)
    check_shards(scan.location, scan.shards)
    key = fingerprint(config.identity())  # reads the weights file: refused before the cache is touched
    with WriterLock(cache):
        _clean_leftovers(cache)
        stored = open_stored(cache, key, rebuild, repair)  # the cache as found, what a killed run left taken up
        data_root = scan.location.url
        if stored.state.attrs and stored.state.attrs.get("data_dir") != data_root:
            raise UsageError(
                f"The cache {str(cache)!r} holds these features for {stored.state.attrs.get('data_dir')!r}, "
                f"not {data_root!r}; use another --cache for another data set."
            )
        relabelled_from = check_label_source(stored.state.attrs, scan.layout, labels_path,
                                             chosen=labels is not None or layout != "auto")
        summary = ExtractSummary(
            shown, key, data_root, scan.layout, list(config.feature_shape), config.precision, engine=engine,
            labels=None if labels is None else str(labels), skipped=len(scan.skipped),
            not_in_labels=scan.not_in_labels, labels_missing=list(scan.missing), relabelled_from=relabelled_from,
        )
        found = stored.state.rows  # as the run found them, for the counts (a commit replaces, never changes, rows)
        others = [] if stored.rebuild or not cache.exists() else _other_configs(cache, key)
        name_configuration(summary, dict(config.identity(), weights_path=_weights_path(config)),
                           bool(stored.state.attrs), others)
        summary.repaired = check_stored(stored, repair)
        writer = Writer(stored)
        run = plan(scan.images, stored.state.rows, stored.state.attrs, augment, augmentation, writer.knows, scan.shards)
        commits = _Commits(writer, run, scan, config, validation_percent, labels_path, Checkpoints(save_every), summary)
        engine_run = (
            Engine(config, writer, run.cached_sha256, commits.checkpoints, batch_size) if engine == "local"
            else RayEngine(config, writer, run.cached_sha256, commits.checkpoints, batch_size, ray_address, ray_actors)
        )
        commits.tally = engine_run.tally
        try:
            for _ in engine_run.run(scan.location, run.reading, run.views(),
                                    workers or max(2, min(8, os.cpu_count() or 1)), progress, run.shards):
                commits.checkpoint()
        except KeyboardInterrupt:
            if not stored.rebuild:  # a rebuild not begun has nothing to keep: the old cache stays
                commits.commit()
            raise  # pending batches stay: they may hold images this run did not reach
        commits.finish()
        started_compaction = time.perf_counter()
        try:
            summary.compacted = compaction.compact(writer, compact)
        except CacheError as error:  # the run is committed; compaction is tried again next time
            summary.compaction_error = str(error)
        summary.save_seconds = round(summary.save_seconds + time.perf_counter() - started_compaction, 3)
    if stored.salvaged:
        why, aside = stored.salvaged
        summary.notes.append(f"{why.split(';')[0]}: moved aside as {str(aside)!r} and rebuilt from the shards "
                             f"of this configuration.")
    summary.notes += [f"The pending batch {name!r} was damaged (a bad checksum or cut short); it was deleted "
                      f"and its images computed again." for name in writer.pending.discarded]
    views = (run.augmentation.fingerprint, run.views_per_image, run.augmentation.identity()) if run.views_per_image else None
    count(summary, found, writer.state, engine_run.tally, views)
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


class _Commits:
    """A run's commits: the state to store (the plan, what the engine read so far, the
    configuration's attributes), at checkpoints, at Ctrl-C and at the end."""

    def __init__(self, writer: Writer, run: Plan, scan: Scan, config: FeatureConfig, validation_percent: float,
                 labels_path: str | None, checkpoints: Checkpoints, summary: ExtractSummary):
        self.writer, self.run, self.scan, self.checkpoints, self.summary = writer, run, scan, checkpoints, summary
        self.stored = writer.state  # the state as last committed (a commit replaces its parts)
        self.tally = Tally()
        identity = config.identity()
        layout = scan.layout
        self.attrs = dict(  # the configuration's attributes but for the views, backends and times
            identity,
            fingerprint=writer.fingerprint,
            identity=identity,
            preprocessing=PREPROCESSING,
            weights_path=_weights_path(config),
            data_dir=summary.data_dir,
            layout=layout,
            labels=labels_path,
            validation_percent=validation_percent if layout in ("classes", "csv", "shards") else None,
        )

    def state(self) -> ConfigState:
        """What the cache is to hold now (where features are is the writer's business)."""
        writer, run, tally = self.writer, self.run, self.tally
        failures = sorted(self.scan.failures + tally.failures)
        read = {path: sha256 for path, sha256 in tally.read.items() if writer.knows(sha256)}
        in_use = run.augmentation.fingerprint if run.views_per_image else None
        attrs = dict(
            self.attrs,
            views=in_use,
            views_per_image=run.views_per_image or None,
            augmentation=run.augmentation.identity() if in_use else None,
            backends=self._backends(),
            created=self.stored.attrs.get("created") or now(),
            extract_version=__version__,
            **{f"{name}_version": version for name, version in package_versions(VERSIONED).items()},
        )
        attrs = {name: value for name, value in attrs.items() if value is not None}
        return next_state(self.images(), run, read, failures, self.stored, attrs)

    def images(self) -> list[ImageFile]:
        """Every image the cache is to hold a row for, if its features are stored: the folder's
        files, the samples of the shards not read, and those met so far in the shards read."""
        tally = self.tally
        met = [image for shard in self.run.shards if shard.path in tally.samples
               for image in shard_rows(shard, list(tally.samples[shard.path].values()), tally.complete(shard.path))]
        return self.scan.images + self.run.kept + met if met or self.run.kept else self.scan.images

    def _backends(self) -> str | None:
        """The Keras backends that computed this configuration's features, in order of first
        use, comma-separated (a cache made before backends were recorded was TensorFlow's)."""
        stored = self.stored.attrs.get("backends") or ("tensorflow" if self.stored.rows else "")
        backends = [name for name in stored.split(",") if name]
        if self.tally.backend and self.tally.backend not in backends:
            backends.append(self.tally.backend)
        return ",".join(backends) or None

    def commit(self, state: ConfigState | None = None) -> None:
        """Store the run as it is now (`state()`, unless given): pending batches become a
        shard, then the catalog is replaced (atomic; see writer.Writer.commit)."""
        started = time.perf_counter()
        state = state or self.state()
        state.attrs["updated"] = now()
        self.writer.commit(state)
        self.checkpoints.committed_now()
        self.summary.save_seconds += time.perf_counter() - started

    def checkpoint(self) -> None:
        """During the run: the finished batches become a shard; the catalog is committed
        too when `progress.Checkpoints` says so."""
        if self.checkpoints.catalog_due(self.writer):
            self.commit()
            return
        started = time.perf_counter()
        self.writer.flush()
        self.checkpoints.flushed()
        self.summary.save_seconds += time.perf_counter() - started

    def finish(self) -> None:
        """Commit unless the cache already holds exactly this."""
        state, stored, writer = self.state(), self.stored, self.writer
        unchanged = (
            state.rows == stored.rows and state.failures == stored.failures and not writer.pending
            and not writer.stored.relocated
            and writer.stored.last_config == writer.fingerprint and not changed(stored.attrs, state.attrs, PROVENANCE)
            and {name: table.keys for name, table in state.views.items()} == {name: table.keys for name, table in stored.views.items()}
        )
        if not unchanged:
            self.commit(state)


def _check_batch_features(batch_size: int, config: FeatureConfig) -> None:
    """Refuse a batch whose features alone exceed BATCH_FEATURE_BYTES (a low --layer at a
    large --input-size), naming the --batch-size that fits, before any work."""
    row = 4 * int(np.prod(config.feature_shape))
    if batch_size * row <= BATCH_FEATURE_BYTES:
        return
    shape = "x".join(map(str, config.feature_shape))
    raise UsageError(
        f"Expected --batch-size x one row of --layer {config.layer} at most 2 GiB (a batch's features are held "
        f"about three times over while they are stored); received {batch_size} x {row / 2**20:.0f} MiB ({shape} "
        f"float32 at --input-size {config.input_size}). Lower --batch-size to {max(1, BATCH_FEATURE_BYTES // row)}."
    )


def _other_configs(cache: Path, key: str) -> list[dict]:
    """The cache's other configurations, to name the nearest; none when one of them is
    damaged (it is copied as it is, and its own runs name --repair)."""
    try:
        return [other for other in list_configs(cache) if other["fingerprint"] != key]
    except CatalogDamagedError:
        return []


def _weights_path(config: FeatureConfig) -> str | None:
    return None if config.weights in ("imagenet", "random") else os.path.realpath(config.weights)


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
    """Remove the commit folders of a writer that was killed (see commit.write_catalog): named
    with a commit's prefix and an owner's tag whose process is gone, and holding nothing but
    the catalog; never a file or folder of anyone else's."""
    for folder in stale_partials(cache.parent, commit_prefix(cache)):  # by name and owner: its, and gone
        remove_commit_folder(folder, cache)
