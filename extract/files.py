"""Files a user names, read and written one way.

- Reading: `open_regular` opens a file once and refuses anything but a regular file (a
  FIFO would block forever, a device never end), checked on the descriptor itself, so a
  file swapped after it was listed is caught too; `read_bounded` reads no more than a limit
  of it; `read_regular` does both and says what went wrong in one line.
- Writing: `write_aside` gives a new file beside the target to write into, renamed over the
  target when complete, so the target is whole or as it was, and two writers never
  interleave.

This module imports nothing of the project but its errors: every other module may use it.
(The cache's own commit, with its lock and fsync, is `commit`'s.)
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from extract.errors import UsageError

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


class NotRegularFile(OSError):
    """`open_regular`'s refusal; its `strerror` says what the path is instead."""


def not_regular(mode: int) -> str | None:
    """Why a file of this `st_mode` is never opened ("not a regular file (a FIFO)"); None
    for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'a special file')})"


def open_regular(path) -> io.BufferedReader:
    """Open a file for reading, without blocking, then check the descriptor: anything but a
    regular file raises `NotRegularFile` (an OSError), as does a socket's refusal to open."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ENXIO:  # a socket (or a FIFO with no writer, on some systems)
            raise NotRegularFile(errno.ENXIO, "not a regular file (a socket)") from None
        raise
    try:
        why = not_regular(os.fstat(descriptor).st_mode)
        if why:
            raise NotRegularFile(errno.EINVAL, why)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_bounded(file, limit: int) -> bytes:
    """The bytes of an open file, but never more than `limit` + 1 of them (more than `limit`:
    too large). Reads the size the file has (not `limit`: that would allocate it for every
    file), then, if it grew or does not know its size (/proc's files), up to the bound."""
    size = os.fstat(file.fileno()).st_size
    data = file.read(min(size, limit) + 1)
    if size < len(data) <= limit:
        data += file.read(limit + 1 - len(data))
    return data


def read_regular(path, limit: int, what: str, fix: str = "") -> bytes:
    """The bytes of the regular file at `path`, at most `limit`. Anything else is a one-line
    `UsageError` naming the file as `what` ("--labels 'a.csv'") and ending with `fix`:
    "Cannot read --labels 'a.csv': it is not a regular file (a FIFO); <fix>."."""
    fix = f"; {fix}" if fix else ""
    try:
        with open_regular(path) as file:
            data = read_bounded(file, limit)
    except NotRegularFile as error:
        raise UsageError(f"Cannot read {what}: it is {error.strerror}{fix}.") from None
    except OSError as error:
        raise UsageError(f"Cannot read {what} ({error.strerror or error}){fix}.") from None
    if len(data) > limit:
        raise UsageError(f"Cannot read {what}: it is over {limit} bytes{fix}.")
    return data


@contextlib.contextmanager
def write_aside(target, what: str, suffix: str = "") -> Iterator[str]:
    """`with write_aside(target, what) as aside:` write the file at the path `aside` (made
    beside `target`, empty, with the permissions open() would give); when the block ends it
    is renamed over `target`, and if the block raises it is removed, `target` untouched.
    A folder as `target` is a `UsageError` naming it as `what`; a file that cannot be made
    there is the OSError. `suffix` ends the aside's name (Keras saves only to ".keras")."""
    target = Path(target)
    if target.is_dir():
        raise UsageError(f"{what} is a folder; name a file.")
    descriptor, aside = tempfile.mkstemp(prefix=f".{target.name}.partial-", suffix=suffix, dir=target.parent)
    try:
        os.close(descriptor)
        os.chmod(aside, 0o666 & ~_umask())  # mkstemp makes it 0o600
        yield aside
        os.replace(aside, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(aside)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
