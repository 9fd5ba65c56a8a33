"""The heads: every one a scikit-learn classifier on flattened feature vectors.

A head is added here, in one place: a builder function registered with `@head(...)`,
taking `random_state` and `class_weight` (and options of its own), plus the small grid
`--search` tries for its key hyperparameter. The CLI and `train_head` read `HEADS`.
A head whose estimator has `fit_rows(rows, validation)` streams: it can learn from rows
read from the cache a window at a time (see classify.data); the others need every
training feature in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from sklearn.base import BaseEstimator
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from classify.finetune import KerasFinetuneClassifier
from classify.keras_head import KerasMLPClassifier
from classify.sgd_head import SGDLinearClassifier


@dataclass(frozen=True)
class Head:
    name: str
    description: str
    build: Callable[..., BaseEstimator]
    grid: dict[str, list] = field(default_factory=dict)  # parameter (as get_params names it) -> values
    class_weights: bool = True  # whether class_weight="balanced" means anything to it
    tunes: bool = False  # it trains VGG16's block 5 on cached block4_pool maps (see classify.finetune)

    @property
    def streams(self) -> bool:
        return hasattr(self.build(), "fit_rows")


HEADS: dict[str, Head] = {}


def head(name: str, description: str, grid: dict[str, list], class_weights: bool = True, tunes: bool = False):
    """Register a builder `(random_state, class_weight, **options) -> estimator` as a head."""

    def register(build):
        HEADS[name] = Head(name, description, build, grid, class_weights, tunes)
        return build

    return register


@head(
    "mlp",
    "the blog recipe's head in Keras: Flatten, Dense(256, relu), Dense(n, softmax); Adam, 10 epochs; streams",
    grid={"hidden_units": [128, 256, 512], "dropout_rate": [0.0, 0.5]},
)
def mlp(random_state=None, class_weight=None, **options):
    return KerasMLPClassifier(random_state=random_state, class_weight=class_weight, **options)


@head(
    "logreg",
    "standardize, then multinomial logistic regression",
    grid={"logisticregression__C": [0.01, 0.1, 1.0, 10.0]},
)
def logreg(random_state=None, class_weight=None):
    return make_pipeline(
        StandardScaler(),
        LogisticRegression(C=1.0, max_iter=1000, class_weight=class_weight, random_state=random_state),
    )


@head(
    "linear-svm",
    "standardize, then a linear SVM with calibrated probabilities",
    grid={"calibratedclassifiercv__estimator__C": [0.001, 0.01, 0.1, 1.0]},
)
def linear_svm(random_state=None, class_weight=None):
    svm = LinearSVC(C=0.01, class_weight=class_weight, random_state=random_state)
    return make_pipeline(StandardScaler(), CalibratedClassifierCV(svm, cv=3))


@head(
    "sgd-logreg",
    "standardize, then logistic regression by SGD; streams (learns from features that do not fit in memory)",
    grid={"alpha": [1e-5, 1e-4, 1e-3, 1e-2]},
)
def sgd_logreg(random_state=None, class_weight=None):
    return SGDLinearClassifier(loss="log_loss", class_weight=class_weight, random_state=random_state)


@head(
    "sgd-svm",
    "standardize, then a linear SVM by SGD (hinge loss; probabilities a softmax of its margins); streams",
    grid={"alpha": [1e-5, 1e-4, 1e-3, 1e-2]},
)
def sgd_svm(random_state=None, class_weight=None):
    return SGDLinearClassifier(loss="hinge", class_weight=class_weight, random_state=random_state)


@head(
    "sklearn-mlp",
    "standardize, then scikit-learn's MLPClassifier (256 hidden units)",
    grid={"mlpclassifier__alpha": [1e-4, 1e-2, 1.0]},
    class_weights=False,
)
def sklearn_mlp(random_state=None, class_weight=None):
    return make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(256,), max_iter=200, early_stopping=True, random_state=random_state),
    )


@head(
    "knn",
    "k nearest neighbours by cosine distance (k=5, distance-weighted)",
    grid={"n_neighbors": [1, 3, 5, 10, 20]},
    class_weights=False,
)
def knn(random_state=None, class_weight=None):
    return KNeighborsClassifier(n_neighbors=5, metric="cosine", weights="distance")


@head(
    "random-forest",
    "a random forest of 300 trees",
    grid={"max_features": ["sqrt", 0.05, 0.2]},
)
def random_forest(random_state=None, class_weight=None):
    return RandomForestClassifier(n_estimators=300, class_weight=class_weight, n_jobs=-1, random_state=random_state)


@head(
    "finetune",
    "VGG16's block5, from the cache's weights, and the mlp head, tuned on cached block4_pool maps: the head first, "
    "then both by SGD (1e-4, momentum 0.9) with early stopping; streams",
    grid={"learning_rate": [1e-5, 1e-4, 1e-3]},
    tunes=True,
)
def finetune(random_state=None, class_weight=None, **options):
    return KerasFinetuneClassifier(random_state=random_state, class_weight=class_weight, **options)
