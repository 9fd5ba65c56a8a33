"""Files a user names, read and written one way.

- Reading: `open_regular` opens a file once and refuses anything but a regular file (a
  FIFO would block forever, a device never end), checked on the descriptor itself, so a
  file swapped after it was listed is caught too; `read_bounded` reads no more than a limit
  of it; `read_regular` does both and says what went wrong in one line; `sha256_regular`
  the same, hashing as it reads, for a file whose bytes need not be kept.
- Writing: `write_aside` gives a new file beside the target to write into, renamed over the
  target when complete, so the target is whole or as it was, and two writers never
  interleave; a target that is a stream, not a file in a folder (a FIFO, /dev/null, a
  terminal, /dev/stdout, /dev/fd/N), is written straight into, as a shell's `>` would.
  `overwrites` says which protected file (a command's own input) a target would replace,
  by identity, not by spelling.
- Leftovers: a temporary's name carries its owner (`owned_prefix`: this machine and PID
  namespace, this process), so a later run removes those of a run killed with -9
  (`stale_partials`) and never a live run's; `partial_prefix` keeps the name within the
  255 bytes a file name may have, however long the target's.

This module imports nothing of the project but its errors: every other module may use it.
(The cache's own commit, with its lock and fsync, is `commit`'s.)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import socket
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

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
    with _regular(path, limit, what, fix) as file:
        data = read_bounded(file, limit)
    if len(data) > limit:
        raise _too_large(limit, what, fix)
    return data


def sha256_regular(path, limit: int, what: str, fix: str = "") -> str:
    """The SHA-256 of the regular file at `path`, read a MiB at a time (a file whose bytes
    are not kept is never held whole), at most `limit` bytes; refusals as `read_regular`'s."""
    digest, read = hashlib.sha256(), 0
    with _regular(path, limit, what, fix) as file:
        while chunk := file.read(min(2**20, limit + 1 - read)):
            read += len(chunk)
            if read > limit:
                raise _too_large(limit, what, fix)
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _regular(path, limit: int, what: str, fix: str) -> Iterator[io.BufferedReader]:
    """`open_regular`, a file over `limit` refused on its size (no byte read), and every
    OSError on the way a one-line UsageError."""
    try:
        with open_regular(path) as file:
            if os.fstat(file.fileno()).st_size > limit:
                raise _too_large(limit, what, fix)
            yield file
    except NotRegularFile as error:
        raise UsageError(f"Cannot read {what}: it is {error.strerror}{_then(fix)}.") from None
    except OSError as error:
        raise UsageError(f"Cannot read {what} ({error.strerror or error}){_then(fix)}.") from None


def _too_large(limit: int, what: str, fix: str) -> UsageError:
    return UsageError(f"Cannot read {what}: it is over {limit} bytes{_then(fix)}.")


def _then(fix: str) -> str:
    return f"; {fix}" if fix else ""


@contextlib.contextmanager
def write_aside(target, what: str, suffix: str = "") -> Iterator[str]:
    """`with write_aside(target, what) as aside:` write the file at the path `aside` (made
    beside `target`, empty, with the permissions open() would give); when the block ends it
    is renamed over `target`, and if the block raises it is removed, `target` untouched.
    A target that is a stream (`streamed`) is yielded itself: written straight into, as a
    shell's `>` does, never replaced by a regular file. A folder or another special file
    as `target` is a `UsageError` naming it as `what`; a file that cannot be made there is
    the OSError. `suffix` ends the aside's name (Keras saves only to ".keras")."""
    target = Path(target)
    if streamed(target):
        yield str(target)
        return
    if target.is_dir():
        raise UsageError(f"{what} is a folder; name a file.")
    why = target.exists() and not_regular(target.stat().st_mode)
    if why:
        raise UsageError(f"{what} is {why}; name a file, a FIFO or a character device such as /dev/stdout.")
    prefix = "." + partial_prefix(target.name)
    for stale in stale_partials(target.parent, prefix, suffix):
        with contextlib.suppress(OSError):
            if stale.is_file() and not stale.is_symlink():
                stale.unlink()
    descriptor, aside = tempfile.mkstemp(prefix=owned_prefix(prefix), suffix=suffix, dir=target.parent)
    try:
        os.close(descriptor)
        os.chmod(aside, 0o666 & ~_umask())  # mkstemp makes it 0o600
        yield aside
        os.replace(aside, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(aside)
        raise


def streamed(target) -> bool:
    """Whether `target` is written straight into rather than replaced: an existing FIFO or
    character device (/dev/null, a terminal), or a process's descriptor (/dev/stdout,
    /dev/fd/1, /proc/self/fd/1: a link the kernel makes to whatever the descriptor is, a
    pipe or a file; renaming over it would replace the link, or fail in /proc). A block
    device is not: a CSV written over a disk is never what was meant."""
    found = _stat(target)
    if found and (stat.S_ISFIFO(found.st_mode) or stat.S_ISCHR(found.st_mode)):
        return True
    return found is not None and _descriptor(target)


_DESCRIPTORS = re.compile(r"/proc/(?:\d+|self|thread-self)(?:/task/\d+)?/fd")  # /proc/self/fd resolves to /proc/<pid>/fd


def _descriptor(target) -> bool:
    """Whether `target`, its links followed one by one, is an entry of a process's /proc
    descriptor folder. Only the links are followed: a name's own folder is resolved, not it
    (the link /proc/self/fd/1 itself leads to the file it is open on)."""
    path = os.path.abspath(target)
    for _ in range(40):  # the kernel's own limit on links followed
        folder = os.path.realpath(os.path.dirname(path))
        if _DESCRIPTORS.fullmatch(folder):
            return True
        try:
            link = os.readlink(os.path.join(folder, os.path.basename(path)))
        except OSError:  # not a link: a name in an ordinary folder
            return False
        path = os.path.join(folder, link)
    return False


_KEPT_NAME_BYTES = 128  # of a target's name, in its temporaries' names: the rest is ours (NAME_MAX is 255)


def partial_prefix(name: str) -> str:
    """`name` + ".partial-", the start of a temporary's name beside the file or folder
    `name`, with `name` cut to its first 128 bytes: `owned_prefix` and mkstemp add some 40,
    and a name of up to 255 bytes must still have a temporary. Two names alike in their
    first 128 bytes share the start; their temporaries still carry their owner."""
    kept = os.fsencode(name)[:_KEPT_NAME_BYTES]
    return f"{os.fsdecode(kept)}.partial-"


def owned_prefix(prefix: str) -> str:
    """`prefix` + this machine's tag (host and PID namespace) + this process's id: the start
    of a temporary's name (mkstemp and mkdtemp add 8 random characters), so
    `stale_partials` can tell whose it is."""
    return f"{prefix}{_HOST}-{os.getpid()}-"


def stale_partials(folder, prefix: str | None = None, suffix: str = "") -> list[Path]:
    """The temporaries in `folder` made with `owned_prefix(prefix)` (any prefix ending in
    ".partial-" when None) and `suffix`, by a process of this machine that is gone: what a
    kill -9 left. A live owner's are never listed, nor another machine's or another PID
    namespace's (a shared folder, or containers sharing a host name: its process ids are
    not ours to look up); a reused process id keeps a leftover, never the reverse."""
    start = re.escape(prefix) if prefix is not None else r".+\.partial-"
    shape = re.compile(rf"{start}{_HOST}-(\d+)-[a-z0-9_]{{8}}{re.escape(suffix)}")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [Path(folder, name) for name in names
            if (match := shape.fullmatch(name)) and not _alive(int(match[1]))]


def _alive(pid: int) -> bool:
    """Whether process `pid` exists here (another user's too); unsure means alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's (EPERM), or no process id we made
        return True
    return True


def overwrites(target, files: Iterable = (), folders: Iterable = ()) -> str | None:
    """Which of `files`, or which of `folders` (anything inside it), writing `target` would
    replace, as given; None if none. Compared by identity, not spelling: an existing target
    by (device, inode), so a symbolic or hard link to a protected file is that file; a new
    one by its folder's (device, inode) and its name, so a link to a folder is that folder.
    Costs a stat a file (folders stat'ed once), so it suits thousands of inputs."""
    target = os.path.abspath(target)
    found = _stat(target)
    own = found and (found.st_dev, found.st_ino)
    entry, parents = _entry(target, {}), {}
    for path in files:
        if own and _identity(path) == own or not own and entry[0] and _entry(path, parents) == entry:
            return str(path)
    inside = {_identity(folder) for folder in _ancestors(os.path.dirname(os.path.realpath(target)))}
    for folder in folders:
        mine = _identity(folder)
        if mine and (mine in inside or found and found.st_nlink > 1 and _holds(folder, own)):
            return str(folder)  # in it, or a hard link elsewhere to a file in it
    return None


def _stat(path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _identity(path) -> tuple[int, int] | None:
    """(device, inode) of what `path` names, links followed; None if nothing is there."""
    found = _stat(path)
    return found and (found.st_dev, found.st_ino)


def _entry(path, parents: dict) -> tuple:
    """A name in a folder, the folder by identity (looked up once in `parents`)."""
    folder, name = os.path.split(os.path.abspath(path))
    if folder not in parents:
        parents[folder] = _identity(folder)
    return parents[folder], name


def _ancestors(folder: str) -> Iterator[str]:
    while True:
        yield folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def _holds(folder, identity: tuple) -> bool:
    for root, _, names in os.walk(folder):
        if any(_identity(os.path.join(root, name)) == identity for name in names):
            return True
    return False


def _machine_tag() -> str:
    """Whose process ids these are: the host name and the PID namespace (containers may
    share a host name; a process id means something only in its own namespace). Where
    /proc does not say, the host name alone."""
    try:
        found = os.stat("/proc/self/ns/pid")
        namespace = f"{found.st_dev}:{found.st_ino}"
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:8]


_HOST = _machine_tag()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
