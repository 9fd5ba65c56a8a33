"""Image files -> features, for a caller that keeps no cache (`score-images`): the
engines' own path (`reader` -> `featurize`, or the Ray engine's `forward`), in input order.

    for batch in image_features(["a.jpg", "b.png"], config):
        for image in batch:
            image.path, image.error, image.features
"""

from __future__ import annotations

import os
from itertools import islice
from pathlib import Path
from typing import Collection, Iterator, NamedTuple

import numpy as np

from extract.config import FeatureConfig
from extract.featurize import Network, featurize
from extract.layout import ImageFile
from extract.ray_engine import forward
from extract.reader import Loaded, load_all


class ImageFeatures(NamedTuple):
    """One input: its features, or the SHA-256 of content in `known` (features None), or
    why it failed (`error`)."""

    path: str
    error: str | None = None
    sha256: str | None = None
    features: np.ndarray | None = None


def image_features(paths: list[str], config: FeatureConfig, known: Collection[str] = frozenset(),
                   batch_size: int = 32, workers: int | None = None, engine: str = "local",
                   address: str | None = None) -> Iterator[list[ImageFeatures]]:
    """Batches of `batch_size` inputs, in input order: each image file of `paths`
    (relative to the current folder) read, hashed and, unless its content is in `known`,
    run through VGG16 (content met twice is computed once). `engine="ray"` reads and
    computes as a Ray Data job on the cluster at `address`."""
    if engine == "ray":
        for batch in forward(paths, config, frozenset(known), batch_size, address=address):
            yield [ImageFeatures(str(path), error or None, sha256 or None, features if key else None)
                   for path, error, sha256, key, features in zip(batch["path"], batch["error"], batch["sha256"],
                                                                 batch["key"], batch["features"])]
        return
    loaded = load_all(
        Path(""), (ImageFile(path, "", "", 0, 0) for path in paths), config.input_size, config.interpolation,
        known, workers or max(2, min(8, os.cpu_count() or 1)), prefetch=2 * batch_size,
        draft=config.decode == "draft",
    )
    work = ((image, _fresh(image)) for image in loaded)
    images = (
        ImageFeatures(image.image.path, image.error, image.sha256, features.get(image.sha256))
        for done in featurize(work, Network(config), batch_size, ordered=True)
        for image, features in done.items
    )
    while batch := list(islice(images, batch_size)):
        yield batch


def _fresh(image: Loaded) -> dict[str, np.ndarray]:
    """What an input needs computed: its content, unless it failed or is known."""
    return {image.sha256: image.pixels} if image.error is None and image.pixels is not None else {}
