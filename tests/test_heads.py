import numpy as np
import pytest

from classify import HEADS
from conftest import blobs


def test_the_registry_holds_every_head():
    assert list(HEADS) == ["mlp", "logreg", "linear-svm", "sgd-logreg", "sgd-svm", "sklearn-mlp", "knn", "random-forest",
                           "finetune"]
    assert [name for name, head in HEADS.items() if head.streams] == ["mlp", "sgd-logreg", "sgd-svm", "finetune"]
    assert [name for name, head in HEADS.items() if head.tunes] == ["finetune"]  # on block4_pool maps: test_finetune.py


@pytest.mark.parametrize("name", [name for name, head in HEADS.items() if not head.tunes])
def test_every_head_trains_and_predicts(name):
    X, y = blobs(per_class=40, seed=1)
    X_test, y_test = blobs(per_class=10, seed=1)  # the same centres, new points
    estimator = HEADS[name].build(random_state=0).fit(X, y)
    assert list(estimator.classes_) == ["a", "b", "c"]
    assert (estimator.predict(X_test) == y_test).mean() > 0.9
    probabilities = estimator.predict_proba(X_test)
    assert probabilities.shape == (30, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("name", [name for name, head in HEADS.items() if head.grid])
def test_search_grids_name_real_parameters(name):
    estimator = HEADS[name].build(random_state=0)
    assert set(HEADS[name].grid) <= set(estimator.get_params())


@pytest.mark.parametrize("name", [name for name, head in HEADS.items() if head.class_weights])
def test_class_weight_reaches_the_estimator(name):
    params = HEADS[name].build(random_state=0, class_weight="balanced").get_params()
    assert "balanced" in [value for key, value in params.items() if key.endswith("class_weight")]
