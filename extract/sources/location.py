"""DATA_DIR as a location: a local folder or file (`folder.Folder`), an fsspec URL
(`remote.Remote`: s3://, gs://, https://, file://), or a brace pattern over either
(`shards/{000000..000099}.tar`, as webdataset and img2dataset name shards).

Every location answers the same three things: `url` (what the cache records as the data
folder), `entries()` (what it holds, relative paths with size and a stamp that changes when
a file does) and `open(relative)` (a file to read).
"""

from __future__ import annotations

import errno
import os
import re
from typing import BinaryIO

from extract.errors import UsageError
from extract.files import NotRegularFile, not_regular, open_regular
from extract.sources.folder import Folder
from extract.sources.remote import Remote, clipped, is_url, open_url

MAX_EXPANDED = 1_000_000  # names one brace pattern may give: a million shards is far past any data set
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def open_location(data, storage_options: dict | None = None):
    """The location DATA_DIR names (see the module's text); a missing local path is refused."""
    text = str(data)
    names = braces(text)
    if len(names) > 1 or names[0] != text:
        parent = _common_folder(names)
        return Selection(open_location(parent, storage_options), [name[len(parent):].lstrip("/") for name in names],
                         text)
    if is_url(text):
        location = Remote(text.rstrip("/") if text.rstrip("/").count("/") > 2 else text, storage_options)
        location.check()  # one line naming what to set, before any work
        return location
    if storage_options:
        raise UsageError(f"--storage-options applies to URLs (s3://, gs://, https://); received the local path {text!r}.")
    folder = Folder(text)
    if not (folder.path.is_dir() or folder.is_file):
        raise UsageError(f"Expected DATA_DIR to be a folder of images or shards, a shard file (.tar, .parquet) "
                         f"or a URL; {text!r} {_what_is(text)}.")
    return folder


def _what_is(path: str) -> str:
    """What a local DATA_DIR that is neither a folder nor a regular file is, for its refusal."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist" if not os.path.islink(path) else "is a broken symbolic link"
    except OSError as error:
        return "is a symbolic link loop" if error.errno == errno.ELOOP else f"cannot be read ({error.strerror})"
    return f"is {not_regular(mode)}"


def braces(pattern: str) -> list[str]:
    """The names a brace pattern stands for: `{000..012}` a range (zero-padded to the width
    written), `{a,b}` a list; nested and repeated braces multiply. Anything else: itself."""
    match = _RANGE.search(pattern) or re.search(r"\{([^{}]*,[^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    if match.re is _RANGE:
        low, high = match.group(1), match.group(2)
        if max(len(low.lstrip("0")), len(high.lstrip("0"))) > 18:  # int() refuses over 4,300 digits
            raise UsageError(f"A range in {clipped(pattern)!r} has a number of over 18 digits; "
                             f"shards are numbered in far fewer.")
        if int(high) < int(low):
            raise UsageError(f"The range {match.group(0)} in {clipped(pattern)!r} runs backwards; write {{{high}..{low}}}.")
        if int(high) - int(low) >= MAX_EXPANDED:
            raise UsageError(f"The range {match.group(0)} in {clipped(pattern)!r} names over {MAX_EXPANDED} shards.")
        width = len(low) if low.startswith("0") else 0
        choices = [str(number).zfill(width) for number in range(int(low), int(high) + 1)]
    else:
        choices = match.group(1).split(",")
    names = []
    for choice in choices:  # counted as it grows: {0..999}/{0..999}/{0..9} is refused at a million, not at ten
        names += braces(head + choice + tail)
        if len(names) > MAX_EXPANDED:
            raise UsageError(f"The pattern {clipped(pattern)!r} names over {MAX_EXPANDED} shards.")
    return names


def _common_folder(names: list[str]) -> str:
    """The folder (or URL prefix) all `names` lie in, ending before a "/"."""
    common = names[0]
    for name in names[1:]:
        while not name.startswith(common):
            common = common[:-1]
    folder = common[:common.rfind("/") + 1] if "/" in common else ""
    if is_url(folder) and folder.count("/") < 3:  # "s3://bucket/" is the shortest prefix a URL may have
        folder = common[:common.find("/", common.find("://") + 3) + 1]
    return folder.rstrip("/") or "."


class Selection:
    """The files a brace pattern names, in the folder (or URL prefix) that holds them all. Its
    data folder is that folder: a pattern that names more shards next time adds their rows."""

    def __init__(self, location, names: list[str], pattern: str):
        self.location, self.names, self.pattern = location, names, pattern
        self.is_file = False
        self.url = location.url

    def __repr__(self) -> str:
        return f"Selection({self.pattern!r})"

    def entries(self, ignored=None) -> list[tuple[str, int, int, str | None]]:
        """The named files, each asked for by name (`stat`: the work grows with the pattern,
        not with what else the folder or bucket holds; an HTTP server need not list folders);
        a name not there, or not a regular file, a failure entry."""
        entries = sorted(map(self._entry, self.names))
        if all(error == self._not_found for _, _, _, error in entries):
            raise UsageError(f"None of the {len(self.names)} files the pattern {clipped(self.pattern)!r} names is "
                             f"there (first: {clipped(self.names[0])!r}); check the pattern.")
        return entries

    @property
    def _not_found(self) -> str:
        return f"not found (named by {clipped(self.pattern)!r})"

    def _entry(self, name: str) -> tuple[str, int, int, str | None]:
        try:
            return (name, *self.location.stat(name), None)
        except FileNotFoundError:
            return name, 0, 0, self._not_found
        except NotRegularFile as error:
            return name, 0, 0, error.strerror
        except OSError as error:
            return name, 0, 0, f"cannot read file: {error}"

    def open(self, relative: str) -> BinaryIO:
        return self.location.open(relative)


class Paths:
    """Files named one by one (score-images's inputs): each a local path, relative to the
    current folder, or a URL read with `storage_options`."""

    def __init__(self, storage_options: dict | None = None):
        self.storage_options = storage_options

    def open(self, path: str) -> BinaryIO:
        if is_url(path):
            return open_url(path, self.storage_options)
        return open_regular(path)
