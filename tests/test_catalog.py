"""Reading the cache: FeatureCache and plain h5py over the catalog and its shards, damage
found when the cache opens, and caches of format version 1."""

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import SIZE, make_image
from extract import Augmentation, CacheError, FeatureCache, extract_features, list_configs
from extract.state import ConfigState, Row
from extract.schema import FORMAT
from extract.recovery import open_stored
from extract.writer import Writer

SHAPE = (1, 1, 4)
FIXTURE = Path(__file__).parent / "fixtures" / "v1"  # made by the release before shards (see its README)


def attrs(**changes):
    values = {"feature_shape": list(SHAPE), "dtype": "float32", "backbone": "vgg16", "input_size": 32}
    values.update(changes)
    return values


def sha(number: int) -> str:
    return f"{number:064x}"


def features_of(number: int, shape=SHAPE) -> np.ndarray:
    return np.full(shape, number, dtype=np.float32)


def commit(path, numbers, fingerprint="k", failures=(), **changes) -> Writer:
    """Store rows whose features all equal the row's number (computing only new ones)."""
    writer = Writer(open_stored(path, fingerprint))
    new = [n for n in numbers if not writer.knows(sha(n))]
    if new:
        writer.append([sha(n) for n in new], np.stack([features_of(n) for n in new]))
    rows = {f"c{n % 2}/{n}.png": Row(sha(n), f"c{n % 2}", "train" if n % 3 else "validation", n, n * 10) for n in numbers}
    writer.commit(ConfigState(attrs=attrs(**changes), rows=rows, failures=list(failures)))
    return writer


def stored(path, config=None) -> dict:
    with FeatureCache(path, config) as cache:
        return {p: f.ravel()[0] for p, f in zip(cache.paths(), cache.features())}


def test_written_rows_read_back_by_split(tmp_path):
    path = tmp_path / "c.h5"
    commit(path, range(9), failures=[("bad.jpg", "empty file")])
    with FeatureCache(path) as cache:
        assert len(cache) == 9 and cache.fingerprint == "k"
        assert list(cache.class_names) == ["c0", "c1"]
        assert cache.split_sizes() == {"train": 6, "validation": 3}
        assert list(cache.paths("validation")) == ["c0/0.png", "c1/3.png", "c0/6.png"]
        np.testing.assert_array_equal(cache.features("validation")[:, 0, 0, 0], [0, 3, 6])
        np.testing.assert_array_equal(cache.label_indices("validation"), [0, 1, 0])
        assert cache.failures() == [("bad.jpg", "empty file")]
        assert cache.config["input_size"] == 32 and cache.feature_shape == SHAPE


def test_batches_cover_the_split_without_loading_everything(tmp_path):
    path = tmp_path / "c.h5"
    commit(path, range(20))
    with FeatureCache(path) as cache:
        batches = list(cache.iter_batches("train", batch_size=7))
        assert len(batches) == 3
        features = np.concatenate([features for features, _, _ in batches])
        np.testing.assert_array_equal(features, cache.features("train"))
        np.testing.assert_array_equal(np.concatenate([labels for _, labels, _ in batches]), cache.label_indices("train"))


def test_a_change_writes_a_small_shard_and_a_new_catalog_only(tmp_path):
    path = tmp_path / "c.h5"
    commit(path, range(300))
    (first,) = list((tmp_path / "c.h5.shards" / "k").glob("*.h5"))
    stamp = first.stat().st_mtime_ns
    commit(path, [n for n in range(301) if n != 7])  # one deleted, one added
    shards = sorted((tmp_path / "c.h5.shards" / "k").glob("*.h5"), key=lambda shard: shard != first)
    assert len(shards) == 2 and shards[0].stat().st_mtime_ns == stamp  # the old shard untouched
    with h5py.File(shards[1], "r") as file:
        assert len(file["features"]) == 1  # the new one holds the added row alone
    assert stored(path) == {f"c{n % 2}/{n}.png": n for n in range(301) if n != 7}


def test_copies_of_one_file_take_turns_so_the_virtual_dataset_needs_few_mappings(tmp_path):
    path = tmp_path / "c.h5"
    writer = Writer(open_stored(path, "k"))
    writer.append([sha(n) for n in range(50)], np.stack([features_of(n) for n in range(50)]))
    rows = {f"c{i % 2}/{i}.png": Row(sha(i % 50), f"c{i % 2}", "train", i, i) for i in range(150)}  # 3 copies each
    writer.commit(ConfigState(attrs=attrs(), rows=rows))
    with h5py.File(path, "r") as file:
        group = file["configs/k"]
        assert group["features"].id.get_create_plist().get_virtual_count() == 3  # one per turn, not one per row
        by_path = dict(zip(group["path"].asstr()[:], group["features"][:, 0, 0, 0]))
    assert by_path == {f"c{i % 2}/{i}.png": i % 50 for i in range(150)}
    assert stored(path) == by_path


def test_plain_h5py_reads_what_feature_cache_reads(tmp_path, weights_file, monkeypatch):
    """Through the virtual datasets, from any working directory, after changes that leave
    dead rows and several shards: the same features, columns and views."""
    data = tmp_path / "data"
    for i in range(12):
        make_image(data / "train" / f"c{i % 2}" / f"{i}.png", seed=i)
    options = dict(input_size=SIZE, weights=weights_file, progress=False, augment=1, compact="never")
    extract_features(data, tmp_path / "c.h5", **options)
    (data / "train/c0/4.png").unlink()
    make_image(data / "train/c1/new.png", seed=99)
    make_image(data / "train/c0/0.png", seed=98)  # edited
    extract_features(data, tmp_path / "c.h5", **options)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(tmp_path / "c.h5", moved / "c.h5")
    shutil.move(tmp_path / "c.h5.shards", moved / "c.h5.shards")
    monkeypatch.chdir(data)
    with FeatureCache(moved / "c.h5") as cache, h5py.File(moved / "c.h5", "r") as file:
        group = file["configs"][file.attrs["last_config"]]
        assert group["features"].is_virtual and len(group["shards/path"]) == 2
        np.testing.assert_array_equal(group["features"][:], cache.features())
        assert list(group["path"].asstr()[:]) == list(cache.paths()) and "train/c0/4.png" not in cache.paths()
        assert list(group["split"].asstr()[:]) == list(cache.splits())
        table = group["views"][group.attrs["views"]]
        views = cache.views()
        by_key = dict(zip(zip(table["sha256"][:].astype(str), table["view"][:]), table["features"][:]))
        hashes = cache.sha256()
        assert len(by_key) == len(views.row) == 12
        for row, view, feature in zip(views.row, views.view, views.features):
            np.testing.assert_array_equal(by_key[(hashes[row], view)], feature)


@pytest.mark.parametrize("shape", [(1, 1, 512), (7, 7, 512), (512,)])
def test_feature_chunks_stay_between_10_kib_and_1_mib(tmp_path, shape):
    path = tmp_path / "c.h5"
    writer = Writer(open_stored(path, "k"))
    writer.append([sha(n) for n in range(300)], np.zeros((300, *shape), np.float32))
    writer.commit(ConfigState(attrs=attrs(feature_shape=list(shape)), rows={f"{n}": Row(sha(n), "", "unlabeled", 0, 0) for n in range(300)}))
    (shard,) = (tmp_path / "c.h5.shards" / "k").glob("*.h5")
    with h5py.File(shard, "r") as file:
        assert 10 * 1024 <= np.prod(file["features"].chunks) * 4 <= 1024 * 1024


def test_configurations_live_apart_and_the_last_is_the_default(tmp_path):
    path = tmp_path / "c.h5"
    commit(path, range(4), "k1")
    commit(path, range(10, 12), "k2", input_size=64)
    assert sorted((c["fingerprint"], c["rows"]) for c in list_configs(path)) == [("k1", 4), ("k2", 2)]
    assert len(stored(path)) == 2
    assert stored(path, "k1") == {f"c{n % 2}/{n}.png": n for n in range(4)}


@pytest.mark.parametrize("damage", ["deleted", "truncated", "foreign"])
def test_a_damaged_shard_is_found_when_the_cache_opens(tmp_path, damage):
    path = tmp_path / "c.h5"
    commit(path, range(5))
    commit(path, range(8))  # a second shard, of 3 rows
    with h5py.File(path, "r") as file:
        victim = tmp_path / "c.h5.shards" / file["configs/k/shards/path"].asstr()[1]
    if damage == "deleted":
        victim.unlink()
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-100])
    else:  # the same rows, written by another cache
        commit(tmp_path / "other.h5", range(8))
        with h5py.File(tmp_path / "other.h5", "r") as file:
            shutil.copy(tmp_path / "other.h5.shards" / file["configs/k/shards/path"].asstr()[0], victim)
    with pytest.raises(CacheError) as raised:
        FeatureCache(path)
    message = str(raised.value)
    assert str(victim) in message and "its 3 rows" in message and "--repair" in message and "\n" not in message


def test_missing_cache_says_to_extract_first(tmp_path):
    with pytest.raises(CacheError, match="run extract-features first"):
        FeatureCache(tmp_path / "none.h5")
    with pytest.raises(CacheError, match="is a folder"):
        FeatureCache(tmp_path)


def test_damaged_catalog_says_how_to_recover(tmp_path):
    path = tmp_path / "c.h5"
    commit(path, range(3))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CacheError, match="--rebuild"):
        FeatureCache(path)


@pytest.mark.parametrize("content, message", [
    ("other", "not a feature cache"), ("no_version", "lacks its format_version"), ("no_configs", "lacks its configs group"),
])
def test_other_hdf5_files_are_not_taken_for_caches(tmp_path, content, message):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as file:
        file["x"] = [1, 2]
        if content != "other":
            file.attrs["format"] = FORMAT
        if content == "no_version":
            file.create_group("configs")
    if content == "no_configs":
        with h5py.File(path, "a") as file:
            file.attrs["format_version"] = 2
    with pytest.raises(CacheError, match=message):
        FeatureCache(path)


def test_an_empty_catalog_says_to_extract_first(tmp_path):
    with h5py.File(tmp_path / "c.h5", "w") as file:
        file.attrs.update(format=FORMAT, format_version=2)
        file.create_group("configs")
    with pytest.raises(CacheError, match="no feature configuration yet"):
        FeatureCache(tmp_path / "c.h5")


def test_a_newer_format_is_refused(tmp_path):
    path = tmp_path / "c.h5"
    commit(path, range(2))
    with h5py.File(path, "r+") as file:
        file.attrs["format_version"] = 99
    with pytest.raises(CacheError, match="upgrade"):
        FeatureCache(path)


def test_an_unknown_configuration_lists_the_known_ones(tmp_path):
    path = tmp_path / "c.h5"
    commit(path, range(2), "k1")
    with pytest.raises(CacheError, match="k1"):
        FeatureCache(path, "zz")


def test_every_views_table_can_be_read(tmp_path, weights_file):
    from conftest import make_dataset

    make_dataset(tmp_path / "data")
    options = dict(input_size=SIZE, weights=weights_file, progress=False)
    extract_features(tmp_path / "data", tmp_path / "c.h5", augment=1, **options)
    extract_features(tmp_path / "data", tmp_path / "c.h5", augment=2, augmentation=Augmentation(flip=False), **options)
    with FeatureCache(tmp_path / "c.h5") as cache:
        tables = {table["fingerprint"]: table for table in cache.view_tables()}
        assert len(tables) == 2 and {table["views"] for table in tables.values()} == {4, 8}
        in_use = cache.views()
        assert in_use.views_per_image == 2 and not in_use.augmentation["flip"]
        earlier = cache.views(augmentation=Augmentation().fingerprint)  # what the first run used
        assert earlier.views_per_image == 1 and earlier.augmentation["flip"] and len(earlier.row) == 4
        assert len(cache.views("validation").row) == 0  # views are only made for training images
        with pytest.raises(CacheError, match="views table"):
            cache.views(augmentation="nope")


# Format version 1: one file, features inside it (tests/fixtures/v1, made by the release before shards)

def v1_copy(tmp_path) -> tuple[Path, Path]:
    """The fixture's cache and images, with the cache pointed at the copied images and the
    images' times as recorded (a checkout gives them new ones)."""
    shutil.copytree(FIXTURE, tmp_path / "v1")
    cache, images = tmp_path / "v1" / "cache.h5", tmp_path / "v1" / "images"
    with h5py.File(cache, "r+") as file:
        for group in file["configs"].values():
            group.attrs["data_dir"] = str(images.resolve())
            for path, mtime_ns in zip(group["path"].asstr()[:], group["mtime_ns"][:]):
                os.utime(images / path, ns=(int(mtime_ns), int(mtime_ns)))
    return cache, images


def v1_contents(cache) -> dict:
    contents = {}
    for config in list_configs(cache):
        with FeatureCache(cache, config["fingerprint"]) as opened:
            views, paths = opened.views(), opened.paths()
            contents[config["fingerprint"]] = (
                dict(zip(paths, opened.features())), opened.failures(), list(opened.class_names),
                views and {(paths[row], int(view)): f for row, view, f in zip(views.row, views.view, views.features)},
            )
    return contents


def test_a_v1_cache_opens_and_reads(tmp_path):
    cache, _ = v1_copy(tmp_path)
    with h5py.File(cache, "r") as file:
        assert file.attrs["format_version"] == 1 and not file["configs"][file.attrs["last_config"]]["features"].is_virtual
    contents = v1_contents(cache)
    assert len(contents) == 2
    for features, _, classes, views in contents.values():
        assert len(features) == 8 and classes == ["cat", "dog"]
    (with_views,) = [views for *_, views in contents.values() if views]
    assert {view for _, view in with_views} == {1} and len(with_views) == 6  # one view of each training image


def test_a_v1_cache_is_upgraded_on_the_first_write_and_reads_the_same(tmp_path):
    cache, images = v1_copy(tmp_path)
    before = v1_contents(cache)
    last = list_configs(cache)
    options = dict(input_size=32, weights="random", progress=False)
    unchanged = extract_features(images, cache, pooling="none", **options)  # the fixture's last run again
    assert unchanged.computed == 0 and unchanged.views_computed == 0
    with h5py.File(cache, "r") as file:
        assert file.attrs["format_version"] == 1  # nothing to write: not upgraded yet
    make_image(images / "train" / "cat" / "new.png", seed=77)
    grown = extract_features(images, cache, pooling="avg", **options)
    assert (grown.computed, grown.views_computed, grown.rows) == (1, 1, 9)
    with h5py.File(cache, "r") as file:
        assert file.attrs["format_version"] == 2
        assert all(group["features"].is_virtual for group in file["configs"].values())
    after = v1_contents(cache)
    assert after.keys() == before.keys() and len(list_configs(cache)) == len(last)
    for fingerprint, (features, failures, classes, views) in before.items():
        new_features, new_failures, new_classes, new_views = after[fingerprint]
        for path, feature in features.items():
            np.testing.assert_array_equal(new_features[path], feature)
        assert new_failures == failures and new_classes == classes
        if views:
            for key, feature in views.items():
                np.testing.assert_array_equal(new_views[key], feature)
            assert new_views.keys() - views.keys() == {("train/cat/new.png", 1)}
    assert os.path.isdir(f"{cache}.shards")


def test_a_shard_gone_after_another_writer_committed_is_named_as_a_change(tmp_path, monkeypatch):
    from extract import catalog

    path = tmp_path / "c.h5"
    writer = Writer(open_stored(path, "cfg"))
    writer.state.attrs = attrs()
    for number in range(3):  # three shards of one row each
        writer.append([sha(number)], np.full((1, *SHAPE), number, np.float32))
        writer.flush()
    writer.commit(ConfigState(attrs=attrs(), rows={f"train/a/{n}.png": Row(sha(n), "a", "train", 1, 1) for n in range(3)}))
    monkeypatch.setattr(catalog, "_OPEN_SHARDS", 1)  # it keeps one shard open, so it reopens the others
    with FeatureCache(path) as cache:
        assert cache.features_at([0, 1, 2])[:, 0, 0, 0].tolist() == [0, 1, 2]
        shards = sorted(Path(f"{path}.shards").glob("cfg/*.h5"))
        copy = tmp_path / "new.h5"
        shutil.copy(path, copy)
        os.replace(copy, path)  # as a writer commits
        shards[0].unlink()
        shards[1].unlink()  # compacted away
        with pytest.raises(CacheError, match=r"changed while it was being read .* run this command again"):
            cache.features_at([0, 1, 2])


def test_a_missing_shard_of_views_counts_its_views(tmp_path, weights_file):
    from conftest import make_dataset

    make_dataset(tmp_path / "data", "splits", per_class=3)  # 2 training images a class, 1 validation
    options = dict(input_size=SIZE, weights=weights_file, progress=False)
    extract_features(tmp_path / "data", tmp_path / "c.h5", **options)
    before = set(Path(f"{tmp_path / 'c.h5'}.shards").glob("*/*.h5"))
    extract_features(tmp_path / "data", tmp_path / "c.h5", augment=2, **options)  # views only: a shard of them
    (views,) = set(Path(f"{tmp_path / 'c.h5'}.shards").glob("*/*.h5")) - before
    views.unlink()
    with pytest.raises(CacheError, match=f"{views.name}.* to drop its 8 rows"):
        FeatureCache(tmp_path / "c.h5")
