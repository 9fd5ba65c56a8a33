"""Linear heads that learn from a stream: standardize, then stochastic gradient descent.

One pass of `StandardScaler.partial_fit` over the rows, then `epochs` passes of
`SGDClassifier.partial_fit` over them in shuffled batches, so the rows can be read from the
cache a window at a time (`fit_rows`); `fit(X, y)` does the same on arrays.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import SGDClassifier
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.extmath import softmax
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, check_random_state, validate_data

from classify.data import Rows


class SGDLinearClassifier(ClassifierMixin, BaseEstimator):
    """loss: SGDClassifier's ("log_loss": logistic regression; "hinge": a linear SVM).
    alpha: L2 penalty. Probabilities: scikit-learn's for log_loss (one-vs-rest, normalized);
    for a loss without them, a softmax of the decision values: it ranks classes as
    `predict` does, but is not calibrated."""

    def __init__(self, loss="log_loss", alpha=1e-4, epochs=10, class_weight=None, random_state=None):
        self.loss = loss
        self.alpha = alpha
        self.epochs = epochs
        self.class_weight = class_weight
        self.random_state = random_state

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float32)
        return self.fit_rows(Rows.from_arrays(X, y))

    def fit_rows(self, rows: Rows, validation: Rows | None = None):
        """Train on `rows` (a `classify.data.Rows`); `validation` is not used."""
        check_classification_targets(rows.y)
        self.classes_ = np.unique(rows.y)
        if len(self.classes_) < 2:
            raise ValueError(f"Expected at least 2 classes in y; received 1 class ({self.classes_[0]!r}).")
        self.n_features_in_ = rows.n_features
        random = check_random_state(self.random_state)
        self.scaler_ = rows.scaler()
        weights = np.ones(len(self.classes_))  # partial_fit takes no "balanced": weights per row instead
        if self.class_weight is not None:
            weights = compute_class_weight(self.class_weight, classes=self.classes_, y=rows.y)
        self.model_ = SGDClassifier(loss=self.loss, alpha=self.alpha, random_state=random.randint(2**31 - 1))
        for _ in range(self.epochs):
            for X, y in rows.batches(rows.scan_rows, rows.shuffled(random)):
                self.model_.partial_fit(self.scaler_.transform(X), y, classes=self.classes_,
                                        sample_weight=weights[np.searchsorted(self.classes_, y)])
        return self

    def decision_function(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return self.model_.decision_function(self.scaler_.transform(X))

    def predict_proba(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        if self.loss in ("log_loss", "modified_huber"):
            return self.model_.predict_proba(self.scaler_.transform(X))
        scores = self.model_.decision_function(self.scaler_.transform(X))
        if scores.ndim == 1:  # two classes: the margin of the second
            scores = np.column_stack([-scores, scores])
        return softmax(scores.astype(np.float64))

    def predict(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return self.model_.predict(self.scaler_.transform(X))
