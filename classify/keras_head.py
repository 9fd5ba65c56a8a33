"""The seed's dense head, in Keras, as a scikit-learn classifier.

Flatten -> Dense(256, relu) -> Dense(n, softmax), Adam, categorical cross-entropy,
10 epochs, batch 32: the defaults are the seed's, but for one: the input is standardized
by default (a `Normalization` layer inside the model, set from the training features'
mean and variance, so an exported model carries it). On unstandardized VGG16 features the
seed's exact head (`standardize=False`) trains poorly: 0.4958 validation accuracy on the
demo's cache, where every scikit-learn head (which all standardize) reaches 0.93-0.97. Given cached augmented views
(`fit(..., image_index=...)`), each epoch sees every image once, as one of its views,
a different one each epoch, as the seed's generator does. It composes with `Pipeline`,
`GridSearchCV`, `clone` and joblib like any scikit-learn estimator; pickling stores the
Keras model in Keras's own `.keras` format, and unpickling loads it with `safe_mode=True`.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, check_random_state, validate_data

from extract.backbone import import_keras


class KerasMLPClassifier(ClassifierMixin, BaseEstimator):
    """A one-hidden-layer dense network on feature vectors.

    early_stopping: stop when the validation loss has not improved for `patience` epochs
        and restore the best weights. The validation data is what `fit` is given as
        `validation_data`, else a stratified `validation_fraction` of the training data.
    class_weight: None or "balanced".
    standardize: subtract each feature's training mean and divide by its standard deviation
        (1 where it does not vary, as scikit-learn's StandardScaler), inside the model.
    """

    def __init__(
        self,
        hidden_units=256,
        dropout_rate=0.0,
        epochs=10,
        batch_size=32,
        learning_rate=0.001,
        early_stopping=False,
        patience=3,
        validation_fraction=0.1,
        class_weight=None,
        standardize=True,
        random_state=None,
        verbose=0,
    ):
        self.hidden_units = hidden_units
        self.dropout_rate = dropout_rate
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.early_stopping = early_stopping
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.class_weight = class_weight
        self.standardize = standardize
        self.random_state = random_state
        self.verbose = verbose

    def fit(self, X, y, image_index=None, validation_data=None):
        """Train on rows X. `image_index`, when given, says which image each row shows:
        rows with the same value are views of one image, and each epoch uses one of them."""
        X, y = validate_data(self, X, y, dtype=np.float32)
        if image_index is not None:
            image_index = np.asarray(image_index)
            if image_index.shape != (len(X),):
                raise ValueError(f"Expected image_index of shape ({len(X)},); received {image_index.shape}.")
        check_classification_targets(y)
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"Expected dropout_rate in [0, 1); received {self.dropout_rate}.")
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"Expected at least 2 classes in y; received 1 class ({self.classes_[0]!r}).")
        keras = import_keras()
        random = check_random_state(self.random_state)
        keras.utils.set_random_seed(int(random.randint(2**31 - 1)))
        if self.early_stopping and validation_data is None:
            images = np.arange(len(X)) if image_index is None else image_index
            first = np.unique(images, return_index=True)[1]  # one row (label) per image
            _, held_out = train_test_split(
                images[first], test_size=self.validation_fraction, stratify=y_index[first],
                random_state=int(check_random_state(self.random_state).randint(2**31 - 1)),
            )
            out = np.isin(images, held_out)
            validation_data = (X[out], self.classes_[y_index[out]])
            X, y_index = X[~out], y_index[~out]
            image_index = None if image_index is None else image_index[~out]
        self.model_ = self._build(keras, X.shape[1], len(self.classes_), _moments(X) if self.standardize else None)
        callbacks = []
        if self.early_stopping:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=self.patience, restore_best_weights=True
            ))
        targets = keras.utils.to_categorical(y_index, len(self.classes_))
        data = {"x": X, "y": targets, "batch_size": self.batch_size}
        if image_index is not None and len(np.unique(image_index)) < len(X):
            data = {"x": _one_view_per_epoch(keras, X, targets, image_index, self.batch_size, random)}
        history = self.model_.fit(
            **data,
            epochs=self.epochs,
            validation_data=self._encode(keras, validation_data),
            class_weight=self._class_weights(y_index),
            callbacks=callbacks,
            verbose=self.verbose,
        )
        self.history_ = {name: [float(v) for v in values] for name, values in history.history.items()}
        return self

    def predict_proba(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        probabilities = np.asarray(self.model_.predict(X, batch_size=1024, verbose=0), dtype=np.float64)
        return probabilities / probabilities.sum(axis=1, keepdims=True)  # float32 softmax sums to 1 +- 1e-7

    def predict(self, X):
        probabilities = self.predict_proba(X)  # checks that the head is fitted
        return self.classes_[np.argmax(probabilities, axis=1)]

    def _build(self, keras, n_features: int, n_classes: int, moments=None):
        layers = [keras.Input((n_features,)), keras.layers.Flatten()]
        if moments is not None:
            layers.append(keras.layers.Normalization(mean=moments[0], variance=moments[1], name="standardize"))
        layers.append(keras.layers.Dense(self.hidden_units, activation="relu"))
        if self.dropout_rate:
            layers.append(keras.layers.Dropout(self.dropout_rate))
        layers.append(keras.layers.Dense(n_classes, activation="softmax"))
        model = keras.Sequential(layers)
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=self.learning_rate),
            loss="categorical_crossentropy",
            metrics=["accuracy"],
        )
        return model

    def _encode(self, keras, validation_data):
        if validation_data is None:
            return None
        X_val, y_val = validation_data
        known = np.isin(y_val, self.classes_)
        indices = np.searchsorted(self.classes_, np.asarray(y_val)[known])
        return np.asarray(X_val, np.float32)[known], keras.utils.to_categorical(indices, len(self.classes_))

    def _class_weights(self, y_index):
        if self.class_weight is None:
            return None
        weights = compute_class_weight(self.class_weight, classes=np.arange(len(self.classes_)), y=y_index)
        return dict(enumerate(weights))

    def __getstate__(self):
        state = self.__dict__.copy()
        if "model_" in state:
            state["model_"] = _model_to_bytes(state["model_"])
        return state

    def __setstate__(self, state):
        if isinstance(state.get("model_"), bytes):
            state["model_"] = _model_from_bytes(state["model_"])
        self.__dict__.update(state)


def _moments(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's mean and variance over the rows of X, as scikit-learn's StandardScaler
    takes them (float64 sums; a feature that never varied, a ReLU that never fired, gets
    variance 1: centred later, not divided by Keras's epsilon)."""
    scaler = StandardScaler().fit(X)
    return scaler.mean_.astype(np.float32), np.square(scaler.scale_).astype(np.float32)


def _one_view_per_epoch(keras, X, targets, image_index, batch_size: int, random):
    """Batches of one row per image, shuffled; epoch e takes each image's rows in turn,
    from a random first one, so consecutive epochs see different views."""

    class OneViewPerEpoch(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            order = np.argsort(image_index, kind="stable")
            _, starts, counts = np.unique(image_index[order], return_index=True, return_counts=True)
            self.order, self.starts, self.counts = order, starts, counts
            self.offsets = random.randint(0, counts)  # each image's first view
            self.epoch = 0
            self.on_epoch_begin()

        def __len__(self):
            return int(np.ceil(len(self.starts) / batch_size))

        def on_epoch_begin(self):
            chosen = self.order[self.starts + (self.offsets + self.epoch) % self.counts]
            self.rows = chosen[random.permutation(len(chosen))]

        def on_epoch_end(self):
            self.epoch += 1

        def __getitem__(self, index):
            rows = self.rows[index * batch_size : (index + 1) * batch_size]
            return X[rows], targets[rows]

    return OneViewPerEpoch()


def _model_to_bytes(model) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        model.save(path)
        with open(path, "rb") as file:
            return file.read()


def _model_from_bytes(data: bytes):
    keras = import_keras()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        with open(path, "wb") as file:
            file.write(data)
        return keras.saving.load_model(path, safe_mode=True)
