"""What an engine hands down, whichever it is: what it read and computed (`Tally`), and
when the finished batches become a shard and the catalog is committed (`Checkpoints`).

An engine runs as a generator: it yields whenever a checkpoint is due and the runner,
which drives it, commits; an engine never calls back up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from extract.layout import ImageFile
from extract.shards import TARGET_SHARD_BYTES

CATALOG_SHARE = 0.05  # at most this share of a run's time goes to catalog commits at its checkpoints


@dataclass
class Tally:
    """One run's reading and computing. `read`: path -> SHA-256 for every image whose
    features are stored (or on their way: see the runner's state); `reused`: images whose
    content was stored under another path (moved, copied) or by an interrupted run."""

    read: dict[str, str] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    computed: int = 0  # images through VGG16
    views_computed: int = 0
    reused: int = 0
    device: str | None = None  # None while nothing needed VGG16
    backend: str | None = None  # the Keras backend that computed
    start_seconds: float | None = None  # building the network and its first batch (local engine)
    images_per_second: float = 0.0
    samples: dict[str, dict[str, ImageFile]] = field(default_factory=dict)  # shard path -> its samples read, by path
    ended: dict[str, int] = field(default_factory=dict)  # shard path -> the samples it gave, read to its end; -1: not

    def sample(self, shard: str, image: ImageFile) -> None:
        """A shard's sample met (its row, like a file's, waits until its features are stored);
        one met twice (a Ray task run again) counts once."""
        self.samples.setdefault(shard, {})[image.path] = image

    def shard_ended(self, shard: str, samples: int, error: str | None) -> None:
        """A shard read to its end (`samples` given), or cut short by `error` (a failure row
        stands for the rest of it)."""
        self.ended[shard] = -1 if error else samples
        if error:
            self.failures.append((shard, error))

    def complete(self, shard: str) -> bool:
        """Whether every sample of a shard is stored: read to its end, none failed, none still
        on its way to the network."""
        samples = self.samples.get(shard, {})
        return self.ended.get(shard, -1) == len(samples) and all(path in self.read for path in samples)

    def count(self, keys) -> None:
        """Keys computed: an image's content key, or a view's (`sha256/augmentation/view`)."""
        for key in keys:
            if "/" in key:
                self.views_computed += 1
            else:
                self.computed += 1

    def stored(self, path: str, sha256: str, computed: bool, cached_sha256: str | None) -> None:
        """An image read whose features are stored: computed now, or found by content."""
        if not computed and cached_sha256 != sha256:
            self.reused += 1
        self.read[path] = sha256


class Checkpoints:
    """When a checkpoint is due: at once while the cache has no catalog (from then on there
    is a cache that opens), every `save_every` seconds, and when the pending batches reach
    a shard's size. And whether it commits the catalog too: only while that keeps catalog
    writing (whose cost grows with the cache) under `CATALOG_SHARE` of the time between
    commits; a shard's cost is in proportion to its rows, so a shard is always written."""

    def __init__(self, save_every: float):
        self.save_every = save_every
        self.saved = self.committed = time.monotonic()

    def due(self, writer) -> bool:
        return (writer.new or time.monotonic() - self.saved >= self.save_every
                or writer.pending_bytes >= TARGET_SHARD_BYTES)

    def catalog_due(self, writer) -> bool:
        return writer.new or time.monotonic() - self.committed >= writer.catalog_seconds / CATALOG_SHARE

    def flushed(self) -> None:
        self.saved = time.monotonic()

    def committed_now(self) -> None:
        self.saved = self.committed = time.monotonic()
