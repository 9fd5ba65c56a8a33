import logging
import pickle
from dataclasses import replace

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from classify import KerasMLPClassifier, keras_head
from classify.splits import load_splits
from conftest import blobs, write_synthetic_cache
from extract import import_keras


@parametrize_with_checks([KerasMLPClassifier(random_state=0)])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def test_defaults_are_the_seeds_head_on_standardized_input():
    X, y = blobs()
    head = KerasMLPClassifier(random_state=0).fit(X, y)
    kinds = [type(layer).__name__ for layer in head.model_.layers]
    assert kinds == ["Flatten", "Normalization", "Dense", "Dense"]
    seeds = KerasMLPClassifier(standardize=False, random_state=0).fit(X, y)
    assert [type(layer).__name__ for layer in seeds.model_.layers] == ["Flatten", "Dense", "Dense"]
    hidden, output = head.model_.layers[2], head.model_.layers[3]
    assert (hidden.units, hidden.activation.__name__) == (256, "relu")
    assert (output.units, output.activation.__name__) == (3, "softmax")
    assert type(head.model_.optimizer).__name__ == "Adam"
    assert float(head.model_.optimizer.learning_rate) == pytest.approx(0.001)
    assert head.model_.loss == "categorical_crossentropy"
    assert len(head.history_["loss"]) == 10 and head.get_params()["batch_size"] == 32


def test_standardizing_inside_the_model_rescues_features_far_from_zero():
    """VGG16's features are ReLU outputs in the hundreds, many of them dead: the blog recipe's head
    on them as they are learns little; standardized, it learns. A feature that never varied
    in training (a dead unit) is centred and divided by 1, as StandardScaler does, not by
    Keras's epsilon (1e-7) when it fires later."""
    X, y = blobs(per_class=60, features=8)  # what tells the classes apart: small numbers
    large = 1000 + 300 * np.random.default_rng(0).standard_normal((len(X), 56))  # what does not: large ones
    X = np.concatenate([X, large], axis=1).astype(np.float32)
    X[:, 0] = 0.0  # a dead unit
    train, validation = np.arange(len(X)) % 3 != 0, np.arange(len(X)) % 3 == 0
    standardized = KerasMLPClassifier(random_state=0).fit(X[train], y[train])
    assert standardized.score(X[validation], y[validation]) >= 0.9
    layer = standardized.model_.get_layer("standardize")
    np.testing.assert_allclose(np.ravel(layer.mean), X[train].mean(axis=0), rtol=1e-5)
    expected = X[train].var(axis=0)
    expected[0] = 1.0
    np.testing.assert_allclose(np.ravel(layer.variance), expected, rtol=1e-4)
    fired = X[validation].copy()
    fired[:, 0] = 1e4
    np.testing.assert_allclose(np.asarray(layer(fired))[:, 0], 1e4)  # (x - 0) / 1, not / 1e-7
    assert np.all(np.isfinite(standardized.predict_proba(fired)))
    raw = KerasMLPClassifier(standardize=False, random_state=0).fit(X[train], y[train])
    assert raw.score(X[validation], y[validation]) <= 0.6  # seen: 0.40, against 0.98 standardized


def test_dropout_adds_a_layer_and_is_validated():
    X, y = blobs()
    head = KerasMLPClassifier(dropout_rate=0.5, hidden_units=32, epochs=1, random_state=0).fit(X, y)
    assert [type(layer).__name__ for layer in head.model_.layers] == ["Flatten", "Normalization", "Dense", "Dropout", "Dense"]
    with pytest.raises(ValueError, match="dropout_rate"):
        KerasMLPClassifier(dropout_rate=1.5).fit(X, y)


def test_learns_and_gives_probabilities():
    X, y = blobs(seed=1)
    head = KerasMLPClassifier(random_state=0, epochs=20).fit(X, y)
    probabilities = head.predict_proba(X)
    assert list(head.classes_) == ["a", "b", "c"]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert (head.predict(X) == y).mean() > 0.95


def test_same_seed_same_head():
    X, y = blobs(seed=2)
    first = KerasMLPClassifier(random_state=7, epochs=3).fit(X, y).predict_proba(X)
    again = KerasMLPClassifier(random_state=7, epochs=3).fit(X, y).predict_proba(X)
    other = KerasMLPClassifier(random_state=8, epochs=3).fit(X, y).predict_proba(X)
    np.testing.assert_allclose(first, again, atol=1e-6)
    assert not np.allclose(first, other, atol=1e-4)


def test_joblib_round_trip_in_keras_format(tmp_path):
    X, y = blobs(seed=3)
    head = KerasMLPClassifier(random_state=0, epochs=2).fit(X, y)
    joblib.dump(head, tmp_path / "head.joblib")
    state = head.__getstate__()
    assert state["model_"][:2] == b"PK"  # a .keras file is a zip archive
    loaded = joblib.load(tmp_path / "head.joblib")
    np.testing.assert_allclose(loaded.predict_proba(X), head.predict_proba(X), atol=1e-6)
    assert pickle.loads(pickle.dumps(clone(head))).get_params() == head.get_params()


def test_early_stopping_restores_the_best_weights():
    X, y = blobs(per_class=40, seed=4)
    noise = np.random.default_rng(0).permutation(y)  # labels the features cannot predict
    head = KerasMLPClassifier(random_state=0, epochs=60, learning_rate=0.01, early_stopping=True, patience=2)
    head.fit(X, y, validation_data=(X[:60] + 5, noise[:60]))
    losses = head.history_["val_loss"]
    assert len(losses) < 60
    keras_loss = head.model_.evaluate(
        X[:60] + 5, np.eye(3)[np.searchsorted(head.classes_, noise[:60])], verbose=0, return_dict=True
    )["loss"]
    assert keras_loss == pytest.approx(min(losses), rel=1e-4)


def test_balanced_class_weights_are_passed_to_keras():
    X, y = blobs(per_class=20)
    X, y = X[:45], y[:45]  # 20 a, 20 b, 5 c
    head = KerasMLPClassifier(class_weight="balanced", epochs=1, random_state=0).fit(X, y)
    weights = head._class_weights(np.unique(y, return_inverse=True)[1])
    assert weights[2] == pytest.approx(3.0) and weights[0] == pytest.approx(0.75)


def test_composes_with_pipeline_and_grid_search():
    X, y = blobs(seed=5)
    search = GridSearchCV(
        make_pipeline(StandardScaler(), KerasMLPClassifier(epochs=2, random_state=0)),
        {"kerasmlpclassifier__hidden_units": [8, 16]}, cv=2,
    ).fit(X, y)
    assert search.best_params_["kerasmlpclassifier__hidden_units"] in (8, 16)


def test_each_epoch_sees_one_view_of_every_image():
    import keras

    from classify.data import Rows
    from classify.keras_head import _batches, _epoch_orders

    images = np.array([0, 1, 2, 3, 0, 1, 2, 0, 0])  # image 3 has no views, image 0 has three
    X = np.arange(len(images), dtype=np.float32)[:, None]
    rows = Rows.from_arrays(X, images, images)
    data = _batches(keras, rows, images, 4, 3, _epoch_orders(rows, np.random.RandomState(0)))
    seen = []
    for _ in range(4):
        data.on_epoch_begin()
        rows = np.concatenate([data[i][0][:, 0] for i in range(len(data))]).astype(int)
        data.on_epoch_end()
        assert sorted(images[rows]) == [0, 1, 2, 3]  # every image once
        seen.append(rows)
    rows_of_image_0 = [int(next(row for row in rows if images[row] == 0)) for rows in seen]
    assert sorted(rows_of_image_0) == [0, 4, 7, 8]  # a different view each epoch


def test_views_train_the_mlp_one_per_image_per_epoch(monkeypatch):
    from classify import keras_head

    made = []
    batches = keras_head._batches
    monkeypatch.setattr(keras_head, "_batches", lambda *a: made.append(batches(*a)) or made[-1])
    X, y = blobs(per_class=20)
    rng = np.random.default_rng(0)
    views = X + rng.normal(0, 0.3, X.shape).astype(np.float32)
    images = np.concatenate([np.arange(len(X)), np.arange(len(X))])
    head = KerasMLPClassifier(random_state=0, epochs=3, batch_size=10).fit(
        np.concatenate([X, views]), np.concatenate([y, y]), image_index=images
    )
    assert len(head.history_["loss"]) == 3 and head.score(X, y) > 0.9
    assert len(made) == 1 and len(made[0]) == 6  # 60 images a epoch in batches of 10, not 120 rows
    with pytest.raises(ValueError, match="image_index"):
        KerasMLPClassifier().fit(X, y, image_index=images)


def test_cross_validating_the_mlp_prints_no_retracing_notes(tmp_path, capfd, caplog, monkeypatch):
    """Every fit builds a model whose steps TensorFlow traces once; as the CLI, the API says
    nothing of "tf.function retracing" (TensorFlow counts all Keras models' steps as one)."""
    from tensorflow.python.eager.polymorphic_function import polymorphic_function

    from classify import train_head

    # a fresh count: TensorFlow notes a function twice at most per process, and earlier tests may have used them
    monkeypatch.setattr(polymorphic_function, "_frequent_tracing_detector_manager",
                        polymorphic_function._FrequentTracingDetectorManager())
    cache = write_synthetic_cache(tmp_path / "c.h5", {"train": (("a", "b"), 20), "validation": (("a", "b"), 6)})
    with caplog.at_level(logging.INFO):
        training = train_head(cache, "mlp", cv=3, epochs=2, out=tmp_path / "run")
    assert training.results[0].cross_validation["folds"] == 3
    assert "retracing" not in caplog.text + capfd.readouterr().err




def test_batches_are_read_few_ahead_of_the_model(monkeypatch, tmp_path):
    """Keras reads batches through tf.data's autotuned prefetch, which read 24 batches ahead
    of the model here (65, 208 MB, on 7x7x512 rows): each is now read once the model has
    taken all but AHEAD of those before it. Streamed rows, whose windows come in bursts."""
    keras = import_keras()
    seen = {"taken": 0, "ahead": 0}

    class Recording(keras_head.Reader):
        def take(self, start, stop):
            seen["ahead"] = max(seen["ahead"], start // 16 + 1 - seen["taken"])
            return super().take(start, stop)

    class Counting(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen["taken"] = batch + 1

    build = KerasMLPClassifier._build

    def building(self, *args):
        model = build(self, *args)
        fit = model.fit
        model.fit = lambda *given, callbacks=(), **options: fit(*given, callbacks=[*callbacks, Counting()], **options)
        return model

    monkeypatch.setattr(keras_head, "Reader", Recording)
    monkeypatch.setattr(KerasMLPClassifier, "_build", building)
    cache = write_synthetic_cache(tmp_path / "c.h5", {"train": (("a", "b"), 1500)}, features=4096)
    with load_splits(cache, None, 0.2, seed=0) as splits:
        rows = replace(splits.train, block_rows=100, window_rows=400)
        KerasMLPClassifier(epochs=1, batch_size=16, random_state=0).fit_rows(rows)
    assert 2 <= seen["ahead"] <= keras_head.AHEAD + 1  # Keras reads batches 0 and 1 before it trains
