"""The labeled rows of a cache, split for training: training images (and their cached
views), validation (stored, or drawn from the training images) and test, as `Rows`.

    with load_splits("cache/features.h5", None, 0.2, seed=0) as splits:
        splits.train, splits.validation, splits.test    # Rows; features read when needed
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from classify.artifacts import CONFIG_FACTS
from classify.data import Rows
from extract import FeatureCache, UsageError, fingerprint


class HeadWarning(UserWarning):
    """Training goes on, but the user should know (e.g. a class with one image)."""


@dataclass
class Splits:
    """The labeled rows of a cache: `train` holds the training images, then the cached
    views of them (`train.images[i]` is the training image row i shows). The rows are read
    from the cache, which stays open until `close()`, unless `load()`ed into memory."""

    train: Rows
    validation: Rows
    test: Rows | None
    training_images: int
    validation_source: str  # "stored" (the cache's split) or "drawn" (from the training split)
    fingerprint: str
    config: dict
    augmentation: dict | None = None  # the transforms, seed and views per image
    cache: FeatureCache | None = None
    paths: np.ndarray | None = None  # every row's path in the cache (relative to data_dir); Rows.entry indexes it
    data_dir: str | None = None  # where extract-features read the images
    base: object = None  # the checked FeatureConfig of cached maps below block5_pool (see `classify.finetune`)
    computed_from: dict | None = None  # the cached configuration these features were computed from (`through`)
    leaks: int = 0  # validation and test images whose content is a training image's (exact copies)

    @property
    def training_views(self) -> int:
        return len(self.train) - self.training_images

    @property
    def memory_needed(self) -> int:
        """Bytes to train in memory: the training features twice (heads standardize a
        copy), the validation and test features once."""
        return 2 * self.train.nbytes + self.validation.nbytes + (self.test.nbytes if self.test else 0)

    def load(self) -> "Splits":
        """The same splits with every feature in memory (the cache stays open until `close()`)."""
        return replace(self, train=self.train.load(), validation=self.validation.load(),
                       test=self.test and self.test.load(), cache=None)

    def through(self, transform, n_features: int, config) -> "Splits":
        """The same rows with features `transform(features)` (see `Rows.through`), those of
        the FeatureConfig `config`: block5_pool's maps computed from cached maps below it."""
        identity = config.identity()
        facts = dict(identity, weights_path=self.config.get("weights_path"))
        return replace(self, train=self.train.through(transform, n_features),
                       validation=self.validation.through(transform, n_features),
                       test=self.test and self.test.through(transform, n_features),
                       fingerprint=fingerprint(identity), config={key: facts[key] for key in CONFIG_FACTS if key in facts},
                       base=None, computed_from={"fingerprint": self.fingerprint, "layer": self.config.get("layer")})

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> "Splits":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load_splits(
    cache, config, validation_fraction: float, seed: int, folds: int | None = None, augment: bool = True,
    read_bytes: int | None = None,
) -> Splits:
    """The labeled rows of a cache (and, with `augment`, the views of its training images),
    checked to be able to train a classifier; their features are read when needed, at most
    `read_bytes` of them at once (see `Rows.in_cache`)."""
    features = FeatureCache(cache, config)
    try:
        return _split(features, cache, validation_fraction, seed, folds, augment, read_bytes)
    except BaseException:
        features.close()
        raise


def _split(features: FeatureCache, cache, validation_fraction: float, seed: int, folds: int | None, augment: bool,
           read_bytes: int | None):
    labels, splits = features.labels(), features.splits()
    fingerprint = features.fingerprint
    views = features.views("train", features=False) if augment else None
    train, validation, test = (splits == "train") & (labels != ""), splits == "validation", splits == "test"
    if not train.any():
        raise UsageError(
            f"The cache {str(cache)!r} (configuration {fingerprint}) has no labeled training images; "
            f"run extract-features on a folder with class folders."
        )
    classes, counts = np.unique(labels[train], return_counts=True)
    if len(classes) < 2:
        raise UsageError(f"Expected at least 2 classes in the training split; found only {classes[0]!r}.")
    unseen = sorted(set(labels[validation | test]) - set(classes))
    if unseen:
        raise UsageError(
            f"Validation or test images of class {unseen[0]!r} have no training images; "
            f"add training images of it or remove it from validation/ and test/."
        )
    drawn = not validation.any()
    needed = max(2 if drawn else 1, folds or 1)
    for name, count in zip(classes, counts):
        if count < needed:
            raise UsageError(
                f"Class {name!r} has {count} training image(s); it needs at least {needed} "
                f"({'to draw a validation split' if drawn else '--cv folds'}). Add images or remove the class."
            )
        if count < 5:
            warnings.warn(f"class {name!r} has only {count} training images; its scores will say little.", HeadWarning)
    train_rows = np.flatnonzero(train)
    if drawn:
        held_out = math.ceil(validation_fraction * len(train_rows))  # as train_test_split counts
        if not len(classes) <= held_out <= len(train_rows) - len(classes):
            raise UsageError(
                f"--validation-fraction {validation_fraction} holds out {held_out} of {len(train_rows)} training images; "
                f"a stratified split needs between {len(classes)} and {len(train_rows) - len(classes)} "
                f"(one image of each of the {len(classes)} classes on each side). Choose another fraction."
            )
        # split images, not rows: the views of a held-out image are held out with it; each
        # side kept in the cache's order, so streamed reads of neighbours find them together
        train_rows, validation_rows = (np.sort(side) for side in train_test_split(
            train_rows, test_size=validation_fraction, stratify=labels[train_rows], random_state=seed
        ))
    else:
        validation_rows = np.flatnonzero(validation)

    def images(rows, view_entries=np.empty(0, np.int64), views_of=np.empty(0, np.int64)):
        """Rows of these image rows, then of these views (entries of the views table) of them."""
        table = np.concatenate([np.zeros(len(rows), np.int8), np.ones(len(view_entries), np.int8)])
        return Rows.in_cache(features, labels[np.concatenate([rows, rows[views_of]])],
                             np.concatenate([np.arange(len(rows)), views_of]), table,
                             np.concatenate([rows, view_entries]), views and views.name, read_bytes)

    facts = {key: features.config[key] for key in CONFIG_FACTS if key in features.config}
    train_set, augmentation = images(train_rows), None
    if views is not None and len(views.row):
        position = {row: i for i, row in enumerate(train_rows)}
        keep = np.array([row in position for row in views.row], dtype=bool)
        views_of = np.array([position[row] for row in views.row[keep]], dtype=np.int64)
        train_set = images(train_rows, views.entry[keep], views_of)
        augmentation = dict(views.augmentation, views_per_image=views.views_per_image)
    test_rows = np.flatnonzero(test)
    hashes = features.sha256()
    leaks = int(np.isin(hashes[np.concatenate([validation_rows, test_rows])], hashes[train_rows]).sum())
    return Splits(train_set, images(validation_rows), images(test_rows) if test.any() else None,
                  len(train_rows), "drawn" if drawn else "stored", fingerprint, facts, augmentation, features,
                  features.paths(), features.config.get("data_dir"), leaks=leaks)


def leak_note(leaks: int) -> str:
    """Words for validation and test images that are exact copies of training images."""
    copies = "s are exact copies of training images" if leaks != 1 else " is an exact copy of a training image"
    return (f"{leaks} validation/test image{copies}, so the scores are inflated; check-data lists every pair "
            f"(duplicates.csv).")


def image_folds(labels: np.ndarray, images: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified K-fold over images (`labels[i]` is image i's) for rows showing `images`:
    each fold trains on the rows of its training images, views included, and tests on the
    held-out images themselves (the first len(labels) rows), never on their views."""
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return [
        (np.flatnonzero(np.isin(images, train)), test)
        for train, test in splitter.split(np.zeros(len(labels)), labels)
    ]
