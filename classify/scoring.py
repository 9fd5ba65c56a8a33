"""Batch scoring: new images -> the head's predictions, streamed, in input order.

The features are made exactly as the head's training features were: the feature
configuration recorded with the head is rebuilt (and refused if it cannot be, e.g. its
weights file is gone), and an image whose content is already in a feature cache of that
configuration is not run through VGG16 again.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from classify.artifacts import LoadedHead, head_config, load_head
from extract import (
    FeatureCache, FeatureConfig, ImageFeatures, Interval, UsageError, check_engine, check_options, expand_inputs,
    image_features, list_configs, overwrites, shard_kind, shards_folder,
)


@dataclass
class ScoreRow:
    """One input's result. `status` is "ok" or "error" (with `error` saying why). `top`
    holds the k most probable (label, probability) pairs, most probable first: its first
    pair is `label` and `probability`, the prediction (CSV writes the others as label_2 ...)."""

    path: str
    status: str
    label: str | None = None
    probability: float | None = None
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


SCORE_IMAGES = {"--top-k": Interval(Integral, 1, 1000), "--batch-size": Interval(Integral, 1, 4096)}  # see extract.options


def score_images(
    paths: Iterable[str],
    head,
    *,
    cache=None,
    cache_required: bool = True,
    weights: str | None = None,
    top_k: int = 3,
    batch_size: int = 32,
    workers: int | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    storage_options: dict | None = None,
    progress: bool = False,
    output=None,
) -> Iterator[ScoreRow]:
    """Score image files, shards (a WebDataset .tar, a .parquet: a row per sample), folders
    of them (recursively), URLs of any of these (read with fsspec's `storage_options`) and
    `@list.txt` files (a path a line) with a head (a folder or a `LoadedHead`). Everything that can be checked before scoring is
    checked at the call (the head, its weights, the cache, the options, the lists), raising
    UsageError; then the rows come, one per input image, in input order, holding at most a
    few batches in memory. Features already in `cache` are reused; a cache without the
    head's configuration is an error unless `cache_required` is False. `engine="ray"` reads
    and computes as a Ray Data job (see `extract.ray_engine`), rows still in input order.
    `output`: the file the caller will write the rows to, refused if it is a file this
    scoring reads (an image, a list, the head's folder, the cache, the weights file)."""
    head = head if isinstance(head, LoadedHead) else load_head(head)
    check_options({"--top-k": top_k, "--batch-size": batch_size}, SCORE_IMAGES)
    check_engine(engine, ray_address)
    top_k = min(top_k, len(head.classes))
    config = head_config(head, weights)
    lists = []
    inputs = list(expand_inputs(paths, lists, storage_options=storage_options))  # a broken list: refused before any output
    if output is not None:
        check_output(output, inputs, lists, head, config, cache)
    known = _CachedFeatures(cache, head.fingerprint, cache_required, head.info.get("computed_from"))
    batches = image_features(inputs, config, known, batch_size, workers, engine, ray_address, storage_options)
    total = None if any(map(shard_kind, inputs)) else len(inputs)  # a shard's samples are counted as they come
    return _score(batches, total, head, known, top_k, progress)


def check_output(output, inputs: list[str], lists: list[str], head: LoadedHead, config: FeatureConfig,
                 cache) -> None:
    """Refuse an `output` that would replace what the scoring reads: an input image, an
    @list, a file of the head's folder, a file of the cache (`cache_files`), the weights
    file (by identity: links and other spellings of them too; see `extract.overwrites`)."""
    weights = [config.weights] if Path(config.weights).is_file() else []
    protected = [("one of the images to score", inputs, ()), ("the list", lists, ()),
                 ("in the head folder", (), [head.folder]), *([] if cache is None else cache_files(cache)),
                 ("the weights file", weights, ())]
    for what, files, folders in protected:
        hit = overwrites(output, files, folders)
        if hit is not None:
            raise UsageError(f"--output {str(output)!r} is {what} {hit!r}, which this run reads; "
                             f"name another file.")


def cache_files(cache) -> list[tuple[str, list, list]]:
    """What of the cache at `cache` no output may replace, as `overwrites` takes it (what it
    is, files, folders): the catalog, its lock file (replaced, it lets a second writer in
    beside one that holds the old one's lock) and its shards folder, the last two beside
    the catalog's real path, where they are used: a cache named through a link reads the
    shards beside the file it links to."""
    real = Path(os.path.realpath(cache))
    return [("the feature cache", [cache], ()), ("the feature cache's lock file", [f"{real}.lock"], ()),
            ("in the feature cache's shards folder", (), [shards_folder(real)])]


def _score(batches: Iterator[list[ImageFeatures]], total: int | None, head: LoadedHead, known, top_k: int,
           progress: bool) -> Iterator[ScoreRow]:
    try:
        known.open()
        with tqdm(total=total, unit="img", desc="scoring", disable=None if progress else True) as bar:
            for batch in batches:
                yield from _score_batch(batch, head, known, top_k)
                bar.update(len(batch))
    finally:
        batches.close()
        known.close()


def _score_batch(batch: list[ImageFeatures], head: LoadedHead, known, top_k: int) -> Iterator[ScoreRow]:
    ok = [item for item in batch if item.error is None]
    features = np.empty((len(ok), *head.info["feature_config"]["feature_shape"]), dtype=np.float32)
    cached = [position for position, item in enumerate(ok) if item.features is None]
    for position, item in enumerate(ok):
        if item.features is not None:
            features[position] = item.features
    if cached:
        features[cached] = known.features([ok[position].sha256 for position in cached])
    probabilities = iter(head.predict_proba(features, head.fingerprint) if ok else ())
    classes = head.classes
    for item in batch:
        if item.error is not None:
            yield ScoreRow(item.path, "error", error=item.error)
            continue
        row = next(probabilities)
        best = np.argsort(-row, kind="stable")[:top_k]
        top = [(classes[j], float(row[j])) for j in best]
        yield ScoreRow(item.path, "ok", top[0][0], top[0][1], top)


class _CachedFeatures:
    """Features of one configuration in a cache, found by content hash. Checked when
    made; opened (`open`) when scoring starts."""

    def __init__(self, cache, key: str, required: bool, computed_from: dict | None = None):
        self.rows: dict[str, int] = {}
        self.cache = None
        self.path, self.key, self.usable = cache, key, False
        if cache is None or not (required or Path(cache).is_file()):
            return
        if not Path(cache).exists():  # scoring needs no cache: extracting one is not the fix
            raise UsageError(f"No feature cache at --cache {str(cache)!r}. Scoring needs none (it only reuses the "
                             f"features a cache holds): leave out --cache, or name the cache that exists.")
        configurations = [config["fingerprint"] for config in list_configs(cache)]
        self.usable = key in configurations
        if not self.usable and required and computed_from and computed_from.get("fingerprint") in configurations:
            raise UsageError(
                f"The head was trained on block5_pool maps computed from the {computed_from.get('layer')} maps of "
                f"configuration {computed_from['fingerprint']} in {str(cache)!r}, which scoring does not reuse; "
                f"leave out --cache (the images go through VGG16 with the head's configuration {key})."
            )
        if not self.usable and required:
            raise UsageError(
                f"The cache {str(cache)!r} holds no features of the head's configuration {key} "
                f"(it holds {', '.join(configurations) or 'none'}); leave out --cache or extract with the head's settings."
            )

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self.rows

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def open(self) -> None:
        if self.usable and self.cache is None:
            self.cache = FeatureCache(self.path, self.key)
            self.rows = {sha256: row for row, sha256 in enumerate(self.cache.sha256())}

    def features(self, hashes: list[str]) -> np.ndarray:
        return self.cache.features_at([self.rows[sha256] for sha256 in hashes])

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None
