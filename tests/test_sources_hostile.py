"""The hostile pass over issue 31's sources (docs/faults.md, "Sources, attacked"): what a
user can hand the commands in place of a data folder or a shard, through the commands."""

import os
import socket
from pathlib import Path

import pytest

from conftest import SIZE, make_image
from helpers import EXTRACT, call, one_line
from extract.errors import UsageError
from extract.sources.folder import walk
from extract.sources.location import open_location
from test_sources import write_tar


def extract(data, cache, *more):
    return call(EXTRACT, str(data), "--cache", str(cache), "--weights", "random", "--input-size", str(SIZE),
                "--pooling", "avg", "--quiet", *more)


def test_a_link_loop_as_data_dir_is_one_line(tmp_path):
    # Path.resolve raised RuntimeError("Symlink loop") out of extract-features: a traceback
    os.symlink("loop.tar", tmp_path / "loop.tar")
    done = extract(tmp_path / "loop.tar", tmp_path / "c.h5")
    one_line(done, 2, "symbolic link loop")
    assert not (tmp_path / "c.h5").exists()


def test_a_fifo_named_as_a_shard_as_data_dir_says_what_it_is(tmp_path):
    os.mkfifo(tmp_path / "x.tar")
    one_line(extract(tmp_path / "x.tar", tmp_path / "c.h5"), 2, "not a regular file (a FIFO)")


def test_a_link_loop_in_a_folder_is_named_a_loop(tmp_path):
    os.symlink("loop.tar", tmp_path / "loop.tar")
    assert [(path, error) for path, _, error in walk(tmp_path)] == [("loop.tar", "cannot read file: symbolic link loop")]


def test_a_fifo_in_a_folder_at_a_file_url_is_a_failure_row_never_opened(tmp_path):
    # fsspec lists it (type "other") and its plain open() of a FIFO blocks for ever: the run hung
    from extract.sources.remote import Remote

    os.mkfifo(tmp_path / "y.parquet")
    (tmp_path / "a.tar").write_bytes(b"")
    entries = Remote(f"file://{tmp_path}").entries()
    assert [(path, error) for path, _, _, error in entries] == [
        ("a.tar", None), ("y.parquet", "not a regular file (fsspec says: other)")]


def test_a_file_url_to_a_fifo_is_refused(tmp_path):
    # was "Found no images" (a FIFO taken for an empty folder)
    os.mkfifo(tmp_path / "x.tar")
    with pytest.raises(UsageError, match="is neither a file nor a folder"):
        open_location(f"file://{tmp_path}/x.tar")


@pytest.mark.parametrize("url", ["s3://", "s3:///x.tar", "https://"])
def test_a_url_without_bucket_or_host_is_refused(url):
    # "s3://" passed the check (s3fs answers its root without a request), then listing it raised
    # ValueError("Cannot traverse all of S3") out of the command
    pytest.importorskip("s3fs")
    pytest.importorskip("aiohttp")
    with pytest.raises(UsageError, match="a bucket or host"):
        open_location(url)


def test_a_filesystem_that_connects_when_made_is_checked_within_the_bound(tmp_path):
    # ftp:// connects in its constructor, which ran outside the bounded check: ConnectionRefusedError traceback
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    done = extract(f"ftp://127.0.0.1:{port}/x.tar", tmp_path / "c.h5")
    one_line(done, 2, f"Cannot reach 127.0.0.1:{port}")


def test_storage_options_nested_too_deep_are_one_short_line(tmp_path):
    # json.loads raised RecursionError: a traceback; and the message quoted all 100,000 characters
    done = extract("s3://bucket/x.tar", tmp_path / "c.h5", "--storage-options", "[" * 100_000)
    assert len(one_line(done, 2, "Expected --storage-options to be a JSON object")) < 500


def test_a_pattern_of_many_names_is_refused_as_it_grows(monkeypatch):
    # the product of ranges was built whole before being counted: {0..999}/{0..999}/{0..9} made
    # ten million names (20 s, about 1 GB) to refuse it at one million
    from extract.sources import location

    calls = []
    expand = location.braces
    monkeypatch.setattr(location, "MAX_EXPANDED", 100)
    monkeypatch.setattr(location, "braces", lambda pattern: calls.append(pattern) or expand(pattern))
    with pytest.raises(UsageError, match="names over 100 shards"):
        location.braces("{0..9}/{0..99}.tar")
    assert len(calls) < 300  # two of the ten first choices, not all ten (1,011 calls)


def test_a_range_of_thousands_of_digits_is_one_line():
    # int() refuses over 4,300 digits: ValueError traceback
    with pytest.raises(UsageError, match="over 18 digits"):
        open_location("{0.." + "9" * 5000 + "}.tar")


def test_a_pattern_that_names_nothing_there_says_so(tmp_path):
    # was "Found no images in ... (layout 'classes')", its folders guessed from the names
    (tmp_path / "a.tar").write_bytes(b"")
    with pytest.raises(UsageError, match=r"None of the 4 files the pattern .* names is there \(first: 'ac/x.tar'\)"):
        open_location(f"{tmp_path}/{{a,b}}{{c,d}}/x.tar").entries()


@pytest.mark.parametrize("option", [("--layout", "splits"), ("--layout", "classes"), ("--labels", "labels.csv")])
def test_a_layout_of_image_files_on_shards_says_what_to_drop(tmp_path, option):
    # was "Found no images ... expected image files ... or shards (.tar, .parquet)" with shards there,
    # or "Found none of the 1 images the labels file names" naming a sample that is there
    write_tar(tmp_path / "d" / "train" / "0.tar", [("cat_0", make_image(tmp_path / "a.png").read_bytes(), "cat")])
    (tmp_path / "labels.csv").write_text("path,label\ntrain/0.tar#cat_0,cat\n")
    value = str(tmp_path / option[1]) if option[0] == "--labels" else option[1]
    done = extract(tmp_path / "d", tmp_path / "c.h5", option[0], value)
    one_line(done, 2, f"{option[0]} {value if option[0] == '--layout' else ''}".strip(), "holds shards (train/0.tar)",
             f"drop {option[0]}")


def _parquet_with(tmp_path, placeholder: bytes, replacement: bytes, **columns) -> Path:
    """A Parquet file (plain pages, no compression) with `placeholder` replaced by
    `replacement` wherever it is: text no writer would let through."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "x.parquet"
    pq.write_table(pa.table(columns), path, compression="none", use_dictionary=False, store_schema=False)
    data = path.read_bytes()
    assert placeholder in data
    path.write_bytes(data.replace(placeholder, replacement))
    return path


def test_a_label_that_is_not_utf8_fails_its_row_only(tmp_path):
    # pyarrow does not check UTF-8 on read: to_pylist raised UnicodeDecodeError for the whole
    # batch, out of the shard's reader (found by flipping each byte of a small file). Now the
    # label keeps its bytes as surrogate escapes, refused where samples are placed
    from extract.layout import place_sample
    from extract.sources import Shard
    from extract.sources.parquet import parquet_samples

    path = _parquet_with(tmp_path, b"Q@Q", b"Q\xffQ", image=[b"a", b"b"], label=["Q@Q", "cat"])
    with open(path, "rb") as file:
        first, second = parquet_samples(file, "x.parquet", 1 << 20)
    assert (first.data, second.data, second.label) == (b"a", b"b", "cat")  # scoring reads both
    shard = Shard("x.parquet", "parquet", 1, 1, "train", True, 20.0)
    assert "holds a character the cache cannot store" in place_sample(shard, first)
    assert place_sample(shard, second) == ("cat", "train")


def test_a_column_name_that_is_not_utf8_is_no_parquet_file(tmp_path):
    from extract.sources.parquet import check_parquet

    path = _parquet_with(tmp_path, b"zzcol", b"zz\xffol", image=[b"a"], zzcol=[1])
    with open(path, "rb") as file, pytest.raises(UsageError, match="not a Parquet file .a column name is not UTF-8"):
        check_parquet(file, "x.parquet")


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_a_compressed_tar_is_decompressed_in_bounded_steps_not_by_tarfile(tmp_path, monkeypatch, mode):
    # tarfile's stream mode decompressed it, copying its whole buffer at each 10 KB step over a
    # skipped member: a 3 GB member of zeros (a 14 MB .tar.gz) took 64 s to pass over (2.6 s now;
    # measured, docs/faults.md). The cost is not asserted: that tarfile no longer decompresses is.
    import tarfile

    from extract.sources.tars import tar_samples

    path = write_tar(tmp_path / "s.tar", [("a", b"x" * 5000, "cat"), ("b", b"y", "dog")])
    with tarfile.open(tmp_path / "c.tar", mode) as out, tarfile.open(path) as tar:
        for member in tar:
            out.addfile(member, tar.extractfile(member))
    kinds = []
    real = tarfile._Stream.__init__
    monkeypatch.setattr(tarfile._Stream, "__init__", lambda self, name, mode, comptype, *rest: (
        kinds.append(comptype), real(self, name, mode, comptype, *rest))[1])
    with open(tmp_path / "c.tar", "rb") as file:
        got = list(tar_samples(file, "c.tar", limit=100))
    assert [(s.key, s.label, s.error is None) for s in got] == [("a", None, False), ("b", "dog", True)]
    assert kinds in ([], ["tar"])  # tarfile, if it reads any of it (tars.py parses plain headers), reads tar bytes


def test_score_images_on_a_file_url_of_a_folder_holding_a_fifo_gives_it_an_error_row(tmp_path):
    # score-images listed the FIFO and opened it through fsspec: it hung for ever
    from extract.sources.location import Paths

    os.mkfifo(tmp_path / "x.tar")
    with pytest.raises(OSError, match="not a regular file"):
        Paths().open(f"file://{tmp_path}/x.tar")


def test_shards_samples_waiting_to_be_decoded_are_bounded_in_bytes(tmp_path, monkeypatch):
    # they were bounded in number only (about 2 x prefetch): a .tar.gz of 12 members of 250 MB
    # peaked at 1.1 GB, and larger valid images decoding slower than the tar is read would hold
    # up to 128 of 256 MiB. The first decodes wait until the reader has read all it will.
    import threading

    from extract import reader
    from extract.sources import Shard
    from extract.sources.folder import Folder

    write_tar(tmp_path / "s.tar", [(f"k{i}", bytes([i]) * 1000, None) for i in range(6)])
    monkeypatch.setattr(reader, "BYTES_IN_FLIGHT", 2500)
    ahead = threading.Event()  # the reader has read every sample, or waits for bytes given back
    produced, finished, outstanding = [], [], []

    class Signalling(threading.Condition):
        def wait(self, timeout=None):
            ahead.set()
            return super().wait(timeout)

    class Watched(reader._Budget):
        def __init__(self, most):
            super().__init__(most)
            self._changed = Signalling()

    def counted(location, shard):
        for item in real_samples(location, shard):
            produced.append(len(item[1] or b""))
            yield item
        ahead.set()

    def gated(image, data, *rest):
        assert ahead.wait(60)
        outstanding.append(sum(produced) - sum(finished))
        try:
            return real_load(image, data, *rest)
        finally:
            finished.append(len(data))

    real_samples, real_load = reader.shard_samples, reader.load_bytes
    monkeypatch.setattr(reader, "_Budget", Watched)
    monkeypatch.setattr(reader, "shard_samples", counted)
    monkeypatch.setattr(reader, "load_bytes", gated)
    shard = Shard("s.tar", "tar", 0, -1, None, False, 0.0)
    loaded = list(reader.load_all(Folder(tmp_path), [shard], SIZE, "bilinear", workers=2))
    assert len(loaded) == 7 and len(finished) == 6
    assert max(outstanding) <= 3000  # two samples held, a third read and waiting (6,000 before)
