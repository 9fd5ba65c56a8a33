import hashlib
import os
import shutil
from pathlib import Path

import h5py
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


def test_what_computed_the_features_is_recorded_but_no_reason_to_write(extract, dataset, monkeypatch):
    first = extract(dataset)
    with h5py.File(first.cache, "r+") as file:  # as written by an older Keras, before backends were recorded
        group = file["configs"][first.fingerprint]
        assert group.attrs["backends"] == "tensorflow" and group.attrs["keras_version"] == keras.__version__
        group.attrs["keras_version"] = "3.0.0"
        del group.attrs["backends"]
        del group.attrs["digest"]  # nor digests
    stamp = os.stat(first.cache).st_mtime_ns
    assert extract(dataset).computed == 0 and os.stat(first.cache).st_mtime_ns == stamp  # nothing written
    make_image(dataset / "train/cat/new.png", seed=5)
    assert extract(dataset).computed == 1
    with FeatureCache(first.cache) as cache:  # a run that writes records its own
        assert cache.config["keras_version"] == keras.__version__ and cache.config["backends"] == "tensorflow"


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


# Augmented views (--augment K)

def cached_views(cache_path) -> dict:
    """(path of the image, view) -> features, for the views in use."""
    with FeatureCache(cache_path) as cache:
        views, paths = cache.views(), cache.paths()
        return {(paths[row], int(view)): feature for row, view, feature in zip(views.row, views.view, views.features)}


def test_views_are_made_for_training_images_only(extract, dataset):
    summary = extract(dataset, augment=2)
    assert (summary.computed, summary.views_computed, summary.views, summary.views_per_image) == (6, 8, 8, 2)
    views = cached_views(summary.cache)
    assert {path for path, _ in views} == {f"train/{label}/{i}.png" for label in ("cat", "dog") for i in (0, 1)}
    with FeatureCache(summary.cache) as cache:
        assert len(cache.features()) == 6  # views are not rows
        table = cache.view_index(cache.config["views"])
        validation = set(cache.sha256("validation"))
    assert len(table) == 8 and not validation & {sha256 for sha256, _ in table}
    originals = cached_features(summary.cache)
    for (path, view), feature in views.items():
        assert not np.array_equal(feature, originals[path])


def test_views_are_deterministic(extract, dataset, tmp_path):
    first = cached_views(extract(dataset, augment=2).cache)
    second = cached_views(extract(dataset, augment=2, cache=tmp_path / "other.h5", batch_size=3).cache)
    assert first.keys() == second.keys()
    for key, feature in first.items():
        np.testing.assert_allclose(second[key], feature, rtol=1e-5, atol=1e-6)  # other batches, same numbers


def test_raising_augment_computes_only_the_missing_views(extract, dataset, monkeypatch):
    before = cached_views(extract(dataset, augment=1).cache)
    summary = extract(dataset, augment=3)
    assert (summary.computed, summary.views_computed, summary.views) == (0, 8, 12)
    after = cached_views(summary.cache)
    for key, feature in before.items():
        np.testing.assert_array_equal(after[key], feature)  # kept as they were, not recomputed
    monkeypatch.setattr(Backbone, "__init__", lambda *a: pytest.fail("the network was built for nothing"))
    written = os.stat(summary.cache).st_mtime_ns
    again = extract(dataset)  # no --augment: keep what the cache uses
    assert (again.views_per_image, again.views, again.views_computed) == (3, 12, 0)
    assert os.stat(summary.cache).st_mtime_ns == written  # nothing to write either


def test_a_flipped_view_is_the_features_of_the_mirror_image(extract, dataset, weights_file):
    from extract.augment import Augmentation
    from extract.config import FeatureConfig
    from extract.reader import decode

    augmentation = Augmentation(shear=0, zoom=0, flip=True)
    summary = extract(dataset, augment=4, augmentation=augmentation)
    backbone = Backbone(FeatureConfig(input_size=SIZE, weights=str(weights_file)))
    with FeatureCache(summary.cache) as cache:
        paths, hashes = cache.paths(), cache.sha256()
    originals, mirrored = cached_features(summary.cache), 0
    for (path, view), feature in cached_views(summary.cache).items():
        sha256 = hashes[list(paths).index(path)]
        if augmentation.parameters(sha256, view, (SIZE, SIZE, 3))["flip_horizontal"]:
            pixels = decode((dataset / path).read_bytes(), SIZE)[None, :, ::-1]
            np.testing.assert_allclose(feature, backbone(pixels)[0], rtol=1e-4, atol=1e-4)
            assert not np.allclose(feature, originals[path], rtol=1e-3, atol=1e-3)
            mirrored += 1
        else:
            np.testing.assert_allclose(feature, originals[path], rtol=1e-4, atol=1e-4)
    assert 0 < mirrored < 16


def test_views_follow_the_training_split(extract, dataset):
    extract(dataset, augment=2)
    (dataset / "validation/cat").mkdir(exist_ok=True)
    (dataset / "train/cat/0.png").rename(dataset / "validation/cat/moved.png")  # no views in validation
    make_image(dataset / "train/dog/new.png", seed=99)
    summary = extract(dataset)
    assert (summary.computed, summary.views_computed, summary.views) == (1, 2, 8)
    views = cached_views(summary.cache)
    assert ("train/dog/new.png", 2) in views and not any(path.startswith("validation/") for path, _ in views)
    with FeatureCache(summary.cache) as cache:
        assert len(cache.view_index(cache.config["views"])) == 8  # the moved image's views are dropped


def test_augment_zero_stops_using_views_but_keeps_them(extract, dataset):
    extract(dataset, augment=2)
    summary = extract(dataset, augment=0)
    assert summary.views_per_image == 0
    with FeatureCache(summary.cache) as cache:
        assert cache.views() is None
    again = extract(dataset, augment=2)
    assert (again.views_computed, again.views) == (0, 8)


def test_other_transforms_are_other_views(extract, dataset):
    from extract.augment import Augmentation

    first = cached_views(extract(dataset, augment=1).cache)
    other = Augmentation(shear=0, zoom=0.5)
    assert extract(dataset, augment=1, augmentation=other).views_computed == 4
    (dataset / "train/cat/0.png").unlink()  # the image rows are now written anew, not appended to
    assert extract(dataset, augment=1, augmentation=other).views_computed == 0
    back = extract(dataset, augment=1)  # the first views were kept through both writes
    assert (back.views_computed, back.views) == (0, 3)
    for key, feature in cached_views(back.cache).items():
        np.testing.assert_array_equal(feature, first[key])


def test_an_interrupted_augmented_run_resumes_without_recomputing(extract, dataset, monkeypatch):
    compute, batches = Backbone.__call__, []

    def interrupt_on_third_batch(self, pixels):
        batches.append(len(pixels))
        if len(batches) == 3:
            raise KeyboardInterrupt
        return compute(self, pixels)

    monkeypatch.setattr(Backbone, "__call__", interrupt_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        extract(dataset, augment=2, batch_size=4)
    monkeypatch.setattr(Backbone, "__call__", compute)
    summary = extract(dataset, augment=2, batch_size=4)
    assert summary.computed + summary.views_computed == 6 + 8 - 8  # two batches of 4 were kept
    assert (summary.rows, summary.views) == (6, 8)


def test_transform_options_need_augment(extract, dataset):
    from extract.augment import Augmentation

    with pytest.raises(UsageError, match="need --augment"):
        extract(dataset, augmentation=Augmentation(shear=1))
    with pytest.raises(UsageError, match="Expected --augment between 0 and 100"):
        extract(dataset, augment=-1)


# Shards and compaction

def test_checkpoints_leave_small_shards_that_compaction_merges(extract, dataset, tmp_path):
    first = extract(dataset, batch_size=1, save_every=0, compact="never")
    shards = tmp_path / "cache" / "features.h5.shards" / first.fingerprint
    assert len(list(shards.glob("*.h5"))) == 6  # one a checkpoint, one image each
    before = cached_features(first.cache)
    again = extract(dataset, compact="full")
    assert again.compacted == 6 and again.computed == 0 and len(list(shards.glob("*.h5"))) == 1
    for path, feature in cached_features(again.cache).items():
        np.testing.assert_array_equal(feature, before[path])


@pytest.mark.parametrize("share, commits", [(1e-9, 2), (1e9, 7)])
def test_a_checkpoint_writes_a_shard_and_the_catalog_only_within_its_share(extract, dataset, monkeypatch, share, commits):
    """Every checkpoint writes its batches as a shard; the catalog (whose cost grows with
    the cache) is committed at a checkpoint only while its writing stays under
    CATALOG_SHARE of the run's time: with no share, only the first (there was no cache)
    and the end; with all the time, every checkpoint and the end."""
    from extract import progress
    from extract import writer as writer_module

    monkeypatch.setattr(progress, "CATALOG_SHARE", share)
    written = []
    monkeypatch.setattr(writer_module, "write_catalog", lambda *a, real=writer_module.write_catalog: written.append(a) or real(*a))
    summary = extract(dataset, batch_size=1, save_every=0, compact="never")
    shards = list((Path(f"{summary.cache}.shards") / summary.fingerprint).glob("*.h5"))
    assert len(written) == commits and len(shards) == 6 and summary.computed == 6
    assert len(cached_features(summary.cache)) == 6


def test_a_failed_compaction_leaves_the_run_saved(extract, dataset, monkeypatch):
    from extract.errors import CacheError

    extract(dataset, batch_size=2, save_every=0, compact="never")
    make_image(dataset / "train/cat/new.png", seed=42)

    def full_disk(*args, **kwargs):
        raise CacheError("Could not write a shard (No space left on device); the cache is unchanged.")

    monkeypatch.setattr("extract.writer.write_shard", full_disk)
    with pytest.raises(CacheError):  # the run's own shard cannot be written either
        extract(dataset, compact="full")
    monkeypatch.undo()
    extract(dataset, compact="never")
    monkeypatch.setattr("extract.writer.write_shard", full_disk)
    summary = extract(dataset, compact="full")
    assert "No space left" in summary.compaction_error and summary.rows == 7
    assert len(cached_features(summary.cache)) == 7


def test_compact_must_be_a_known_choice(extract, dataset):
    with pytest.raises(UsageError, match="--compact"):
        extract(dataset, compact="sometimes")


def test_run_twice_from_inside_the_data_folder_with_the_default_cache(dataset, weights_file, monkeypatch):
    monkeypatch.chdir(dataset)
    first = extract_features(".", weights=weights_file, input_size=SIZE, progress=False)
    assert (dataset / "cache" / "features.h5").is_file() and first.computed == 6
    again = extract_features(".", weights=weights_file, input_size=SIZE, progress=False)
    assert (again.layout, again.computed, again.unchanged, again.skipped) == ("splits", 0, 6, 0)
    assert again.class_names == first.class_names == ["cat", "dog"]


def test_the_summary_names_the_configuration_and_a_new_one_beside_others(extract, dataset, weights_file):
    first = extract(dataset, input_size=48)
    assert first.configuration == f"weights {weights_file.name}, input size 48, pooling none, precision float32"
    assert (first.new_configuration, first.other_configurations, first.differences) == (True, 0, {})
    forgot = extract(dataset, interpolation="nearest")  # --input-size 48 forgotten: 32 px here
    assert forgot.configuration.endswith("precision float32, interpolation nearest")
    assert (forgot.new_configuration, forgot.other_configurations) == (True, 1)
    assert forgot.nearest_configuration == first.fingerprint
    assert forgot.differences == {"--input-size": ["32", "48"], "--interpolation": ["nearest", "bilinear"]}
    again = extract(dataset, input_size=48)
    assert (again.new_configuration, again.other_configurations, again.differences) == (False, 1, {})


def test_configurations_in_words_and_their_differences():
    from extract import FeatureConfig, describe, option_differences

    plain = FeatureConfig(weights="random", seed=3).identity()
    assert describe(plain) == "weights random (seed 3), input size 224, pooling none, precision float32"
    other = FeatureConfig(weights="imagenet", input_size=48, pooling="avg", decode="draft", dtype="float16").identity()
    assert describe(other) == ("weights imagenet, input size 48, pooling avg, precision float32, decode draft, "
                               "dtype float16")
    assert option_differences(other, plain) == {
        "--weights": ("imagenet", "random"), "--input-size": ("48", "224"), "--pooling": ("avg", "none"),
        "--decode": ("draft", "exact"), "--dtype": ("float16", "float32")}
    assert option_differences(plain, dict(plain, weights_seed=4)) == {"--seed": ("3", "4")}
    assert option_differences(plain, plain) == {}
    group = {"identity": other, "weights_path": "/w/mine.h5", "rows": 3}  # a cache group's attributes
    assert describe(dict(group, identity=dict(other, weights="file"))).startswith("weights mine.h5, input size 48")
