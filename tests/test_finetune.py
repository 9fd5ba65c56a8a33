"""Fine-tuning VGG16's block5 from cached block4_pool maps (issue 30): `extract-features
--layer`, `train-head --head finetune`, the other heads on such a cache, export and scoring."""

import json
import os
import shutil

import h5py
import keras
import numpy as np
import pytest

import helpers
from classify import export_model, load_head, score_images, train_head
from classify.splits import load_splits
from classify.finetune import feature_sets
from conftest import make_dataset
from extract import FeatureCache, FeatureConfig, extract_features, fingerprint, list_configs
from extract.reader import decode
from helpers import EXTRACT, SCORE, TRAIN, call, listing, one_line

SIZE = 48  # block4_pool 3x3x512, block5_pool 1x1x512


@pytest.fixture(scope="module")
def world(tmp_path_factory, weights_file):
    """Three classes of 8 images; a block4_pool cache (2 views of each training image) and the
    default block5_pool configuration of the same images in a second cache."""
    root = tmp_path_factory.mktemp("finetune")
    make_dataset(root / "data", per_class=8, classes=("cat", "dog", "fox"))
    extract_features(root / "data", root / "b4.h5", input_size=SIZE, weights=weights_file, layer="block4_pool",
                     augment=2, progress=False)
    extract_features(root / "data", root / "b5.h5", input_size=SIZE, weights=weights_file, progress=False)
    return root


def test_a_layers_cache_holds_what_plain_keras_computes_there(world, weights_file):
    model = keras.applications.VGG16(include_top=False, weights=str(weights_file), input_shape=(SIZE, SIZE, 3))
    cut = keras.Model(model.inputs, model.get_layer("block4_pool").output)
    with FeatureCache(world / "b4.h5") as cache:
        paths, features = cache.paths(), cache.features()
        assert cache.feature_shape == (3, 3, 512) and cache.config["layer"] == "block4_pool"
    pixels = np.stack([decode((world / "data" / path).read_bytes(), SIZE) for path in paths]).astype(np.float32)
    expected = cut.predict(keras.applications.vgg16.preprocess_input(pixels), verbose=0)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-4)


def test_the_layer_is_part_of_the_configuration_and_the_default_keeps_its_fingerprint(world, weights_file):
    default = FeatureConfig(SIZE, weights=str(weights_file))
    assert "layer" not in default.identity()  # caches made before --layer keep their fingerprints
    assert [c["fingerprint"] for c in list_configs(world / "b5.h5")] == [fingerprint(default.identity())]
    below = FeatureConfig(SIZE, weights=str(weights_file), layer="block4_pool")
    assert [c["fingerprint"] for c in list_configs(world / "b4.h5")] == [fingerprint(below.identity())]
    assert fingerprint(below.identity()) != fingerprint(default.identity())
    assert FeatureConfig(224, layer="block4_pool").feature_shape == (14, 14, 512)
    assert FeatureConfig(224, layer="block3_conv2").feature_shape == (56, 56, 256)
    assert FeatureConfig(224, layer="block4_pool", pooling="avg").feature_shape == (512,)


def test_an_unknown_layer_is_one_line_listing_the_valid_names(dataset, tmp_path):
    done = call(EXTRACT, dataset, "--cache", tmp_path / "c.h5", "--layer", "block6_pool", "--input-size", "32",
                "--weights", "random")
    one_line(done, 2, "Expected --layer to be one of block1_conv1,", "block4_pool,", "block5_pool; received 'block6_pool'")
    assert not (tmp_path / "c.h5").exists()


def test_a_batch_of_a_low_layer_too_large_to_hold_is_refused_naming_the_batch_size_that_fits(dataset, tmp_path):
    """block1_conv1 at 1024 px is 256 MiB a row: 32 of them (8 GiB) were taken, and held three times over."""
    done = call(EXTRACT, dataset, "--cache", tmp_path / "c.h5", "--layer", "block1_conv1", "--input-size", "1024",
                "--weights", "random")
    one_line(done, 2, "--layer block1_conv1 at most 2 GiB", "received 32 x 256 MiB (1024x1024x64 float32",
             "Lower --batch-size to 8.")
    assert not listing(tmp_path, "c.h5*")
    (tmp_path / "empty").mkdir()  # the batch that fits passes the check, to the next refusal
    one_line(call(EXTRACT, tmp_path / "empty", "--cache", tmp_path / "c.h5", "--layer", "block1_conv1",
                  "--input-size", "1024", "--batch-size", "8", "--weights", "random"), 2, "Found no images")


def test_a_float16_layer_cache_is_extracted_incrementally(tmp_path, weights_file):
    make_dataset(tmp_path / "data", per_class=3)
    options = dict(input_size=32, weights=weights_file, layer="block4_pool", dtype="float16", progress=False)
    first = extract_features(tmp_path / "data", tmp_path / "c.h5", **options)
    make_dataset(tmp_path / "data", per_class=3, seed=7, classes=("owl",))
    second = extract_features(tmp_path / "data", tmp_path / "c.h5", **options)
    assert (first.computed, second.computed) == (6, 3)
    with FeatureCache(tmp_path / "c.h5") as cache:
        assert cache.features().shape == (9, 2, 2, 512) and cache.features().dtype == np.float16


def test_finetune_trains_a_head_folder_with_its_learning_curve(world, tmp_path):
    training = train_head(world / "b4.h5", "finetune", out=tmp_path / "head", epochs=2, head_epochs=2,
                          early_stopping=False)
    folder = training.folder
    assert {"head.joblib", "head.json", "metrics.json", "predictions.csv", "learning_curve.png", "report.html",
            "SHA256SUMS"} <= {path.name for path in folder.iterdir()}
    head = load_head(folder)
    history = head.estimator.history_
    assert history["fine_tuning_from"] == [2] and len(history["val_loss"]) == 4  # 2 of the head alone, 2 tuned
    info = json.loads((folder / "head.json").read_text())
    assert info["feature_config"]["layer"] == "block4_pool" and info["training_views"] == 42
    assert info["params"]["learning_rate"] == 1e-4 and info["params"]["momentum"] == 0.9


def test_finetune_cross_validates_few_images_holding_out_one_of_each_class_to_stop_early(world, tmp_path):
    """A fold of 14 images of 3 classes: a tenth of them (2) held out for early stopping
    was fewer than the classes, and every fold refused."""
    training = train_head(world / "b4.h5", "finetune", out=tmp_path / "head", cv=3, epochs=1, head_epochs=1,
                          report=False)
    assert training.results[0].cross_validation["folds"] == 3


def test_too_few_images_to_stop_early_say_so_and_name_no_early_stopping():
    from classify.keras_head import KerasMLPClassifier
    with pytest.raises(ValueError, match=r"Too few images to hold out a validation split for early stopping "
                                         r"\(3 images of 3 classes, 1 of the least\); add images or pass "
                                         r"--no-early-stopping"):
        KerasMLPClassifier(early_stopping=True, epochs=1).fit(np.eye(3), [0, 1, 2])


def test_finetune_changes_block5(world, tmp_path, weights_file):
    head = load_head(train_head(world / "b4.h5", "finetune", out=tmp_path / "head", epochs=2, head_epochs=1,
                                early_stopping=False, learning_rate=0.01).folder)
    tuned = head.estimator.model_.get_layer("vgg16_above_block4_pool").get_layer("block5_conv3").get_weights()[0]
    start = keras.applications.VGG16(include_top=False, weights=str(weights_file), input_shape=(SIZE, SIZE, 3))
    assert np.abs(tuned - start.get_layer("block5_conv3").get_weights()[0]).max() > 0


def test_the_exported_finetune_model_gives_the_pipelines_probabilities(world, tmp_path):
    folder = train_head(world / "b4.h5", "finetune", out=tmp_path / "head", epochs=2, head_epochs=2).folder
    export_model(folder, tmp_path / "model.keras")
    model = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    with FeatureCache(world / "b4.h5") as cache:
        paths = list(cache.paths())
    pixels = np.stack([decode((world / "data" / path).read_bytes(), SIZE) for path in paths])
    exported = model.predict(pixels, verbose=0)
    rows = list(score_images([world / "data" / path for path in paths], folder))
    classes = load_head(folder).classes
    scored = np.array([[dict(row.top)[name] for name in classes] for row in rows])
    np.testing.assert_allclose(exported, scored, atol=1e-5)
    assert model.input_shape == (None, SIZE, SIZE, 3) and model.output_shape == (None, 3)


def test_the_exported_model_of_a_float16_cache_rounds_as_the_cache_does(tmp_path, weights_file):
    """The head learnt float16 maps: the model gives it its maps rounded so. Unrounded, 69% of
    them differed from the cache's (by up to half a float16 step), and the probabilities of a
    head trained on cached views by 3.8e-3."""
    make_dataset(tmp_path / "data", per_class=6, classes=("cat", "dog", "fox"))
    extract_features(tmp_path / "data", tmp_path / "c.h5", input_size=SIZE, weights=weights_file, layer="block4_pool",
                     dtype="float16", progress=False)
    folder = train_head(tmp_path / "c.h5", "finetune", out=tmp_path / "head", epochs=1, head_epochs=1,
                        report=False).folder
    model = export_model(folder, tmp_path / "model.keras")
    with FeatureCache(tmp_path / "c.h5") as cache:
        paths, stored = list(cache.paths()), cache.features()
    pixels = np.stack([decode((tmp_path / "data" / path).read_bytes(), SIZE) for path in paths])
    maps = keras.Model(model.inputs, model.get_layer("flatten_features").output).predict(pixels, verbose=0)
    assert (maps != stored.reshape(len(paths), -1)).mean() < 0.01  # a rare float32 difference may round apart
    classes = load_head(folder).classes
    scored = [[dict(row.top)[name] for name in classes] for row in score_images([tmp_path / "data" / path for path in paths], folder)]
    np.testing.assert_allclose(model.predict(pixels, verbose=0), scored, atol=1e-5)


def test_score_images_with_a_finetune_head_reuses_the_cached_maps(world, tmp_path):
    folder = train_head(world / "b4.h5", "finetune", out=tmp_path / "head", epochs=1, head_epochs=1).folder
    images = sorted(str(path) for path in (world / "data").glob("validation/*/*.png"))
    done = call(SCORE, *images, "--head", folder, "--cache", world / "b4.h5", "--format", "jsonl", "--quiet")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["status"] for row in rows] == ["ok"] * len(images)
    fresh = list(score_images(images, folder))
    np.testing.assert_allclose([row["probability"] for row in rows], [row.probability for row in fresh], atol=1e-5)


def test_the_other_heads_train_on_block5_maps_computed_from_the_cache(world, weights_file, tmp_path):
    with load_splits(world / "b4.h5", None, 0.2, seed=0, augment=False) as splits:
        (derived, names), (maps, tuned) = feature_sets(["logreg", "finetune"], ["finetune"], True, splits,
                                                             world / "b4.h5", None)
        assert (names, tuned) == (["logreg"], ["finetune"]) and maps.base.layer == "block4_pool"
        computed = derived.validation.load().X
        key = derived.fingerprint
    with FeatureCache(world / "b5.h5") as cache:
        assert cache.fingerprint == key  # the configuration of --layer block5_pool with these weights
        order = {path: i for i, path in enumerate(cache.paths())}
        with FeatureCache(world / "b4.h5") as b4:
            validation = [order[path] for path, split in zip(b4.paths(), b4.splits()) if split == "validation"]
        stored = cache.features_at(validation).reshape(len(validation), -1)
    np.testing.assert_allclose(computed, stored, rtol=1e-5, atol=1e-4)
    training = train_head(world / "b4.h5", "all", out=tmp_path / "all", epochs=1, head_epochs=1, report=False)
    heads = {result.head: load_head(result.folder) for result in training.results}
    assert set(heads) == {"mlp", "logreg", "linear-svm", "sgd-logreg", "sgd-svm", "sklearn-mlp", "knn",
                          "random-forest", "finetune"}
    assert heads["logreg"].fingerprint == key and heads["logreg"].info["computed_from"]["layer"] == "block4_pool"
    assert heads["finetune"].fingerprint == list_configs(world / "b4.h5")[0]["fingerprint"]
    # a derived head is a head of the block5_pool configuration: it scores that cache's features
    with FeatureCache(world / "b5.h5") as cache:
        assert heads["logreg"].predict_proba(cache.features(), cache.fingerprint).shape == (len(cache.paths()), 3)


def test_all_on_a_block5_cache_leaves_finetune_out_without_a_word(world, tmp_path):
    done = call(TRAIN, "--cache", world / "b5.h5", "--head", "all", "--out", tmp_path / "all", "--no-report",
                "--epochs", "1")
    assert done.returncode == 0 and "finetune" not in done.stdout + done.stderr, done.stderr


def test_finetune_on_another_cache_names_the_command_that_makes_the_right_one(world, tmp_path, weights_file):
    done = call(TRAIN, "--cache", world / "b5.h5", "--head", "finetune", "--out", tmp_path / "head")
    one_line(done, 2, "--head finetune tunes VGG16's block5 from cached unpooled block4_pool maps",
             f"extract-features {world / 'data'} --layer block4_pool --pooling none --input-size {SIZE} "
             f"--weights {weights_file}")
    assert not (tmp_path / "head").exists()


def test_finetune_on_a_pooled_layer_cache_is_refused_but_the_other_heads_use_it(tmp_path, weights_file):
    make_dataset(tmp_path / "data", per_class=6)
    extract_features(tmp_path / "data", tmp_path / "c.h5", input_size=32, weights=weights_file, layer="block4_pool",
                     pooling="avg", progress=False)
    one_line(call(TRAIN, "--cache", tmp_path / "c.h5", "--head", "finetune"), 2, "--pooling none", "--layer block4_pool")
    head = load_head(train_head(tmp_path / "c.h5", "logreg", out=tmp_path / "head").folder)
    assert head.info["feature_config"]["feature_shape"] == [512] and "computed_from" not in head.info


def test_weights_gone_or_changed_are_one_line_naming_weights_and_nothing_is_written(world, tmp_path, weights_file):
    moved = tmp_path / "copy.h5"
    shutil.copy(weights_file, moved)
    data = tmp_path / "data"
    make_dataset(data, per_class=6)
    extract_features(data, tmp_path / "c.h5", input_size=32, weights=moved, layer="block4_pool", progress=False)
    moved.rename(tmp_path / "elsewhere.h5")
    for head in ("finetune", "logreg"):  # both run block5 with those weights
        one_line(call(TRAIN, "--cache", tmp_path / "c.h5", "--head", head, "--out", tmp_path / "head"), 2,
                 f"weights file {str(moved)!r}, which is not there; pass --weights PATH")
    assert not (tmp_path / "head").exists() and not listing(tmp_path, "head*")
    moved.mkdir()  # a folder where the weights were: there, but no weights file
    one_line(call(TRAIN, "--cache", tmp_path / "c.h5", "--head", "finetune", "--out", tmp_path / "head"), 2,
             f"weights file {str(moved)!r}, which is not a regular file; pass --weights PATH")
    moved.rmdir()
    with h5py.File(tmp_path / "other.h5", "w") as file:  # another file at the recorded place
        file.attrs["nothing"] = 1
    one_line(call(TRAIN, "--cache", tmp_path / "c.h5", "--head", "finetune", "--weights", tmp_path / "other.h5",
                  "--out", tmp_path / "head"), 2, "not the weights the cache's features were made with", "--weights PATH")
    done = call(TRAIN, "--cache", tmp_path / "c.h5", "--head", "finetune", "--weights", tmp_path / "elsewhere.h5",
                "--out", tmp_path / "head", "--epochs", "1", "--head-epochs", "1", "--quiet")
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not os.path.isfile("/proc/self/mem"), reason="needs Linux's /proc/self/mem")
def test_a_weights_file_that_cannot_be_read_is_one_line_before_any_work(world, tmp_path):
    unreadable = "/proc/self/mem"  # a regular file whose first read fails (EIO), even for root
    one_line(call(EXTRACT, world / "data", "--cache", tmp_path / "c.h5", "--weights", unreadable, "--input-size", "32"),
             2, f"Cannot read the weights file {unreadable!r} (Input/output error)", "--weights PATH")
    assert list(tmp_path.iterdir()) == []  # not even the cache's lock file
    one_line(call(TRAIN, "--cache", world / "b4.h5", "--head", "finetune", "--weights", unreadable,
                  "--out", tmp_path / "head"), 2, f"Cannot read the weights file {unreadable!r}")
    assert list(tmp_path.iterdir()) == []


def test_export_uses_the_weights_train_head_was_given(tmp_path, weights_file):
    moved = tmp_path / "copy.h5"
    shutil.copy(weights_file, moved)
    make_dataset(tmp_path / "data", per_class=6)
    extract_features(tmp_path / "data", tmp_path / "c.h5", input_size=32, weights=moved, layer="block4_pool",
                     progress=False)
    moved.rename(tmp_path / "elsewhere.h5")
    done = call(TRAIN, "--cache", tmp_path / "c.h5", "--head", "logreg", "--weights", tmp_path / "elsewhere.h5",
                "--export", tmp_path / "model.keras", "--out", tmp_path / "head", "--quiet")
    assert done.returncode == 0, done.stderr
    assert keras.saving.load_model(tmp_path / "model.keras").output_shape == (None, 2)


@pytest.mark.parametrize("args, words", [
    (("--head-epochs", "-1"), "Expected --head-epochs between 0 and 10000; received -1."),
    (("--learning-rate", "0"), "Expected --learning-rate between 0 and 10 (0 excluded); received 0.0."),
    (("--head", "mlp", "--head-epochs", "2"), "Expected --head finetune (or all) with --head-epochs"),
])
def test_finetune_options_are_checked_like_the_other_heads(world, tmp_path, args, words):
    head = () if "--head" in args else ("--head", "finetune")
    one_line(call(TRAIN, "--cache", world / "b4.h5", *head, *args, "--out", tmp_path / "head"), 2, words)
    assert not (tmp_path / "head").exists()


def test_one_class_is_refused_as_for_the_other_heads(tmp_path, weights_file):
    make_dataset(tmp_path / "data", per_class=6, classes=("cat",))
    extract_features(tmp_path / "data", tmp_path / "c.h5", input_size=32, weights=weights_file, layer="block4_pool",
                     progress=False)
    one_line(call(TRAIN, "--cache", tmp_path / "c.h5", "--head", "finetune", "--out", tmp_path / "h"), 2,
             "Expected at least 2 classes in the training split")


def test_finetune_streams_a_cache_larger_than_the_budget(world, tmp_path):
    training = train_head(world / "b4.h5", "finetune", out=tmp_path / "head", epochs=2, head_epochs=1,
                          memory_budget="64K", early_stopping=False)
    assert training.streamed and json.loads((training.folder / "head.json").read_text())["arguments"]["streamed"]
    assert len(load_head(training.folder).estimator.history_["loss"]) == 3


def test_ctrl_c_in_finetune_is_one_line_and_leaves_nothing(world, tmp_path):
    process = helpers.start(TRAIN, "--cache", world / "b4.h5", "--head", "finetune", "--epochs", "10000",
                            "--no-early-stopping", "--out", tmp_path / "run", "--quiet")
    helpers.ctrl_c(process, tmp_path, "run.partial-*", 1.0)  # 1 s: into the epochs
    assert list(tmp_path.iterdir()) == []


def test_scoring_a_computed_from_head_with_the_maps_cache_says_to_leave_out_the_cache(world, tmp_path):
    folder = train_head(world / "b4.h5", "logreg", out=tmp_path / "head").folder
    image = next((world / "data").glob("validation/*/*.png"))
    one_line(call(SCORE, image, "--head", folder, "--cache", world / "b4.h5"), 2,
             "trained on block5_pool maps computed from the block4_pool maps", "leave out --cache")
    done = call(SCORE, image, "--head", folder, "--quiet")
    assert done.returncode == 0 and done.stdout.count("\n") == 2, done.stderr  # a header and the row


def test_a_second_step_that_only_makes_it_worse_keeps_the_first_steps_weights(world, tmp_path, weights_file):
    # learning rate 10: every tuned epoch scores worse on validation than the head trained on
    # frozen block5 did, so early stopping keeps block5 as the cache's weights made it
    head = load_head(train_head(world / "b4.h5", "finetune", out=tmp_path / "head", epochs=2, head_epochs=3,
                                learning_rate=10.0).folder)
    history = head.estimator.history_
    assert min(history["val_loss"][3:]) > min(history["val_loss"][:3])
    tuned = head.estimator.model_.get_layer("vgg16_above_block4_pool").get_layer("block5_conv1").get_weights()[0]
    start = keras.applications.VGG16(include_top=False, weights=str(weights_file), input_shape=(SIZE, SIZE, 3))
    np.testing.assert_array_equal(tuned, start.get_layer("block5_conv1").get_weights()[0])
