"""Image files -> features, for a caller that keeps no cache (`score-images`): the
engines' own path (`reader` -> `featurize`, or the Ray engine's `forward`), in input order;
and `expand_inputs`, the command line's files, folders and `@list.txt` files as image paths.

    for batch in image_features(["a.jpg", "b.png"], config):
        for image in batch:
            image.path, image.error, image.features
"""

from __future__ import annotations

import os
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Collection, Iterable, Iterator, NamedTuple

import numpy as np

from extract.config import FeatureConfig
from extract.errors import UsageError
from extract.featurize import Network, featurize
from extract.files import read_regular
from extract.layout import IMAGE_EXTENSIONS, ImageFile
from extract.sources import Shard, shard_kind
from extract.sources.folder import walk
from extract.sources.location import Paths, is_url, open_location
from extract.ray_engine import forward
from extract.reader import Loaded, load_all

MAX_LIST_BYTES = 256 * 2**20  # a list file of paths; more is not a list
MAX_LIST_DEPTH = 32


class ImageFeatures(NamedTuple):
    """One input: its features, or the SHA-256 of content in `known` (features None), or
    why it failed (`error`)."""

    path: str
    error: str | None = None
    sha256: str | None = None
    features: np.ndarray | None = None


def image_features(paths: list[str], config: FeatureConfig, known: Collection[str] = frozenset(),
                   batch_size: int = 32, workers: int | None = None, engine: str = "local",
                   address: str | None = None, storage_options: dict | None = None) -> Iterator[list[ImageFeatures]]:
    """Batches of `batch_size` inputs, in input order: each image file of `paths` (relative
    to the current folder, or URLs read with fsspec's `storage_options`) read, hashed and,
    unless its content is in `known`, run through VGG16 (content met twice is computed once);
    a shard (a WebDataset .tar, a .parquet) gives one input per sample (`<shard>#<key>`), and
    one for the rest of it if it is cut short. `engine="ray"` reads and computes as a Ray
    Data job on the cluster at `address`."""
    if engine == "ray":
        for batch in forward(list(map(_input, paths)), config, frozenset(known), batch_size, address=address,
                             storage_options=storage_options):
            yield [ImageFeatures(str(path), error or None, sha256 or None, features if key else None)
                   for path, error, sha256, key, features in zip(batch["path"], batch["error"], batch["sha256"],
                                                                 batch["key"], batch["features"])]
        return
    loaded = load_all(
        Paths(storage_options), map(_input, paths), config.input_size, config.interpolation,
        known, workers or max(2, min(8, os.cpu_count() or 1)), prefetch=2 * batch_size,
        draft=config.decode == "draft",
    )
    work = ((replace(image, pixels=None), _fresh(image)) for image in loaded)  # pixels travel in the needs alone
    images = (
        ImageFeatures(image.image.path, image.error, image.sha256, features.get(image.sha256))
        for done in featurize(work, Network(config), batch_size, ordered=True)
        for image, features in done.items
        if image.samples is None or image.error  # a shard's end is an input only when the rest was lost
    )
    while batch := list(islice(images, batch_size)):
        yield batch


def _input(path: str) -> ImageFile | Shard:
    """An input as the reader takes it: a shard by its name, else an image file."""
    kind = shard_kind(path)
    return Shard(path, kind, 0, -1, None, False, 0.0) if kind else ImageFile(path, "", "", 0, 0)


def _fresh(image: Loaded) -> dict[str, np.ndarray]:
    """What an input needs computed: its content, unless it failed or is known."""
    return {image.sha256: image.pixels} if image.error is None and image.pixels is not None else {}


def expand_inputs(paths: Iterable[str], lists: list | None = None, _lists: tuple[str, ...] = (),
                  storage_options: dict | None = None) -> Iterator[str]:
    """Files as given, folders as their image files and shards (sorted, recursive), URLs of a
    file as given and of a folder (a prefix) as the image files and shards below it,
    `@list.txt` as the paths it lists (one a line, UTF-8, relative to the current folder; #
    starts a comment). A list that includes itself, directly or not, is refused. Each list
    read is appended to `lists`, where given (files a command must not write over)."""
    for path in paths:
        path = str(path)
        if path.startswith("@"):
            lines = _read_list(path[1:], _lists)
            if lists is not None:
                lists.append(path[1:])
            yield from expand_inputs((line.strip() for line in lines if line.strip() and not line.startswith("#")),
                                     lists, (*_lists, os.path.realpath(path[1:])), storage_options)
        elif is_url(path):
            yield from _remote_inputs(path, storage_options)
        elif Path(path).is_dir():
            for relative, _, error in walk(Path(path)):
                if error or Path(relative).suffix.lower() in IMAGE_EXTENSIONS or shard_kind(relative):
                    yield os.path.join(path, relative)
        else:
            yield path


def _remote_inputs(url: str, storage_options: dict | None) -> Iterator[str]:
    """A URL as inputs: itself when it names an image or a shard, else what lies below it."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    if shard_kind(name) or Path(name).suffix.lower() in IMAGE_EXTENSIONS:
        yield url
        return
    location = open_location(url, storage_options)
    for relative, _, _, _ in location.entries():
        if Path(relative).suffix.lower() in IMAGE_EXTENSIONS or shard_kind(relative):
            yield f"{url.rstrip('/')}/{relative}"


def _read_list(name: str, including: tuple[str, ...]) -> list[str]:
    if os.path.realpath(name) in including:
        raise UsageError(f"The list {name!r} includes itself (through @-lines); remove that line.")
    if len(including) >= MAX_LIST_DEPTH:
        raise UsageError(f"The list {name!r} is nested more than {MAX_LIST_DEPTH} lists deep; flatten the lists.")
    data = read_regular(name, MAX_LIST_BYTES, f"the list {name!r}", "pass a file of paths")
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UsageError(f"The list {name!r} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                         f"{error.start}); save it as UTF-8.") from None
