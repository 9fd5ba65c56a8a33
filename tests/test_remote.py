"""extract/sources/remote.py against moto's S3 and a local HTTP server (tests/servers.py)."""

import importlib.util
import os
import pickle
import socket
import subprocess
import sys
from contextlib import closing

import pytest

from extract.errors import UsageError
from extract.sources import remote
from extract.sources.remote import Remote, is_url, open_url, parse_storage_options
from servers import http_server, put_objects, s3_env, s3_server  # noqa: F401 (a fixture)

DATA = os.urandom(300_000)


@pytest.fixture
def fast_retries(monkeypatch):
    """Reads retry at once, and fetch 64 KiB at a time, so a 300 kB file takes several requests."""
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.001)
    monkeypatch.setattr(remote, "BLOCK_SIZE", 64 * 1024)


@pytest.fixture
def served(tmp_path):
    (tmp_path / "f.bin").write_bytes(DATA)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "g.tar").write_bytes(b"g" * 10)
    (tmp_path / ".hidden").write_bytes(b"h")
    with http_server(tmp_path) as server:
        yield server


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_line_error(call) -> str:
    with pytest.raises(UsageError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_is_url():
    assert all(map(is_url, ["s3://b/k", "gs://b", "gcs://b", "https://h/x.tar", "file:///tmp/a", "abc+d://x"]))
    assert not any(map(is_url, ["/tmp/a", "images", "C:\\data", "s3:/b", "://x"]))


def test_storage_options_are_a_json_object():
    assert parse_storage_options('{"endpoint_url": "http://127.0.0.1:9000", "anon": true}') == {
        "endpoint_url": "http://127.0.0.1:9000", "anon": True}
    for bad in ['["anon"]', "anon=true", "", "{'anon': true}"]:
        message = one_line_error(lambda: parse_storage_options(bad))
        assert message.startswith("Expected --storage-options to be a JSON object such as")
        assert f"received {bad!r}" in message


def test_file_url_lists_a_local_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.png").write_bytes(b"png")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_bytes(b"ref")
    location = Remote(f"file://{tmp_path}")
    location.check()
    [(path, size, stamp)] = location.list()
    assert (path, size) == ("a/1.png", 3) and stamp >= 0
    assert location.open(path).read() == b"png"


# S3 through moto

def test_s3_prefix_lists_and_reads_every_object(s3_server):
    objects = {"data/b.tar": b"b" * 7, "data/a/1.png": b"png", "data/.cache/x": b"x",
               "data/a/.DS_Store": b"d", "data/folder/": b"", "other/c.tar": b"c"}
    put_objects(s3_server, "listing", objects)
    location = Remote("s3://listing/data", {"endpoint_url": s3_server})
    location.check()
    assert not location.is_file
    entries = location.list()
    assert [(path, size) for path, size, _ in entries] == [("a/1.png", 3), ("b.tar", 7)]
    assert all(0 <= stamp < 2**62 for _, _, stamp in entries)
    for path, _, _ in entries:
        with location.open(path) as file:
            assert file.read() == objects[f"data/{path}"]


def test_s3_stamp_changes_when_an_object_is_replaced(s3_server):
    put_objects(s3_server, "stamps", {"x/a.tar": b"first", "x/b.tar": b"same"})
    location = Remote("s3://stamps/x/", {"endpoint_url": s3_server})
    before = dict((path, stamp) for path, _, stamp in location.list())
    put_objects(s3_server, "stamps", {"x/a.tar": b"secnd"})
    after = dict((path, stamp) for path, _, stamp in location.list())
    assert after["a.tar"] != before["a.tar"]
    assert after["b.tar"] == before["b.tar"]


def test_s3_url_naming_one_object(s3_server):
    put_objects(s3_server, "single", {"shards/000001.tar": DATA})
    url = "s3://single/shards/000001.tar"
    location = Remote(url, {"endpoint_url": s3_server})
    location.check()
    assert location.is_file
    [(name, size, stamp)] = location.list()
    assert (name, size) == ("000001.tar", len(DATA)) and stamp >= 0
    with location.open(name) as file:
        file.seek(1000)
        assert file.read(10) == DATA[1000:1010]
    with open_url(url, {"endpoint_url": s3_server}) as file:
        assert file.read() == DATA


def test_s3_endpoint_from_the_environment(s3_server, monkeypatch):
    put_objects(s3_server, "environ", {"k/a.png": b"a"})
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    location = Remote("s3://environ/k")
    location.check()
    assert [path for path, _, _ in location.list()] == ["a.png"]


def test_s3_missing_credentials(s3_server, monkeypatch):
    put_objects(s3_server, "creds", {"k/a.png": b"a"})
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    message = one_line_error(Remote("s3://creds/k", {"endpoint_url": s3_server}).check)
    assert message == ("No credentials to read s3://creds/k: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                       "(or AWS_PROFILE), or pass --storage-options '{\"anon\": true}' for a public bucket")


def test_s3_closed_port(s3_server):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    message = one_line_error(Remote("s3://bucket/k", {"endpoint_url": endpoint}).check)
    assert message.startswith(f"Cannot reach {endpoint} for s3://bucket/k (")
    assert "AWS_ENDPOINT_URL" in message


def test_s3_missing_bucket(s3_server):
    message = one_line_error(Remote("s3://no-such-bucket/k", {"endpoint_url": s3_server}).check)
    assert message.startswith(f"No bucket 'no-such-bucket' at {s3_server} for s3://no-such-bucket/k;")


def test_s3_nothing_at_the_url(s3_server):
    put_objects(s3_server, "empty", {"k/a.png": b"a"})
    message = one_line_error(Remote("s3://empty/nothing", {"endpoint_url": s3_server}).check)
    assert message.startswith("Nothing at s3://empty/nothing;")


def test_remote_pickles_without_its_filesystem(s3_server):
    put_objects(s3_server, "pickled", {"p/a.tar": b"aaa", "p/b.tar": b"bb"})
    location = Remote("s3://pickled/p", {"endpoint_url": s3_server})
    location.check()
    entries = location.list()
    copy = pickle.loads(pickle.dumps(location))
    assert copy._fs is None and copy.is_file is False
    assert copy.url == location.url and copy.storage_options == location.storage_options
    assert copy.list() == entries
    assert copy.open("b.tar").read() == b"bb"


def test_a_subprocess_reaches_the_server_through_s3_env(s3_server):
    put_objects(s3_server, "subprocess", {"k/a.tar": b"abc"})
    script = "from extract.sources.remote import Remote; print(Remote('s3://subprocess/k').list()[0][:2])"
    done = subprocess.run([sys.executable, "-c", script], env=s3_env(s3_server),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "('a.tar', 3)", done.stderr


# HTTP through tests/servers.py

def test_http_url_naming_one_file(served):
    location = Remote(served.url + "f.bin")
    location.check()
    assert location.is_file
    [(name, size, stamp)] = location.list()
    assert (name, size) == ("f.bin", len(DATA)) and stamp >= 0


def test_http_folder_lists_its_files(served):
    location = Remote(served.url)
    location.check()
    assert [(path, size) for path, size, _ in location.list()] == [("f.bin", len(DATA)), ("sub/g.tar", 10)]


def test_http_open_seek_read(served, fast_retries):
    with Remote(served.url + "f.bin").open() as file:
        assert file.seekable()
        file.seek(200_000)
        assert file.read(1000) == DATA[200_000:201_000]
        assert file.tell() == 201_000
        assert file.seek(-10, os.SEEK_END) == len(DATA) - 10
        assert file.read() == DATA[-10:]
        file.seek(0)
        assert file.read() == DATA


def test_http_dropped_connection_resumes_at_the_offset(served, fast_retries):
    with open_url(served.url + "f.bin") as file:
        head = file.read(100_000)
        served.fail("f.bin", after=1000, times=1)
        armed = len(served.requests)
        tail = file.read()
    assert head + tail == DATA
    gets = [r.start for r in served.requests[armed:] if r.method == "GET"]
    assert len(gets) >= 2  # the dropped request, then the resumed one
    assert gets[1] == 100_000  # resumed where the reader was
    assert 0 not in gets


def test_http_dropped_every_time_fails_after_the_retries(served, fast_retries):
    url = served.url + "f.bin"
    with open_url(url) as file:
        file.read(100_000)
        served.fail("f.bin", after=10, times=None)
        armed = len(served.requests)
        with pytest.raises(OSError) as caught:
            file.read()
    assert str(caught.value).startswith(f"lost the connection to {url} at byte 100000 after 5 retries: ")
    assert len([r for r in served.requests[armed:] if r.method == "GET"]) == remote.RETRIES + 1


def test_http_missing_file_is_not_retried(served, fast_retries):
    with pytest.raises(FileNotFoundError):
        open_url(served.url + "nope.tar").read()
    assert all(r.path == "nope.tar" for r in served.requests) and len(served.requests) <= 2
    message = one_line_error(Remote(served.url + "nope.tar").check)
    assert message.startswith(f"Nothing at {served.url}nope.tar;")


def test_http_access_denied(served):
    served.denied.add("f.bin")
    message = one_line_error(Remote(served.url + "f.bin").check)
    assert message.startswith(f"Access denied to {served.url}f.bin (")


def test_http_closed_port():
    host = f"127.0.0.1:{closed_port()}"
    message = one_line_error(Remote(f"http://{host}/a.tar").check)
    assert message.startswith(f"Cannot reach {host} for http://{host}/a.tar (")


def test_check_is_bounded_when_the_host_never_answers(monkeypatch):
    monkeypatch.setattr(remote, "CHECK_SECONDS", 0.5)
    with closing(socket.socket()) as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        message = one_line_error(Remote(f"http://{host}/a.tar").check)
    assert message.startswith(f"No answer from {host} within 0.5 s for http://{host}/a.tar;")


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_missing_package_names_the_extra():
    message = one_line_error(Remote("gs://bucket/shards").check)
    assert message == "Reading gs:// URLs needs gcsfs: pip install 'bottleneck-features[gcs]'"
