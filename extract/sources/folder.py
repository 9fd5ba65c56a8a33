"""A folder on this machine as a location of images: its files listed safely (`walk`),
one opened at a time without blocking (`Folder.open`).

The listing follows symbolic links, but lists each real folder once (a link back to a
parent, or a second way into a folder, is a failure entry naming the first) and no deeper
than `MAX_DEPTH`; a FIFO, device or socket is a failure entry, never opened; a name that is
not UTF-8 is a failure entry (the cache stores paths as UTF-8 text); hidden entries and a
cache's own files are left out.
"""

from __future__ import annotations

import errno
import operator
import os
from pathlib import Path
from typing import BinaryIO

from extract.files import NotRegularFile, not_regular, open_regular

MAX_DEPTH = 200  # folders below DATA_DIR; deeper ones are a failure row (and Python's recursion stays bounded)


class Folder:
    """A local folder of images and shards, or one local shard file (`is_file`)."""

    def __init__(self, path):
        self.path = Path(path)
        self.is_file = self.path.is_file()
        self.root = (self.path.parent if self.is_file else self.path).absolute()  # what stored paths are relative to
        self.url = os.path.realpath(self.path)  # what the cache records as the data folder (a link loop: as named)

    def __repr__(self) -> str:
        return f"Folder({str(self.path)!r})"

    def entries(self, ignored: tuple[str, str] | None = None) -> list[tuple[str, int, int, str | None]]:
        """(relative path, size, modification time in ns, error) of every visible file, sorted;
        a folder that was not entered ends with "/" and says why. `ignored`: a cache's entries."""
        if self.is_file:
            stat = self.path.stat()
            return [(self.path.name, stat.st_size, stat.st_mtime_ns, not_regular(stat.st_mode))]
        return [(path, stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0, error)
                for path, stat, error in walk(self.root, ignored)]

    def stat(self, relative: str) -> tuple[int, int]:
        """(size, modification time in ns) of one file named (a brace pattern's shard), as
        `entries` gives them, without listing the folder; a file that is not a regular one
        raises `files.NotRegularFile`, saying what it is, as `entries` would."""
        stat = os.stat(self.root / relative)
        why = not_regular(stat.st_mode)
        if why:
            raise NotRegularFile(errno.EINVAL, why)
        return stat.st_size, stat.st_mtime_ns

    def open(self, relative: str) -> BinaryIO:
        """The file, opened without blocking and checked regular (`files.open_regular`)."""
        return open_regular(self.root / relative)


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
            if name[0] == "." or (ignored is not None and is_cache_entry(prefix, name, ignored)):
                continue
            path = prefix + name
            if not (name.isascii() or is_utf8(name)):  # the cache stores paths as UTF-8 text
                if is_visible_dir(entry):
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
                reason = (("symbolic link loop" if error.errno == errno.ELOOP else "broken symbolic link")
                          if entry.is_symlink() else error.strerror)
                found.append((path, None, f"cannot read file: {reason}"))

    top = _identity(root)
    first[top] = "./"
    visit(str(root), "", frozenset({top}))
    return found



_name = operator.attrgetter("name")


def is_visible_dir(entry: os.DirEntry) -> bool:
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


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_cache_entry(prefix: str, name: str, ignored: tuple[str, str] | None) -> bool:
    """Whether `name` in the folder `prefix` is the cache's catalog, lock, temporary catalog,
    shard folder or a copy moved aside (`<catalog>`, `<catalog>.lock`, `.tmp-N`, `.shards`, `.replaced-T`)."""
    return ignored is not None and prefix == ignored[0] and (name == ignored[1] or name.startswith(ignored[1] + "."))
