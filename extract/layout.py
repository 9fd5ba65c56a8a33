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

A cache inside ``DATA`` (``extract-features .`` with the default ``cache/features.h5``) is
not data: its catalog, lock and shards are never listed, and the folder that holds only the
cache is no class or split folder to the detection.

Files are images by their name (`IMAGE_EXTENSIONS`); what is inside is the reader's
business, so a WebP named ``.jpeg`` is read as WebP. Hidden entries are ignored,
symbolic links are followed, but each real folder is listed once (a link back to a parent,
or a second way into a folder, is a failure row naming the first) and no deeper than
`MAX_DEPTH`; a FIFO, device or socket named like an image is a failure row, never opened.
"""

from __future__ import annotations

import hashlib
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from extract.errors import UsageError
from extract.files import not_regular

MAX_DEPTH = 200  # folders below DATA_DIR; deeper ones are a failure row (and Python's recursion stays bounded)
LAYOUTS = ("auto", "splits", "classes", "unlabeled")
SPLITS = ("train", "validation", "test", "unlabeled")
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .gif .bmp .dib .webp .tif .tiff "
    ".ppm .pgm .pbm .pnm .tga .ico .avif .qoi".split()
)


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
    """What a data folder holds."""

    root: Path
    layout: str
    images: list[ImageFile] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not images by name, outside any class, not in the labels
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unlistable
    not_in_labels: int = 0  # images skipped because the labels file does not name them (layout "csv")
    missing: list[str] = field(default_factory=list)  # what the labels file names but is no image here

    @property
    def class_names(self) -> list[str]:
        return sorted({image.label for image in self.images if image.label})


def scan_folder(data_dir, layout: str = "auto", validation_percent: float = 20.0,
                labels: dict[str, Labelled] | None = None, cache=None) -> Scan:
    """List the images of `data_dir` with their labels and splits: by the layout, or by
    `labels` (what `labels.read_labels` read: the layout is then "csv", whatever `layout`
    says; extract_features refuses both). The files of the
    cache at `cache` (its catalog, lock and shards) are never listed."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UsageError(f"Expected DATA_DIR to be a folder of images; {str(root)!r} is not a folder.")
    if layout not in LAYOUTS:
        raise UsageError(f"Expected --layout to be one of {', '.join(LAYOUTS)}; received {layout!r}.")
    if not 0 <= validation_percent < 100:
        raise UsageError(
            f"Expected --validation-percent in [0, 100); received {validation_percent}."
        )
    ignored = _cache_entries(root, cache)
    if labels is not None:
        layout = "csv"
    elif layout == "auto":
        layout = detect_layout(root, ignored)
    scan = Scan(root=root, layout=layout)
    for path, stat, error in walk(root, ignored):
        if path.endswith("/"):  # a folder that could not be entered
            scan.failures.append((path, error))
            continue
        parts = path.split("/")
        if _extension(parts[-1]) not in IMAGE_EXTENSIONS:
            scan.skipped.append(path)
            continue
        if labels is not None and path not in labels:
            scan.skipped.append(path)
            scan.not_in_labels += 1
            continue
        if error:
            scan.failures.append((path, error))
            continue
        placed = _place(parts, layout, validation_percent, labels)
        if placed is None:
            scan.skipped.append(path)
            continue
        label, split = placed
        scan.images.append(ImageFile(path, label, split, stat.st_size, stat.st_mtime_ns))
    if labels is not None:
        found = {image.path for image in scan.images} | {path for path, _ in scan.failures}
        scan.missing = [path for path in labels if path not in found]
        if not scan.images and not any(path in labels for path, _ in scan.failures):
            raise UsageError(
                f"Found none of the {len(labels)} images the labels file names in {str(root)!r} "
                f"(first: {scan.missing[0]!r}); its paths are relative to DATA_DIR."
            )
    if not scan.images and not scan.failures:
        raise UsageError(
            f"Found no images in {str(root)!r} (layout {layout!r}); expected files named "
            f"*.jpg, *.png, ... (see IMAGE_EXTENSIONS) in the layout README describes."
        )
    return scan


def detect_layout(root: Path, ignored: tuple[str, str] | None = None) -> str:
    """`splits` if the top-level folders are split names, `classes` if they are anything
    else, `unlabeled` if there are none. The cache's entries and the top-level folder that
    holds nothing but the cache (`ignored`, as `_cache_entries` gives it) are no folders here."""
    folders = sorted(entry.name for entry in os.scandir(root) if _is_visible_dir(entry)
                     and not _is_cache_entry("", entry.name, ignored))
    top = ignored[0].split("/")[0] if ignored else ""
    if top in folders and _holds_only_cache(root, ignored):
        folders.remove(top)
    split_folders = [name for name in folders if name in SPLIT_FOLDERS]
    if not folders:
        return "unlabeled"
    if not split_folders:
        return "classes"
    if len(split_folders) == len(folders):
        if "val" in folders and "validation" in folders:
            raise UsageError(
                f"Found both val/ and validation/ in {str(root)!r}; keep one of them."
            )
        return "splits"
    others = sorted(set(folders) - set(split_folders))
    raise UsageError(
        f"Found split folders ({', '.join(split_folders)}) beside other folders "
        f"({', '.join(others[:3])}) in {str(root)!r}; pass --layout splits or --layout classes."
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


def _is_cache_entry(prefix: str, name: str, ignored: tuple[str, str] | None) -> bool:
    """Whether `name` in the folder `prefix` is the cache's catalog, lock, temporary catalog,
    shard folder or a copy moved aside (`<catalog>`, `<catalog>.lock`, `.tmp-N`, `.shards`, `.replaced-T`)."""
    return ignored is not None and prefix == ignored[0] and (name == ignored[1] or name.startswith(ignored[1] + "."))


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
        if any((not _is_cache_entry(ignored[0], name, ignored)) if last else name != parts[depth + 1] for name in names):
            return False
    return True


def walk(root: Path, ignored: tuple[str, str] | None = None) -> list[tuple[str, os.stat_result | None, str | None]]:
    """(relative path, stat, error) for every visible file below `root`, in sorted order,
    following symbolic links. Each real folder is listed once, by the first path that
    reaches it: a link to a folder already listed (or to one that contains it) comes with
    a trailing "/" and why it was not entered, as does a folder that cannot be entered or
    lies deeper than `MAX_DEPTH`. A file that is not a regular one (a FIFO, a device, a
    socket) comes with its reason: it is never opened. The cache's own entries (`ignored`,
    see `_cache_entries`) are left out. (One list, not nested generators: it runs for every
    file of every run.)"""
    found = []
    first: dict[tuple[int, int], str] = {}  # (device, inode) of each folder listed -> its path

    def visit(directory: str, prefix: str, ancestors: frozenset) -> None:
        if prefix.count("/") > MAX_DEPTH:
            found.append((prefix, None, f"folders nested deeper than {MAX_DEPTH} levels; not listed"))
            return
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=_name)
        except OSError as error:
            found.append((prefix or "./", None, f"cannot list folder: {error.strerror}"))
            return
        for entry in entries:
            name = entry.name
            if name[0] == "." or (ignored is not None and _is_cache_entry(prefix, name, ignored)):
                continue
            path = prefix + name
            if not (name.isascii() or _is_utf8(name)):  # the cache stores paths as UTF-8 text
                if _is_visible_dir(entry):
                    found.append((_shown(path) + "/", None, "folder name is not valid UTF-8; not listed (rename it)"))
                else:
                    found.append((_shown(path), None, "file name is not valid UTF-8 (rename it)"))
                continue
            try:
                is_dir = entry.is_dir()  # the name is visible: checked above
            except OSError:
                is_dir = False
            if is_dir:
                try:
                    key = _identity(entry.path)
                except OSError as error:
                    found.append((path + "/", None, f"cannot list folder: {error.strerror}"))
                    continue
                if key in ancestors:
                    found.append((path + "/", None, "symbolic link loop: the folder contains itself"))
                elif key in first:
                    found.append((path + "/", None, f"the same folder as {first[key]} (reached again through a link); listed once"))
                else:
                    first[key] = path + "/"
                    visit(entry.path, path + "/", ancestors | {key})
                continue
            try:
                info = entry.stat()
                found.append((path, info, not_regular(info.st_mode)))
            except OSError as error:
                reason = "broken symbolic link" if entry.is_symlink() else error.strerror
                found.append((path, None, f"cannot read file: {reason}"))

    top = _identity(root)
    first[top] = "./"
    visit(str(root), "", frozenset({top}))
    return found


def _extension(name: str) -> str:
    """".jpg" of "a.JPG" (os.path.splitext's answer, faster: it runs for every file)."""
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


_name = operator.attrgetter("name")


def _is_visible_dir(entry: os.DirEntry) -> bool:
    try:
        return not entry.name.startswith(".") and entry.is_dir()
    except OSError:
        return False


def _identity(path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _shown(path: str) -> str:
    """A path with undecodable bytes (surrogate escapes) as UTF-8 text, each such byte as "\\xNN"."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
