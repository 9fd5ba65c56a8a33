"""check-data: what the cached features say about the data themselves, without running the
network again: labels that look wrong, copies within and across splits (leaks), outliers,
and the images most like a given one.

    from classify.check import check_data, nearest
    check = check_data("cache/features.h5", out="check")   # label_issues.csv, duplicates.csv,
                                                          # outliers.csv, check.html
    for neighbour in nearest("photo.jpg", "cache/features.h5", k=5): print(neighbour)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LABEL_ISSUES, DUPLICATES, OUTLIERS, PAGE = "label_issues.csv", "duplicates.csv", "outliers.csv", "check.html"
COLUMNS = {
    LABEL_ISSUES: ("path", "split", "given_label", "suggested_label", "score"),
    DUPLICATES: ("path_a", "split_a", "path_b", "split_b", "similarity", "kind", "leak"),
    OUTLIERS: ("path", "split", "label", "mean_distance"),
}


@dataclass
class Check:
    """What check_data found. The row lists hold the first rows of each CSV (at most
    `shown`, in the CSV's order: most suspicious first), as dicts keyed by its columns
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
