"""One Keras model for serving: raw RGB uint8 images in, class probabilities out.

    inputs (S, S, 3) uint8 -> float -> caffe preprocessing (a fixed 1x1 convolution: RGB to
    BGR, minus the ImageNet means) -> the frozen VGG16 base with the head's pooling ->
    (rounded to float16 where the cache stores that) -> Flatten -> the head

The head becomes Keras layers: `mlp` is its own Keras model, and so is `finetune` (its
tuned block5 and dense head, on the base up to block4_pool); `logreg` and `linear-svm`
become Dense layers with the standardization folded into their weights (the calibrated
SVM's sigmoids and their normalization included). Only built-in layers are used, so
`keras.saving.load_model(path)` loads it anywhere, with safe_mode on.

The class names travel beside it, as TF Hub's classifiers keep theirs: `model.keras` gets
`model.labels.txt`, one name a line (UTF-8), line i naming output i. Named after the model,
so two exports in one folder keep their own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from classify.artifacts import LoadedHead, head_config, load_head
from extract import Backbone, UsageError, import_keras, overwrites, write_aside

EXPORTABLE = ("mlp", "finetune", "logreg", "linear-svm")


def export_model(head, path, *, weights: str | None = None):
    """Write the head and its backbone as one `.keras` model at `path`; returns the model."""
    head = head if isinstance(head, LoadedHead) else load_head(head)
    name = head.info["head"]
    if name not in EXPORTABLE:
        raise UsageError(
            f"A {name} head cannot be exported as one Keras model; export works for {', '.join(EXPORTABLE)}."
        )
    path = Path(path)
    if path.suffix != ".keras":
        raise UsageError(f"Expected --export to name a .keras file; received {str(path)!r}.")
    if labels_path(path).is_dir():
        raise UsageError(f"Expected {str(labels_path(path))!r}, where --export writes the class names, not to be a "
                         f"folder; name another .keras file.")
    labels = labels_text(head.classes, path)
    config = head_config(head, weights)
    weights_file = [config.weights] if Path(config.weights).is_file() else []
    for written in (path, labels_path(path)):
        if overwrites(written, weights_file) is not None:
            raise UsageError(f"--export writes {str(written)!r}, which is the weights file of the head's features "
                             f"({config.weights!r}); name another .keras file.")
    keras = import_keras()
    size = config.input_size
    inputs = keras.Input((size, size, 3), dtype="uint8", name="rgb")
    x = _as_stored(keras, config, Backbone(config).features_of(inputs))
    x = keras.layers.Flatten(name="flatten_features")(x)
    outputs = _head_layers(keras, name, head.estimator, x)
    model = keras.Model(inputs, outputs, name=f"vgg16_{name.replace('-', '_')}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Both written aside, then renamed, the model first (the inner `with` ends first): a full
    # disk or Ctrl-C never leaves a truncated model, nor class names beside a model they do
    # not belong to.
    with (write_aside(labels_path(path), f"{str(labels_path(path))!r}") as labels_aside,
          write_aside(path, f"--export {str(path)!r}", suffix=".keras") as model_aside):
        model.save(model_aside)
        Path(labels_aside).write_text(labels, encoding="utf-8", newline="")
    return model


def _as_stored(keras, config, features):
    """The backbone's features rounded as the cache stores them (`--dtype float16`), so that
    the head sees what it was trained on and the model's probabilities are the pipeline's
    (3.8e-3 apart without it, for a finetune head on a float16 cache)."""
    if config.dtype == "float32":
        return features
    return keras.layers.Identity(dtype=config.dtype, name=f"stored_{config.dtype}")(features)


def labels_path(path) -> Path:
    """Where the class names of the model at `path` are: `model.keras` -> `model.labels.txt`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.labels.txt")


def labels_text(classes, path) -> str:
    """The class names, one a line, in the model's output order, for `labels_path(path)`.
    A name with a line break in it (anything `str.splitlines` splits on) cannot be one
    line: it is refused, as there is no escaping every reader of such a file would undo."""
    for name in classes:
        if str(name).splitlines() != [str(name)]:
            raise UsageError(
                f"Class {str(name)!r} has a line break in its name, and {labels_path(path).name} holds one class "
                f"a line; rename its folder and extract again to export this head."
            )
    return "".join(f"{name}\n" for name in classes)


def _head_layers(keras, name: str, estimator, x):
    if name in ("mlp", "finetune"):  # finetune's model holds the tuned block5 too, above the cached layer
        return estimator.model_(x)
    scaler, model = estimator.steps[0][1], estimator.steps[-1][1]
    if name == "logreg":
        weights, biases = _fold_scaler(scaler, model.coef_, model.intercept_)
        if len(model.classes_) == 2:  # binary: p1 = sigmoid(z) = softmax([0, z])[1]
            weights, biases = np.vstack([np.zeros_like(weights), weights]), np.concatenate([[0.0], biases])
        return _dense(keras, "logreg", weights, biases, "softmax")(x)
    # linear-svm: per calibrated fold, class j's probability is sigmoid(-(a_j d_j + b_j)) with
    # d the SVM's decision; normalized over classes (softmax of the log-sigmoids), then the
    # folds are averaged.
    n_classes, rows, biases = len(model.classes_), [], []
    for fold in model.calibrated_classifiers_:
        svm = fold.estimator
        slopes = np.array([c.a_ for c in fold.calibrators])
        offsets = np.array([c.b_ for c in fold.calibrators])
        weights = -slopes[:, None] * svm.coef_
        bias = -(slopes * svm.intercept_ + offsets)
        if n_classes == 2:  # one decision; p0 = 1 - p1 = sigmoid(-z)
            weights, bias = np.vstack([-weights, weights]), np.concatenate([-bias, bias])
        weights, bias = _fold_scaler(scaler, weights, bias)
        rows.append(weights)
        biases.append(bias)
    folds = len(rows)
    x = _dense(keras, "svm_calibrated", np.vstack(rows), np.concatenate(biases), "log_sigmoid")(x)
    x = keras.layers.Reshape((folds, n_classes), name="svm_folds")(x)
    x = keras.layers.Softmax(axis=-1, name="svm_normalize")(x)
    return keras.layers.GlobalAveragePooling1D(name="svm_average")(x)


def _fold_scaler(scaler, weights: np.ndarray, biases: np.ndarray):
    """w.((x - mean) / scale) + b  ==  (w / scale).x + (b - w.(mean / scale))."""
    mean = scaler.mean_ if scaler.with_mean else np.zeros(weights.shape[1])
    scale = scaler.scale_ if scaler.with_std else np.ones(weights.shape[1])
    return weights / scale, biases - weights @ (mean / scale)


def _dense(keras, name: str, weights: np.ndarray, biases: np.ndarray, activation: str):
    layer = keras.layers.Dense(weights.shape[0], activation=activation, name=name)
    layer.build((None, weights.shape[1]))
    layer.set_weights([weights.T.astype(np.float32), np.asarray(biases, np.float32)])
    return layer
