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

import csv
import warnings
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from classify.artifacts import check_out, new_folder, recorded_config, spreadsheet_cell, written_whole
from classify.data import memory_budget as memory_budget_bytes
from classify.heads import HEADS
from classify.neighbours import MAPS_REDUCED, knn_graph, vectors
from extract import DEFAULT_CACHE, CacheError, FeatureCache, Interval, SEED, StrOptions, UsageError, check_options, image_features

LABEL_ISSUES, DUPLICATES, OUTLIERS, PAGE = "label_issues.csv", "duplicates.csv", "outliers.csv", "check.html"
COLUMNS = {
    LABEL_ISSUES: ("path", "split", "given_label", "suggested_label", "score"),
    DUPLICATES: ("path_a", "split_a", "path_b", "split_b", "similarity", "kind", "leak"),
    OUTLIERS: ("path", "split", "label", "mean_distance"),
}
DEFAULT_CHECKS_FOLDER = "checks"
NEAR_THRESHOLD = 0.97  # cosine similarity; measured: docs/performance.md "check-data"
SHOWN = 48  # rows of each kind a Check holds (the page shows them)
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


@dataclass
class Check:
    """What check_data found. The row lists hold the first rows of each CSV (at most
    `SHOWN`, in the CSV's order: most suspicious first), as dicts keyed by its columns
    (values as written: str, float, bool); the counts are of every row written."""

    out: Path
    fingerprint: str
    config: dict  # the configuration's facts (extract.describe(config) says it in words)
    data_dir: str | None  # where extract-features read the images (thumbnails are read from there)
    images: int  # image rows checked (cached views are not)
    classes: dict[str, dict[str, int]]  # split -> label -> images ("" is unlabeled)
    k: int  # neighbours per image (outliers, near duplicates)
    near_threshold: float  # cosine similarity at or above which two images are near duplicates
    index: str  # how neighbours were found, in words ("exact", "IVF 1024 lists, 16 probed" ...)
    reduced: str | None  # how unpooled maps were reduced to vectors, in words; None if they were vectors
    label_issues: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    outliers: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # label_issues, exact, near, leaks, outliers
    notes: list[str] = field(default_factory=list)  # one line each: what was not checked, and why
    label_head: str | None = None  # the head whose out-of-fold probabilities found label issues
    folds: int | None = None


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
        rows = _Rows.of(features, cache)
        vectors = _Vectors(features, budget)
        vectors.refuse_all_equal(rows)
        issues, folds_used = _label_issues(rows, vectors, head, folds, seed, notes)
        held = 0 if vectors.held is None else vectors.held.nbytes  # the graph gets what they leave
        graph = knn_graph(vectors.read, len(rows.paths), vectors.d, k, budget - held, seed, progress)
        facts = features.fingerprint, dict(features.config), features.config.get("data_dir")
    pairs, outliers = _duplicates(rows, graph, near_threshold), _outliers(graph)
    counts = {"images": len(rows.paths), "label_issues": len(issues.rows), "exact": int(pairs.exact.sum()),
              "near": int((~pairs.exact).sum()), "leaks": int(pairs.leak.sum()), "outliers": _far_out(outliers.scores)}
    if counts["near"] > counts["images"]:
        notes.append(f"{counts['near']:,} near-duplicate pairs among {counts['images']:,} images: --near-threshold "
                     f"{near_threshold:g} looks too low for these features; raise it (random weights put every image "
                     f"within a cosine of about 0.99 of the others: docs/check-data.md).")
    final = final or new_folder("check", DEFAULT_CHECKS_FOLDER)
    found = Check(final, *facts, len(rows.paths), rows.classes(), k, near_threshold, graph.description, vectors.reduced,
                  **_shown(rows, issues, pairs, outliers), counts=counts, notes=notes,
                  label_head=head if folds_used else None, folds=folds_used)
    with written_whole(final, made=out is None, what="check") as partial:
        _write(partial, rows, issues, pairs, outliers)
        if page:
            from classify.check_page import write_check_page  # matplotlib and PIL: only for the page
            write_check_page(partial / PAGE, found)
    return found


@dataclass(frozen=True)
class _Rows:
    """The image rows of a configuration: where each came from and what it is labeled."""

    paths: np.ndarray
    splits: np.ndarray
    labels: np.ndarray
    sha256: np.ndarray

    @classmethod
    def of(cls, features: FeatureCache, cache) -> "_Rows":
        rows = cls(features.paths(), features.splits(), features.labels(), features.sha256())
        if len(rows.paths) < 2:
            raise UsageError(f"The cache {str(cache)!r} (configuration {features.fingerprint}) holds "
                             f"{len(rows.paths)} image(s); check-data compares images: extract at least 2.")
        return rows

    def classes(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for split, label in zip(self.splits, self.labels):
            counts.setdefault(str(split), {}).setdefault(str(label), 0)
            counts[str(split)][str(label)] += 1
        return counts


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

    def refuse_all_equal(self, rows: _Rows) -> None:
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


def label_issues(X, labels, head: str = "logreg", folds: int = 5, seed: int = 0):
    """Rows whose given label looks wrong: out-of-fold predicted probabilities (stratified
    `folds`-fold, `head` refitted on each) handed to cleanlab's `find_label_issues`.
    Returns (order, scores, suggested): the flagged rows, lowest label quality first; every
    row's label quality (cleanlab's self-confidence: the out-of-fold probability of its given
    label); every row's most probable class name."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    classes, given = np.unique(np.asarray(labels), return_inverse=True)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    estimator = HEADS[head].build(random_state=seed)
    with warnings.catch_warnings():  # a class smaller than the folds: sklearn warns, cleanlab copes
        warnings.simplefilter("ignore", UserWarning)
        probabilities = cross_val_predict(estimator, X, given, cv=splitter, method="predict_proba")
        # n_jobs=1: cleanlab's own process pool would fork a process that holds TensorFlow's threads
        flagged = find_label_issues(given, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    scores = get_label_quality_scores(given, probabilities)
    return np.asarray(flagged, dtype=np.int64), scores, classes[probabilities.argmax(axis=1)]


@dataclass(frozen=True)
class _Ranked:
    """Flagged rows (row numbers of the configuration), most suspicious first, with a value
    each and, for label issues, the class suggested instead."""

    rows: np.ndarray
    scores: np.ndarray
    suggested: np.ndarray | None = None


def _label_issues(rows: _Rows, vectors: _Vectors, head: str, folds: int, seed: int,
                  notes: list[str]) -> tuple[_Ranked, int | None]:
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
        return _Ranked(np.empty(0, np.int64), np.empty(0), np.empty(0, str)), None
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
    return _Ranked(labeled[order], scores[order], suggested[order]), folds


@dataclass(frozen=True)
class _Pairs:
    """Duplicate pairs (row numbers a < b unless a is the training side of a leak), in the
    CSV's order: leaks first, exact before near, most similar first."""

    a: np.ndarray
    b: np.ndarray
    similarity: np.ndarray
    exact: np.ndarray
    leak: np.ndarray


def _duplicates(rows: _Rows, graph, threshold: float) -> _Pairs:
    """Exact copies (a group of m images with one content is m - 1 pairs: each with the
    group's first training image, else its first image) and near ones (neighbours at or
    above `threshold`, of different contents; each pair once)."""
    a, b = [], []
    _, group, sizes = np.unique(rows.sha256, return_inverse=True, return_counts=True)
    for members in np.split(np.argsort(group, kind="stable"), np.cumsum(sizes)[:-1]):
        if len(members) > 1:
            training = members[rows.splits[members] == "train"]
            anchor = training[0] if len(training) else members[0]
            others = members[members != anchor]
            a.append(np.full(len(others), anchor))
            b.append(others)
    exact_a = np.concatenate(a) if a else np.empty(0, np.int64)
    exact_b = np.concatenate(b) if b else np.empty(0, np.int64)
    query = np.repeat(np.arange(len(graph.ids)), graph.ids.shape[1])
    other, similarity = graph.ids.ravel(), graph.similarities.ravel()
    near = (other >= 0) & (similarity >= threshold)
    query, other, similarity = query[near], other[near], similarity[near]
    different = group[query] != group[other]  # content ids: the hashes, 256 bytes each, would take GBs here
    low, high = np.minimum(query, other)[different], np.maximum(query, other)[different]
    n = len(rows.paths)
    pairs, first = np.unique(low * n + high, return_index=True)  # one int64 a pair: (low, high) order, lean
    near_similarity = similarity[different][first]
    a = np.concatenate([exact_a, pairs // n]).astype(np.int64)
    b = np.concatenate([exact_b, pairs % n]).astype(np.int64)
    similarity = np.concatenate([np.ones(len(exact_a)), near_similarity]).astype(np.float64)
    exact = np.arange(len(a)) < len(exact_a)
    training = rows.splits == "train"
    held_out = np.isin(rows.splits, ("validation", "test"))
    leak = (training[a] & held_out[b]) | (held_out[a] & training[b])
    swap = leak & held_out[a]  # the training image first
    a, b = np.where(swap, b, a), np.where(swap, a, b)
    by_path = np.empty(n, np.int64)
    by_path[np.argsort(rows.paths, kind="stable")] = np.arange(n)  # paths are unique: their ranks sort as they do
    order = np.lexsort((by_path[b], by_path[a], -similarity, ~exact, ~leak))
    return _Pairs(a[order], b[order], similarity[order], exact[order], leak[order])


def _outliers(graph) -> _Ranked:
    """Every image by its mean cosine distance to its neighbours, the farthest first."""
    found = graph.ids >= 0
    distance = np.where(found, 1.0 - graph.similarities, 0.0).sum(axis=1) / np.maximum(found.sum(axis=1), 1)
    order = np.argsort(-distance, kind="stable")
    return _Ranked(order, distance[order])


def _far_out(distances: np.ndarray) -> int:
    """How many distances are beyond Tukey's far fence (Q3 + 3 IQR): the outliers counted."""
    low, high = np.percentile(distances, [25, 75])
    return int((distances > high + 3 * (high - low)).sum())


def _write(folder: Path, rows: _Rows, issues: _Ranked, pairs: _Pairs, outliers: _Ranked) -> None:
    """The three CSVs, their text cells defended against spreadsheet formulas."""
    def text(values):
        return [spreadsheet_cell(str(value)) for value in values]

    tables = {
        LABEL_ISSUES: zip(text(rows.paths[issues.rows]), rows.splits[issues.rows], text(rows.labels[issues.rows]),
                          text(issues.suggested), (f"{score:.6f}" for score in issues.scores)),
        DUPLICATES: zip(text(rows.paths[pairs.a]), rows.splits[pairs.a], text(rows.paths[pairs.b]),
                        rows.splits[pairs.b], (f"{value:.6f}" for value in pairs.similarity),
                        np.where(pairs.exact, "exact", "near"), np.where(pairs.leak, "true", "false")),
        OUTLIERS: zip(text(rows.paths[outliers.rows]), rows.splits[outliers.rows], text(rows.labels[outliers.rows]),
                      (f"{value:.6f}" for value in outliers.scores)),
    }
    for name, table in tables.items():
        with open(folder / name, "w", newline="", encoding="utf-8", errors="backslashreplace") as file:
            writer = csv.writer(file)
            writer.writerow(COLUMNS[name])
            writer.writerows(table)


def _shown(rows: _Rows, issues: _Ranked, pairs: _Pairs, outliers: _Ranked) -> dict[str, list[dict]]:
    """The first SHOWN rows of each CSV, as dicts (see `Check`)."""
    def image(row):
        return str(rows.paths[row]), str(rows.splits[row])

    return {
        "label_issues": [dict(zip(COLUMNS[LABEL_ISSUES], (*image(row), str(rows.labels[row]), str(label), float(score))))
                         for row, score, label in zip(issues.rows[:SHOWN], issues.scores, issues.suggested)],
        "duplicates": [dict(zip(COLUMNS[DUPLICATES], (*image(a), *image(b), float(similarity),
                                                      "exact" if exact else "near", bool(leak))))
                       for a, b, similarity, exact, leak in zip(pairs.a[:SHOWN], pairs.b, pairs.similarity, pairs.exact, pairs.leak)],
        "outliers": [dict(zip(COLUMNS[OUTLIERS], (*image(row), str(rows.labels[row]), float(distance))))
                     for row, distance in zip(outliers.rows[:SHOWN], outliers.scores)],
    }


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
