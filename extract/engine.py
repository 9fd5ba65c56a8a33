"""The local engine: reader threads -> `featurize` (the network) -> pending batches.

Images are read, hashed, decoded and resized on a pool of threads (`reader.load_all`),
in order, while the network computes. An image whose content is already stored is taken
as it is; new content (and each missing view) goes through VGG16 in full batches
(`featurize`), and each computed batch is appended to the writer's pending batches.
`run` is a generator: it yields whenever a checkpoint is due (`progress.Checkpoints`),
and the runner commits; so on a GPU the network does not wait for the cache.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from extract.config import FeatureConfig
from extract.featurize import Network, featurize
from extract.layout import ImageFile
from extract.progress import Checkpoints, Tally
from extract.reader import Loaded, ViewRequest, load_all
from extract.shards import view_key
from extract.sources import Shard
from extract.writer import Writer


class Engine:
    """One run's reading and computing on this machine; after `run`, `tally` says what it did."""

    def __init__(self, config: FeatureConfig, writer: Writer, cached_sha256: Callable[[str], str | None],
                 checkpoints: Checkpoints, batch_size: int):
        self.config, self.writer, self.cached_sha256 = config, writer, cached_sha256
        self.checkpoints, self.batch_size = checkpoints, batch_size
        self.tally = Tally()

    def run(self, location, images: list[ImageFile], views: ViewRequest | None, workers: int,
            progress: bool, shards: list[Shard] = ()) -> Iterator[None]:
        """Compute what `images` and the samples of `shards` (and their `views`) need, read from
        `location`; yields when a checkpoint is due."""
        config, writer, tally = self.config, self.writer, self.tally
        network = Network(config)
        started = time.perf_counter()
        loaded = load_all(location, [*images, *shards], config.input_size, config.interpolation, _Known(writer), workers,
                          prefetch=2 * self.batch_size, views=views, draft=config.decode == "draft")
        work = _work(loaded, writer, views.augmentation.fingerprint if views else "")
        total = None if shards else len(images)  # a shard's samples are known only as it is read
        with tqdm(total=total, unit="img", desc="extracting", disable=None if progress else True) as bar:
            for done in featurize(work, network, self.batch_size):
                read = [(image, features) for image, features in done.items if image is not None]
                for image, features in read:  # before the batch is stored: a commit takes only what is
                    if image.samples is not None:
                        tally.shard_ended(image.shard.path, image.samples, image.error)
                        continue
                    if image.shard is not None:
                        tally.sample(image.shard.path, image.image)
                    if image.error:
                        tally.failures.append((image.image.path, image.error))
                    else:
                        tally.stored(image.image.path, image.sha256, image.sha256 in features,
                                     self.cached_sha256(image.image.path))
                if done.keys:
                    writer.append(done.keys, done.features)
                    tally.count(done.keys)
                    tally.device, tally.backend = network.device, network.backend
                    tally.start_seconds = network.start_seconds
                bar.update(sum(image.samples is None for image, _ in read))
                if writer.new if done.started else done.keys and self.checkpoints.due(writer):
                    yield
        tally.images_per_second = network.rate(tally.computed + tally.views_computed, time.perf_counter() - started)


def _work(loaded: Iterator[Loaded], writer: Writer, views: str) -> Iterator[tuple[Loaded | None, dict[str, np.ndarray]]]:
    """What each image still needs computed: its content, unless stored (the image's row
    waits for it alone), then its views, unless stored (as an item of their own: None)."""
    for image in loaded:
        if image.error or image.samples is not None:  # a failure, or a shard's end
            yield image, {}
            continue
        needs = {} if writer.knows(image.sha256) else {image.sha256: image.pixels}
        missing = {key: pixels for view, pixels in image.views.items()
                   if not writer.knows(key := view_key(image.sha256, views, view))}
        yield replace(image, pixels=None, views={}), needs  # pixels travel in `needs` alone: computed once, then gone
        if missing:
            yield None, missing


class _Known:
    """The reader's "already stored?" test, asked from its threads."""

    def __init__(self, writer: Writer):
        self.writer = writer

    def __contains__(self, key: str) -> bool:
        return self.writer.knows(key)
