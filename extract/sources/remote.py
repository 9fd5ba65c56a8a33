"""Locations at fsspec URLs (s3://, gs://, https://, file://): check, list, open with retries.

A `Remote` is a URL and its `--storage-options`. Before any work, `check` reads the location
once, bounded in time, and turns every way it can fail (a missing package, no credentials, an
unreachable endpoint, a missing bucket, nothing there, access denied) into one `UsageError`
line naming what to set. `list` gives each object below the URL with a size and a stamp that
changes when the object does, so a cache can tell a replaced object from the one it read.
`open` gives a file whose reads survive dropped connections: a long scan of tars or Parquet
files over a network should not fail on one reset, nor start a shard over from its first byte.

A `Remote` is pickled to Ray tasks on other machines: only the URL, the options and what was
learned about the URL travel; the fsspec filesystem is built again where it is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import threading
import time
from typing import BinaryIO, Callable
from urllib.parse import urlsplit

import fsspec

from extract.errors import UsageError
from extract.files import open_regular

RETRIES = 5  # re-opens of an object after a dropped connection, before a read fails for good
BACKOFF_SECONDS = 0.5  # the first wait before a re-open; doubled after each, up to the cap
BACKOFF_CAP_SECONDS = 8.0
BLOCK_SIZE = 4 * 2**20  # bytes a read asks the store for at once: few requests, bounded memory
CHECK_SECONDS = 15.0  # `check` gives up on a store that does not answer within this
# botocore's defaults retry a silent endpoint for minutes; the check needs one quick answer.
CHECK_BOTOCORE = {"connect_timeout": 5, "read_timeout": 5, "retries": {"max_attempts": 1}}

S3 = ("s3", "s3a")  # fsspec's names for s3fs's protocol
# The package and the project's extra each protocol needs (fsspec loads it by name).
PACKAGES = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"),
            "gcs": ("gcsfs", "gcs"), "http": ("aiohttp", "http"), "https": ("aiohttp", "http")}
CREDENTIALS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass "
          "--storage-options '{\"anon\": true}' for a public bucket",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS (or run gcloud auth application-default login), "
          "or pass --storage-options '{\"token\": \"anon\"}' for a public bucket",
}
CREDENTIALS.update({"s3a": CREDENTIALS["s3"], "gcs": CREDENTIALS["gs"]})
# Exception classes (by name, anywhere in an error's chain and bases) that mean the
# connection failed or was lost, whatever library raised them: worth another try.
CONNECTION_ERRORS = {
    "ConnectionError", "TimeoutError", "ClientConnectionError", "ClientPayloadError",
    "ServerTimeoutError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ResponseStreamingError", "IncompleteReadError", "ProtocolError",
}
NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}
# Errors that are the store's answer, not a failed connection: another try gets the same.
ANSWERS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
NETWORK_LIBRARIES = {"aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "google"}
# Object-info keys that change when the object does, best first (S3, GCS, HTTP, local files).
STAMP_KEYS = ("ETag", "etag", "md5Hash", "LastModified", "Last-Modified", "updated", "mtime")


def is_url(text: str) -> bool:
    """Whether `text` is an fsspec URL ("proto://..."), rather than a local path."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text) is not None


def parse_storage_options(text: str) -> dict:
    """The value of --storage-options: a JSON object, passed to the fsspec filesystem."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        value = None
    if not isinstance(value, dict):
        raise UsageError("Expected --storage-options to be a JSON object such as "
                         f"'{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}'; received {clipped(_line(text))!r}")
    return value


def clipped(text: str, most: int = 200) -> str:
    """`text` for a one-line message: at most `most` characters, the rest counted."""
    return text if len(text) <= most else f"{text[:most]}... ({len(text) - most} more characters)"


class Remote:
    """The objects at or below one fsspec URL."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self._is_file: bool | None = None  # learned by `check` (or on first use), then pickled
        self._fs = None
        self._root = ""  # the URL as the filesystem names it (no "s3://"; an HTTP URL whole)

    def __getstate__(self) -> dict:
        return {"url": self.url, "storage_options": self.storage_options, "_is_file": self._is_file}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _fs=None, _root="")

    @property
    def protocol(self) -> str:
        return urlsplit(self.url).scheme.lower() if is_url(self.url) else "file"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem, built on first use (again after unpickling). Its own, not
        fsspec's shared instance: credentials and endpoints are read when it is built."""
        if self._fs is None:
            self._fs, self._root = self._connect(self.storage_options)
        return self._fs

    @property
    def is_file(self) -> bool:
        """Whether the URL names one object (a .tar, a .parquet) rather than a prefix."""
        if self._is_file is None:
            self._is_file = self._names_file(self.fs.info(self._path("")))
        return self._is_file

    def check(self) -> None:
        """Read the location once, within CHECK_SECONDS, before any work; UsageError naming
        what to set when it cannot be read."""
        if self.protocol in PACKAGES and not urlsplit(self.url).netloc:  # "s3://": s3fs would list every bucket
            raise UsageError(f"Expected a URL with a bucket or host (s3://bucket/shards/); received {clipped(self.url)!r}")
        options = dict(self.storage_options)
        if self.protocol in S3:
            options["config_kwargs"] = {**options.get("config_kwargs", {}), **CHECK_BOTOCORE}
        roots: list = []

        def probe() -> dict:
            # The filesystem is made in the probe too: some connect when made (ftp://), with no timeout
            fs, root = self._connect(options)
            roots.append(root)
            if self.protocol in S3:
                fs.retries = 1  # s3fs's own retries of a timed-out request (5), on top of botocore's
            return fs.info(root)

        outcome: list = []
        thread = threading.Thread(target=_capture, args=(probe, outcome), daemon=True)
        thread.start()
        thread.join(CHECK_SECONDS)
        if not outcome:
            raise UsageError(f"No answer from {self._endpoint()} within {CHECK_SECONDS:g} s "
                             f"for {self.url}; {self._endpoint_hint()}")
        info, error = outcome[0]
        if isinstance(error, UsageError):  # `_connect`'s: a package to install, options it refused
            raise error
        if error is not None:
            raise UsageError(self._explain(error, roots[0] if roots else "")) from error
        if info.get("type") not in ("file", "directory"):  # file:// to a FIFO, a socket: "other"
            raise UsageError(f"{self.url} is neither a file nor a folder (fsspec says: {info.get('type')}); "
                             "expected a shard or a folder of them")
        self._is_file = self._names_file(info)

    def list(self) -> list[tuple[str, int, int]]:
        """(path relative to the URL, size, stamp) of every object below it, sorted by path;
        for a URL naming one object, that object under its base name. Hidden names (a part
        starting with ".") and folder markers are left out, as a local folder's are, and so is
        what is no file (`entries` names it)."""
        return [(relative, size, stamp) for relative, size, stamp, error in self.entries() if error is None]

    def entries(self, ignored=None) -> list[tuple[str, int, int, str | None]]:
        """`list` as a local folder's listing gives it (`folder.Folder.entries`), with an error for
        what the filesystem says is no file (type "other": a FIFO or a socket behind a file://
        URL, never opened: it would block); `ignored` (a local cache's files) does not apply."""
        fs = self.fs
        if self.is_file:
            info = fs.info(self._root)
            return [(self._base_name(), int(info["size"]), stamp(info), None)]
        prefix = self._root.rstrip("/") + "/"
        entries = []
        for name, info in fs.find(self._root, detail=True).items():
            relative = name[len(prefix):] if name.startswith(prefix) else ""
            if not relative or relative.endswith("/") or info.get("type") == "directory":
                continue  # outside the URL (an HTTP link elsewhere), or a folder marker
            if any(part.startswith(".") for part in relative.split("/")):
                continue
            if info.get("size") is None:  # an HTTP folder listing gives names only
                info = fs.info(name)
            kind = info.get("type", "file")
            error = None if kind == "file" else f"not a regular file (fsspec says: {kind})"
            entries.append((relative, int(info.get("size") or 0), stamp(info), error))
        return sorted(entries)

    def stat(self, relative: str) -> tuple[int, int]:
        """(size, stamp) of the object at `relative`: what `list` gives, for one object named
        (a brace pattern's shard: an HTTP server need not list its folders)."""
        info = self.fs.info(self._path(relative))
        return int(info["size"]), stamp(info)

    def open(self, relative: str = "") -> BinaryIO:
        """A readable, seekable binary file of the object at `relative` (a path from `list`;
        "" for the URL itself) that re-opens it where it was when a connection drops. A file://
        URL's file is opened as a local one is (`files.open_regular`): without blocking, and
        refused unless regular (fsspec's open of a FIFO waits for a writer for ever)."""
        path = self._path(relative)
        if self.protocol in ("file", "local"):
            return open_regular(path)
        shown = self.url if path == self._root else self.url.rstrip("/") + "/" + relative
        return RetryingFile(lambda: self.fs.open(path, "rb", block_size=BLOCK_SIZE), shown)

    def _path(self, relative: str) -> str:
        self.fs  # sets _root
        if not relative or (relative == self._base_name() and self.is_file):
            return self._root
        return self._root.rstrip("/") + "/" + relative

    def _base_name(self) -> str:
        """The name `list` gives the one object of a URL that names one."""
        return posixpath.basename(self._root.rstrip("/"))

    def _names_file(self, info: dict) -> bool:
        # An HTTP server answers a folder's URL with a page: a trailing "/" says it is a folder.
        return info.get("type") == "file" and not self.url.endswith("/")

    def _connect(self, options: dict):
        try:
            return fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **options)
        except ImportError as error:
            package, extra = PACKAGES.get(self.protocol, (None, None))
            if package is None:
                raise UsageError(f"Reading {self.protocol}:// URLs needs a package fsspec names: {_line(error)}") from error
            raise UsageError(f"Reading {self.protocol}:// URLs needs {package}: "
                             f"pip install 'bottleneck-features[{extra}]'") from error
        except (ValueError, TypeError) as error:
            raise UsageError(f"Cannot read {self.url} with --storage-options "
                             f"{clipped(json.dumps(self.storage_options))} ({clipped(_line(error))})") from error

    def _endpoint(self) -> str:
        """The host a request goes to: the endpoint for object stores, the URL's host otherwise."""
        if self.protocol in S3:
            client = self.storage_options.get("client_kwargs", {})
            return (self.storage_options.get("endpoint_url") or client.get("endpoint_url")
                    or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                    or "AWS S3")
        return urlsplit(self.url).netloc or self.url

    def _endpoint_hint(self) -> str:
        if self.protocol in S3:
            return ("check the endpoint: --storage-options '{\"endpoint_url\": ...}' or "
                    "AWS_ENDPOINT_URL, and the network")
        return "check the host name and port, and the network"

    def _explain(self, error: BaseException, root: str) -> str:
        """One line for a failed check of `root` (the URL as its filesystem names it): what
        went wrong and what to set."""
        names = _class_names(error)
        reason = _line(error)
        if names & NO_CREDENTIALS:
            hint = CREDENTIALS.get(self.protocol, "pass credentials in --storage-options")
            return f"No credentials to read {self.url}: {hint}"
        if names & CONNECTION_ERRORS:
            lost = next(link for link in _chain(error) if _names(link) & CONNECTION_ERRORS)
            return (f"Cannot reach {self._endpoint()} for {self.url} ({_line(lost) or type(lost).__name__}); "
                    f"{self._endpoint_hint()}")
        denied = next((link for link in _chain(error) if isinstance(link, PermissionError)
                       or getattr(link, "status", None) in (401, 403)), None)  # HTTP's answer
        if denied is not None:
            hint = ("check the credentials' permissions on it" if self.protocol in CREDENTIALS
                    else "check that the server lets it be read (a signed URL may have expired)")
            return f"Access denied to {self.url} ({_line(denied)}); {hint}"
        if isinstance(error, FileNotFoundError) and "bucket does not exist" in reason:
            bucket = root.split("/", 1)[0]
            return (f"No bucket '{bucket}' at {self._endpoint()} for {self.url}; "
                    "check the bucket's name and the endpoint (endpoint_url, AWS_ENDPOINT_URL)")
        if isinstance(error, FileNotFoundError):
            return f"Nothing at {self.url}; check the path (a folder's URL lists the objects below it)"
        return f"Cannot read {self.url} ({type(error).__name__}: {clipped(reason)})"


def open_url(url: str, storage_options: dict | None = None) -> BinaryIO:
    """The object at one URL as a file that resumes after a dropped connection."""
    return Remote(url, storage_options).open("")


def stamp(info: dict) -> int:
    """An int64 that changes when the object changes: a stable hash of its ETag (else its
    modification time) into 0..2**62; -1 when the store gives neither."""
    for key in STAMP_KEYS:
        value = info.get(key)
        if value not in (None, ""):
            digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
            return int.from_bytes(digest, "big") >> 2
    return -1


class RetryingFile(io.RawIOBase):
    """A binary file over one object that re-opens it at the offset reached when a read
    fails on the connection, waiting BACKOFF_SECONDS, doubled each time, between tries."""

    def __init__(self, open_file: Callable[[], BinaryIO], url: str):
        super().__init__()
        self._open_file = open_file
        self._url = url
        self._file: BinaryIO | None = None
        self._offset = 0  # the position the caller sees: bytes returned so far, or sought to

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._offset

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            self._offset = self._retrying(lambda file: file.seek(offset, io.SEEK_END))
        else:
            self._offset = offset + (self._offset if whence == io.SEEK_CUR else 0)
        return self._offset

    def read(self, size: int | None = -1) -> bytes:
        size = -1 if size is None else size
        data = self._retrying(lambda file: file.read(size))
        self._offset += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._discard()
        super().close()

    def _retrying(self, action):
        delay = BACKOFF_SECONDS
        for retry in range(RETRIES + 1):
            try:
                if self._file is None:
                    self._file = self._open_file()
                if self._file.tell() != self._offset:
                    self._file.seek(self._offset)  # a range request from here, never byte 0 again
                return action(self._file)
            except Exception as error:
                if not transient(error):
                    raise
                self._discard()
                if retry == RETRIES:
                    raise OSError(f"lost the connection to {self._url} at byte {self._offset} "
                                  f"after {RETRIES} retries: {_line(error)}") from error
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_CAP_SECONDS)

    def _discard(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except Exception:
                pass  # the connection is already gone; nothing of ours is lost


def transient(error: BaseException) -> bool:
    """Whether another try may succeed: the connection failed or dropped (any library's
    error, or an OSError), not the store's answer (missing, denied) nor an interrupt."""
    if _class_names(error) & CONNECTION_ERRORS:
        return True
    if isinstance(error, ANSWERS):
        return False
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in NETWORK_LIBRARIES


def _chain(error: BaseException | None):
    """`error` and the errors it was raised from (its cause, else its context), outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _names(error: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(error).__mro__}


def _class_names(error: BaseException) -> set[str]:
    """The class names of `error`, its bases, and of the errors it was raised from."""
    return set().union(*(_names(link) for link in _chain(error)))


def _capture(call: Callable, outcome: list) -> None:
    """Run `call` in a thread, leaving (result, None) or (None, error) in `outcome`."""
    try:
        outcome.append((call(), None))
    except Exception as error:
        outcome.append((None, error))


def _line(value) -> str:
    return " ".join(str(value).split())
