"""What a run must do, as pure functions of the folder and the catalog.

What is computed is decided by content: an image whose path, size and modification time
match its cached row is not even read (`to_read`); any other image is read and hashed, and
goes through VGG16 only if no stored row or batch has its SHA-256. The rows to store are
then `catalog_rows` of what was read. With augmented views, each training image also
needs views 1..K, known by (SHA-256, view) (`view_table`).
"""

from __future__ import annotations

from typing import Callable, Iterable

from extract.catalog import Row, ViewTable
from extract.layout import ImageFile
from extract.shards import view_key


def to_read(images: Iterable[ImageFile], cached: dict[str, Row], missing_views: Callable[[ImageFile, str], list]) -> list[ImageFile]:
    """The images that may have changed, or still lack views: every other one keeps its row unread."""
    return [
        image for image in images
        if not ((row := cached.get(image.path)) and (row.size, row.mtime_ns) == (image.size, image.mtime_ns))
        or missing_views(image, row.sha256)
    ]


def catalog_rows(images: Iterable[ImageFile], cached: dict[str, Row], read: dict[str, str], failed: set[str]) -> dict[str, Row]:
    """The rows to store: each image read (path -> its SHA-256, features stored) with its
    label and split; an image not read (unchanged, or not reached by an interrupted run)
    keeps its cached row, and its cached size and time, to be checked again next time.
    Failed, deleted and not-yet-computed images have no row."""
    rows = {}
    for image in images:
        if image.path in read:
            rows[image.path] = Row(read[image.path], image.label, image.split, image.size, image.mtime_ns)
        elif (row := cached.get(image.path)) and image.path not in failed:
            rows[image.path] = Row(row.sha256, image.label, image.split, row.size, row.mtime_ns)
    return rows


def view_table(rows: dict[str, Row], cached: ViewTable | None, name: str, views_per_image: int, attrs: dict,
               known: Callable[[str], bool]) -> ViewTable:
    """The views table to store: every stored view of the training rows' images, the
    cached ones first. Views numbered above `views_per_image` stay (a later, larger
    --augment uses them); views of images no longer in training go."""
    training = {row.sha256 for row in rows.values() if row.split == "train"}
    keys = [key for key in (cached.keys if cached else []) if key[0] in training]
    have = set(keys)
    keys += [
        (sha256, view) for sha256 in sorted(training) for view in range(1, views_per_image + 1)
        if (sha256, view) not in have and known(view_key(sha256, name, view))
    ]
    return ViewTable(attrs, keys)
