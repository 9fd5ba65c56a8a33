"""Decoded images -> VGG16 features: the one path from pixels to features.

`featurize` takes items (an image the reader loaded, see `reader.load_all`, or its
views), each with the pixels of what it still needs computed (key -> pixels: its content
key, the keys of its missing views), gathers those into batches of `batch_size` keys,
and runs each batch on the network in a thread of its own while the reader reads on and
the batch before it is handed down. The first batch is handed down at once: its time
is the network's start.

It hands down `Featurized` groups: items whose every key is computed by now, each with
the features of its keys, and the batch that finished (keys and features); and once, an
empty group with `started` set, when the network is built, before its first batch.
`ordered=True` keeps the input order (scoring: a row per input, in order) and, so that
memory stays bounded, starts a batch before it is full when more than a few batches of
items wait behind it; `ordered=False` (an engine writing a cache) hands an item down as
soon as it needs nothing more.

The local engine, the Ray engine's backbone actors and `score-images` all compute
through `Network`, so a fix here is a fix everywhere.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from extract.backbone import Backbone
from extract.config import FeatureConfig

HELD_BATCHES = 4  # ordered: images waiting behind an unfinished batch, in batches, before it starts early


class Network:
    """The frozen VGG16, built when the first batch needs it (never, when nothing is
    computed), and how long its start took."""

    def __init__(self, config: FeatureConfig):
        self.config = config
        self.backbone: Backbone | None = None
        self.device: str | None = None
        self.backend: str | None = None  # the Keras backend, once built
        self.start_seconds: float | None = None  # building the network and computing its first batch
        self.first_batch = 0  # keys in that first batch
        self._building = 0.0

    def build(self) -> Backbone:
        if self.backbone is None:
            self._building = time.perf_counter()
            self.backbone = Backbone(self.config)
            self.device, self.backend = self.backbone.device, self.backbone.backend
        return self.backbone

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.build()(pixels)

    def started(self, keys: int) -> None:
        """The first batch is computed: what came before it was the network's start."""
        if self.start_seconds is None:
            self.start_seconds, self.first_batch = time.perf_counter() - self._building, keys

    def rate(self, done: int, elapsed: float) -> float:
        """Images and views a second once the network was up (over the whole run, if the
        first batch was all there was)."""
        if self.start_seconds is not None and done > self.first_batch and elapsed > self.start_seconds:
            return round((done - self.first_batch) / (elapsed - self.start_seconds), 2)
        return round(done / elapsed, 2) if done and elapsed > 0 else 0.0


def stack(pixels: list[np.ndarray]) -> np.ndarray:
    """One batch of pixels: uint8 when all are images, float32 when views are among them."""
    return np.stack(pixels)


@dataclass
class Featurized:
    """Items handed down, each with the features of the keys it needed computed (key ->
    features; a key computed once for several items is given to each), and the batch
    that finished, if any."""

    items: list[tuple[Any, dict[str, np.ndarray]]]
    keys: list[str] = field(default_factory=list)
    features: np.ndarray | None = None
    started: bool = False  # the network is built and its first batch about to run


def featurize(work: Iterable[tuple[Any, dict[str, np.ndarray]]], network: Network, batch_size: int,
              ordered: bool = False) -> Iterator[Featurized]:
    """Compute what each (item, needs) of `work` needs (key -> pixels; a key already
    waiting or on the network is computed once), handing down `Featurized` groups as
    items are done. Each key is looked at once on its way in and once on its way out,
    whatever number of items wait for it."""
    waiting: dict[str, np.ndarray] = {}  # key -> pixels, for the next batch
    waiters: dict[str, list[_Entry]] = {}  # key waiting or on the network -> the items that need it
    order: deque[_Entry] = deque()  # ordered: every item not handed down yet, in input order
    ready: list[_Entry] = []  # not ordered: items complete, to hand down
    computing: _Computing | None = None  # the batch on the network

    def release(batch: _Computing | None = None) -> Featurized | None:
        """The batch's features (None: no batch finished), and the items now complete."""
        nonlocal computing
        keys, features = [], None
        if batch is not None:
            keys, features = batch.keys, batch.result()
            network.started(len(keys))
            if computing is batch:
                computing = None
            for key, row in zip(keys, features):
                for entry in waiters.pop(key, ()):
                    entry.features[key] = row
                    entry.missing -= 1
                    if not ordered and entry.complete:
                        ready.append(entry)
        if ordered:
            done = []
            while order and order[0].complete:
                done.append(order.popleft())
        else:
            done = ready.copy()
            ready.clear()
        if not done and batch is None:
            return None
        return Featurized([(entry.item, entry.features) for entry in done], keys, features)

    def launch() -> Iterator[Featurized]:
        """The waiting batch onto the network; the one before it, computed meanwhile, handed down."""
        nonlocal computing
        if network.backbone is None:
            network.build()
            yield Featurized([], started=True)
        keys = list(waiting)
        pixels = stack([waiting[key] for key in keys])
        waiting.clear()
        previous = computing
        if previous is not None:
            previous.result()  # the network takes one batch at a time
        computing = batch = _Computing(network.backbone, keys, pixels)
        if previous is not None:
            yield release(previous)
        if network.start_seconds is None:  # the first batch at once: its time is the network's start
            yield release(batch)

    for item, needs in work:
        entry = _Entry(item)
        if ordered:
            order.append(entry)
        for key, pixels in needs.items():
            entry.missing += 1
            if key in waiters:  # waiting, or on the network: computed once for all
                waiters[key].append(entry)
                continue
            waiters[key] = [entry]
            waiting[key] = pixels
            if len(waiting) == batch_size:
                yield from launch()
        entry.queued = True
        if not ordered and entry.complete:
            ready.append(entry)
        if ordered and waiting and len(order) >= HELD_BATCHES * batch_size:
            yield from launch()
        if (done := release()) is not None:
            yield done
    if waiting:
        yield from launch()
    if computing is not None:
        yield release(computing)
    if (done := release()) is not None:
        yield done


class _Entry:
    """An item on its way through: the features found for it so far, and how many of its
    keys are still to come (it is complete once every key was queued and has come)."""

    __slots__ = ("item", "features", "missing", "queued")

    def __init__(self, item):
        self.item, self.features, self.missing, self.queued = item, {}, 0, False

    @property
    def complete(self) -> bool:
        return self.queued and not self.missing


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
        except BaseException as error:  # raised in the caller's thread, by result()
            self._error = error

    def result(self) -> np.ndarray:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._features
