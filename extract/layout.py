"""Find the images of a data folder, and the label and split of each one.

Three layouts, detected automatically (`layout="auto"`) or named:

- ``splits``: the seed's ``DATA/train/<class>/...`` and ``DATA/validation/<class>/...``
  (``val/`` also accepted, ``test/`` optional). Split and label come from the folders.
- ``classes``: ``DATA/<class>/...``. The validation split is drawn by a stable hash of
  each file's relative path, so adding images never moves old ones across splits.
- ``unlabeled``: any images below ``DATA``; label ``""``, split ``"unlabeled"``.

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
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from extract.errors import UsageError

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


@dataclass
class Scan:
    """What a data folder holds."""

    root: Path
    layout: str
    images: list[ImageFile] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not images by name, or outside any class
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unlistable

    @property
    def class_names(self) -> list[str]:
        return sorted({image.label for image in self.images if image.label})


def scan_folder(data_dir, layout: str = "auto", validation_percent: float = 20.0) -> Scan:
    """List the images of `data_dir` with their labels and splits."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UsageError(f"Expected DATA_DIR to be a folder of images; {str(root)!r} is not a folder.")
    if layout not in LAYOUTS:
        raise UsageError(f"Expected --layout to be one of {', '.join(LAYOUTS)}; received {layout!r}.")
    if not 0 <= validation_percent < 100:
        raise UsageError(
            f"Expected --validation-percent in [0, 100); received {validation_percent}."
        )
    if layout == "auto":
        layout = detect_layout(root)
    scan = Scan(root=root, layout=layout)
    for path, stat, error in walk(root):
        if path.endswith("/"):  # a folder that could not be entered
            scan.failures.append((path, error))
            continue
        parts = path.split("/")
        if _extension(parts[-1]) not in IMAGE_EXTENSIONS:
            scan.skipped.append(path)
            continue
        if error:
            scan.failures.append((path, error))
            continue
        placed = _place(parts, layout, validation_percent)
        if placed is None:
            scan.skipped.append(path)
            continue
        label, split = placed
        scan.images.append(ImageFile(path, label, split, stat.st_size, stat.st_mtime_ns))
    if not scan.images and not scan.failures:
        raise UsageError(
            f"Found no images in {str(root)!r} (layout {layout!r}); expected files named "
            f"*.jpg, *.png, ... (see IMAGE_EXTENSIONS) in the layout README describes."
        )
    return scan


def detect_layout(root: Path) -> str:
    """`splits` if the top-level folders are split names, `classes` if they are anything
    else, `unlabeled` if there are none."""
    folders = sorted(entry.name for entry in os.scandir(root) if _is_visible_dir(entry))
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


def _place(parts: list[str], layout: str, validation_percent: float):
    """(label, split) of a file from its path parts, or None if the layout has no place for it."""
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


def walk(root: Path) -> list[tuple[str, os.stat_result | None, str | None]]:
    """(relative path, stat, error) for every visible file below `root`, in sorted order,
    following symbolic links. Each real folder is listed once, by the first path that
    reaches it: a link to a folder already listed (or to one that contains it) comes with
    a trailing "/" and why it was not entered, as does a folder that cannot be entered or
    lies deeper than `MAX_DEPTH`. A file that is not a regular one (a FIFO, a device, a
    socket) comes with its reason: it is never opened. (One list, not nested generators:
    it runs for every file of every run.)"""
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
            if name[0] == ".":
                continue
            path = prefix + name
            if not (name.isascii() or _is_utf8(name)):  # the cache stores paths as UTF-8 text
                if _is_visible_dir(entry):
                    found.append((_shown(path) + "/", None, "folder name is not valid UTF-8; not listed (rename it)"))
                else:
                    found.append((_shown(path), None, "file name is not valid UTF-8 (rename it)"))
                continue
            if _is_visible_dir(entry):
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


def not_regular(mode: int) -> str | None:
    """Why a file of this `st_mode` is never opened ("not a regular file (a FIFO)"); None
    for a regular file. A FIFO would block a reader forever, a device never end."""
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'a special file')})"


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


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
