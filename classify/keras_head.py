"""The blog recipe's dense head, in Keras, as a scikit-learn classifier.

Flatten -> Dense(256, relu) -> Dense(n, softmax), Adam, categorical cross-entropy,
10 epochs, batch 32: the defaults are the blog recipe's, but for one: the input is standardized
by default (a `Normalization` layer inside the model, set from the training features'
mean and variance, so an exported model carries it). On unstandardized VGG16 features the
blog recipe's exact head (`standardize=False`) trains poorly: 0.4958 validation accuracy on the
demo's cache, where every scikit-learn head (which all standardize) reaches 0.93-0.97. Given cached augmented views
(`fit(..., image_index=...)`), each epoch sees every image once, as one of its views,
a different one each epoch, as the blog recipe's generator does. It composes with `Pipeline`,
`GridSearchCV`, `clone` and joblib like any scikit-learn estimator; pickling stores the
Keras model in Keras's own `.keras` format, and unpickling loads it with `safe_mode=True`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, check_random_state, validate_data

from tqdm import tqdm

from classify.data import Reader, Rows
from extract import Interval, check_options, import_keras

VALIDATION_BATCH = 256
PREDICT_BATCH = 1024
AHEAD = 4  # batches read before the model has taken the ones before them (see _batches)
AHEAD_WAIT = 10.0  # seconds a read waits for the model at most: a backend that reads further ahead is slowed, never stuck


class KerasMLPClassifier(ClassifierMixin, BaseEstimator):
    """A one-hidden-layer dense network on feature vectors.

    early_stopping: stop when the validation loss has not improved for `patience` epochs
        and restore the best weights. The validation data is what `fit` is given as
        `validation_data`, else a stratified `validation_fraction` of the training data.
    class_weight: None or "balanced".
    standardize: subtract each feature's training mean and divide by its standard deviation
        (1 where it does not vary, as scikit-learn's StandardScaler), inside the model.
    """

    # What `fit` takes, as scikit-learn's `_parameter_constraints` (train-head's --hidden-units ... too).
    parameter_constraints = {
        "hidden_units": Interval(Integral, 1, 65536),
        "dropout_rate": Interval(Real, 0, 1, closed="left"),
        "epochs": Interval(Integral, 1, 10000),
        "learning_rate": Interval(Real, 0, 10, closed="right"),
    }

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
        validation = None if validation_data is None else Rows.from_arrays(*validation_data)
        return self.fit_rows(Rows.from_arrays(X, y, image_index), validation)

    def fit_rows(self, rows: Rows, validation: Rows | None = None, progress: str | None = None):
        """Train on `rows` (a `classify.data.Rows`: in memory, or read from the cache a
        window at a time), scoring `validation` after each epoch. Rows of one image
        (`rows.images`) are its views: each epoch uses one of them. `progress`: the name
        of a bar of epochs on stderr when it is a terminal (`_epoch_bar`); None, silent."""
        keras, random, rows, y_index, validation = self._prepare(rows, validation)
        self.model_ = self._build(keras, rows.n_features, len(self.classes_), _moments(rows) if self.standardize else None)
        self.history_ = self._train(keras, self.model_, rows, y_index, validation, self.epochs, random,
                                    progress=progress)
        return self

    def _prepare(self, rows: Rows, validation: Rows | None):
        """Check the options and labels, set `classes_`, seed Keras, and hold out a
        validation split when early stopping has none: (keras, random, rows, y_index, validation)."""
        check_classification_targets(rows.y)
        check_options({name: getattr(self, name) for name in self.parameter_constraints}, self.parameter_constraints)
        self.classes_, y_index = np.unique(rows.y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"Expected at least 2 classes in y; received 1 class ({self.classes_[0]!r}).")
        self.n_features_in_ = rows.n_features
        keras = import_keras()
        random = check_random_state(self.random_state)
        keras.utils.set_random_seed(int(random.randint(2**31 - 1)))
        if self.early_stopping and validation is None:
            first = np.unique(rows.images, return_index=True)[1]  # one row (label) per image
            held_out = self._held_out(rows.images[first], y_index[first])
            out = np.isin(rows.images, held_out)
            validation, rows, y_index = rows.subset(np.flatnonzero(out)), rows.subset(np.flatnonzero(~out)), y_index[~out]
        return keras, random, rows, y_index, validation

    def _held_out(self, images: np.ndarray, y_index: np.ndarray) -> np.ndarray:
        """The images early stopping holds out: a stratified `validation_fraction` of them,
        but at least one of each class (a fold of --cv, or --search, on few images), so
        that a fraction smaller than the classes is no refusal. Too few images of a class
        to keep one on each side is one: that says to add images or stop early no more."""
        size = self.validation_fraction
        if np.ceil(size * len(images)) < len(self.classes_):
            size = len(self.classes_)
        try:
            return train_test_split(images, test_size=size, stratify=y_index,
                                    random_state=int(check_random_state(self.random_state).randint(2**31 - 1)))[1]
        except ValueError:
            fewest = int(np.bincount(y_index, minlength=len(self.classes_)).min())
            raise ValueError(
                f"Too few images to hold out a validation split for early stopping ({len(images)} images of "
                f"{len(self.classes_)} classes, {fewest} of the least); add images or pass --no-early-stopping"
            ) from None

    def _train(self, keras, model, rows: Rows, y_index, validation: Rows | None, epochs: int, random,
               best_loss: float | None = None, progress: str | None = None) -> dict:
        """`model.fit` on `rows` (batches read as the model takes them, see `_batches`),
        scoring `validation` after each epoch; its history. With early stopping and
        `best_loss`, the model's weights as they are now score `best_loss` on validation,
        and are kept unless an epoch beats them. `progress`: as `fit_rows` takes it."""
        callbacks = [_early_stopping(keras, self.patience, best_loss)] if self.early_stopping else []
        batches = _batches(keras, rows, y_index, len(self.classes_), self.batch_size, _epoch_orders(rows, random), model)
        validation = self._validation(keras, validation, model)
        bar = _epoch_bar(keras, epochs, progress)
        callbacks += [_paced(keras, batches, validation), bar]
        try:
            with _without_retracing_notes():
                history = model.fit(
                    batches,
                    epochs=epochs,
                    validation_data=validation,
                    class_weight=self._class_weights(y_index),
                    callbacks=callbacks,
                    verbose=self.verbose,
                    shuffle=False,  # the batches are shuffled already: see classify.data
                )
        finally:
            bar.close()
            for data in (batches, validation):
                if data is not None:
                    data.taken(None)
        for data in (batches, validation):
            if data is not None and data.error is not None:
                raise data.error
        return {name: [float(v) for v in values] for name, values in history.history.items()}

    _predict_batch = PREDICT_BATCH  # rows the model is called on at once
    _validation_batch = VALIDATION_BATCH

    def predict_proba(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        keras = import_keras()
        probabilities = np.concatenate([  # the model called, not model.predict: see _RetracingNotes
            keras.ops.convert_to_numpy(self.model_(X[start:start + self._predict_batch], training=False))
            for start in range(0, len(X), self._predict_batch)
        ]).astype(np.float64)
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

    def _validation(self, keras, validation: Rows | None, model):
        """Batches of the validation rows of classes the head knows, in their order (the
        rows themselves when every class is known: a subset of rows in memory is a copy)."""
        if validation is None:
            return None
        known = np.isin(validation.y, self.classes_)
        if not known.all():
            validation = validation.subset(np.flatnonzero(known))
        y_index = np.searchsorted(self.classes_, validation.y)
        return _batches(keras, validation, y_index, len(self.classes_), self._validation_batch, model=model)

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


class _RetracingNotes(logging.Filter):
    """Drops TensorFlow's "N out of the last M calls to <function ...> triggered tf.function
    retracing" while a head trains. Each fit builds a new model, whose train and validation
    steps are traced once, as they must be; TensorFlow counts the traces of every model's
    steps together (it keys them by the Python code, which all Keras models share), so a
    few short fits in a row (cross-validation, a search) read to it as one function
    retraced. Predictions call the model directly and trace nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


_RETRACING_NOTES = _RetracingNotes()
_notes_lock = threading.Lock()
_notes_depth = 0


@contextlib.contextmanager
def _without_retracing_notes():
    """TensorFlow's retracing notes dropped, around Keras calls of this module only."""
    global _notes_depth
    logger = logging.getLogger("tensorflow")
    with _notes_lock:
        _notes_depth += 1
        logger.addFilter(_RETRACING_NOTES)
    try:
        yield
    finally:
        with _notes_lock:
            _notes_depth -= 1
            if not _notes_depth:
                logger.removeFilter(_RETRACING_NOTES)


def _moments(rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's mean and variance over `rows`, as scikit-learn's StandardScaler
    takes them (float64 sums, a batch at a time; a feature that never varied, a ReLU that
    never fired, gets variance 1: centred later, not divided by Keras's epsilon)."""
    scaler = rows.scaler()
    return scaler.mean_.astype(np.float32), np.square(scaler.scale_).astype(np.float32)


def _epoch_orders(rows: Rows, random):
    """epoch -> the order of its rows: every row, or with views, one row per image, each
    image's rows in turn from a random first one (consecutive epochs see different views);
    shuffled as `Rows.shuffled` does (by blocks, then windows, when streamed)."""
    if len(np.unique(rows.images)) == len(rows):
        return lambda epoch: rows.shuffled(random)
    by_image = np.argsort(rows.images, kind="stable")
    _, starts, counts = np.unique(rows.images[by_image], return_index=True, return_counts=True)
    offsets = random.randint(0, counts)  # each image's first view
    return lambda epoch: rows.shuffled(random, by_image[starts + (offsets + epoch) % counts])


def _batches(keras, rows: Rows, y_index, n_classes: int, batch_size: int, orders=None, model=None):
    """A PyDataset of (features, one-hot labels) of `rows`: in the order `orders(epoch)`
    gives, or as stored when None. Keras asks for batch 0 before the first epoch begins.
    A batch is read once the model has taken all but AHEAD of the batches before it (`taken`,
    which `_paced` calls): with TensorFlow, Keras reads a PyDataset through tf.data's
    autotuned prefetch, which read 65 batches ahead of the model (208 MB of 7x7x512 rows) in
    a 619-batch epoch here, and is bounded only by half the machine's memory.
    A batch that cannot be read (a damaged cache) stops `model`'s training and is kept in
    `error`, for the caller to raise: TensorFlow, in whose thread batches are read, would
    turn it into a page of graph errors."""

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch, self.error, self.used, self.turn = 0, None, 0, threading.Condition()
            self.on_epoch_begin()

        def __len__(self):
            return int(np.ceil(len(self.reader.order) / batch_size))

        def on_epoch_begin(self):
            self.reader = Reader(rows, np.arange(len(rows)) if orders is None else orders(self.epoch))
            self.taken(0)

        def on_epoch_end(self):
            self.epoch += 1

        def taken(self, count: int | None):
            """The model has taken `count` batches of this epoch (None: it takes no more)."""
            with self.turn:
                self.used = np.inf if count is None else count
                self.turn.notify_all()

        def __getitem__(self, index):
            with self.turn:
                self.turn.wait_for(lambda: index < self.used + AHEAD or self.error is not None
                                   or (model is not None and model.stop_training), timeout=AHEAD_WAIT)
            if self.error is None:
                try:
                    start, stop = index * batch_size, min((index + 1) * batch_size, len(self.reader.order))
                    targets = keras.utils.to_categorical(y_index[self.reader.order[start:stop]], n_classes)
                    return self.reader.take(start, stop), targets
                except Exception as error:
                    self.error = error
                    if model is not None:
                        model.stop_training = True
            return np.zeros((1, rows.n_features), np.float32), np.zeros((1, n_classes), np.float32)  # the model is discarded: `error` is raised

    return Batches()


def _early_stopping(keras, patience: int, best_loss: float | None = None):
    """Keras's EarlyStopping on the validation loss, restoring the best epoch's weights at the
    end; with `best_loss`, the weights the model starts with are the best so far, at that loss."""

    class EarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if best_loss is not None:
                self.best, self.best_weights, self.best_epoch = best_loss, self.model.get_weights(), -1

    return EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)


def _paced(keras, batches, validation):
    """A callback telling the training and validation batches how many of theirs the model
    has taken (see `_batches`)."""

    class Paced(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            batches.taken(batch + 1)

        def on_test_batch_end(self, batch, logs=None):
            if validation is not None:
                validation.taken(batch + 1)

    return Paced()


def _epoch_bar(keras, epochs: int, name: str | None):
    """A callback showing training as a bar of epochs on stderr, updated as each ends:
    `name`, epoch i/n, the time left (tqdm's estimate), the epoch's loss and validation
    accuracy. Nothing where `name` is None or stderr is not a terminal (tqdm's disable=None);
    `close` it once training ends, whether it ended well or not."""

    class EpochBar(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.bar = tqdm(total=epochs, unit="epoch", desc=name, leave=False, mininterval=0, miniters=1,
                            disable=None if name is not None else True)  # every epoch drawn, however fast

        def on_epoch_end(self, epoch, logs=None):
            self.bar.set_postfix_str(epoch_note(logs or {}), refresh=False)
            self.bar.update(1)

        def close(self):
            self.bar.close()

    return EpochBar()


def epoch_note(logs: dict) -> str:
    """An epoch's results in words, as Keras logs them: "loss 0.4215, val acc 0.9250"."""
    notes = [f"{label} {logs[key]:.4f}" for key, label in (("loss", "loss"), ("val_accuracy", "val acc"))
             if key in logs]
    return ", ".join(notes)


def _model_to_bytes(model) -> bytes:
    """The trained model as a `.keras` file, without its optimizer: Adam's state is twice
    the weights, and names the backend it ran on (a file another backend cannot load)."""
    keras = import_keras()
    bare = keras.Sequential([keras.Input(model.input_shape[1:]), *model.layers], name=model.name)  # its layers, uncompiled
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        bare.save(path)
        with open(path, "rb") as file:
            return file.read()


def _model_from_bytes(data: bytes):
    keras = import_keras()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        with open(path, "wb") as file:
            file.write(data)
        return keras.saving.load_model(path, safe_mode=True, compile=False)  # for predictions only
