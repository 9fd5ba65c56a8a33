"""Find the images of a data folder, and the label and split of each one.

Three layouts, detected automatically (`layout="auto"`) or named, and a fourth given by a
labels file:

- ``splits``: the blog recipe's ``DATA/train/<class>/...`` and ``DATA/validation/<class>/...``
  (``val/`` also accepted, ``test/`` optional). Split and label come from the folders.
- ``classes``: ``DATA/<class>/...``. The validation split is drawn by a stable hash of
  each file's relative path, so adding images never moves old ones across splits.
- ``unlabeled``: any images below ``DATA``; label ``""``, split ``"unlabeled"``.
- ``csv``: the images a labels CSV names (see `labels`), with its labels and splits (a
  missing split drawn by path hash, as in ``classes``); the other images are skipped.
- ``shards``: WebDataset tars and Parquet files (`sources`), detected when the listing holds
  them; each sample's label is its own, its split its shard's ``train/``, ``validation/`` or
  ``test/`` folder's, else its own, else drawn by the hash of its stored path (`place_sample`,
  as the samples are read). Image files beside shards are refused, but under ``unlabeled``.

A cache inside ``DATA`` (``extract-features .`` with the default ``cache/features.h5``) is
not data: its catalog, lock and shards are never listed, and the folder that holds only the
cache is no class or split folder to the detection.

Files are images by their name (`IMAGE_EXTENSIONS`), shards by theirs (`sources.shard_kind`);
what is inside is the reader's business, so a WebP named ``.jpeg`` is read as WebP. The
listing is the location's (`sources.location`): a local folder's follows symbolic links but
lists each real folder once, and a FIFO, device or socket named like an image is a failure
row, never opened (`sources.folder`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from extract.errors import UsageError
from extract.sources import Sample, Shard, member_path, shard_kind
from extract.sources.folder import Folder, is_cache_entry, is_utf8, is_visible_dir
from extract.sources.location import open_location

LAYOUTS = ("auto", "splits", "classes", "unlabeled", "shards")
SPLITS = ("train", "validation", "test", "unlabeled")
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
IMAGE_ENDINGS = tuple((".jpg .jpeg .jpe .jfif .png .apng .gif .bmp .dib .webp .tif .tiff "
                       ".ppm .pgm .pbm .pnm .tga .ico .avif .qoi").split())  # the commonest first, for messages
IMAGE_EXTENSIONS = frozenset(IMAGE_ENDINGS)


class ImageFile(NamedTuple):  # a tuple: made once per file on every run, so it must be cheap
    """One image of the data folder, as listed (its content is not read here)."""

    path: str  # relative to the data folder, "/"-separated
    label: str  # class name, "" when unlabeled
    split: str  # one of SPLITS
    size: int
    mtime_ns: int


class Labelled(NamedTuple):
    """One image a labels file names (what `labels.read_labels` reads)."""

    label: str
    split: str | None  # None: drawn by path hash
    line: int  # where the file names it, for messages


@dataclass
class Scan:
    """What a data folder holds: image files, each placed now, and shards, whose samples are
    placed as they are read (`place_sample`)."""

    location: object  # where the files are: sources.folder.Folder, sources.remote.Remote, ...
    layout: str
    images: list[ImageFile] = field(default_factory=list)
    shards: list[Shard] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not images by name, outside any class, not in the labels
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unlistable
    not_in_labels: int = 0  # images skipped because the labels file does not name them (layout "csv")
    missing: list[str] = field(default_factory=list)  # what the labels file names but is no image here

    @property
    def class_names(self) -> list[str]:
        return sorted({image.label for image in self.images if image.label})


def scan_folder(data_dir, layout: str = "auto", validation_percent: float = 20.0,
                labels: dict[str, Labelled] | None = None, cache=None, storage_options: dict | None = None) -> Scan:
    """List the images and shards of `data_dir` (a folder, a shard file, a URL, a brace
    pattern: see `sources.location`; or a location itself) with their labels and splits: by
    the layout, or by `labels` (what `labels.read_labels` read: the layout is then "csv",
    whatever `layout` says; extract_features refuses both). The files of the cache at `cache`
    (its catalog, lock and shards) are never listed."""
    if layout not in LAYOUTS:
        raise UsageError(f"Expected --layout to be one of {', '.join(LAYOUTS)}; received {layout!r}.")
    if not 0 <= validation_percent < 100:
        raise UsageError(
            f"Expected --validation-percent in [0, 100); received {validation_percent}."
        )
    location = data_dir if hasattr(data_dir, "entries") else open_location(data_dir, storage_options)
    local = isinstance(location, Folder)
    ignored = _cache_entries(location.root, cache) if local else None
    entries = location.entries(ignored)
    sharded = labels is None and layout in ("auto", "shards", "unlabeled") and any(
        shard_kind(path) and not error for path, _, _, error in entries)
    if labels is not None:
        layout = "csv"
    elif sharded and layout == "auto":
        layout = "shards"
    elif layout == "auto":
        layout = detect_layout(location.root, ignored) if local else _detect_from(entries)
    scan = Scan(location=location, layout=layout)
    for path, size, stamp, error in entries:
        if path.endswith("/"):  # a folder that could not be entered
            scan.failures.append((path, error))
            continue
        parts = path.split("/")
        kind = shard_kind(parts[-1]) if sharded else None
        if kind is None and (layout == "shards" or _extension(parts[-1]) not in IMAGE_EXTENSIONS):
            scan.skipped.append(path)
            continue
        if labels is not None and path not in labels:
            scan.skipped.append(path)
            scan.not_in_labels += 1
            continue
        if error:
            scan.failures.append((path, error))
            continue
        if kind is not None:
            split = "unlabeled" if layout == "unlabeled" else SPLIT_FOLDERS.get(parts[0]) if len(parts) > 1 else None
            scan.shards.append(Shard(path, kind, size, stamp, split, layout != "unlabeled", validation_percent))
            continue
        placed = _place(parts, layout, validation_percent, labels)
        if placed is None:
            scan.skipped.append(path)
            continue
        label, split = placed
        scan.images.append(ImageFile(path, label, split, size, stamp))
    if layout == "shards" and scan.skipped and any(_extension(path) in IMAGE_EXTENSIONS for path in scan.skipped):
        image = next(path for path in scan.skipped if _extension(path) in IMAGE_EXTENSIONS)
        raise UsageError(
            f"Found both shards ({scan.shards[0].path if scan.shards else 'none readable'}) and image files "
            f"({image}) in {location.url!r}; keep one kind in a data folder (or pass --layout unlabeled for both)."
        )
    if not scan.images and not scan.shards:
        _refuse_shards_read_as_files(entries, layout, location.url)
    if labels is not None:
        found = {image.path for image in scan.images} | {path for path, _ in scan.failures}
        scan.missing = [path for path in labels if path not in found]
        if not scan.images and not any(path in labels for path, _ in scan.failures):
            raise UsageError(
                f"Found none of the {len(labels)} images the labels file names in {location.url!r} "
                f"(first: {scan.missing[0]!r}); its paths are relative to DATA_DIR."
            )
    if not scan.images and not scan.shards and not scan.failures:
        raise UsageError(
            f"Found no images in {location.url!r} (layout {layout!r}){_skipped_note(scan.skipped)}; expected image "
            f"files ({image_extensions()}, in any case) in the layout README describes, or shards (.tar, .parquet)."
        )
    return scan


def image_extensions() -> str:
    """The file name endings read as images, in words for a message: ".jpg, .jpeg ... or .qoi"."""
    return f"{', '.join(IMAGE_ENDINGS[:-1])} or {IMAGE_ENDINGS[-1]}"


def _skipped_note(skipped: list[str]) -> str:
    """What the folder held instead of images, for the empty-folder message ("" when nothing)."""
    if not skipped:
        return ""
    return f"; it holds {len(skipped)} other file{'s' if len(skipped) > 1 else ''} (such as {skipped[0]!r})"


def _refuse_shards_read_as_files(entries: list[tuple[str, int, int, str | None]], layout: str, url: str) -> None:
    """A UsageError when a layout that reads image files (--layout splits or classes, --labels)
    found none where there are shards: their samples carry their own labels."""
    shard = next((path for path, _, _, error in entries if error is None and shard_kind(path.rsplit("/", 1)[-1])), None)
    if shard is None:
        return
    given = "--labels" if layout == "csv" else f"--layout {layout}"
    raise UsageError(f"{given} reads image files, and {url!r} holds shards ({shard}), whose samples carry their "
                     f"own labels (.cls, .json, a label column); drop {given}.")


def place_sample(shard: Shard, sample: Sample) -> tuple[str, str] | str:
    """(label, split) of a shard's sample, or why it cannot be stored. The label is the
    sample's own (required unless --layout unlabeled); the split, its shard's folder's, else
    the sample's own (a Parquet split column), else drawn by the hash of its stored path."""
    if not shard.labelled:
        return "", "unlabeled"
    label = sample.label
    if label is None or not label.strip():
        return ("no label (expected KEY.cls, a \"label\" in KEY.json, or a label column); pass --layout unlabeled "
                "to store samples without labels")
    if "\x00" in label or not is_utf8(label):
        return f"label {label!r} holds a character the cache cannot store (NUL, or text that is not UTF-8)"
    split = shard.split or sample.split
    if split is not None and split not in SPLIT_FOLDERS.values():  # a Parquet split column's "holdout"
        return (f"unknown split {split!r}; expected one of {', '.join(SPLIT_FOLDERS)} (or none: drawn by "
                f"the path's hash)")
    if split is None:
        path = member_path(shard.path, sample.key)
        split = "validation" if validation_fraction(path) < shard.validation_percent else "train"
    return label.strip(), split


def _detect_from(entries: list[tuple[str, int, int, str | None]]) -> str:
    """`detect_layout` for a location that is no local folder: its folders, from the listing."""
    folders = sorted({path.split("/", 1)[0] for path, _, _, _ in entries if "/" in path})
    return _layout_of(folders, "the data folder")


def detect_layout(root: Path, ignored: tuple[str, str] | None = None) -> str:
    """`splits` if the top-level folders are split names, `classes` if they are anything
    else, `unlabeled` if there are none. The cache's entries and the top-level folder that
    holds nothing but the cache (`ignored`, as `_cache_entries` gives it) are no folders here."""
    folders = sorted(entry.name for entry in os.scandir(root) if is_visible_dir(entry)
                     and not is_cache_entry("", entry.name, ignored))
    top = ignored[0].split("/")[0] if ignored else ""
    if top in folders and _holds_only_cache(root, ignored):
        folders.remove(top)
    return _layout_of(folders, repr(str(root)))


def _layout_of(folders: list[str], where: str) -> str:
    """The layout the top-level `folders` of the data folder (shown as `where`) say."""
    split_folders = [name for name in folders if name in SPLIT_FOLDERS]
    if not folders:
        return "unlabeled"
    if not split_folders:
        return "classes"
    if len(split_folders) == len(folders):
        if "val" in folders and "validation" in folders:
            raise UsageError(
                f"Found both val/ and validation/ in {where}; keep one of them."
            )
        return "splits"
    others = sorted(set(folders) - set(split_folders))
    raise UsageError(
        f"Found split folders ({', '.join(split_folders)}) beside other folders "
        f"({', '.join(others[:3])}) in {where}; pass --layout splits or --layout classes."
    )


def validation_fraction(path: str) -> float:
    """A stable number in [0, 100) drawn from the relative path alone."""
    digest = hashlib.sha256(path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def _place(parts: list[str], layout: str, validation_percent: float, labels: dict | None = None):
    """(label, split) of a file from its path parts, or None if the layout has no place for it."""
    if labels is not None:  # layout == "csv"; the caller checked the file is named
        path = "/".join(parts)
        label, split, _ = labels[path]
        return label, split or ("validation" if validation_fraction(path) < validation_percent else "train")
    if layout == "unlabeled":
        return "", "unlabeled"
    if layout == "classes":
        if len(parts) < 2:
            return None
        split = "validation" if validation_fraction("/".join(parts)) < validation_percent else "train"
        return parts[0], split
    if len(parts) < 3 or parts[0] not in SPLIT_FOLDERS:  # layout == "splits"
        return None
    return parts[1], SPLIT_FOLDERS[parts[0]]


def _cache_entries(root: Path, cache) -> tuple[str, str] | None:
    """Where the cache at `cache` is inside `root`: (its folder relative to `root`, "" or
    "a/b/", and the catalog's name), or None when it is not inside."""
    if cache is None:
        return None
    data, real = os.path.realpath(root), os.path.realpath(cache)
    if os.path.commonpath([data, real]) != data or real == data:
        return None
    folder = os.path.relpath(os.path.dirname(real), data)
    return ("" if folder == "." else folder.replace(os.sep, "/") + "/"), os.path.basename(real)


def _holds_only_cache(root: Path, ignored: tuple[str, str]) -> bool:
    """Whether each folder on the way down to the cache's folder holds only the next one,
    and the cache's folder only the cache (hidden entries aside)."""
    parts = ignored[0].strip("/").split("/")
    folder = str(root)
    for depth, part in enumerate(parts):
        folder = os.path.join(folder, part)
        try:
            names = [name for name in os.listdir(folder) if not name.startswith(".")]
        except OSError:
            return False
        last = depth == len(parts) - 1
        if any((not is_cache_entry(ignored[0], name, ignored)) if last else name != parts[depth + 1] for name in names):
            return False
    return True


def _extension(name: str) -> str:
    """".jpg" of "a.JPG" (os.path.splitext's answer, faster: it runs for every file)."""
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


