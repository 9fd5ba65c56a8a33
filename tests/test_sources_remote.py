"""Shards at URLs, end to end through the commands: an S3-compatible server (moto, on
loopback) read through s3fs exactly as a real bucket would be, and the standard library's
HTTP server, which drops connections on demand. Scoring a tar, locally and at a URL."""

import csv
import io
import json

import numpy as np
import pytest

import helpers
from conftest import SIZE, make_dataset
from extract import FeatureCache
from extract.sources import remote
from servers import http_server, put_objects, s3_env, s3_server  # noqa: F401  (s3_server: a fixture)
from test_sources import tars_of

pytest.importorskip("s3fs", reason="s3:// needs the s3 extra (make test installs it)")


def arguments(data, cache, weights_file, *extra) -> list[str]:
    return [str(data), "--cache", str(cache), "--weights", str(weights_file), "--input-size", str(SIZE),
            "--pooling", "avg", "--json", *map(str, extra)]


def extract(data, cache, weights_file, *extra, env=None):
    done = helpers.run(helpers.EXTRACT, *arguments(data, cache, weights_file, *extra), env=env)
    return done


def summary_of(done) -> dict:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def by_content(cache) -> dict:
    with FeatureCache(cache) as opened:
        return {sha256: (path, label, split, feature) for path, label, split, sha256, feature in
                zip(opened.paths(), opened.labels(), opened.splits(), opened.sha256(), opened.features())}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Tars of a small data set (train/ and validation/ folders), and the data set itself."""
    root = tmp_path_factory.mktemp("shards")
    make_dataset(root / "data", per_class=4)
    members = tars_of(root / "data", root / "shards", per_tar=4)
    return root, members


@pytest.fixture(scope="module")
def local(shards, weights_file):
    """The local tars extracted: what every URL must give."""
    root, _ = shards
    done = extract(root / "shards", root / "local.h5", weights_file)
    summary_of(done)
    return by_content(root / "local.h5")


def assert_same_as_local(cache, local) -> None:
    got = by_content(cache)
    assert got.keys() == local.keys()
    for sha256, (path, label, split, feature) in got.items():
        assert (path, label, split) == local[sha256][:3]
        np.testing.assert_array_equal(feature, local[sha256][3])


def test_s3_prefix_with_the_endpoint_in_storage_options(s3_server, shards, local, weights_file, tmp_path):
    root, _ = shards
    put_objects(s3_server, "bucket", {f"set/{path.relative_to(root / 'shards').as_posix()}": path.read_bytes()
                                      for path in (root / "shards").rglob("*.tar")})
    options = json.dumps({"endpoint_url": s3_server})
    first = summary_of(extract("s3://bucket/set/", tmp_path / "s3.h5", weights_file, "--storage-options", options,
                               env=s3_env()))
    assert first["data_dir"] == "s3://bucket/set" and first["failed"] == 0 and first["layout"] == "shards"
    assert_same_as_local(tmp_path / "s3.h5", local)
    again = summary_of(extract("s3://bucket/set", tmp_path / "s3.h5", weights_file, env=s3_env(s3_server)))
    assert (again["computed"], again["unchanged"]) == (0, first["rows"])  # the endpoint from AWS_ENDPOINT_URL


def test_s3_without_credentials_is_one_line_before_any_work(s3_server, weights_file, tmp_path):
    env = s3_env(s3_server)
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    done = extract("s3://bucket/set/", tmp_path / "c.h5", weights_file, env=env)
    assert done.returncode == 2 and "AWS_ACCESS_KEY_ID" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "c.h5").exists()


def test_s3_parquet_and_a_brace_pattern(s3_server, shards, weights_file, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, members = shards
    paths = sorted(members)
    objects = {}
    for number in range(2):
        chunk = paths[number::2]
        table = pa.table({"image": [{"bytes": members[path], "path": path} for path in chunk],
                          "label": [path.split("#")[1].split("_")[0] for path in chunk]})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        objects[f"pq/part-{number:05d}.parquet"] = sink.getvalue()
    put_objects(s3_server, "bucket", objects)
    done = summary_of(extract("s3://bucket/pq/part-{00000..00001}.parquet", tmp_path / "pq.h5", weights_file,
                              "--storage-options", json.dumps({"endpoint_url": s3_server}), env=s3_env()))
    assert done["rows"] == len(members) and done["failed"] == 0 and done["data_dir"] == "s3://bucket/pq"
    with FeatureCache(tmp_path / "pq.h5") as cache:
        assert "pq/part-00000.parquet#0" not in cache.paths() and "part-00000.parquet#0" in cache.paths()
        assert set(cache.labels()) == {"cat", "dog"}


def test_http_connection_dropped_mid_shard_is_resumed(shards, local, weights_file, tmp_path):
    root, _ = shards
    with http_server(root / "shards") as server:
        server.fail("train/000000.tar", after=3000, times=2)  # twice: the reader opens it again (test_remote: at its offset)
        done = summary_of(extract(server.url + "train/000000.tar", tmp_path / "h.h5", weights_file))
        assert done["failed"] == 0 and done["rows"] == 4
        reads = [request for request in server.requests if request.method == "GET"]
        assert len(reads) == 3, server.requests


def test_http_connection_lost_for_good_fails_the_rest_then_a_rerun_reads_only_that_shard(
        shards, weights_file, tmp_path, monkeypatch):
    root, members = shards
    with http_server(root) as server:
        pattern = server.url + "shards/train/{000000..000001}.tar"
        server.fail("shards/train/000001.tar", after=5000, times=None)
        monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.01)  # in this process (helpers.call): the retries, quick
        done = summary_of(helpers.call(helpers.EXTRACT, *arguments(pattern, tmp_path / "h.h5", weights_file)))
        failures = dict(map(tuple, done["failures"]))
        assert list(failures) == ["000001.tar"] and server.url in failures["000001.tar"]
        train = sum(path.startswith("train/") for path in members)
        kept = done["rows"]
        assert 4 <= kept < train
        server.fail("shards/train/000001.tar", after=0, times=0)  # the network is back
        server.requests.clear()
        again = summary_of(extract(pattern, tmp_path / "h.h5", weights_file))
        assert again["failed"] == 0 and again["rows"] == train and again["computed"] == train - kept
        assert {request.path for request in server.requests if request.method == "GET"} == {"shards/train/000001.tar"}


@pytest.fixture(scope="module")
def head(shards, tmp_path_factory, weights_file):
    """A logreg head trained on the tars' cache."""
    from classify import train_head

    root, _ = shards
    folder = tmp_path_factory.mktemp("head")
    summary_of(extract(root / "shards", folder / "c.h5", weights_file))
    train_head(folder / "c.h5", "logreg", out=folder / "head")
    return folder / "head"


def test_score_images_on_a_tar_gives_a_row_per_sample_as_the_images_do(shards, head, tmp_path):
    root, members = shards
    tar = root / "shards" / "train" / "000000.tar"
    from_tar = helpers.run(helpers.SCORE, tar, "--head", head, "--output", tmp_path / "tar.csv", "--quiet")
    assert from_tar.returncode == 0, from_tar.stderr
    rows = list(csv.DictReader((tmp_path / "tar.csv").open()))
    keys = [path.split("#")[1] for path in sorted(members) if path.startswith("train/000000.tar#")]
    assert [row["path"] for row in rows] == [f"{tar}#{key}" for key in keys]
    images = [root / "data" / "train" / key.split("_")[0] / f"{key.split('_')[1]}.png" for key in keys]
    from_files = helpers.run(helpers.SCORE, *images, "--head", head, "--output", tmp_path / "files.csv", "--quiet")
    assert from_files.returncode == 0, from_files.stderr
    expected = list(csv.DictReader((tmp_path / "files.csv").open()))
    assert [(row["label"], row["probability"]) for row in rows] == [(row["label"], row["probability"]) for row in expected]


def test_score_images_on_a_tar_at_a_url(shards, head, tmp_path):
    root, members = shards
    with http_server(root / "shards") as server:
        done = helpers.run(helpers.SCORE, server.url + "validation/000000.tar", "--head", head, "--output",
                           tmp_path / "s.csv", "--quiet")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert len(rows) == sum(path.startswith("validation/000000.tar#") for path in members)
    assert all(row["status"] == "ok" and row["path"].startswith(server.url) for row in rows)
