import h5py
import numpy as np
import pytest

from extract.errors import CacheError
from extract.journal import Journal
from extract.store import FORMAT, FeatureCache, Rows, list_configs, write_cache

SHAPE = (1, 1, 4)


def attrs(**changes):
    values = {"feature_shape": list(SHAPE), "dtype": "float32", "backbone": "vgg16", "input_size": 32}
    values.update(changes)
    return values


def sha(number: int) -> str:
    return f"{number:064x}"


def features_of(number: int, shape=SHAPE) -> np.ndarray:
    return np.full(shape, number, dtype=np.float32)


def new_rows(journal: Journal, numbers, split_of=lambda n: "train" if n % 3 else "validation") -> Rows:
    """Rows whose features (all equal to the row's number) wait in the journal."""
    numbers = list(numbers)
    journal.append([sha(n) for n in numbers], np.stack([features_of(n) for n in numbers]))
    rows = Rows()
    for n in numbers:
        rows.add(f"c{n % 2}/{n}.png", sha(n), f"c{n % 2}", split_of(n), n, n * 10, -1)
    return rows


def stored(path, config=None) -> dict:
    with FeatureCache(path, config) as cache:
        return {p: f.ravel()[0] for p, f in zip(cache.paths(), cache.features())}


def test_written_rows_read_back_by_split(tmp_path):
    path = tmp_path / "c.h5"
    journal = Journal(path, "k1").open()
    write_cache(path, "k1", attrs(), new_rows(journal, range(9)), [("bad.jpg", "empty file")], journal)
    with FeatureCache(path) as cache:
        assert len(cache) == 9 and cache.fingerprint == "k1"
        assert list(cache.class_names) == ["c0", "c1"]
        assert cache.split_sizes() == {"train": 6, "validation": 3}
        assert list(cache.paths("validation")) == ["c0/0.png", "c1/3.png", "c0/6.png"]
        np.testing.assert_array_equal(cache.features("validation")[:, 0, 0, 0], [0, 3, 6])
        np.testing.assert_array_equal(cache.label_indices("validation"), [0, 1, 0])
        assert cache.failures() == [("bad.jpg", "empty file")]
        assert cache.config["input_size"] == 32 and cache.feature_shape == SHAPE


def test_batches_cover_the_split_without_loading_everything(tmp_path):
    path = tmp_path / "c.h5"
    journal = Journal(path, "k1").open()
    write_cache(path, "k1", attrs(), new_rows(journal, range(20)), [], journal)
    with FeatureCache(path) as cache:
        batches = list(cache.iter_batches("train", batch_size=7))
        assert len(batches) == 3
        features = np.concatenate([features for features, _, _ in batches])
        np.testing.assert_array_equal(features, cache.features("train"))
        np.testing.assert_array_equal(np.concatenate([labels for _, labels, _ in batches]), cache.label_indices("train"))


def test_plain_h5py_reads_the_schema(tmp_path):
    path = tmp_path / "c.h5"
    journal = Journal(path, "k1").open()
    write_cache(path, "k1", attrs(), new_rows(journal, range(3)), [], journal)
    with h5py.File(path, "r") as file:
        assert file.attrs["format"] == FORMAT and file.attrs["format_version"] == 1
        group = file["configs"][file.attrs["last_config"]]
        assert group["features"].shape == (3, *SHAPE) and group["features"].compression == "gzip"
        assert group["features"].maxshape[0] is None
        assert group["path"].asstr()[0] == "c0/0.png"
        assert group["sha256"][1] == sha(1).encode()
        assert list(group["split"].asstr()[:]) == ["validation", "train", "train"]
        assert list(group["class_names"].asstr()[:]) == ["c0", "c1"]
        assert group.attrs["backbone"] == "vgg16"


@pytest.mark.parametrize("shape", [(1, 1, 512), (7, 7, 512), (512,)])
def test_feature_chunks_stay_between_10_kib_and_1_mib(tmp_path, shape):
    path = tmp_path / "c.h5"
    write_cache(path, "k", attrs(feature_shape=list(shape)), Rows(), [], Journal(path, "k"))
    with h5py.File(path, "r") as file:
        chunk = file["configs/k/features"].chunks
        assert 10 * 1024 <= np.prod(chunk) * 4 <= 1024 * 1024


def test_configurations_live_apart_and_the_last_is_the_default(tmp_path):
    path = tmp_path / "c.h5"
    first, second = Journal(path, "k1").open(), Journal(path, "k2").open()
    write_cache(path, "k1", attrs(), new_rows(first, range(4)), [], first)
    write_cache(path, "k2", attrs(input_size=64), new_rows(second, range(10, 12)), [], second)
    assert sorted((c["fingerprint"], c["rows"]) for c in list_configs(path)) == [("k1", 4), ("k2", 2)]
    assert len(stored(path)) == 2
    assert stored(path, "k1") == {f"c{n % 2}/{n}.png": n for n in range(4)}


def test_appending_keeps_old_rows_as_they_were(tmp_path):
    path = tmp_path / "c.h5"
    journal = Journal(path, "k").open()
    write_cache(path, "k", attrs(), new_rows(journal, range(300)), [], journal)
    rows = Rows()
    with FeatureCache(path) as cache:
        for row, (p, s) in enumerate(zip(cache.paths(), cache.sha256())):
            rows.add(p, s, "c0", "train", 0, 0, row)  # same features; label and split rewritten
    more = new_rows(journal, range(300, 310))
    for column in vars(rows):
        getattr(rows, column).extend(getattr(more, column))
    write_cache(path, "k", attrs(), rows, [], journal)
    assert stored(path) == {p: int(p.split("/")[1][:-4]) for p in rows.path}
    with FeatureCache(path) as cache:
        assert set(cache.labels()[:300]) == {"c0"}


def test_rows_can_be_dropped_reordered_and_taken_from_other_rows(tmp_path):
    path = tmp_path / "c.h5"
    journal = Journal(path, "k").open()
    write_cache(path, "k", attrs(), new_rows(journal, range(600)), [], journal)
    rows = Rows()
    for row in (599, 5, 0, 300):  # a subset, out of order
        rows.add(f"keep/{row}", sha(row), "c", "train", 0, 0, row)
    write_cache(path, "k", attrs(), rows, [], journal)
    assert stored(path) == {"keep/599": 599, "keep/5": 5, "keep/0": 0, "keep/300": 300}


def test_missing_cache_says_to_extract_first(tmp_path):
    with pytest.raises(CacheError, match="run extract-features first"):
        FeatureCache(tmp_path / "none.h5")


def test_damaged_cache_says_how_to_recover(tmp_path):
    path = tmp_path / "c.h5"
    journal = Journal(path, "k").open()
    write_cache(path, "k", attrs(), new_rows(journal, range(3)), [], journal)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CacheError, match="--rebuild"):
        FeatureCache(path)


def test_other_hdf5_files_are_not_taken_for_caches(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as file:
        file["x"] = [1, 2]
    with pytest.raises(CacheError, match="not a feature cache"):
        FeatureCache(path)


def test_a_newer_format_is_refused(tmp_path):
    path = tmp_path / "c.h5"
    write_cache(path, "k", attrs(), Rows(), [], Journal(path, "k"))
    with h5py.File(path, "r+") as file:
        file.attrs["format_version"] = 99
    with pytest.raises(CacheError, match="upgrade"):
        FeatureCache(path)


def test_an_unknown_configuration_lists_the_known_ones(tmp_path):
    path = tmp_path / "c.h5"
    write_cache(path, "k1", attrs(), Rows(), [], Journal(path, "k1"))
    with pytest.raises(CacheError, match="k1"):
        FeatureCache(path, "zz")


def test_a_failed_write_leaves_the_old_cache_intact(tmp_path, monkeypatch):
    path = tmp_path / "c.h5"
    journal = Journal(path, "k").open()
    write_cache(path, "k", attrs(), new_rows(journal, range(5)), [], journal)
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("extract.store._write_tables", disk_full)
    with pytest.raises(CacheError, match="No space left on device.*unchanged"):
        write_cache(path, "k", attrs(), new_rows(journal, range(5, 9)), [], journal)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["c.h5"]


def test_every_views_table_can_be_read(tmp_path, weights_file):
    from conftest import SIZE, make_dataset
    from extract import Augmentation, CacheError, extract_features

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
