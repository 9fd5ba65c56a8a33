"""`--engine ray`: a Ray started by the command itself, and a real two-node cluster started
by Ray's own test harness; the features, failures and views equal the local engine's, from
a folder, from a folder of tars, and from an s3:// source (moto's server on loopback).
Every Ray a test starts is stopped through Ray's API (the command's own `ray.shutdown`,
the fixture's `cluster.shutdown()`). The Ray drivers are plain subprocesses; the local
engine's references run in this process (`here`), or forked (`apart`) where a FIFO is read."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import helpers
from conftest import SIZE, make_dataset, make_image
from extract import FeatureCache
from extract.cluster import _probe
from servers import put_objects, s3_env, s3_server  # noqa: F401 (s3_server: a fixture)
from test_sources import tars_of

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]' (make test installs it)")
from ray.cluster_utils import Cluster  # noqa: E402

TIMEOUT = 300


def arguments(data, cache, weights_file, *extra) -> list[str]:
    return [str(data), "--cache", str(cache), "--weights", str(weights_file), "--input-size", str(SIZE),
            "--pooling", "avg", "--json", *map(str, extra)]


def extract(data, cache, weights_file, *extra, env=None, driver=""):
    """The command in a plain subprocess (a Ray driver), after the Python code `driver`."""
    return subprocess.run(helpers.command_line(helpers.EXTRACT, *arguments(data, cache, weights_file, *extra), setup=driver),
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)


def here(data, cache, weights_file, *extra):
    """The local engine, main() in this process."""
    return helpers.call(helpers.EXTRACT, *arguments(data, cache, weights_file, *extra))


def apart(data, cache, weights_file, *extra):
    """The local engine in a process of its own (forked warm), ended after TIMEOUT."""
    return helpers.run(helpers.EXTRACT, *arguments(data, cache, weights_file, *extra), timeout=TIMEOUT)


def summary(done) -> dict:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def on_cluster(address: str) -> dict:
    return dict(os.environ, RAY_ADDRESS=address)


def contents(cache: Path) -> dict:
    """Everything a cache says of its configuration: rows (path -> sha256, label, split,
    features), failures, and the views (sha256, view -> features)."""
    with FeatureCache(cache) as opened:
        rows = {
            str(path): (sha256, str(label), str(split), feature)
            for path, sha256, label, split, feature in zip(
                opened.paths(), opened.sha256(), opened.labels(), opened.splits(), opened.features())
        }
        views = opened.views()
        hashes = opened.sha256()
        by_view = {} if views is None else {
            (hashes[row], int(view)): feature for row, view, feature in zip(views.row, views.view, views.features)
        }
        return {"rows": rows, "failures": sorted(map(tuple, opened.failures())), "views": by_view}


def assert_same(ray_cache: Path, local_cache: Path) -> None:
    got, expected = contents(ray_cache), contents(local_cache)
    assert got["failures"] == expected["failures"]
    assert got["rows"].keys() == expected["rows"].keys()
    for path, (sha256, label, split, feature) in expected["rows"].items():
        assert got["rows"][path][:3] == (sha256, label, split), path
        np.testing.assert_allclose(got["rows"][path][3], feature, rtol=1e-5, atol=1e-6, err_msg=path)
    assert got["views"].keys() == expected["views"].keys()
    for key, feature in expected["views"].items():
        np.testing.assert_allclose(got["views"][key], feature, rtol=1e-5, atol=1e-6, err_msg=str(key))


@pytest.fixture(scope="module")
def hostile_data(tmp_path_factory, weights_file):
    """Images with a corrupt one, a FIFO named like an image and a copy of another image's
    content; and the local engine's cache of them, with two views per training image."""
    root = tmp_path_factory.mktemp("ray")
    data = root / "data"
    make_dataset(data, per_class=6)
    (data / "train" / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    os.mkfifo(data / "train" / "dog" / "pipe.jpg")
    (data / "validation" / "dog" / "copy.png").write_bytes((data / "train" / "cat" / "0.png").read_bytes())
    local = summary(apart(data, root / "local.h5", weights_file, "--augment", "2"))
    assert local["failed"] == 2 and local["views"] > 0
    return data, root / "local.h5", local


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A real two-node Ray cluster on this machine (a head and one more node, one CPU each),
    started with the test S3 server's credentials in its environment (the nodes' own, as a
    real cluster's nodes have theirs: the driver's do not travel with the tasks)."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def test_a_ray_started_here_gives_the_local_engines_features_failures_and_views(hostile_data, weights_file, tmp_path):
    data, local_cache, local = hostile_data
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    done = summary(extract(data, tmp_path / "ray.h5", weights_file, "--augment", "2", "--engine", "ray", env=env))
    assert (done["rows"], done["failed"], done["views"]) == (local["rows"], local["failed"], local["views"])
    # The copy's content may go through VGG16 twice (its reads are in different tasks), stored once.
    assert local["computed"] <= done["computed"] <= local["computed"] + 1
    assert done["views_computed"] == local["views_computed"]
    assert (done["device"], done["engine"], local["engine"]) == ("CPU", "ray", "local")
    assert done["backend"] == local["backend"] == "tensorflow"
    assert_same(tmp_path / "ray.h5", local_cache)


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


def test_a_two_node_cluster_gives_the_same_and_a_rerun_computes_nothing(hostile_data, weights_file, cluster, tmp_path):
    data, local_cache, local = hostile_data
    env = on_cluster(cluster.address)
    first = summary(extract(data, tmp_path / "ray.h5", weights_file, "--augment", "2", "--engine", "ray", env=env))
    assert first["rows"] == local["rows"] and first["failed"] == 2
    assert_same(tmp_path / "ray.h5", local_cache)
    again = summary(extract(data, tmp_path / "ray.h5", weights_file, "--engine", "ray", env=env))
    assert (again["computed"], again["views_computed"], again["rows"]) == (0, 0, local["rows"])
    assert_same(tmp_path / "ray.h5", local_cache)


def test_a_layers_maps_on_the_cluster_are_the_local_engines(hostile_data, weights_file, cluster, tmp_path):
    data, _, _ = hostile_data
    maps = ("--layer", "block4_pool", "--pooling", "none", "--dtype", "float16", "--augment", "2")  # after arguments' avg
    local = summary(apart(data, tmp_path / "local.h5", weights_file, *maps))
    done = summary(extract(data, tmp_path / "ray.h5", weights_file, *maps, "--engine", "ray",
                           env=on_cluster(cluster.address)))
    assert (done["rows"], done["views"], done["feature_shape"]) == (local["rows"], local["views"], [2, 2, 512])
    assert_same(tmp_path / "ray.h5", tmp_path / "local.h5")


def test_the_driver_killed_mid_job_leaves_shards_the_next_run_adopts(weights_file, cluster, tmp_path):
    """Shards of four rows (set in the driver's process), the driver killed once two
    exist; the next run, with the local engine, computes only what no complete shard holds
    and ends with the features of an uninterrupted run."""
    data = tmp_path / "data"
    for i in range(40):
        make_image(data / f"{i:02d}.png", seed=i)
    reference = summary(here(data, tmp_path / "reference.h5", weights_file))
    shards = tmp_path / "c.h5.shards"
    arguments = [str(data), "--cache", str(tmp_path / "c.h5"), "--weights", str(weights_file), "--input-size",
                 str(SIZE), "--pooling", "avg", "--engine", "ray", "--batch-size", "4", "--quiet"]
    small_shards = "import extract.ray_engine as engine; engine.SHARD_ROWS = 4; "
    process = subprocess.Popen(helpers.command_line(helpers.EXTRACT, *arguments, setup=small_shards),
                               env=on_cluster(cluster.address), stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    while len(helpers.listing(shards, "*/*.h5")) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    written = len(helpers.listing(shards, "*/*.h5"))
    assert written >= 2
    rerun = summary(here(data, tmp_path / "c.h5", weights_file))
    assert rerun["computed"] <= 40 - 8 and rerun["rows"] == 40
    assert_same(tmp_path / "c.h5", tmp_path / "reference.h5")
    assert reference["rows"] == 40


def test_a_backbone_worker_killed_mid_batch_is_retried_and_the_features_are_the_same(weights_file, cluster,
                                                                                      tmp_path):
    """Fault injection: the actor's worker process (its title names the job's Forward actor
    and the batch it is computing) SIGKILLed once; Ray restarts it and retries the batch."""
    data = tmp_path / "data"
    for i in range(60):
        make_image(data / f"{i:02d}.png", seed=i)
    reference = summary(here(data, tmp_path / "reference.h5", weights_file))
    process = subprocess.Popen(
        [sys.executable, "-m", "extract.cli", str(data), "--cache", str(tmp_path / "c.h5"), "--weights",
         str(weights_file), "--input-size", str(SIZE), "--pooling", "avg", "--engine", "ray", "--batch-size", "2",
         "--json"], env=on_cluster(cluster.address), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.monotonic() + TIMEOUT
    while killed is None and process.poll() is None and time.monotonic() < deadline:
        listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
        working = [line.split()[0] for line in listing.splitlines()
                   if "ray::MapWorker(MapBatches(Forward)).submit" in line]
        if working:
            killed = subprocess.run(["kill", "-9", working[0]]).returncode == 0
        time.sleep(0.1)
    out, err = process.communicate(timeout=TIMEOUT)
    assert killed, "the run ended before its backbone worker could be killed"
    assert process.returncode == 0, err
    done = json.loads(out)  # stdout holds only the summary, whatever Ray says of the dead worker
    assert done["rows"] == reference["rows"] == 60 and done["failed"] == 0
    assert_same(tmp_path / "c.h5", tmp_path / "reference.h5")


def test_ctrl_c_stops_the_job_in_one_line_and_keeps_what_is_done(weights_file, cluster, tmp_path):
    data = tmp_path / "data"
    for i in range(40):
        make_image(data / f"{i:02d}.png", seed=i)
    arguments = [str(data), "--cache", str(tmp_path / "c.h5"), "--weights", str(weights_file), "--input-size",
                 str(SIZE), "--pooling", "avg", "--engine", "ray", "--batch-size", "4", "--quiet"]
    process = subprocess.Popen([sys.executable, "-m", "extract.cli", *arguments], env=on_cluster(cluster.address),
                               stderr=subprocess.PIPE, text=True, preexec_fn=helpers.interruptible)
    deadline = time.monotonic() + TIMEOUT
    while not (tmp_path / "c.h5.shards").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 130, err
    # Ray's own native log line when the actor pool started before the signal (docs/scale-out.md: ray#53727)
    ours = [line for line in err.splitlines() if not re.match(r"\[\d{4}-\d\d-\d\d [\d:,]+ [IWE] \d+ \d+\] core_worker", line)]
    assert len(ours) == 1 and "interrupted" in ours[0], err
    finished = summary(here(data, tmp_path / "c.h5", weights_file))
    assert finished["rows"] == 40


def test_sigterm_while_ray_starts_is_a_clean_stop_not_rays_stack_dump(dataset, weights_file, tmp_path):
    """Ray's native code replaces SIGTERM's handler when imported and started; the command
    keeps its own (a scheduler's stop commits and exits 130 in one line)."""
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    process = subprocess.Popen(
        [sys.executable, "-m", "extract.cli", str(dataset), "--cache", str(tmp_path / "c.h5"), "--weights",
         str(weights_file), "--input-size", str(SIZE), "--engine", "ray", "--quiet"],
        env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(2)  # importing or starting Ray, on this machine
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 130, err
    # Ray's own native log line when the actor pool started before the signal (docs/scale-out.md: ray#53727)
    ours = [line for line in err.splitlines() if not re.match(r"\[\d{4}-\d\d-\d\d [\d:,]+ [IWE] \d+ \d+\] core_worker", line)]
    assert len(ours) == 1 and "interrupted" in ours[0], err


def test_score_images_on_ray_gives_the_local_rows_in_input_order(hostile_data, weights_file, cluster, tmp_path):
    data, local_cache, _ = hostile_data
    from classify import train_head

    train_head(local_cache, head="logreg", out=tmp_path / "head")
    inputs = [str(path) for path in sorted(data.rglob("*.png"))][::-1] + [str(data / "train" / "dog" / "pipe.jpg")]

    options = [*inputs, "--head", str(tmp_path / "head"), "--weights", str(weights_file), "--format", "jsonl", "--quiet"]

    def rows(done):
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    local = rows(helpers.run(helpers.SCORE, *options, timeout=TIMEOUT))  # forked: the inputs hold a FIFO
    remote = rows(subprocess.run(helpers.command_line(helpers.SCORE, *options, "--engine", "ray"), capture_output=True,
                                 text=True, timeout=TIMEOUT, env=on_cluster(cluster.address)))
    assert [row["path"] for row in remote] == inputs == [row["path"] for row in local]
    assert [row["status"] for row in remote] == [row["status"] for row in local]
    assert sum(row["status"] == "error" for row in remote) == 2  # the corrupt image and the FIFO
    for got, expected in zip(remote, local):
        assert got["label"] == expected["label"]
        if expected["probability"] is not None:
            assert got["probability"] == pytest.approx(expected["probability"], abs=1e-5)


def test_wrong_weights_more_actors_than_the_cluster_holds_and_an_address_nobody_answers_are_one_line(dataset, weights_file,
                                                                                        cluster, tmp_path):
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as file:  # an HDF5 file, not VGG16's weights
        file["x"] = 1
    done = extract(dataset, tmp_path / "c.h5", tmp_path / "other.h5", "--engine", "ray", env=on_cluster(cluster.address))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr  # not a page per actor started
    assert "not a weights file for VGG16" in done.stderr
    done = extract(dataset, tmp_path / "c.h5", weights_file, "--engine", "ray", "--ray-actors", "2",
                   env=on_cluster(cluster.address))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--ray-actors below the Ray cluster's 2 CPUs" in done.stderr
    done = extract(dataset, tmp_path / "c.h5", weights_file, "--engine", "ray", "--ray-address", "127.0.0.1:1")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "Cannot connect to the Ray cluster at '127.0.0.1:1'" in done.stderr


def test_without_ray_installed_the_engine_is_refused_in_one_line(dataset, tmp_path, weights_file):
    no_ray = "import sys; sys.modules['ray'] = None; "
    done = extract(dataset, tmp_path / "c.h5", weights_file, "--engine", "ray", driver=no_ray)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "pip install" in done.stderr and "[ray]" in done.stderr
    assert not (tmp_path / "c.h5").exists()


def test_what_a_node_that_does_not_share_the_folders_answers(tmp_path):
    """What a node answers about the cache's folder and DATA_DIR (`check_shared` asks every
    node, and refuses in one line when one answers something)."""
    marker, image = tmp_path / ".shared-1", make_image(tmp_path / "data" / "a.png")
    assert "is not the driver's" in _probe(str(marker), [str(image)])
    marker.write_text("")
    assert _probe(str(marker), [str(image)]) is None
    assert "'" + str(tmp_path / "elsewhere" / "a.png") + "' does not exist" in _probe(
        str(marker), [str(image), str(tmp_path / "elsewhere" / "a.png")])
    if not Path("/proc/version").is_file():
        pytest.skip("needs /proc (Linux): a folder where nobody, not even root, can create a file")
    assert "cannot be written" in _probe("/proc/version")


# -- shards and URLs on Ray ----------------------------------------------------------------

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
