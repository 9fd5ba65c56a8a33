"""Test servers on loopback addresses, for any test file that reads fsspec URLs.

- `s3_server`: a module-scoped fixture running moto's S3 in a thread on 127.0.0.1 (a free
  port); it yields the endpoint URL. `put_objects` fills a bucket; `s3_env` is the environment
  a subprocess needs to reach it (the test credentials, no metadata service, no config files).
- `http_server(folder)`: a context manager serving a folder over HTTP with Range requests,
  ETag and Last-Modified, dropped connections on demand (`HTTPServer.fail`), so a test can
  watch a reader resume where it was, and 403 Forbidden for the paths in `HTTPServer.denied`.
"""

from __future__ import annotations

import email.utils
import logging
import os
import re
import socket
import threading
from contextlib import contextmanager
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

# What moto needs, and nothing of the machine's own AWS setup: no real credentials, profile or
# endpoint can leak in, and botocore never waits on the EC2 metadata service for credentials.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
S3_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")


def s3_env(endpoint: str | None = None, base: dict | None = None) -> dict:
    """The environment for a subprocess that reads the test S3 server: `base` (os.environ by
    default) with the test credentials, and AWS_ENDPOINT_URL when `endpoint` is given."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in S3_UNSET}
    env.update(S3_ENV)
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """moto's S3 on 127.0.0.1 at a free port, with the test credentials in this process's
    environment while the module runs; yields the endpoint URL ("http://127.0.0.1:PORT")."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    with pytest.MonkeyPatch.context() as patch:
        for name in S3_UNSET:
            patch.delenv(name, raising=False)
        for name, value in S3_ENV.items():
            patch.setenv(name, value)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def put_objects(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    """Create `bucket` at `endpoint` if it is not there, and put each key's bytes in it."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=bucket)
    for key, data in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)


class Request(NamedTuple):
    method: str
    path: str  # relative to the served folder: "a/b.tar"
    start: int | None  # the first byte a Range header asked for; None without one


class HTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that logs each request (`requests`) and drops connections on
    demand (`fail`)."""

    daemon_threads = True

    def __init__(self, address, handler):
        super().__init__(address, handler)
        self.requests: list[Request] = []
        self.denied: set[str] = set()  # paths answered 403 Forbidden
        self._faults: dict[str, list] = {}  # path -> [bytes sent before dropping, requests left or None]
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def fail(self, path: str, after: int, times: int | None = 1) -> None:
        """Drop the connection after `after` bytes of the body of the next `times` GET
        requests of `path` (every one from now on when `times` is None)."""
        with self._lock:
            self._faults[path] = [after, times]

    def _record(self, request: Request) -> int | None:
        """Log a request; the number of body bytes to send before dropping, or None."""
        with self._lock:
            self.requests.append(request)
            fault = self._faults.get(request.path)
            if request.method != "GET" or fault is None:
                return None
            after, times = fault
            if times is not None:
                if times == 0:
                    return None
                fault[1] = times - 1
            return after


class RangeHandler(SimpleHTTPRequestHandler):
    """Files with Range (one range: 206 and Content-Range, 416 past the end), ETag and
    Last-Modified; folders listed as the standard library lists them."""

    timeout = 10  # an idle keep-alive connection closes, so no handler thread outlives a test by long
    protocol_version = "HTTP/1.1"  # keep-alive, as a real server; aiohttp reuses connections

    def log_message(self, format, *args):
        pass

    def send_head(self):
        self._span = None  # (first byte, length) of a file's body; None for a listing
        if self._relative() in self.server.denied:
            self.send_error(HTTPStatus.FORBIDDEN)
            return None
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            return super().send_head()
        try:
            file = open(path, "rb")
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND)
            return None
        stat = os.fstat(file.fileno())
        start, end = 0, stat.st_size - 1
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match and match.group(1):
            start = int(match.group(1))
            end = min(int(match.group(2)), end) if match.group(2) else end
        elif match and match.group(2):
            start = max(0, stat.st_size - int(match.group(2)))
        if match and start >= stat.st_size:
            file.close()
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{stat.st_size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.send_response(HTTPStatus.PARTIAL_CONTENT if match else HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"')
        self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end}/{stat.st_size}")
        self.end_headers()
        self._span = (start, end - start + 1)
        return file

    def _relative(self) -> str:
        return self.path.split("?", 1)[0].lstrip("/")

    def _start(self) -> int | None:
        match = re.fullmatch(r"bytes=(\d*)-\d*", self.headers.get("Range", ""))
        return int(match.group(1)) if match and match.group(1) else None

    def do_GET(self):
        self._drop_after = self.server._record(Request("GET", self._relative(), self._start()))
        super().do_GET()

    def do_HEAD(self):
        self.server._record(Request("HEAD", self._relative(), self._start()))
        super().do_HEAD()

    def copyfile(self, source, outputfile):
        """Send the requested span; when a fault is armed, only its first bytes, then close
        the connection mid-response (the client sees fewer bytes than Content-Length)."""
        if self._span is None:
            return super().copyfile(source, outputfile)
        start, length = self._span
        if self._drop_after is not None:
            length = min(length, self._drop_after)
        source.seek(start)
        while length > 0:
            chunk = source.read(min(length, 64 * 1024))
            if not chunk:
                break
            outputfile.write(chunk)
            length -= len(chunk)
        if self._drop_after is not None:
            outputfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


@contextmanager
def http_server(folder: Path) -> Iterator[HTTPServer]:
    """Serve `folder` on 127.0.0.1 at a free port until the block ends; `server.url` ends in "/"."""
    server = HTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
