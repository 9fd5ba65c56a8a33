"""`--engine ray` over shards: a folder of WebDataset tars on a Ray started by the command,
an s3:// source on a two-node cluster, and score-images over a tar; each equals the local
engine on the same source. As in tests/test_ray_engine.py, the Ray drivers are plain
subprocesses and every Ray a test starts is stopped through Ray's API."""

import json
import os
import subprocess

import pytest

import helpers
from conftest import make_dataset
from servers import put_objects, s3_env, s3_server  # noqa: F401 (a fixture)
from test_ray_engine import TIMEOUT, apart, assert_same, contents, extract, here, on_cluster, summary
from test_sources import tars_of

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]' (make test installs it)")
from ray.cluster_utils import Cluster  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_ray_at_a_time():
    """The Ray test modules take turns (helpers.one_at_a_time), whichever workers run them."""
    with helpers.one_at_a_time("ray"):
        yield


@pytest.fixture(scope="module")
def tars(tmp_path_factory, weights_file):
    """Tars of four images (train/ and validation/ folders give the split, .cls the label),
    one of them truncated; and the local engine's cache of them, with two views per
    training image."""
    root = tmp_path_factory.mktemp("ray-tars")
    make_dataset(root / "data", per_class=5)
    members = tars_of(root / "data", root / "shards", per_tar=4)
    truncated = root / "shards" / "train" / "000001.tar"
    truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size * 2 // 3])
    local = summary(apart(root / "shards", root / "local.h5", weights_file, "--augment", "2"))
    assert local["failed"] == 1 and 0 < local["rows"] < len(members) and local["views"] > 0
    return root / "shards", root / "local.h5", local


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A two-node Ray cluster on this machine, started with the test S3 credentials in its
    environment (the nodes' own, as a real cluster's nodes have theirs)."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def test_a_folder_of_tars_gives_the_local_engines_rows_failures_and_views_and_a_rerun_computes_nothing(
        tars, weights_file, tmp_path):
    shards, local_cache, local = tars
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    done = summary(extract(shards, tmp_path / "ray.h5", weights_file, "--augment", "2", "--engine", "ray", env=env))
    assert (done["rows"], done["failed"], done["views"]) == (local["rows"], local["failed"], local["views"])
    assert (done["computed"], done["views_computed"]) == (local["computed"], local["views_computed"])
    assert_same(tmp_path / "ray.h5", local_cache)
    assert [path for path, _ in contents(tmp_path / "ray.h5")["failures"]] == ["train/000001.tar"]
    again = summary(extract(shards, tmp_path / "ray.h5", weights_file, "--augment", "2", "--engine", "ray", env=env))
    assert (again["computed"], again["views_computed"], again["rows"], again["failed"]) == (0, 0, local["rows"], 1)
    assert_same(tmp_path / "ray.h5", local_cache)


def test_an_s3_source_on_a_two_node_cluster_equals_the_local_engine(tars, s3_server, cluster, weights_file, tmp_path):
    """The issue's done-when: the tars in a bucket, the endpoint in --storage-options, the
    credentials in each node's environment and the driver's, never in the cache."""
    shards, _, _ = tars
    put_objects(s3_server, "ray-tars", {path.relative_to(shards).as_posix(): path.read_bytes()
                                        for path in sorted(shards.rglob("*.tar"))})
    source, options = "s3://ray-tars", json.dumps({"endpoint_url": s3_server})
    local = summary(here(source, tmp_path / "local.h5", weights_file, "--storage-options", options))
    done = summary(extract(source, tmp_path / "ray.h5", weights_file, "--storage-options", options, "--engine", "ray",
                           env=s3_env(base=on_cluster(cluster.address))))
    assert (done["rows"], done["failed"], done["computed"]) == (local["rows"], local["failed"], local["computed"])
    assert local["rows"] > 0 and local["failed"] == 1
    assert_same(tmp_path / "ray.h5", tmp_path / "local.h5")
    cache = b"".join(path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())
    assert b"testing" not in cache  # the test credentials (servers.S3_ENV) are nowhere in the cache


def test_a_node_without_credentials_is_refused_in_one_line_before_the_job(tars, s3_server, cluster, weights_file,
                                                                          tmp_path):
    """The driver's environment does not travel with the tasks: a node started without
    credentials (AWS_ACCESS_KEY_ID empty in its raylet's environment) cannot read the bucket,
    which extract-features and score-images say before any work."""
    shards, local_cache, _ = tars
    from classify import train_head

    train_head(local_cache, head="logreg", out=tmp_path / "head")
    put_objects(s3_server, "ray-nocreds", {"a.tar": (shards / "validation" / "000000.tar").read_bytes()})
    options, env = json.dumps({"endpoint_url": s3_server}), s3_env(base=on_cluster(cluster.address))
    node = cluster.add_node(num_cpus=1, env_vars={"AWS_ACCESS_KEY_ID": ""})
    try:
        done = extract("s3://ray-nocreds", tmp_path / "c.h5", weights_file, "--storage-options", options,
                       "--engine", "ray", env=env)
        scored = subprocess.run(helpers.command_line(
            helpers.SCORE, "s3://ray-nocreds/a.tar", "--head", str(tmp_path / "head"), "--weights", str(weights_file),
            "--storage-options", options, "--engine", "ray"), capture_output=True, text=True, timeout=TIMEOUT, env=env)
    finally:
        cluster.remove_node(node)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("extract-features: error: On Ray node ") and "No credentials" in done.stderr
    assert scored.returncode == 2 and scored.stderr.count("\n") == 1, scored.stderr
    assert "On Ray node " in scored.stderr and "No credentials" in scored.stderr


def test_score_images_on_ray_gives_a_row_per_sample_in_input_order(tars, s3_server, cluster, weights_file, tmp_path):
    """A local tar, a truncated one (its samples, then a row for the rest) and a tar by URL."""
    shards, local_cache, _ = tars
    from classify import train_head

    train_head(local_cache, head="logreg", out=tmp_path / "head")
    put_objects(s3_server, "ray-score", {"000000.tar": (shards / "validation" / "000000.tar").read_bytes()})
    inputs = [str(shards / "train" / "000001.tar"), str(shards / "train" / "000000.tar"), "s3://ray-score/000000.tar"]
    options = [*inputs, "--head", str(tmp_path / "head"), "--weights", str(weights_file), "--format", "jsonl",
               "--quiet", "--storage-options", json.dumps({"endpoint_url": s3_server})]

    def rows(done):
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    local = rows(helpers.call(helpers.SCORE, *options))
    remote = rows(subprocess.run(helpers.command_line(helpers.SCORE, *options, "--engine", "ray"), capture_output=True,
                                 text=True, timeout=TIMEOUT, env=s3_env(base=on_cluster(cluster.address))))
    assert [row["path"] for row in remote] == [row["path"] for row in local]
    assert [row["status"] for row in remote] == [row["status"] for row in local]
    paths = [row["path"] for row in remote]
    assert paths[0].startswith(inputs[0] + "#") and inputs[0] in paths  # samples, then the rest of the truncated tar
    assert paths[-1].startswith("s3://ray-score/000000.tar#") and len(paths) > 8
    for got, expected in zip(remote, local):
        assert got["label"] == expected["label"]
        if expected["probability"] is not None:
            assert got["probability"] == pytest.approx(expected["probability"], abs=1e-5)
