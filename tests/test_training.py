import json

import numpy as np
import pytest

from classify import HeadWarning, load_head, train_head
from conftest import SIZE, make_dataset, write_synthetic_cache
from extract import CacheError, FeatureCache, UsageError, extract_features

SPLITS = {"train": (("a", "b", "c"), 30), "validation": (("a", "b", "c"), 10), "test": (("a", "b", "c"), 10)}


@pytest.fixture
def cache(tmp_path):
    return write_synthetic_cache(tmp_path / "c.h5", SPLITS)


def test_one_head_is_scored_and_saved(cache, tmp_path):
    training = train_head(cache, "logreg", out=tmp_path / "run")
    result = training.results[0]
    assert result.scores["validation"]["accuracy"] > 0.9 and result.scores["validation"]["images"] == 30
    assert result.scores["test"]["images"] == 30
    assert np.array(result.scores["validation"]["confusion_matrix"]).sum() == 30
    files = sorted(path.name for path in (tmp_path / "run").iterdir())
    assert files == ["SHA256SUMS", "confusion_test.png", "confusion_validation.png", "head.joblib", "head.json",
                     "metrics.json", "predictions.csv", "report.html"]
    info = json.loads((tmp_path / "run" / "head.json").read_text())
    assert info["classes"] == ["a", "b", "c"] and info["fingerprint"] == "synthetic0000001"
    sums = (tmp_path / "run" / "SHA256SUMS").read_text().splitlines()
    listed = [line.split("  ")[1] for line in sums if not line.startswith("#")]
    sizes = {line.split("  ")[1]: int(line.split()[2]) for line in sums if line.startswith("# size ")}
    assert sizes == {name: (tmp_path / "run" / name).stat().st_size for name in listed}
    assert info["feature_config"]["pooling"] == "avg" and listed == files[1:-1]  # all but the report, which nothing loads
    assert info["metrics"]["validation"]["accuracy"] == result.scores["validation"]["accuracy"]


def test_a_loaded_head_predicts_what_the_trained_one_did(cache, tmp_path):
    result = train_head(cache, "mlp", out=tmp_path / "run").results[0]
    assert (tmp_path / "run" / "learning_curve.png").is_file()
    head = load_head(tmp_path / "run")
    with FeatureCache(cache) as features:
        X = features.features("validation")
        np.testing.assert_allclose(
            head.predict_proba(X, features.fingerprint), result.estimator.predict_proba(X), atol=1e-6
        )


def test_a_head_refuses_features_of_another_configuration(cache, tmp_path):
    train_head(cache, "knn", out=tmp_path / "run")
    head = load_head(tmp_path / "run")
    with pytest.raises(UsageError, match="configuration synthetic0000001 .* these are configuration other"):
        head.predict(np.zeros((1, 16)), "other")


def test_a_changed_artifact_is_refused(cache, tmp_path):
    train_head(cache, "logreg", out=tmp_path / "run")
    artifact = tmp_path / "run" / "head.joblib"
    data = artifact.read_bytes()
    artifact.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the same size
    with pytest.raises(UsageError, match="does not match the SHA-256"):
        load_head(tmp_path / "run")
    artifact.write_bytes(data + b"\0")
    with pytest.raises(UsageError, match="bytes, not the .* recorded in SHA256SUMS"):
        load_head(tmp_path / "run")


def test_all_heads_make_a_leaderboard(cache, tmp_path):
    training = train_head(cache, "all", out=tmp_path / "run", epochs=3)
    board = training.leaderboard()
    assert {row["head"] for row in board} == {"mlp", "logreg", "linear-svm", "sgd-logreg", "sgd-svm", "sklearn-mlp", "knn", "random-forest"}
    accuracies = [row["validation_accuracy"] for row in board]
    assert accuracies == sorted(accuracies, reverse=True)
    assert all((tmp_path / "run" / row["head"] / "head.joblib").is_file() for row in board)
    assert json.loads((tmp_path / "run" / "leaderboard.json").read_text()) == board


def test_search_picks_from_the_grid_on_validation(cache, tmp_path):
    result = train_head(cache, "knn", out=tmp_path / "run", search=True).results[0]
    assert [row["params"]["n_neighbors"] for row in result.search] == [1, 3, 5, 10, 20]
    best = max(result.search, key=lambda row: row["validation_accuracy"])
    assert result.estimator.n_neighbors == best["params"]["n_neighbors"]


def test_cross_validation_reports_mean_and_spread(cache, tmp_path):
    result = train_head(cache, "logreg", out=tmp_path / "run", cv=3).results[0]
    assert result.cross_validation["folds"] == 3
    assert 0.8 < result.cross_validation["accuracy_mean"] <= 1 and result.cross_validation["accuracy_std"] >= 0


@pytest.mark.parametrize("head", ["mlp", "random-forest", "sklearn-mlp"])
def test_a_seed_reproduces_a_head(cache, tmp_path, head):
    options = {"epochs": 2} if head == "mlp" else {}
    first, again, other = (
        train_head(cache, head, out=tmp_path / name, seed=seed, **options).results[0].scores["validation"]["log_loss"]
        for name, seed in (("one", 3), ("two", 3), ("three", 4))
    )
    assert first == pytest.approx(again, abs=1e-9)
    assert other != pytest.approx(first, abs=1e-9)


def test_without_a_validation_split_one_is_drawn(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c.h5", {"train": (("a", "b"), 50)})
    training = train_head(cache, "logreg", out=tmp_path / "run", validation_fraction=0.2)
    assert training.validation_source == "drawn"
    assert training.results[0].scores["validation"]["per_class"]["a"]["support"] == 10


def test_runs_never_overwrite(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = train_head(cache, "knn").folder
    second = train_head(cache, "knn").folder
    assert first != second and first.parent.name == second.parent.name == "heads"
    with pytest.raises(UsageError, match="not empty"):
        train_head(cache, "knn", out=first)
    assert not list(first.parent.glob("*.partial-*"))


@pytest.mark.parametrize(
    "splits, message",
    [
        ({"train": (("a",), 10)}, "at least 2 classes"),
        ({"train": (("a", "b"), 1)}, "has 1 training image"),
        ({"train": (("a", "b"), 5), "validation": (("a", "b", "z"), 2)}, "of class 'z' have no training images"),
        ({"unlabeled": (("",), 5)}, "no labeled training images"),
    ],
)
def test_data_that_cannot_train_a_head_is_refused(tmp_path, splits, message):
    cache = write_synthetic_cache(tmp_path / "c.h5", splits)
    with pytest.raises(UsageError, match=message):
        train_head(cache, "logreg", out=tmp_path / "run")


def test_a_class_with_few_images_is_a_warning(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c.h5", {"train": (("a", "b"), 4), "validation": (("a", "b"), 2)})
    with pytest.warns(HeadWarning, match="only 4 training images"):
        train_head(cache, "logreg", out=tmp_path / "run")


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"head": "svm"}, "Expected --head to be one of mlp, logreg"),
        ({"head": "knn", "hidden_units": 5}, "Expected --head mlp"),
        ({"head": "knn", "cv": 1}, "Expected --cv between 2 and 100; received 1."),
        ({"head": "knn", "validation_fraction": 1.5}, "--validation-fraction"),
    ],
)
def test_bad_arguments(cache, tmp_path, arguments, message):
    with pytest.raises(UsageError, match=message):
        train_head(cache, out=tmp_path / "run", **arguments)


def test_a_missing_cache_says_to_extract_first(tmp_path):
    with pytest.raises(CacheError, match="run extract-features first"):
        train_head(tmp_path / "none.h5", "logreg")


def test_on_a_real_extraction(tmp_path, weights_file):
    data = tmp_path / "data"
    make_dataset(data, per_class=6, classes=("cat", "dog", "fox"))
    summary = extract_features(data, tmp_path / "c.h5", input_size=SIZE, weights=weights_file, pooling="none",
                               progress=False)
    training = train_head(tmp_path / "c.h5", "logreg", out=tmp_path / "run")
    result = training.results[0]
    assert training.fingerprint == summary.fingerprint
    assert result.scores["validation"]["images"] == 3
    assert load_head(tmp_path / "run").info["n_features"] == 512


def test_scikit_learn_heads_train_on_every_view(augmented, tmp_path):
    training = train_head(augmented, "knn", out=tmp_path / "with")
    n = training.training_images
    assert (n, training.training_views) == (19, 38)  # 24 images, 5 drawn for validation
    assert training.results[0].estimator.n_samples_fit_ == 3 * n
    info = json.loads((tmp_path / "with" / "head.json").read_text())
    assert info["training_views"] == 38 and info["augmentation"]["views_per_image"] == 2
    without = train_head(augmented, "knn", out=tmp_path / "without", augment=False)
    assert without.training_views == 0 and without.results[0].estimator.n_samples_fit_ == n


def test_drawn_validation_holds_out_the_views_of_its_images(augmented):
    from classify.splits import load_splits

    with load_splits(augmented, None, 0.2, seed=0) as streamed:
        splits = streamed.load()
    with FeatureCache(augmented) as cache:
        views, features = cache.views(), cache.features().reshape(24, -1)
    views_by_image = {}
    for row, feature in zip(views.row, views.features.reshape(len(views.row), -1)):
        views_by_image.setdefault(features[row].tobytes(), []).append(feature.tobytes())
    n = splits.training_images
    training_views = {feature.tobytes() for feature in splits.train.X[n:]}
    assert len(splits.validation) == 5 and (n, splits.training_views) == (19, 38)
    for image in splits.validation.X:
        assert not training_views & set(views_by_image[image.tobytes()])  # no view of it in training
    for image, position in zip(splits.train.X[n:], splits.train.images[n:]):
        assert image.tobytes() in views_by_image[splits.train.X[position].tobytes()]  # each view with its image


def test_cross_validation_folds_keep_views_with_their_image():
    from classify.splits import image_folds

    labels = np.repeat(["a", "b"], 6)
    images = np.concatenate([np.arange(12), np.repeat(np.arange(12), 2)])  # 12 images, then 2 views of each
    folds = image_folds(labels, images, 3, seed=0)
    assert len(folds) == 3 and sorted(np.concatenate([test for _, test in folds])) == list(range(12))
    for train, test in folds:
        assert set(test) <= set(range(12))  # held-out images are scored themselves, never their views
        assert not set(images[train]) & set(test)  # no view of a held-out image trains
        assert len(train) == 3 * (12 - len(test))  # every row of every training image does


def test_mlp_search_and_cross_validation_with_views(augmented, tmp_path):
    training = train_head(augmented, "mlp", out=tmp_path / "run", search=True, cv=2, epochs=2)
    result = training.results[0]
    assert len(result.search) == 6 and result.cross_validation["folds"] == 2
    assert result.estimator.history_["loss"] and len(result.estimator.history_["loss"]) == 2
