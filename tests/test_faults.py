"""Faults from outside, on the real command in processes of its own (forked warm, see
helpers.py): kills at any moment, a second writer, a full disk, a read-only cache folder,
unreadable files, a damaged cache."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import helpers
from conftest import SIZE, make_image
from extract import CacheError, FeatureCache
from extract.cli import main
from helpers import EXTRACT, listing

def many_images(root: Path, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        make_image(root / "train" / f"c{i % 3}" / f"{i}.png", seed=i, size=(12, 12))


def arguments(data, cache, weights_file, *extra) -> list:
    return [data, "--cache", cache, "--weights", weights_file, "--input-size", SIZE, "--quiet", *extra]


def start(data, cache, weights_file, *extra, **options):
    """extract-features as a process of its own."""
    return helpers.start(EXTRACT, *arguments(data, cache, weights_file, *extra), **options)


def run(data, cache, weights_file, *extra, **options) -> subprocess.CompletedProcess:
    """extract-features as a process of its own, to its end."""
    return helpers.run(EXTRACT, *arguments(data, cache, weights_file, *extra), **options)


def call(data, cache, weights_file, *extra) -> subprocess.CompletedProcess:
    """extract-features' main() in this process."""
    return helpers.call(EXTRACT, *arguments(data, cache, weights_file, *extra))


def copy_images(data: Path, target: Path, count: int) -> Path:
    """The first `count` images of `data` (as sorted), copied into `target`."""
    for path in sorted(data.rglob("*.png"))[:count]:
        copy = target / path.relative_to(data)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
    return target


def batches(cache: Path) -> int:
    """Finished batches on disk: pending ones, and shards (one per checkpoint)."""
    shards = Path(f"{cache}.shards")
    return len(listing(shards, "*/pending/batch-*.npz")) + len(listing(shards, "*/*.h5"))


def wait_for_batches(cache: Path, count: int, process, timeout=120) -> bool:
    """Wait until the journal holds `count` batches; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while batches(cache) < count:
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
    return True


def features(cache: Path) -> dict:
    with FeatureCache(cache) as opened:
        return dict(zip(opened.paths(), opened.features()))


def assert_rows_match(cache: Path, reference: dict) -> int:
    saved = features(cache)
    for path, feature in saved.items():
        # Batches of another size may round differently in oneDNN's kernels (seen: 2.5e-7).
        np.testing.assert_allclose(feature, reference[path], rtol=1e-5, atol=1e-6, err_msg=path)
    return len(saved)


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory, weights_file):
    """300 tiny images and the features of one uninterrupted run over them."""
    root = tmp_path_factory.mktemp("big")
    many_images(root / "data", 300)
    done = call(root / "data", root / "reference.h5", weights_file)
    assert done.returncode == 0, done.stderr
    return root / "data", features(root / "reference.h5")


def test_sigkill_at_twenty_moments_loses_nothing(big_folder, weights_file, tmp_path):
    """Kill -9 twenty times at random moments (saving after every batch, so many kills land
    inside a cache write); after each, the cache opens and every row in it is right; then
    a last run finishes with exactly the features of an uninterrupted run."""
    data, reference = big_folder
    cache, moments = tmp_path / "c.h5", random.Random(0)
    rows_seen = []
    for kill in range(20):
        process = start(data, cache, weights_file, "--batch-size", "2", "--save-every", "0")
        assert wait_for_batches(cache, batches(cache) + 1, process), "the run ended before it could be killed"
        time.sleep(moments.uniform(0, 0.08))
        process.send_signal(signal.SIGKILL)
        process.wait()
        rows_seen.append(assert_rows_match(cache, reference))
    assert rows_seen[-1] > 0
    finish = run(data, cache, weights_file, "--json")
    assert finish.returncode == 0, finish.stderr
    final = features(cache)
    assert final.keys() == reference.keys()
    assert_rows_match(cache, reference)
    shards = Path(f"{cache}.shards")
    assert len(list(shards.glob("*/*.h5"))) == 1  # compacted: the small shards of the checkpoints merged
    assert not list(shards.glob("*/pending/*")) and not list(shards.rglob("*.tmp")) and not list(tmp_path.glob(".c.h5.commit-*"))


def views(cache: Path) -> dict:
    with FeatureCache(cache) as opened:
        found, paths = opened.views(), opened.paths()
        if found is None:  # not saved yet
            return {}
        return {(paths[row], int(view)): feature for row, view, feature in zip(found.row, found.view, found.features)}


def test_sigkill_during_an_augmented_run_loses_no_view(tmp_path, weights_file):
    """Kills while images and their views are computed (at least five, and on until one came
    after views were saved: each comes after a new batch, so the runs get there however slow
    the machine); the views in the cache after each kill are right, and the last run ends with
    those of an uninterrupted run."""
    many_images(tmp_path / "data", 40)
    options = ("--augment", "2", "--batch-size", "4", "--save-every", "0")
    done = call(tmp_path / "data", tmp_path / "reference.h5", weights_file, *options)
    assert done.returncode == 0, done.stderr
    reference, cache, moments = views(tmp_path / "reference.h5"), tmp_path / "c.h5", random.Random(1)
    assert len(reference) == 80
    seen = []
    for kill in range(40):  # 10 batches of images and 20 of views: each kill is after one more
        if kill >= 5 and any(seen):
            break
        process = start(tmp_path / "data", cache, weights_file, *options)
        if not wait_for_batches(cache, batches(cache) + 1, process):
            break  # it finished first
        time.sleep(moments.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if cache.exists():
            seen.append(views(cache))
            for key, feature in seen[-1].items():
                np.testing.assert_allclose(feature, reference[key], rtol=1e-5, atol=1e-6, err_msg=str(key))
    assert any(seen), "no kill came after a view was saved"
    finish = run(tmp_path / "data", cache, weights_file, *options)
    assert finish.returncode == 0, finish.stderr
    final = views(cache)
    assert final.keys() == reference.keys()
    for key, feature in final.items():
        np.testing.assert_allclose(feature, reference[key], rtol=1e-5, atol=1e-6, err_msg=str(key))


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_and_exits_with_a_short_message(big_folder, weights_file, tmp_path, stop):
    data, reference = big_folder
    cache = tmp_path / "c.h5"
    process = start(data, cache, weights_file, "--batch-size", "8")
    assert wait_for_batches(cache, 3, process)
    process.send_signal(stop)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "interrupted; every finished batch is saved" in err and "Traceback" not in err
    assert assert_rows_match(cache, reference) >= 24


def test_a_second_writer_is_refused_naming_the_first(big_folder, weights_file, tmp_path):
    data, _ = big_folder
    cache = tmp_path / "c.h5"
    first = start(data, cache, weights_file, "--batch-size", "2")
    try:
        assert wait_for_batches(cache, 1, first)
        second = run(data, cache, weights_file, timeout=60)
        assert second.returncode == 1
        assert f"is being written by process {first.pid}" in second.stderr and second.stderr.count("\n") == 1
    finally:
        first.kill()
        first.wait()


def snapshot(cache: Path) -> dict:
    """The catalog and every shard, byte for byte."""
    return {path.name: path.read_bytes() for path in [cache, *Path(f"{cache}.shards").glob("*/*.h5")]}


def test_a_full_disk_keeps_the_old_cache_and_the_new_batches(tmp_path, weights_file):
    data, cache = tmp_path / "data", tmp_path / "c.h5"
    many_images(data, 30)
    assert call(data, cache, weights_file).returncode == 0
    before = snapshot(cache)
    many_images(data, 200, start=30)
    limit = 40_000  # room for each pending batch, not for the shard of 200 images
    full = run(data, cache, weights_file, "--batch-size", "8", file_size_limit=limit)
    assert full.returncode == 1 and "File too large" in full.stderr and "the cache is unchanged" in full.stderr
    assert full.stderr.count("\n") == 1 and "Traceback" not in full.stderr
    assert snapshot(cache) == before
    again = call(data, cache, weights_file, "--json")
    assert again.returncode == 0 and '"computed": 0' in again.stdout  # every batch was kept
    assert len(features(cache)) == 230


def without_file_access_override(arguments) -> subprocess.CompletedProcess:
    """The command with file permissions enforced even for root (which CI runs as):
    setpriv drops the capabilities that let root read and write anything."""
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: file permissions cannot be enforced")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    return subprocess.run([*prefix, sys.executable, "-m", "extract.cli", *map(str, arguments)],
                          capture_output=True, text=True)


def test_a_read_only_cache_folder_is_a_clear_error(tmp_path, weights_file):
    data, store = tmp_path / "data", tmp_path / "store"
    many_images(data, 6)
    store.mkdir()
    arguments = [data, "--cache", store / "c.h5", "--weights", weights_file, "--input-size", SIZE, "--quiet"]
    assert helpers.call(EXTRACT, *arguments).returncode == 0
    before = snapshot(store / "c.h5")
    many_images(data, 3, start=6)
    os.chmod(store, 0o555)
    os.chmod(store / "c.h5.lock", 0o444)
    try:
        result = without_file_access_override(arguments)
    finally:
        os.chmod(store, 0o755)
    assert result.returncode == 1, result.stderr
    assert "Cannot write the cache folder" in result.stderr and result.stderr.count("\n") == 1
    assert snapshot(store / "c.h5") == before


def test_an_unreadable_file_is_a_failure_not_a_stop(tmp_path, weights_file):
    data = tmp_path / "data"
    many_images(data, 6)
    os.chmod(data / "train" / "c0" / "0.png", 0)
    result = without_file_access_override([data, "--cache", tmp_path / "c.h5", "--weights", weights_file,
                                           "--input-size", SIZE, "--quiet"])
    assert result.returncode == 0, result.stderr
    with FeatureCache(tmp_path / "c.h5") as cache:
        assert len(cache) == 5
        assert cache.failures() == [("train/c0/0.png", "cannot read file: Permission denied")]


@pytest.mark.parametrize("damage", ["truncate", "superblock"])
def test_a_damaged_catalog_says_what_to_do(tmp_path, weights_file, capsys, damage):
    data, cache = tmp_path / "data", tmp_path / "c.h5"
    many_images(data, 40)
    arguments = [str(data), "--cache", str(cache), "--weights", str(weights_file), "--input-size", str(SIZE), "--quiet"]
    assert main(arguments) == 0
    content = bytearray(cache.read_bytes())
    if damage == "truncate":
        content = content[: len(content) // 2]
    else:
        content[8 : 8 + 4096] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    cache.write_bytes(bytes(content))
    assert main(arguments) == 1
    err = capsys.readouterr().err
    assert "--rebuild" in err and err.count("\n") == 1
    assert main([*arguments, "--rebuild"]) == 0
    assert len(features(cache)) == 40
    (aside,) = tmp_path.glob("c.h5.replaced-*")  # the damaged cache, kept aside with its shards
    assert (aside / "c.h5").exists() and (aside / "c.h5.shards").is_dir()


@pytest.mark.parametrize("damage", ["deleted", "truncated", "foreign", "garbled"])
def test_a_damaged_shard_is_named_and_repair_computes_only_its_rows(big_folder, tmp_path, weights_file, capsys, damage):
    data, reference = big_folder
    part = copy_images(data, tmp_path / "data", 50)
    cache = tmp_path / "c.h5"
    arguments = [str(part), "--cache", str(cache), "--weights", str(weights_file), "--input-size", str(SIZE), "--quiet"]
    moved = [path for path in sorted(part.rglob("*.png"))[:10]]
    for path in moved:
        path.rename(tmp_path / path.name)
    assert main(arguments) == 0
    for path in moved:
        (tmp_path / path.name).rename(path)
    assert main(arguments) == 0  # a second shard, of the 10 images
    (victim,) = [shard for shard in Path(f"{cache}.shards").glob("*/*.h5") if shard.stat().st_size < 30_000]
    if damage == "deleted":
        victim.unlink()
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-1000])
    elif damage == "foreign":
        other = tmp_path / "other.h5"
        assert main([str(part), "--cache", str(other), *arguments[3:]]) == 0
        (donor,) = Path(f"{other}.shards").glob("*/*.h5")
        victim.write_bytes(donor.read_bytes())
    else:
        with h5py.File(victim, "r") as file:
            offset = file["features"].id.get_chunk_info(0).byte_offset
        content = bytearray(victim.read_bytes())
        content[offset + 16 : offset + 32] = bytes(16)
        victim.write_bytes(bytes(content))
    capsys.readouterr()
    if damage == "garbled":  # the index of the shard is whole: reading the features finds it
        assert main(arguments) == 0
        with pytest.raises(CacheError, match=f"shard '.*{victim.name}' .* is damaged .*--repair"):
            features(cache)
    else:
        assert main(arguments) == 1
        err = capsys.readouterr().err
        assert victim.name in err and "its 10 rows" in err and "--repair" in err and err.count("\n") == 1
        with pytest.raises(CacheError, match=victim.name):
            features(cache)
    assert main([*arguments, "--repair", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["computed"], summary["repaired"], summary["rows"]) == (10, 10, 50)
    assert assert_rows_match(cache, reference) == 50


def test_sigkill_during_compaction_loses_nothing(big_folder, weights_file, tmp_path):
    """A cache of 60 small shards (a checkpoint after every batch) compacted with
    --compact full, SIGKILLed at a random moment after its new shard appears, again and
    again from the same start, until kills have landed both before and after the
    compaction's commit: after each kill the cache reads right, and the next run leaves
    one shard and no stray file."""
    data, reference = big_folder
    part = copy_images(data, tmp_path / "data", 120)
    cache, shards, pristine = tmp_path / "c.h5", tmp_path / "c.h5.shards", tmp_path / "pristine"
    made = call(part, cache, weights_file, "--batch-size", "2", "--save-every", "0", "--compact", "never")
    assert made.returncode == 0, made.stderr
    original = set(shards.glob("*/*.h5"))
    assert len(original) == 60
    pristine.mkdir()
    shutil.copy(cache, pristine / cache.name)
    shutil.copytree(shards, pristine / shards.name)
    moments, committed, spread = random.Random(2), set(), 0.02
    for kill in range(16):
        cache.unlink()
        shutil.rmtree(shards)
        shutil.copy(pristine / cache.name, cache)
        shutil.copytree(pristine / shards.name, shards)
        process = start(part, cache, weights_file, "--compact", "full")
        deadline = time.monotonic() + 60
        while not set(map(Path, listing(shards, "*/*.h5"))) - original and process.poll() is None:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.001)
        time.sleep(moments.uniform(0, spread))
        process.send_signal(signal.SIGKILL)
        process.wait()
        with h5py.File(cache, "r") as opened:  # killed after the compaction's commit, or before it?
            after = len(next(iter(opened["configs"].values()))["shards/path"]) == 1
        committed.add(after)
        spread = spread / 1.5 if after else spread * 1.5  # closing in on the moment of the commit
        assert assert_rows_match(cache, reference) == 120
        finish = run(part, cache, weights_file)
        assert finish.returncode == 0, finish.stderr
        assert len(list(shards.glob("*/*.h5"))) == 1 and not list(shards.rglob("*.tmp"))
        assert assert_rows_match(cache, reference) == 120
        if committed == {True, False}:
            break
    assert committed == {True, False}, "every kill landed on the same side of the commit"
