"""WebDataset tars (what img2dataset writes), read as a stream: once, in order, never seeking,
so that a shard at an https:// or s3:// URL is read as it arrives.

A tar's members are grouped into samples by key, by WebDataset's rule (its `base_plus_ext`):
`train/cat_0017.seg.png` is the key `train/cat_0017` and the extension `seg.png`. The members
of a sample are contiguous; a new key starts a new sample. The image is the member under jpg,
jpeg, png or webp (the first present, in that order), the label a `.cls` (its text) or a
`.json`'s "label" (a string or an integer). Only the members of one sample are held, and only
those read: the image and the label, each under its size limit; the rest are skipped unread.

What cannot be read becomes an error `Sample`, never an exception: a sample without an image,
over the limit, a key met twice, a key HDF5 cannot store. A damaged tar (truncated, corrupt,
a connection lost for good) keeps the samples completed before the damage and ends with one
error sample of key "" standing for the rest.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import tarfile
import zlib
from typing import BinaryIO, Iterator

from extract.sources import Sample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference
LABEL_EXTENSIONS = ("cls", "json")  # in order of preference
LABEL_LIMIT = 1 << 20  # bytes: labels are tiny; a larger one is not a label
KEY_RULE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


class _ReadFailed(OSError):
    """An error raised by the shard's own `read` (a network drop the remote layer could
    not recover), carried through tarfile as the damage it is."""


class _Source:
    """The shard's file as tarfile reads it: only `read`, with any error it raises turned
    into `_ReadFailed`, so that a remote filesystem's own exception types end the tar like
    a truncation while this module's bugs still surface. KeyboardInterrupt passes through."""

    def __init__(self, file: BinaryIO):
        self._file = file

    def read(self, size: int = -1) -> bytes:
        try:
            return self._file.read(size)
        except Exception as error:
            raise _ReadFailed(f"reading failed: {error}") from error


class _Header(tarfile.TarInfo):
    """A member's header that tells a tar's end from its damage. tarfile ends a stream
    silently, as if complete, on a header that is missing, cut short or corrupt after the
    first; only a block of zeros is the tar's real end."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.EmptyHeaderError:
            reason = "the data ends without the tar's end marker" if tar.offset else "an empty file"
            raise tarfile.ReadError(reason) from None
        except tarfile.HeaderError as error:
            raise tarfile.ReadError(f"a damaged member header ({error})") from None


# What a damaged stream raises: tarfile's own errors, the decompressors' (gzip's and bz2's are
# OSErrors), the stream's end inside a member, and `_ReadFailed`.
DAMAGE = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
# A compressed tar by its first bytes, and what reads it.
COMPRESSED = ((b"\x1f\x8b", lambda stream: gzip.GzipFile(fileobj=stream, mode="rb")),
              (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile))


class _Prepended:
    """The shard's bytes with `head`, read from it to choose a decompressor, put back in front."""

    def __init__(self, head: bytes, source: _Source):
        self._head, self._source = head, source

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._source.read(size)
        if size is None or size < 0:
            data, self._head = self._head + self._source.read(), b""
            return data
        data, self._head = self._head[:size], self._head[size:]
        return data


class _Decompressed:
    """A compressed tar's bytes, decompressed here rather than by tarfile's stream mode, which
    copies its whole buffer at each 10 KB step over a skipped member: a 3 GB member of zeros in
    a 14 MB .tar.gz took 64 s to pass over (2.6 s this way). The compressed data ending early
    ends the tar's bytes, as it did in tarfile: the tar's own end marker, or its absence
    (`_Header`), tells a whole tar from a cut one."""

    def __init__(self, stream):
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        data = bytearray()
        while size < 0 or len(data) < size:
            try:  # read1: a buffered read(size) drops what it holds when the data ends short
                piece = self._stream.read1(size - len(data) if size >= 0 else 1 << 20)
            except EOFError:  # the compressed data cut short: what came before it stands
                break
            if not piece:
                break
            data += piece
        return bytes(data)


def _tar_bytes(source: _Source):
    """The tar's bytes from the shard's: decompressed when its first bytes say gzip, bz2 or xz."""
    head = source.read(6)
    opener = next((opener for magic, opener in COMPRESSED if head.startswith(magic)), None)
    stream = _Prepended(head, source)
    return stream if opener is None else _Decompressed(opener(stream))


class _Progress:
    """How far a tar was read, for the message that stands for the rest."""

    def __init__(self) -> None:
        self.members = 0  # member headers read
        self.samples = 0  # samples completed
        self.last_key = ""  # the key of the last one

    def rest(self, name: str, error: BaseException) -> Sample:
        """The error sample (key "") for what could not be read after the damage."""
        reason = str(error) or type(error).__name__
        if self.members == 0 and not isinstance(error, _ReadFailed):
            message = f"not a tar file ({reason}); expected a WebDataset tar: {name}"
        elif self.samples == 0:
            message = f"truncated tar in its first sample (0 samples read): {reason}"
        else:
            message = (
                f"truncated tar after sample {self.last_key} ({self.samples} samples read): {reason}"
            )
        return Sample("", None, error=message)


def tar_samples(file: BinaryIO, name: str, limit: int) -> Iterator[Sample]:
    """The samples of the WebDataset tar (or .tar.gz, .tar.bz2, .tar.xz) read from `file`,
    which need not be seekable, in order. A sample whose image is over `limit` bytes is
    an error sample, its member never read; `name` names the shard in messages."""
    progress = _Progress()
    try:
        with tarfile.open(fileobj=_tar_bytes(_Source(file)), mode="r|", tarinfo=_Header,
                          encoding="utf-8", errors="surrogateescape") as tar:
            for sample in _grouped(tar, limit, progress):
                yield sample
                progress.samples += 1
                progress.last_key = sample.key
    except DAMAGE as error:
        yield progress.rest(name, error)


def _grouped(tar: tarfile.TarFile, limit: int, progress: _Progress) -> Iterator[Sample]:
    """The tar's samples: its members grouped by key, each group made a `Sample` once the
    next key begins or the tar ends."""
    group: _Group | None = None
    seen: set[str] = set()
    while (member := tar.next()) is not None:
        tar.members = []  # tarfile keeps every header it read; a shard may have millions
        progress.members += 1
        match = KEY_RULE.match(member.name) if member.isreg() else None
        if match is None:
            continue  # a folder, a link, a name without an extension: not part of a sample
        key, extension = match.groups()
        if group is None or key != group.key:
            if group is not None:
                yield group.sample()
            group = _Group(key, progress.members, repeated=key in seen)
            seen.add(key)
        group.add(tar, member, extension, limit, progress.members)
    if group is not None:
        yield group.sample()


class _Group:
    """The members of one sample as they are read: the image and label members' bytes by
    extension, every extension found (for the message when there is no image), and the first
    error, after which nothing more of the sample is read."""

    def __init__(self, key: str, index: int, repeated: bool):
        self.key = key
        self.found: list[str] = []
        self.data: dict[str, bytes] = {}
        self.error = _key_error(key)
        if repeated and self.error is None:
            self.error = f"the key {key} again at member {index}; keys must be unique in a tar"

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo, extension: str, limit: int, index: int) -> None:
        """Reads `member` if the sample needs it (an image or a label) and it is under its limit."""
        self.found.append(extension)
        wanted = extension.lower()
        if self.error is not None or wanted not in IMAGE_EXTENSIONS + LABEL_EXTENSIONS:
            return
        if wanted in self.data:
            self.error = f"the member {member.name} again at member {index}; keys must be unique in a tar"
            return
        cap = limit if wanted in IMAGE_EXTENSIONS else min(limit, LABEL_LIMIT)
        if member.size > cap:
            self.error = f"{member.name} is {member.size} bytes, over the limit of {cap} bytes"
            self.data.clear()
            return
        self.data[wanted] = tar.extractfile(member).read()

    def sample(self) -> Sample:
        """The sample these members make: the image and its label, or why not."""
        if self.error is not None:
            return Sample(_shown(self.key), None, error=self.error)
        image = next((self.data[e] for e in IMAGE_EXTENSIONS if e in self.data), None)
        if image is None:
            found = ", ".join(f"{self.key}.{e}" for e in self.found)
            return Sample(
                self.key, None, error=f"no image (expected {self.key}.jpg, .jpeg, .png or .webp); found {found}"
            )
        try:
            return Sample(self.key, image, label=_label(self.key, self.data))
        except ValueError as error:
            return Sample(self.key, None, error=str(error))


def _label(key: str, data: dict[str, bytes]) -> str | None:
    """The sample's label: the `.cls` text, else the `.json`'s "label" if a string or an
    integer, else None. Raises ValueError on a label member that cannot be read as text."""
    if "cls" in data:
        try:
            return data["cls"].decode("utf-8").strip() or None
        except UnicodeDecodeError as error:
            raise ValueError(f"{key}.cls is not UTF-8 text ({error}); write the class as UTF-8") from None
    if "json" not in data:
        return None
    try:
        document = json.loads(data["json"])
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deep
        raise ValueError(f"{key}.json is not valid JSON ({error})") from None
    label = document.get("label") if isinstance(document, dict) else None
    if isinstance(label, str) or (isinstance(label, int) and not isinstance(label, bool)):
        return str(label)
    return None


def _key_error(key: str) -> str | None:
    """Why `key` cannot be stored (HDF5 holds UTF-8 strings without NUL), or None."""
    if "\0" in key:
        return f"the key {_shown(key)} holds a NUL character; rename the member"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return f"the key {_shown(key)} is not valid UTF-8; rename the member"
    return None


def _shown(key: str) -> str:
    """`key` with its undecodable bytes and NULs as backslash escapes, storable and readable."""
    shown = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return shown.replace("\0", "\\x00")
