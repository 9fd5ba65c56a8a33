"""check-data: what the cached features say about the data themselves, without running the
network again: labels that look wrong, copies within and across splits (leaks), outliers,
and the images most like a given one.

    from classify.check import check_data, nearest
    check = check_data("cache/features.h5", out="check")   # label_issues.csv, duplicates.csv,
                                                          # outliers.csv, check.html
    for neighbour in nearest("photo.jpg", "cache/features.h5", k=5): print(neighbour)

Every image row of one configuration is checked (cached views are not: they are the same
images). Its features become one unit vector (`neighbours.vectors`: a map is averaged over its
positions first); similarity is the cosine, the vectors' dot product.

    label issues   out-of-fold probabilities (stratified K-fold over the labeled images, with a
                   fast head) handed to cleanlab's find_label_issues (confident learning)
    duplicates     exact: equal content (the cache's SHA-256); near: cosine >= near_threshold
                   among each image's k nearest neighbours; a leak spans train and validation/test
    outliers       each image's mean cosine distance (1 - similarity) to its k nearest neighbours
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from classify.artifacts import check_out, new_folder, recorded_config, written_whole
from classify.data import memory_budget as memory_budget_bytes
from classify.findings import (
    PAGE, Check, Images, Ranked, duplicates, far_out, label_issues, outliers, shown, write_csvs,
)
from classify.heads import HEADS
from classify.neighbours import MAPS_REDUCED, knn_graph, vectors
from extract import DEFAULT_CACHE, CacheError, FeatureCache, Interval, SEED, StrOptions, UsageError, check_options, image_features

DEFAULT_CHECKS_FOLDER = "checks"
NEAR_THRESHOLD = 0.97  # cosine similarity, meant for ImageNet's weights (not measured: docs/check-data.md)
LOAD_SHARE = 4  # the vectors are held in memory when they need at most 1/4 of --memory-budget
BLOCK_BYTES = 64 * 2**20  # features read from the cache at once, at most
LABEL_HEADS = tuple(name for name, spec in HEADS.items() if not spec.tunes)
CHECK_DATA = {
    "-k": Interval(Integral, 1, 1000),
    "--near-threshold": Interval(Real, 0, 1, closed="right"),
    "--folds": Interval(Integral, 2, 100),
    "--head": StrOptions(LABEL_HEADS),
    "--seed": SEED,
}


@dataclass(frozen=True)
class Neighbour:
    path: str
    split: str
    label: str
    similarity: float


def check_data(
    cache=DEFAULT_CACHE,
    *,
    config: str | None = None,
    out=None,
    k: int = 10,
    near_threshold: float = NEAR_THRESHOLD,
    head: str = "logreg",
    folds: int = 5,
    memory_budget=None,
    seed: int = 0,
    progress: bool = False,
    page: bool = True,
) -> Check:
    """Check the images of one configuration of `cache` (default: the last written) and
    write label_issues.csv, duplicates.csv, outliers.csv and (with `page`) check.html into
    `out` (default: a new folder under checks/), all of them or none. Features that need
    more than a quarter of `memory_budget` are read from the cache a block at a time."""
    check_options({"-k": k, "--near-threshold": near_threshold, "--folds": folds, "--head": head, "--seed": seed},
                  CHECK_DATA)
    budget = memory_budget_bytes(memory_budget)
    final = check_out(out)
    notes: list[str] = []
    with FeatureCache(cache, config) as features:
        rows = Images.of(features, cache)
        vectors = _Vectors(features, budget)
        vectors.refuse_all_equal(rows)
        issues, folds_used = _label_issues(rows, vectors, head, folds, seed, notes)
        held = 0 if vectors.held is None else vectors.held.nbytes  # the graph gets what they leave
        graph = knn_graph(vectors.read, len(rows.paths), vectors.d, k, budget - held, seed, progress)
        facts = features.fingerprint, dict(features.config), features.config.get("data_dir")
    pairs, distant = duplicates(rows, graph, near_threshold), outliers(graph)
    counts = {"images": len(rows.paths), "label_issues": len(issues.rows), "exact": int(pairs.exact.sum()),
              "near": int((~pairs.exact).sum()), "leaks": int(pairs.leak.sum()), "outliers": far_out(distant.scores)}
    if counts["near"] > counts["images"]:
        notes.append(f"{counts['near']:,} near-duplicate pairs among {counts['images']:,} images: --near-threshold "
                     f"{near_threshold:g} looks too low for these features; raise it (random weights put every image "
                     f"within a cosine of about 0.99 of the others: docs/check-data.md).")
    final = final or new_folder("check", DEFAULT_CHECKS_FOLDER)
    found = Check(final, *facts, len(rows.paths), rows.classes(), k, near_threshold, graph.description, vectors.reduced,
                  **shown(rows, issues, pairs, distant), counts=counts, notes=notes,
                  label_head=head if folds_used else None, folds=folds_used)
    with written_whole(final, made=out is None, what="check") as partial:
        write_csvs(partial, rows, issues, pairs, distant)
        if page:
            from classify.check_page import write_check_page  # matplotlib and PIL: only for the page
            write_check_page(partial / PAGE, found)
    return found


class _Vectors:
    """Every row's unit vector (`neighbours.vectors`), held in memory when they take at
    most 1/LOAD_SHARE of the budget, else read from the cache a block at a time."""

    def __init__(self, features: FeatureCache, budget: int, hold: bool = True):
        self.features = features
        shape = features.feature_shape
        self.d = int(shape[-1]) if len(shape) == 3 else int(np.prod(shape))
        self.reduced = MAPS_REDUCED if len(shape) == 3 else None
        stored_row = 4 * int(np.prod(shape))
        self.block = max(1, min(BLOCK_BYTES, budget // LOAD_SHARE) // stored_row)
        self.n = len(features)
        self.held = None
        if hold and self.n * self.d * 4 <= budget // LOAD_SHARE:
            self.held = np.empty((self.n, self.d), np.float32)
            for start in range(0, self.n, self.block):
                self.held[start:start + self.block] = self._read(np.arange(start, min(start + self.block, self.n)))

    def _read(self, rows: np.ndarray) -> np.ndarray:
        return vectors(self.features.features_at(rows))

    def read(self, rows) -> np.ndarray:
        """The unit vectors of `rows` (sorted row numbers)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.held is not None:
            return self.held[rows]
        return np.concatenate([self._read(rows[start:start + self.block]) for start in range(0, len(rows), self.block)]
                              or [np.empty((0, self.d), np.float32)])

    def refuse_all_equal(self, rows: Images) -> None:
        """Features all equal while contents differ say the extraction went wrong (weights of
        zeros, a constant input): nothing here would mean anything."""
        if len(set(rows.sha256)) < 2:
            return
        low = high = None
        for start in range(0, self.n, self.block):
            block = self.read(np.arange(start, min(start + self.block, self.n)))
            low = block.min(axis=0) if low is None else np.minimum(low, block.min(axis=0))
            high = block.max(axis=0) if high is None else np.maximum(high, block.max(axis=0))
        if (high - low).max() == 0:
            raise UsageError(
                f"Every image of configuration {self.features.fingerprint} has the same features, though their "
                f"contents differ: the extraction's weights or inputs look broken; extract again (--rebuild).")


def _label_issues(rows: Images, vectors: _Vectors, head: str, folds: int, seed: int,
                  notes: list[str]) -> tuple[Ranked, int | None]:
    """The labeled images' label issues (and the folds used); none, with a note saying why,
    where labels cannot be checked."""
    labeled = np.flatnonzero(rows.labels != "")
    classes, counts = np.unique(rows.labels[labeled], return_counts=True)
    why = ("the cache is unlabeled" if not len(labeled) else
           f"every labeled image is of one class ({str(classes[0])!r})" if len(classes) < 2 else
           "fewer than 2 classes hold 2 images or more, too few for out-of-fold predictions"
           if np.sort(counts)[-2] < 2 else None)
    if why:
        notes.append(f"Labels not checked: {why}; duplicates and outliers are.")
        return Ranked(np.empty(0, np.int64), np.empty(0), np.empty(0, str)), None
    folds = max(2, min(folds, int(counts.max())))
    small = classes[counts < folds]
    if len(small):
        names = ", ".join(repr(str(name)) for name in small[:3]) + (" ..." if len(small) > 3 else "")
        notes.append(f"{len(small)} class(es) have fewer than {folds} images ({names}): each of their images is "
                     f"predicted by heads that saw few or none of the class, so their label scores say less.")
    try:
        order, scores, suggested = label_issues(vectors.read(labeled), rows.labels[labeled], head, folds, seed)
    except (ValueError, ArithmeticError) as error:  # what estimators raise on data they cannot fit
        raise UsageError(f"--head {head} cannot be fitted on these labels ({' '.join(str(error).split())[:200]}); "
                         f"try --head logreg.") from None
    return Ranked(labeled[order], scores[order], suggested[order]), folds


def nearest(image, cache=DEFAULT_CACHE, *, config: str | None = None, k: int = 10, weights: str | None = None,
            memory_budget=None) -> list[Neighbour]:
    """The `k` cached images most like `image` (a file or URL), most similar first. Its
    features are computed once with the configuration's own settings and weights (`weights`:
    where that weights file is now, if moved), unless its content is cached already; then
    compared with every cached image's, a block at a time (no index: one query reads each
    row once)."""
    check_options({"-k": k}, CHECK_DATA)
    budget = memory_budget_bytes(memory_budget)
    with FeatureCache(cache, config) as features:
        setting = recorded_config(features.config, features.fingerprint, weights, "cache's features",
                                  f"The configuration {features.fingerprint} of {str(cache)!r}", "extract again")
        hashes = features.sha256()
        [[computed]] = list(image_features([str(image)], setting, known=frozenset(hashes)))
        if computed.error is not None:
            raise UsageError(f"--similar-to {str(image)!r} cannot be read as an image ({computed.error}).")
        cached = computed.features is None  # its content is in the cache: its features are the cached ones
        query = vectors(features.features_at([int(np.flatnonzero(hashes == computed.sha256)[0])]) if cached
                        else computed.features[None])[0]
        stored = _Vectors(features, budget, hold=False)
        if len(query) != stored.d:  # else a matmul error: the catalog's shape is not what its configuration makes
            raise CacheError(f"The configuration {features.fingerprint} of {str(cache)!r} stores {stored.d:,} features "
                             f"an image, but computes {len(query):,} for --similar-to: the cache is damaged or was "
                             f"not written by extract-features; extract again with --rebuild.")
        best_rows, best = np.empty(0, np.int64), np.empty(0, np.float32)
        for start in range(0, stored.n, stored.block):
            block = np.arange(start, min(start + stored.block, stored.n))
            candidates = np.concatenate([best, stored.read(block) @ query])
            rows = np.concatenate([best_rows, block])
            keep = np.argsort(-candidates, kind="stable")[:k]
            best_rows, best = rows[keep], candidates[keep]
        paths, splits, labels = features.paths(), features.splits(), features.labels()
    return [Neighbour(str(paths[row]), str(splits[row]), str(labels[row]), float(similarity))
            for row, similarity in zip(best_rows, best)]
