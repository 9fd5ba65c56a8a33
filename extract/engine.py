"""The local engine: reader threads -> the backbone -> pending batches, with checkpoints.

Images are read, hashed, decoded and resized on a pool of threads (`reader.load_all`),
in order, while the network computes. An image whose content is already stored is taken
as it is; new content (and each missing view) waits for a full batch and goes through
VGG16 in a thread of its own, while this thread stores the batch before it: the batch is
written to the writer's pending batches, and every `save_every` seconds, or when the
pending batches reach a shard's size, `checkpoint()` writes them as a shard (and sometimes
commits the catalog: see runner._Run.checkpoint). So on a GPU the network does not wait
for the cache.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from extract.backbone import Backbone
from extract.config import FeatureConfig
from extract.layout import ImageFile
from extract.reader import ViewRequest, load_all
from extract.writer import TARGET_SHARD_BYTES, Writer


class Engine:
    """One run's computing. After `run`: `read` (path -> SHA-256, for every image whose
    features are stored), `failures`, and the counts."""

    def __init__(self, config: FeatureConfig, writer: Writer, cached_sha256: Callable[[str], str | None],
                 checkpoint: Callable[[], None], save_every: float, batch_size: int):
        self.config, self.writer, self.cached_sha256 = config, writer, cached_sha256
        self.checkpoint, self.save_every, self.batch_size = checkpoint, save_every, batch_size
        self.read: dict[str, str] = {}
        self.failures: list[tuple[str, str]] = []
        self.computed = self.views_computed = self.reused = 0
        self.device: str | None = None
        self.backend: str | None = None  # the Keras backend, once VGG16 is built
        self.start_seconds: float | None = None  # building the network and its first batch (compiling)
        self.images_per_second = 0.0  # once the network is up: after its first batch
        self._backbone: Backbone | None = None
        self._waiting: dict[str, np.ndarray] = {}  # key -> pixels, for the next batch
        self._waiting_paths: dict[str, list[str]] = {}  # sha256 -> paths whose features it will be
        self._computing: _Computing | None = None  # the batch on the network
        self._building = 0.0  # when building the network began
        self._last_save = time.monotonic()
        self._first_batch = 0  # images and views in the first batch (counted in start_seconds)

    def run(self, root: Path, images: list[ImageFile], views: ViewRequest | None, view_key, workers: int,
            progress: bool) -> None:
        size, interpolation, draft = self.config.input_size, self.config.interpolation, self.config.decode == "draft"
        started = time.perf_counter()
        bar = tqdm(total=len(images), unit="img", desc="extracting", disable=None if progress else True)
        with bar:
            for loaded in load_all(root, images, size, interpolation, _Known(self.writer), workers,
                                   prefetch=2 * self.batch_size, views=views, draft=draft):
                path = loaded.image.path
                if loaded.error:
                    self.failures.append((path, loaded.error))
                elif self.writer.knows(loaded.sha256):
                    self._take(path, loaded.sha256)
                else:
                    self._waiting_paths.setdefault(loaded.sha256, []).append(path)
                    self._queue(loaded.sha256, loaded.pixels)
                for view, pixels in loaded.views.items():
                    self._queue(view_key(loaded.sha256, view), pixels)
                bar.update()
            if self._waiting:
                self._run_batch()
            if self._computing:
                self._store(self._computing)
        elapsed = time.perf_counter() - started
        done = self.computed + self.views_computed
        if done > self._first_batch and elapsed > self.start_seconds:  # the rate a longer run would see
            self.images_per_second = round((done - self._first_batch) / (elapsed - self.start_seconds), 2)
        elif done and elapsed > 0:
            self.images_per_second = round(done / elapsed, 2)

    def _take(self, path: str, sha256: str) -> None:
        """An image whose content is stored: its own row's, or another's (moved, copied)."""
        if self.cached_sha256(path) != sha256:
            self.reused += 1
        self.read[path] = sha256

    def _queue(self, key: str, pixels: np.ndarray) -> None:
        if key not in self._waiting and not self.writer.knows(key) and not (self._computing and key in self._computing):
            self._waiting[key] = pixels
            if len(self._waiting) == self.batch_size:
                self._run_batch()

    def _run_batch(self) -> None:
        """The waiting batch onto the network; the one before it, computed meanwhile, stored."""
        if self._backbone is None:
            self._building = time.perf_counter()
            self._backbone = Backbone(self.config)
            self.device, self.backend = self._backbone.device, self._backbone.backend
            if self.writer.new:
                self.checkpoint()  # the first commits the catalog: from now on there is a cache that opens
        keys = list(self._waiting)
        pixels = np.stack([self._waiting[key] for key in keys])
        self._waiting.clear()
        previous = self._computing
        if previous:
            previous.result()  # the network takes one batch at a time
        self._computing = computing = _Computing(self._backbone, keys, pixels)
        if previous:
            self._store(previous)
        if self.start_seconds is None:  # the first batch at once: its time is the network's start
            self._store(computing)

    def _store(self, batch: "_Computing") -> None:
        """A computed batch into the pending batches, and a checkpoint when one is due."""
        keys, features = batch.keys, batch.result()
        if self._computing is batch:
            self._computing = None
        if self.start_seconds is None:
            self.start_seconds, self._first_batch = time.perf_counter() - self._building, len(keys)
        for key in keys:  # before the batch is stored: a commit takes only what is (see _Run.state)
            for path in self._waiting_paths.pop(key, ()):
                self.read[path] = key
        self.writer.append(keys, features)
        self.views_computed += sum("/" in key for key in keys)
        self.computed += sum("/" not in key for key in keys)
        if time.monotonic() - self._last_save >= self.save_every or self.writer.pending_bytes >= TARGET_SHARD_BYTES:
            self.checkpoint()
            self._last_save = time.monotonic()


class _Computing:
    """One batch on the network, in a thread of its own (a daemon: Ctrl-C never waits for it;
    the batch is lost, not stored). `result()` waits for its features, or raises its error."""

    def __init__(self, backbone: Backbone, keys: list[str], pixels: np.ndarray):
        self.keys, self._keys = keys, set(keys)
        self._features: np.ndarray | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._compute, args=(backbone, pixels), name="network", daemon=True)
        self._thread.start()

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def _compute(self, backbone: Backbone, pixels: np.ndarray) -> None:
        try:
            self._features = backbone(pixels)
        except BaseException as error:  # raised in the engine's thread, by result()
            self._error = error

    def result(self) -> np.ndarray:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._features


class _Known:
    """The reader's "already stored?" test, asked from its threads."""

    def __init__(self, writer: Writer):
        self.writer = writer

    def __contains__(self, key: str) -> bool:
        return self.writer.knows(key)
