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
from typing import BinaryIO, Callable, Iterator, NamedTuple

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
        for sample in _grouped(_members(_tar_bytes(_Source(file))), limit, progress):
            yield sample
            progress.samples += 1
            progress.last_key = sample.key
    except DAMAGE as error:
        yield progress.rest(name, error)


class _Member(NamedTuple):
    """A member's header, as `_grouped` needs it; `read` returns its data, once, before the
    next member is asked for."""

    name: str
    regular: bool  # a file's data, not a folder, a link or a device
    size: int
    read: Callable[[], bytes]


# The member types read here rather than by tarfile, as tarfile reads them: files, whose
# data follows their header, and links, folders and devices, which have none.
FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
DATALESS_TYPES = (tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE,
                  tarfile.FIFOTYPE)
# Where a header's numbers lie besides its size (mode, uid, gid; mtime; devmajor, devminor):
# tarfile refuses a header if any cannot be read.
NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))
PLAIN_TYPES = FILE_TYPES + DATALESS_TYPES + (tarfile.XHDTYPE,)  # pax: read here when it only gives times
# The numbers from mode to checksum, and the device numbers, as tarfile and GNU tar write them.
COMMON_NUMBERS = re.compile(rb"(?:[0-7]{7}\0){3}(?:[0-7]{11}\0){2}[0-7]{6}\0 ")
COMMON_DEVICES = re.compile(rb"(?:[0-7]{7}\0|\0{8}){2}")
# A pax record that only gives a time, and pax data that holds nothing else.
PAX_TIME = re.compile(rb"(\d+) [acm]time=\d+(?:[.]\d+)?\n")
PAX_TIMES = re.compile(rb"(?:\d+ [acm]time=\d+(?:[.]\d+)?\n)*")


def _members(stream) -> Iterator[_Member]:
    """The tar's members. Plain ustar and v7 headers are read here, and the pax headers that
    only give a time (what webdataset's TarWriter, img2dataset's writer, puts before each
    member: Python writes a float mtime so): tarfile's own header parsing cost 0.07 ms a
    sample, in the thread that feeds the decoders. At the first header of any other kind (pax
    with other records, GNU long names, sparse files, damage) tarfile reads the rest, from
    that header on, as if it had read the tar from its start."""
    blocks = _Blocks(stream)
    while True:
        at = blocks.offset
        taken = header = blocks.take(tarfile.BLOCKSIZE)
        if not header:  # as `_Header` says it
            raise tarfile.ReadError("the data ends without the tar's end marker" if at else "an empty file")
        if header.count(0) == tarfile.BLOCKSIZE:
            return  # the end marker
        member = _plain(header)
        if member is not None and header[156:157] == tarfile.XHDTYPE:  # pax records, then the member
            records = blocks.take(_padded(member[2]))
            header = blocks.take(tarfile.BLOCKSIZE)
            taken += records + header
            member = _plain(header) if _times_only(records, member[2]) else None
        if member is None or header[156:157] == tarfile.XHDTYPE:
            yield from _tarfile_members(blocks.stream, at, taken + blocks.rest())
            return
        name, regular, size = member
        yield _Member(name, regular, size, lambda size=size: blocks.data(size))
        blocks.skip_to(at + len(taken) + (_padded(size) if regular else 0))  # whether read or not


def _padded(size: int) -> int:
    """The bytes that `size` bytes of data take in a tar."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _times_only(records: bytes, size: int) -> bool:
    """Whether a pax header's `size` bytes of records (padded) are all there, only times, each
    as long as its length says, the padding NULs: records tarfile reads without effect on what
    is read here. Anything else (a path, a size, a length of 0) is tarfile's to read."""
    if len(records) != _padded(size) or not PAX_TIMES.fullmatch(records, 0, size) or records[size:].strip(b"\0"):
        return False
    at = 0
    while at < size:
        record = PAX_TIME.match(records, at)
        if int(record[1]) != record.end() - at:
            return False
        at = record.end()
    return True


def _plain(header: bytes) -> tuple[str, bool, int] | None:
    """(name, whether a file, size) from a plain header, as tarfile's `TarInfo.frombuf` reads
    them, or None where tarfile must read it: another type, a number tarfile refuses, a bad
    checksum (signed or unsigned sums both pass), a block cut short, a negative size."""
    kind = header[156:157]
    if len(header) != tarfile.BLOCKSIZE or kind not in PLAIN_TYPES:
        return None
    try:
        checksum, size = _numbers(header)
    except tarfile.HeaderError:
        return None
    unsigned = 256 + sum(header) - sum(header[148:156])
    if (checksum != unsigned and checksum not in tarfile.calc_chksums(header)) or size < 0:
        return None
    name = tarfile.nts(header[0:100], "utf-8", "surrogateescape")
    if kind not in FILE_TYPES or (kind == tarfile.AREGTYPE and name.endswith("/")):
        return name, False, size  # a folder's name is never a key: left as it is
    if not header[345]:
        return name, True, size
    return f"{tarfile.nts(header[345:500], 'utf-8', 'surrogateescape')}/{name}", True, size


def _numbers(header: bytes) -> tuple[int, int]:
    """The header's checksum and size, as tarfile's `nti` reads them, its other numbers
    checked as tarfile checks them (HeaderError where it refuses one); without nti's cost
    where they are written as tarfile and GNU tar write them."""
    if COMMON_NUMBERS.fullmatch(header, 100, 156) and COMMON_DEVICES.fullmatch(header, 329, 345):
        return int(header[148:154], 8), int(header[124:135], 8)
    for start, end in NUMBER_FIELDS:
        tarfile.nti(header[start:end])
    return tarfile.nti(header[148:156]), tarfile.nti(header[124:136])


def _tarfile_members(stream, start: int = 0, read: bytes = b"") -> Iterator[_Member]:
    """The members of the tar read from `stream` by tarfile, from the header `start` bytes into
    the tar, with `read` the bytes from there already taken from `stream`."""
    with _TarFrom.open(fileobj=stream, mode="r|", start=start, read=read, tarinfo=_Header,
                       encoding="utf-8", errors="surrogateescape") as tar:
        while (member := tar.next()) is not None:
            tar.members = []  # tarfile keeps every header it read; a shard may have millions
            yield _Member(member.name, member.isreg(), member.size,
                          lambda member=member: tar.extractfile(member).read())


class _TarFrom(tarfile.TarFile):
    """tarfile in stream mode taking over a tar part-read: its stream (`tarfile._Stream`) is
    put where it would have been had tarfile read the tar from its start, `start` bytes in,
    holding `read`. tarfile's offsets are then the tar's, and what it decides by them (its
    end, "an empty file", a member's negative size) is what it decides reading it whole."""

    def __init__(self, name=None, mode="r", fileobj=None, *, start: int = 0, read: bytes = b"", **kwargs):
        fileobj.pos, fileobj.buf = start, read
        super().__init__(name, mode, fileobj, **kwargs)


class _Blocks:
    """The tar's bytes, read forward. It asks its stream for what tarfile's stream mode
    asks (`RECORDSIZE` bytes, only when it has too few), so that a stream that fails
    fails at the same sample either way; a member skipped passes through in such pieces."""

    def __init__(self, stream):
        self.stream = stream
        self.offset = 0  # in the tar, of the next byte to take
        self._buffer = b""
        self._at = 0  # in _buffer, of the next byte to take

    def take(self, size: int) -> bytes:
        """The next `size` bytes, fewer where the tar ends."""
        if self._at + size > len(self._buffer):
            pieces, have = [self._buffer[self._at:]], len(self._buffer) - self._at
            while have < size and (piece := self.stream.read(tarfile.RECORDSIZE)):
                pieces.append(piece)
                have += len(piece)
            self._buffer, self._at = b"".join(pieces), 0
        data = self._buffer[self._at:self._at + size]
        self._at += len(data)
        self.offset += len(data)
        return data

    def data(self, size: int) -> bytes:
        """A member's `size` bytes of data, or tarfile's error where the tar ends first."""
        data = self.take(size)
        if len(data) < size:
            raise tarfile.ReadError("unexpected end of data")
        return data

    def skip_to(self, offset: int) -> None:
        """Passes over the bytes up to `offset`, or tarfile's error where the tar ends first."""
        left = offset - self.offset
        if left <= len(self._buffer) - self._at:
            self._at += left
        else:
            left -= len(self._buffer) - self._at
            self._buffer, self._at = b"", 0
            while left > 0:
                piece = self.stream.read(tarfile.RECORDSIZE)
                if not piece:
                    raise tarfile.ReadError("unexpected end of data")
                left -= len(piece)
            self._buffer = piece[len(piece) + left:]  # read past `offset`: kept
        self.offset = offset

    def rest(self) -> bytes:
        """The bytes taken from the stream and not yet given out, for tarfile to go on from."""
        rest, self._buffer, self._at = self._buffer[self._at:], b"", 0
        return rest


def _grouped(members: Iterator[_Member], limit: int, progress: _Progress) -> Iterator[Sample]:
    """The tar's samples: its members grouped by key, each group made a `Sample` once the
    next key begins or the tar ends."""
    group: _Group | None = None
    seen: set[str] = set()
    for member in members:
        progress.members += 1
        match = KEY_RULE.match(member.name) if member.regular else None
        if match is None:
            continue  # a folder, a link, a name without an extension: not part of a sample
        key, extension = match.groups()
        if group is None or key != group.key:
            if group is not None:
                yield group.sample()
            group = _Group(key, progress.members, repeated=key in seen)
            seen.add(key)
        group.add(member, extension, limit, progress.members)
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

    def add(self, member: _Member, extension: str, limit: int, index: int) -> None:
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
        self.data[wanted] = member.read()

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
