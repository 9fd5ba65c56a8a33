"""The Ray engine (`--engine ray`): the local engine's work as one Ray Data job, on one
machine or a cluster of many, with or without GPUs.

The driver plans as for the local engine (`runner`); Ray Data streams the rest:

    images -> read tasks, one per unit (`_units`: a group of image files, or one shard read
              in order, once): `reader.load` / `reader.load_bytes` (read, hash, decode,
              resize, views; failures are rows; what the cache already has, by content, is
              hashed and not decoded); a shard also gives an end row (`samples` it gave)
           -> the backbone in a pool of actors (`Backbone`, built in each actor from the
              weights file; one GPU per actor where there are GPUs)
           -> write tasks: each writes its rows as one immutable shard in the cache's folder
           -> the driver: only keys and shard facts come back; it takes each shard up and
              commits the catalog at checkpoints, as the local engine does.

So the cache's folder must be one every worker can write (a shared filesystem on a
cluster); `cluster.check_shared` proves it before the job starts. A driver killed at any moment
leaves complete shards, which the next run (with either engine) adopts.

`forward` is the first two stages alone, in input order, for `score-images --engine ray`.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from extract.cluster import check_shared, check_weights, job_errors, session, weights_file
from extract.config import FeatureConfig, keras_backend
from extract.errors import UsageError
from extract.featurize import Network, stack
from extract.layout import ImageFile
from extract.progress import Checkpoints, Tally
from extract.reader import Loaded, ViewRequest, load, load_bytes, shard_samples
from extract.shards import TARGET_SHARD_BYTES, ShardInfo, view_key, write_shard
from extract.sources import Shard
from extract.sources.folder import Folder
from extract.sources.location import Paths, is_url
from extract.sources.remote import Remote
from extract.writer import Writer

# Rows a write task gathers into one shard, at most (fewer when they pass TARGET_SHARD_BYTES):
# what the driver cannot take up before the task ends, so a bound on what a killed run
# recomputes. Small shards (pooled features: 2 MB) are merged by the compaction at the end.
SHARD_ROWS = 1024


class RayEngine:
    """The local engine's contract (`run` yields when a checkpoint is due; `tally`), on Ray."""

    def __init__(self, config: FeatureConfig, writer: Writer, cached_sha256: Callable[[str], str | None],
                 checkpoints: Checkpoints, batch_size: int, address: str | None = None, actors: int | None = None):
        self.config, self.writer, self.cached_sha256 = config, writer, cached_sha256
        self.checkpoints, self.batch_size = checkpoints, batch_size
        self.address, self.actors = address, actors
        self.tally = Tally()  # its start_seconds stay None: the actors' start is not seen from here
        self._shards: dict[str, dict[int, str]] = {}  # shard -> its rows come so far (row -> key)

    def run(self, location, images: list[ImageFile], views: ViewRequest | None, workers: int,
            progress: bool, shards: list[Shard] = ()) -> Iterator[None]:
        if not images and not shards:
            return
        with session(self.address):
            yield from self._run(location, [*images, *shards], views, progress)

    def _run(self, location, items: list[ImageFile | Shard], views: ViewRequest | None,
             progress: bool) -> Iterator[None]:
        import ray

        writer, config, tally = self.writer, self.config, self.tally
        known = ray.put(frozenset(writer.state.located) | frozenset(writer.pending.index))
        wanted = _Wanted(views.augmentation, views.per_image) if views else None
        row_bytes = int(np.prod(config.feature_shape)) * np.dtype(config.dtype).itemsize
        dataset = stream(location, items, config, known, wanted, self.batch_size, self.actors).map_batches(
            _write, batch_size=max(1, min(TARGET_SHARD_BYTES // row_bytes, SHARD_ROWS)), batch_format="numpy",
            fn_kwargs=dict(folder=str(writer.folder), base=str(writer.base), fingerprint=writer.fingerprint,
                           shape=tuple(config.feature_shape), dtype=config.dtype),
        )
        writer.begin()  # a --rebuild moves the old cache aside now: the tasks write into the new one
        local = [location.root / items[0].path] if isinstance(location, Folder) else []  # one of DATA_DIR's files
        check_shared(writer.folder, [*local, *weights_file(config)])
        check_readable(location)
        started = time.perf_counter()
        total = None if any(isinstance(item, Shard) for item in items) else len(items)  # samples: known as read
        bar = tqdm(total=total, unit="img", desc="extracting", disable=None if progress else True)
        with bar, job_errors():
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(self._take(batch))
                if self.checkpoints.due(writer):
                    yield
        elapsed = time.perf_counter() - started
        done = tally.computed + tally.views_computed
        if done and elapsed > 0:
            tally.images_per_second = round(done / elapsed, 2)

    def _take(self, batch: dict[str, np.ndarray]) -> int:
        """Take up one batch of finished rows: each cache shard once all its rows have come, then
        what each image (a file, a shard's sample) read, and each shard's end, as the local
        engine does (`Tally.complete` counts, so the order of a shard's rows does not matter).
        Returns the number of images in the batch."""
        for key, shard, row, rows, size, identity in zip(batch["key"], batch["shard"], batch["shard_row"],
                                                        batch["shard_rows"], batch["shard_bytes"], batch["shard_uuid"]):
            if shard:
                keys = self._shards.setdefault(shard, {})
                keys[int(row)] = key
                if len(keys) == rows:
                    self.writer.take_shard(ShardInfo(shard, int(rows), int(size), identity),
                                           [keys[i] for i in range(int(rows))])
                    del self._shards[shard]
        tally, images = self.tally, 0
        tally.count(key for key in batch["key"] if key)
        for path, label, split, source, samples, sha256, error, key, device in zip(
                *(batch[name] for name in ("path", "label", "split", "source", "samples", "sha256", "error", "key",
                                           "device"))):
            if device:
                tally.device, tally.backend = device, keras_backend()  # the driver's, which `stream` gives the actors
            if not path:
                continue  # a view's row
            if samples >= 0:
                tally.shard_ended(path, int(samples), error or None)
                continue
            images += 1
            if source:
                tally.sample(source, ImageFile(path, label, split, 0, 0))
            if error:
                tally.failures.append((path, error))
            else:
                tally.stored(path, sha256, bool(key), self.cached_sha256(path))
        return images


def stream(location, items: Iterable[ImageFile | Shard], config: FeatureConfig, known=frozenset(), wanted=None,
           batch_size: int = 32, actors: int | None = None):
    """The Ray Data dataset of read tasks feeding a pool of backbone actors, in the order of
    `items` (image files and shards of `location`): one row per image, a file or a shard's
    sample (path, label, split, source: the shard a sample is from; sha256, error, key,
    features, device), one per shard's end (its path, `samples`: how many it gave, and the
    error for the rest, if any; -1 on every other row) and one per view computed (its
    `key`, no path). `key` is empty where nothing was computed: an error, or content in
    `known` (a set, or a Ray reference to one)."""
    import ray

    units = _units(items, batch_size)
    check_weights(config)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    pool = actors or max(1, gpus)
    if gpus and pool > gpus:
        raise UsageError(f"Expected --ray-actors at most {gpus}, the GPUs of the Ray cluster (one each); received {pool}.")
    if not gpus and pool >= cpus:
        raise UsageError(
            f"Expected --ray-actors below the Ray cluster's {cpus} CPUs (one each, and one at least for the read "
            f"tasks); received {pool}. Lower --ray-actors, or add a node."
        )
    # Files and shards are one dataset of units, a block each, so a read task takes one
    # unit: a shard is read in order, once, by one task, and the units keep the order of
    # `items` (which `forward` needs; two datasets unioned would not). A read task is a
    # generator that gives up its rows every `batch_size` images, which leave it in blocks
    # of Ray Data's target size: a shard of any length is never held whole in a task.
    # The reads are tasks and the backbone an actor pool that says how much memory it needs
    # (which also keeps Ray Data from fusing the reads into the actors, as it does when the
    # resources of a task stage and the next actor stage match). The actors run on the
    # driver's Keras backend, whatever the nodes' own environment says.
    return ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        _read, batch_size=1, batch_format="numpy", num_cpus=1,
        fn_kwargs=dict(location=location, config=config, known=known, wanted=wanted, batch_size=batch_size),
    ).map_batches(
        Forward, batch_size=batch_size, batch_format="numpy", fn_constructor_kwargs=dict(config=config),
        compute=ray.data.ActorPoolStrategy(size=pool), num_gpus=1 if gpus else 0, num_cpus=1,
        memory=actor_memory(config, batch_size), runtime_env={"env_vars": {"KERAS_BACKEND": keras_backend()}},
    )


def _units(items: Iterable[ImageFile | Shard], batch_size: int) -> list[dict]:
    """The read tasks' work, in order: each shard alone, runs of image files `batch_size` at
    a time (pickled: a Shard or a list of ImageFile, as `_read` takes them)."""
    units, files = [], []
    for item in items:
        if isinstance(item, Shard) or len(files) == batch_size:
            if files:
                units.append(files)
            files = []
        if isinstance(item, Shard):
            units.append(item)
        else:
            files.append(item)
    if files:
        units.append(files)
    return [{"unit": pickle.dumps(unit)} for unit in units]


def check_readable(location) -> None:
    """Refuse, in one line, a URL that some node of the cluster cannot read. Each node reads
    with its own credentials and network: the driver's environment (AWS_ACCESS_KEY_ID, say)
    does not travel with the tasks, so a node without credentials would otherwise turn every
    shard it reads into a failure row. Each alive node runs `Remote.check`, as the driver did."""
    remote = getattr(location, "location", location)  # a brace pattern's `Selection` reads through its location
    if not isinstance(remote, Remote):
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    probe = ray.remote(num_cpus=0, max_retries=0)(_why_unreadable)
    answers = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                       .remote(remote) for node in nodes])
    for node, why in zip(nodes, answers):
        if why:
            raise UsageError(f"On Ray node {node.get('NodeManagerAddress')}: {why} (each node reads DATA_DIR with its "
                             f"own credentials and network).")


def _why_unreadable(remote: Remote) -> str | None:
    """On one node: None if `remote` can be read from here, else why not (`Remote.check`'s line)."""
    try:
        remote.check()
    except UsageError as error:
        return str(error)
    return None


def actor_memory(config: FeatureConfig, batch_size: int) -> int:
    """Bytes a backbone actor needs: the Keras backend and the weights (~1 GiB), plus a batch's
    largest activations (VGG16's first block: two maps of 64 channels at full size, float32)."""
    return 2**30 + 2 * batch_size * config.input_size**2 * 64 * 4


def forward(items: list[ImageFile | Shard], config: FeatureConfig, known=frozenset(), batch_size: int = 32,
            actors: int | None = None, address: str | None = None,
            storage_options: dict | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `stream` over image files and shards (their paths relative to the current
    folder, or URLs read with fsspec's `storage_options`), in input order, on the Ray
    cluster at `address` (as `connect`); `features` holds a row's features where `key` is
    set (content in `known` is hashed, not computed). A shard's end is a row only when it
    carries an error: the rest of the shard, lost."""
    with session(address):
        import ray

        ray.data.DataContext.get_current().execution_options.preserve_order = True
        readable = next((Path(item.path).absolute() for item in items if os.path.isfile(item.path)), None)
        check_shared(None, [*weights_file(config), *([readable] if readable else [])])
        url = next((item.path for item in items if is_url(item.path)), None)
        if url:
            check_readable(Remote(url, storage_options))
        dataset = stream(_Inputs(Path.cwd(), storage_options), items, config, ray.put(known), None, batch_size, actors)
        with job_errors():
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                inputs = (batch["samples"] < 0) | (batch["error"] != "")
                yield {name: column[inputs] for name, column in batch.items()}


class _Inputs(Paths):
    """`location.Paths` with local paths taken from the driver's current folder (a worker's
    is its own)."""

    def __init__(self, folder: Path, storage_options: dict | None):
        super().__init__(storage_options)
        self.folder = folder

    def open(self, path: str):
        return super().open(path if is_url(path) else str(self.folder / path))


class _Wanted:
    """Which views of an image to compute (`reader.ViewRequest.missing`), picklable: the
    views 1..K of a training image whose keys are not in `known`."""

    def __init__(self, augmentation, per_image: int):
        self.augmentation, self.per_image, self.known = augmentation, per_image, frozenset()

    def request(self, known) -> ViewRequest:
        self.known = known
        return ViewRequest(self.augmentation, self._missing, self.per_image)

    def _missing(self, image: ImageFile, sha256: str) -> list[int]:
        if image.split != "train":
            return []
        name = self.augmentation.fingerprint
        return [view for view in range(1, self.per_image + 1) if view_key(sha256, name, view) not in self.known]


_KNOWN: dict = {}  # per worker process: the known set of the job, fetched once


def _known(known):
    import ray

    if not isinstance(known, ray.ObjectRef):
        return known
    if known.hex() not in _KNOWN:
        _KNOWN.clear()
        _KNOWN[known.hex()] = ray.get(known)
    return _KNOWN[known.hex()]


def _read(batch: dict, location, config: FeatureConfig, known, wanted: _Wanted | None,
          batch_size: int) -> Iterator[dict]:
    """A read task over its unit (`_units`): `reader.load` each image file, or stream one
    shard (`reader.shard_samples`) and `reader.load_bytes` each sample, then its end row;
    an image's row, then its views'. Rows are given up `batch_size` images at a time.
    Pixels travel as they are made: an image's as uint8, a view's as float32 (`view`)."""
    known = _known(known)
    views = wanted.request(known) if wanted else None
    arguments = (config.input_size, config.interpolation, known, views, config.decode == "draft")
    for unit in map(pickle.loads, batch["unit"]):
        rows = _Rows(known, wanted)
        if not isinstance(unit, Shard):
            for image in unit:
                rows.add(load(location, image, *arguments))
            yield rows.batch()
            continue
        count = 0
        for image, data, error in shard_samples(location, unit):
            if image.path == unit.path:
                rows.end(unit.path, count, error)
                break
            count += 1
            rows.add(Loaded(image, error=error) if data is None else load_bytes(image, data, *arguments), unit.path)
            if rows.images == batch_size:
                yield rows.batch()
                rows = _Rows(known, wanted)
        yield rows.batch()


_NO_PIXELS, _NO_VIEW = np.zeros((0, 0, 3), np.uint8), np.zeros((0, 0, 3), np.float32)  # a row with none to compute


class _Rows:
    """The rows a read task gives up next, as columns (see `stream`)."""

    def __init__(self, known, wanted: _Wanted | None):
        self.known, self.wanted, self.images = known, wanted, 0
        self.columns = {name: [] for name in ("path", "label", "split", "source", "samples", "sha256", "error", "key",
                                              "pixels", "view")}

    def add(self, loaded: Loaded, source: str = "") -> None:
        """An image's row (`source`: the shard of a sample), then its views'."""
        image = loaded.image
        fresh = loaded.pixels is not None and not loaded.error and loaded.sha256 not in self.known
        self._row(image.path, image.label, image.split, source, -1, loaded.sha256 or "", loaded.error or "",
                  loaded.sha256 if fresh else "", loaded.pixels if fresh else _NO_PIXELS, _NO_VIEW)
        self.images += 1
        for number, pixels in loaded.views.items():
            key = view_key(loaded.sha256, self.wanted.augmentation.fingerprint, number)
            self._row("", "", "", source, -1, loaded.sha256, "", key, _NO_PIXELS, pixels)

    def end(self, shard: str, samples: int, error: str | None) -> None:
        """A shard's end: the samples it gave, and why the rest was not read, if it was not."""
        self._row(shard, "", "", "", samples, "", error or "", "", _NO_PIXELS, _NO_VIEW)

    def _row(self, *values) -> None:
        for column, value in zip(self.columns.values(), values):
            column.append(value)

    def batch(self) -> dict[str, np.ndarray]:
        return {name: _tensor_column(values) if name in ("pixels", "view") else
                np.array(values, dtype=np.int64 if name == "samples" else object)
                for name, values in self.columns.items()}


class Forward:
    """A backbone actor: the model is built here, from the weights file, once per actor."""

    def __init__(self, config: FeatureConfig):
        self.network = Network(config)
        self.network.build()  # in the actor's start, before any batch
        self.empty = np.zeros((0,) * len(config.feature_shape), np.dtype(config.dtype))

    def __call__(self, batch: dict) -> dict:
        keys = batch["key"]
        fresh = [i for i, key in enumerate(keys) if key]
        features = [self.empty] * len(keys)
        if fresh:
            pixels = stack([batch["pixels"][i] if batch["pixels"][i].size else batch["view"][i] for i in fresh]
                           ).astype(np.float32)
            for i, row in zip(fresh, self.network(pixels)):
                features[i] = row
        batch = {name: column for name, column in batch.items() if name not in ("pixels", "view")}
        batch["features"] = _tensor_column(features)
        batch["device"] = np.array([self.network.device if key else "" for key in keys], dtype=object)
        return batch


def _write(batch: dict, folder: str, base: str, fingerprint: str, shape: tuple, dtype: str) -> dict:
    """A write task: the batch's computed rows become one shard (a key twice, once)."""
    keys = batch["key"]
    first = {}
    for i, key in enumerate(keys):
        if key and key not in first:
            first[key] = i
    n = len(keys)
    out = {name: column for name, column in batch.items() if name != "features"}
    out.update(shard=np.full(n, "", dtype=object), shard_row=np.zeros(n, np.int64), shard_rows=np.zeros(n, np.int64),
               shard_bytes=np.zeros(n, np.int64), shard_uuid=np.full(n, "", dtype=object))
    if first:
        order = list(first.values())
        shard = write_shard(Path(folder), Path(base), fingerprint, list(first), lambda a, b: np.stack(
            [batch["features"][i] for i in order[a:b]]), shape, dtype)
        for row, i in enumerate(order):
            out["shard"][i], out["shard_row"][i], out["shard_uuid"][i] = shard.path, row, shard.uuid
            out["shard_rows"][i], out["shard_bytes"][i] = shard.rows, shard.bytes
    return out


def _tensor_column(arrays: list[np.ndarray]) -> np.ndarray:
    """One array of arrays of possibly different shapes (Ray Data's variable-shaped tensors)."""
    column = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        column[i] = array
    return column


