"""classify.sgd_head: the linear heads that learn from streamed rows."""

import numpy as np
import pytest

from classify.sgd_head import SGDLinearClassifier
from conftest import blobs


@pytest.mark.parametrize("loss", ["log_loss", "hinge"])
def test_balanced_class_weights_favour_the_rare_class(loss):
    X, y = blobs(classes=("0", "1"), per_class=200, seed=2, spread=4.0)  # overlapping; labels that look like numbers
    keep = np.concatenate([np.arange(200), np.arange(200, 220)])  # 200 of class "0", 20 of class "1"
    plain = SGDLinearClassifier(loss=loss, random_state=0).fit(X[keep], y[keep])
    balanced = SGDLinearClassifier(loss=loss, class_weight="balanced", random_state=0).fit(X[keep], y[keep])
    rare = y == "1"
    assert (balanced.predict(X[rare]) == "1").mean() > (plain.predict(X[rare]) == "1").mean()


def test_the_same_seed_gives_the_same_head_and_another_seed_another():
    X, y = blobs(per_class=40, seed=3, spread=3.0)
    first, again, other = (SGDLinearClassifier(random_state=seed).fit(X, y) for seed in (0, 0, 1))
    np.testing.assert_array_equal(first.decision_function(X), again.decision_function(X))
    assert not np.array_equal(first.decision_function(X), other.decision_function(X))


def test_a_fitted_head_refuses_rows_of_another_width():
    X, y = blobs(per_class=10)
    head = SGDLinearClassifier(random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        head.predict(X[:, :3])


@pytest.mark.parametrize("classes", [("a", "b"), ("a", "b", "c")])
def test_svm_probabilities_rank_classes_as_predict_does(classes):
    X, y = blobs(classes=classes, per_class=30, seed=4, spread=6.0)  # overlapping: uncertain rows
    head = SGDLinearClassifier(loss="hinge", random_state=0).fit(X, y)
    probabilities = head.predict_proba(X)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1)
    assert (head.classes_[probabilities.argmax(axis=1)] == head.predict(X)).all()  # no uniform ties
