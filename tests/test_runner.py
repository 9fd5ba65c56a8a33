import hashlib
import os
import shutil

import keras
import numpy as np
import pytest

from conftest import SIZE, make_dataset, make_image
from extract import FeatureCache, extract_features
from extract.backbone import Backbone
from extract.errors import UsageError


@pytest.fixture
def extract(weights_file, tmp_path):
    """extract_features with the test weights, small images and a cache in tmp_path."""

    def run(data, **options):
        options = {"weights": weights_file, "input_size": SIZE, "progress": False, **options}
        return extract_features(data, options.pop("cache", tmp_path / "cache" / "features.h5"), **options)

    return run


def cached_features(cache_path, config=None) -> dict:
    with FeatureCache(cache_path, config) as cache:
        return dict(zip(cache.paths(), cache.features()))


@pytest.mark.parametrize("pooling, size, interpolation", [("none", 48, "bilinear"), ("avg", 32, "nearest")])
def test_features_equal_plain_keras(extract, dataset, weights_file, tmp_path, pooling, size, interpolation):
    summary = extract(dataset, pooling=pooling, input_size=size, interpolation=interpolation, batch_size=4)
    model = keras.applications.VGG16(
        include_top=False, weights=str(weights_file), input_shape=(size, size, 3),
        pooling=None if pooling == "none" else pooling,
    )
    features = cached_features(summary.cache)
    assert summary.computed == len(features) == 6
    for path, feature in features.items():
        pixels = keras.utils.img_to_array(
            keras.utils.load_img(dataset / path, target_size=(size, size), interpolation=interpolation)
        )
        expected = model.predict(keras.applications.vgg16.preprocess_input(pixels[None]), verbose=0)[0]
        assert np.abs(feature - expected).max() <= 1e-4


def test_labels_splits_and_hashes_are_stored(extract, dataset):
    summary = extract(dataset)
    with FeatureCache(summary.cache) as cache:
        rows = {path: (label, split) for path, label, split in zip(cache.paths(), cache.labels(), cache.splits())}
        assert rows["train/cat/0.png"] == ("cat", "train")
        assert rows["validation/dog/2.png"] == ("dog", "validation")
        digests = dict(zip(cache.paths(), cache.sha256()))
        assert digests["train/dog/1.png"] == hashlib.sha256((dataset / "train/dog/1.png").read_bytes()).hexdigest()
        assert cache.config["data_dir"] == str(dataset.resolve()) and cache.config["layout"] == "splits"
        assert cache.config["weights"] == "file" and cache.config["pooling"] == "none"
    assert summary.split_sizes == {"train": 4, "validation": 2} and summary.class_names == ["cat", "dog"]


def test_a_rerun_computes_nothing_and_writes_nothing(extract, dataset, monkeypatch):
    first = extract(dataset)
    stamp = os.stat(first.cache).st_mtime_ns
    monkeypatch.setattr(Backbone, "__init__", lambda *a: pytest.fail("the network was built for nothing"))
    again = extract(dataset)
    assert (again.new, again.changed, again.unchanged, again.computed) == (0, 0, 6, 0)
    assert os.stat(first.cache).st_mtime_ns == stamp


def test_changed_new_deleted_and_moved_files(extract, dataset):
    first = extract(dataset)
    before = cached_features(first.cache)
    make_image(dataset / "train/cat/0.png", seed=99)  # changed content
    (dataset / "train/dog/0.png").unlink()  # deleted
    make_image(dataset / "train/dog/new.png", seed=42)  # new
    shutil.copy(dataset / "train/cat/1.png", dataset / "train/dog/copy.png")  # known content
    summary = extract(dataset)
    assert (summary.new, summary.changed, summary.removed, summary.computed, summary.reused) == (2, 1, 1, 2, 1)
    after = cached_features(first.cache)
    assert "train/dog/0.png" not in after and len(after) == 7
    assert not np.allclose(after["train/cat/0.png"], before["train/cat/0.png"])
    np.testing.assert_array_equal(after["train/dog/copy.png"], before["train/cat/1.png"])
    np.testing.assert_array_equal(after["validation/cat/2.png"], before["validation/cat/2.png"])


def test_a_touched_file_is_hashed_again_but_not_recomputed(extract, dataset):
    extract(dataset)
    os.utime(dataset / "train/cat/0.png", ns=(1, 1))
    summary = extract(dataset)
    assert (summary.unchanged, summary.computed, summary.reused) == (6, 0, 0)
    with FeatureCache(summary.cache) as cache:
        mtimes = dict(zip(cache.paths(), cache.column("mtime_ns")))
    assert mtimes["train/cat/0.png"] == 1


def test_broken_files_are_recorded_and_the_rest_extracted(extract, dataset):
    (dataset / "train/cat/empty.jpg").write_bytes(b"")
    (dataset / "train/cat/text.jpg").write_text("hello")
    (dataset / "README.txt").write_text("a data set")
    whole = make_image(dataset / "train/dog/whole.jpg", size=(64, 64)).read_bytes()
    (dataset / "train/dog/whole.jpg").write_bytes(whole[: len(whole) // 2])
    summary = extract(dataset)
    assert (summary.rows, summary.failed, summary.skipped) == (6, 3, 1)
    with FeatureCache(summary.cache) as cache:
        reasons = dict(cache.failures())
    assert reasons["train/cat/empty.jpg"] == "empty file"
    assert reasons["train/dog/whole.jpg"].startswith("truncated image")
    assert set(reasons) == {"train/cat/empty.jpg", "train/cat/text.jpg", "train/dog/whole.jpg"}


def test_a_file_that_breaks_leaves_the_cache(extract, dataset):
    extract(dataset)
    (dataset / "train/cat/0.png").write_bytes(b"broken now")
    summary = extract(dataset)
    assert (summary.removed, summary.failed, summary.rows) == (1, 1, 5)


def test_configurations_live_apart(extract, dataset):
    first = extract(dataset)
    second = extract(dataset, pooling="avg")
    assert first.fingerprint != second.fingerprint
    assert next(iter(cached_features(second.cache).values())).shape == (512,)  # the last one by default
    assert next(iter(cached_features(first.cache, first.fingerprint).values())).shape == (1, 1, 512)
    again = extract(dataset)
    assert again.computed == 0
    with FeatureCache(again.cache) as cache:
        assert cache.fingerprint == first.fingerprint


def test_another_data_folder_needs_another_cache(extract, dataset, tmp_path):
    extract(dataset)
    other = tmp_path / "other"
    make_dataset(other, seed=5)
    with pytest.raises(UsageError, match="use another --cache"):
        extract(other)


def test_unlabeled_folder(extract, tmp_path):
    make_dataset(tmp_path / "loose", "unlabeled", per_class=2)
    summary = extract(tmp_path / "loose")
    assert summary.layout == "unlabeled" and summary.class_names == [] and summary.rows == 4
    with FeatureCache(summary.cache) as cache:
        assert set(cache.label_indices()) == {-1}


def test_float16_cache_holds_float16(extract, dataset):
    summary = extract(dataset, dtype="float16", pooling="avg")
    with FeatureCache(summary.cache) as cache:
        assert cache.features().dtype == np.float16


def test_interrupted_run_keeps_finished_batches_and_resumes(extract, dataset, weights_file, monkeypatch):
    make_dataset(dataset, per_class=8, seed=3, classes=("bird", "fish"))  # 22 images in all
    reference = cached_features(extract(dataset, cache=dataset.parent / "reference.h5", batch_size=4).cache)
    calls = {"n": 0}
    compute = Backbone.__call__

    def interrupt_on_third_batch(self, pixels):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return compute(self, pixels)

    monkeypatch.setattr(Backbone, "__call__", interrupt_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        extract(dataset, batch_size=4)
    monkeypatch.setattr(Backbone, "__call__", compute)
    saved = cached_features(dataset.parent / "cache" / "features.h5")
    assert len(saved) == 8  # two whole batches
    for path, feature in saved.items():
        np.testing.assert_array_equal(feature, reference[path])
    summary = extract(dataset, batch_size=4)
    assert summary.computed == 22 - 8
    final = cached_features(summary.cache)
    assert final.keys() == reference.keys()
    for path, feature in final.items():
        np.testing.assert_array_equal(feature, reference[path])


def test_rebuild_moves_the_old_cache_aside(extract, dataset, tmp_path):
    extract(dataset)
    summary = extract(dataset, rebuild=True)
    assert summary.computed == 6
    assert len(list((tmp_path / "cache").glob("features.h5.replaced-*"))) == 1


def test_a_moved_file_read_after_a_checkpoint(extract, dataset):
    """The moved file's old row is dropped at the first checkpoint; its features must still
    be found (or computed again), never lost or mixed up."""
    before = cached_features(extract(dataset).cache)
    (dataset / "train/cat/0.png").rename(dataset / "train/dog/zzz.png")  # moved: new path, same content
    for i in range(12):  # new images read (and checkpointed) before it
        make_image(dataset / "train/dog" / f"a-{i:02d}.png", seed=700 + i)
    summary = extract(dataset, batch_size=2, save_every=0)
    after = cached_features(summary.cache)
    np.testing.assert_array_equal(after["train/dog/zzz.png"], before["train/cat/0.png"])
    assert "train/cat/0.png" not in after and summary.removed == 1
