"""What check-data finds, from arrays: label issues (`label_issues`), duplicate pairs and
leaks (`duplicates`), outliers (`outliers`); the CSV files that hold them, and `Check`, the
record of a run (its counts and first rows) that the summary and check.html are made from.
`classify.check` reads the cache and calls these (see its docstring for what each means).
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from classify.artifacts import spreadsheet_cell
from classify.heads import HEADS
from extract import FeatureCache, UsageError

LABEL_ISSUES, DUPLICATES, OUTLIERS, PAGE = "label_issues.csv", "duplicates.csv", "outliers.csv", "check.html"
COLUMNS = {
    LABEL_ISSUES: ("path", "split", "given_label", "suggested_label", "score"),
    DUPLICATES: ("path_a", "split_a", "path_b", "split_b", "similarity", "kind", "leak"),
    OUTLIERS: ("path", "split", "label", "mean_distance"),
}
SHOWN = 48  # rows of each kind a Check holds (the page shows them)


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
class Images:
    """The image rows of a configuration: where each came from and what it is labeled."""

    paths: np.ndarray
    splits: np.ndarray
    labels: np.ndarray
    sha256: np.ndarray

    @classmethod
    def of(cls, features: FeatureCache, cache) -> "Images":
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
class Ranked:
    """Flagged rows (row numbers of the configuration), most suspicious first, with a value
    each and, for label issues, the class suggested instead."""

    rows: np.ndarray
    scores: np.ndarray
    suggested: np.ndarray | None = None


@dataclass(frozen=True)
class Pairs:
    """Duplicate pairs (row numbers a < b unless a is the training side of a leak), in the
    CSV's order: leaks first, exact before near, most similar first."""

    a: np.ndarray
    b: np.ndarray
    similarity: np.ndarray
    exact: np.ndarray
    leak: np.ndarray


def duplicates(rows: Images, graph, threshold: float) -> Pairs:
    """Exact copies (a group of m images with one content is m - 1 pairs: each with the
    group's first training image, else its first image) and near ones (neighbours at or
    above `threshold`, of different contents; each pair once)."""
    _, group, sizes = np.unique(rows.sha256, return_inverse=True, return_counts=True)
    copied = np.flatnonzero(sizes[group] > 1)  # rows whose content another row has too
    copied = copied[np.lexsort((copied, rows.splits[copied] != "train", group[copied]))]  # each group's anchor first
    starts = np.ones(len(copied), dtype=bool)
    starts[1:] = group[copied][1:] != group[copied][:-1]
    anchor = copied[np.maximum.accumulate(np.where(starts, np.arange(len(copied)), 0))]
    exact_a, exact_b = anchor[~starts], copied[~starts]
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
    return Pairs(a[order], b[order], similarity[order], exact[order], leak[order])


def outliers(graph) -> Ranked:
    """Every image by its mean cosine distance to its neighbours, the farthest first."""
    found = graph.ids >= 0
    distance = np.where(found, 1.0 - graph.similarities, 0.0).sum(axis=1) / np.maximum(found.sum(axis=1), 1)
    order = np.argsort(-distance, kind="stable")
    return Ranked(order, distance[order])


def far_out(distances: np.ndarray) -> int:
    """How many distances are beyond Tukey's far fence (Q3 + 3 IQR): the outliers counted."""
    low, high = np.percentile(distances, [25, 75])
    return int((distances > high + 3 * (high - low)).sum())


def write_csvs(folder: Path, rows: Images, issues: Ranked, pairs: Pairs, outliers: Ranked) -> None:
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


def shown(rows: Images, issues: Ranked, pairs: Pairs, outliers: Ranked) -> dict[str, list[dict]]:
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


