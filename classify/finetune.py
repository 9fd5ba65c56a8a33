"""Fine-tuning VGG16's top block from cached block-4 maps: the step after bottleneck heads.

    extract-features data/ --layer block4_pool        # blocks 1-4 run once per image
    train-head --head finetune                         # block5 + the head learn from the cache

A cache of `--layer block4_pool` (unpooled) holds what VGG16's block 5 reads. The finetune
head is block 5 (three 3x3 convolutions and a pool, with the weights the cache was made
with) and the blog recipe's dense head on top, trained in the two steps known to work
(the Keras blog's "fine-tuning the top layers"): first the head alone on block 5's frozen
output, computed once from the cache; then block 5 and the head together by SGD at a small
learning rate (1e-4, momentum 0.9), stopping early on the validation loss. Every epoch
reads the cache (a window at a time when it is larger than memory), never an image.

The other heads train on such a cache too: `frozen_top` computes block5_pool's map from
the cached maps once (9% of the base's work at 224 px), the features a
`--layer block5_pool` cache of the same weights would hold; their heads are heads of that
configuration (scored and exported like any other). `feature_sets` says which features
each head of a train-head run gets.
"""

from __future__ import annotations

import shlex
from dataclasses import replace
from numbers import Integral, Real

import numpy as np

from classify.artifacts import recorded_config
from classify.data import Rows
from classify.keras_head import KerasMLPClassifier, _moments
from classify.splits import Splits
from extract import TOP_LAYER, FeatureConfig, Interval, UsageError, describe, import_keras, vgg16_top

# SGD's steps in the second step are clipped to this global gradient norm: the head standardizes
# block 5's output, which multiplies block 5's gradients by 1 / its spread; measured on the
# demo's digits (random weights, 64 px), plain SGD at 1e-4 diverged to NaN in the second
# tuned epoch, clipped it did not (docs/finetune.md).
CLIP_NORM = 1.0
TUNED_LAYER = "block4_pool"  # the cached maps the finetune head reads: block 5 is what it tunes
FROZEN_BATCH = 64  # maps run through the frozen block 5 at once
TUNE_BATCH = 64  # rows the tuned model is called on at once (validation, predictions): 12 MB of 14x14x512 maps


class KerasFinetuneClassifier(KerasMLPClassifier):
    """VGG16's block 5 (from `base`, the FeatureConfig of the cached maps) and a dense head,
    on flattened maps of an unpooled layer below block5_pool.

    head_epochs, head_learning_rate: the first step, the head alone by Adam on block 5's
        frozen output (0 epochs: the head starts untrained).
    epochs, learning_rate, momentum: the second step, block 5 and the head by SGD.
    The other parameters are the mlp's (`KerasMLPClassifier`), early stopping on by default.
    """

    parameter_constraints = {
        **KerasMLPClassifier.parameter_constraints,
        "head_epochs": Interval(Integral, 0, 10000),
        "head_learning_rate": Interval(Real, 0, 10, closed="right"),
        "momentum": Interval(Real, 0, 1, closed="left"),
    }
    _predict_batch = TUNE_BATCH
    _validation_batch = TUNE_BATCH

    def __init__(
        self,
        hidden_units=256,
        dropout_rate=0.0,
        epochs=10,
        batch_size=32,
        learning_rate=1e-4,
        momentum=0.9,
        head_epochs=10,
        head_learning_rate=1e-3,
        early_stopping=True,
        patience=3,
        validation_fraction=0.1,
        class_weight=None,
        standardize=True,
        base=None,
        random_state=None,
        verbose=0,
    ):
        super().__init__(hidden_units=hidden_units, dropout_rate=dropout_rate, epochs=epochs, batch_size=batch_size,
                         learning_rate=learning_rate, early_stopping=early_stopping, patience=patience,
                         validation_fraction=validation_fraction, class_weight=class_weight, standardize=standardize,
                         random_state=random_state, verbose=verbose)
        self.momentum = momentum
        self.head_epochs = head_epochs
        self.head_learning_rate = head_learning_rate
        self.base = base

    def fit_rows(self, rows: Rows, validation: Rows | None = None, progress: str | None = None):
        """As the mlp's (`KerasMLPClassifier.fit_rows`), in two steps, each its own bar of epochs."""
        base = self.base
        if not (isinstance(base, FeatureConfig) and base.is_map_below_top):
            raise ValueError(f"Expected base= the FeatureConfig of unpooled maps below block5_pool; received {base!r}.")
        if rows.n_features != int(np.prod(base.feature_shape)):
            raise ValueError(f"Expected rows of {int(np.prod(base.feature_shape))} features (maps of "
                             f"{'x'.join(map(str, base.feature_shape))}); received {rows.n_features}.")
        keras, random, rows, y_index, validation = self._prepare(rows, validation)
        top = vgg16_top(base, trainable=True)  # frozen by use in the first step (only called), tuned in the second
        frozen = _Frozen(top, base.feature_shape)
        head = KerasMLPClassifier(
            hidden_units=self.hidden_units, dropout_rate=self.dropout_rate, epochs=max(1, self.head_epochs),
            batch_size=self.batch_size, learning_rate=self.head_learning_rate, early_stopping=self.early_stopping,
            patience=self.patience, class_weight=self.class_weight, standardize=self.standardize,
            random_state=random.randint(2**31 - 1), verbose=self.verbose,
        )
        frozen_rows = _held(rows.through(frozen, frozen.n_features), rows)
        frozen_validation = None if validation is None else _held(validation.through(frozen, frozen.n_features), rows)
        if self.head_epochs:
            head.fit_rows(frozen_rows, frozen_validation, progress=_step(progress, "head alone"))
            first = head.history_
        else:  # the head as built, untrained
            head.classes_ = self.classes_
            head.model_ = head._build(keras, frozen.n_features, len(self.classes_),
                                      _moments(frozen_rows) if self.standardize else None)
            first = {}
        self.model_ = keras.Sequential([keras.Input((rows.n_features,)),
                                        keras.layers.Reshape(base.feature_shape, name="cached_map"),
                                        top, keras.layers.Flatten(name="block5_flatten"), head.model_],
                                       name="vgg16_block5_finetuned")
        self.model_.compile(
            optimizer=keras.optimizers.SGD(learning_rate=self.learning_rate, momentum=self.momentum,
                                           global_clipnorm=CLIP_NORM),
            loss="categorical_crossentropy",
            metrics=["accuracy"],
        )
        second = self._train(keras, self.model_, rows, y_index, validation, self.epochs, random,
                             _kept_loss(first, self.early_stopping), progress=_step(progress, "block5 and head"))
        if not np.isfinite(second["loss"][-1]) and not self.early_stopping:
            raise ValueError(f"block5's training diverged (a training loss of {second['loss'][-1]}) at "
                             f"--learning-rate {self.learning_rate}; lower it, or keep early stopping on")
        self.history_ = {name: first.get(name, []) + values for name, values in second.items()}
        self.history_["fine_tuning_from"] = [len(first.get("loss", []))]  # epochs of the first step
        return self


def _step(progress: str | None, step: str) -> str | None:
    """The name of one step's bar of epochs: "finetune, head alone" (None: no bar)."""
    return None if progress is None else f"{progress}, {step}"


def _kept_loss(history: dict, early_stopping: bool) -> float | None:
    """The validation loss of the weights a Keras head kept after training with `history`:
    the best epoch's with early stopping (restored), else the last one's."""
    losses = history.get("val_loss")
    if not losses:
        return None
    return float(np.nanmin(losses)) if early_stopping and not np.isnan(losses).all() else float(losses[-1])


class _Frozen:
    """Flattened maps -> block5_pool's flattened maps, through the frozen rest of the base."""

    def __init__(self, top, shape: tuple[int, ...]):
        self.top, self.shape, self.keras = top, tuple(shape), import_keras()
        self.n_features = int(np.prod(top.output_shape[1:]))

    def __call__(self, X: np.ndarray) -> np.ndarray:
        keras = self.keras
        result = np.empty((len(X), self.n_features), np.float32)
        for start in range(0, len(X), FROZEN_BATCH):
            maps = np.asarray(X[start:start + FROZEN_BATCH], np.float32).reshape(-1, *self.shape)
            result[start:start + len(maps)] = keras.ops.convert_to_numpy(self.top(maps, training=False)).reshape(len(maps), -1)
        return result


def _held(frozen: Rows, rows: Rows) -> Rows:
    """Block 5's output of `rows`, computed once and held when it takes no more than one
    read of `rows` may (a quarter of its size at 224 px); else computed as it is read."""
    if frozen.X is None and frozen.nbytes <= rows.read_rows * 4 * rows.n_features:
        return frozen.load()
    return frozen


def frozen_top(config: FeatureConfig):
    """(transform, n_features, config of its output): block5_pool's maps from the cached maps of
    `config` (see `Rows.through`), as a cache of `--layer block5_pool` would hold them."""
    top = vgg16_top(config)
    frozen = _Frozen(top, config.feature_shape)
    return frozen, frozen.n_features, replace(config, layer=TOP_LAYER)


def feature_sets(names: list[str], tuning: list[str], every: bool, splits: Splits, cache,
                 weights) -> list[tuple[Splits, list[str]]]:
    """The features each head of `names` trains on, as (splits, heads) pairs: the cache's,
    or on cached maps below block5_pool, those maps for the heads of `tuning` (finetune)
    and block5_pool's maps computed from them for the others. A head of `tuning` on
    another cache is refused, or left out when `every` head was asked for (--head all);
    `weights`: where the weights the cache was made with are now (None: where they were)."""
    facts = splits.config
    maps = FeatureConfig.from_facts(facts).is_map_below_top
    if tuning and not (maps and facts.get("layer") == TUNED_LAYER):
        if not every:
            raise UsageError(_finetune_needs(splits, cache))
        names = [name for name in names if name not in tuning]
        tuning = []
    others = [name for name in names if name not in tuning]
    if not maps:
        return [(splits, names)]
    base = recorded_config(facts, splits.fingerprint, weights, "cache's features",
                           f"The configuration {splits.fingerprint} of {str(cache)!r}", "extract the features again")
    splits = replace(splits, base=base)
    sets = [(splits.through(*frozen_top(base)), others)] if others else []
    return sets + ([(splits, tuning)] if tuning else [])


def _finetune_needs(splits: Splits, cache) -> str:
    """Why --head finetune cannot train on `splits`, naming the extract-features command that
    makes features it can."""
    facts = splits.config
    weights = facts.get("weights")
    if weights == "file":  # named by its path where the cache recorded one
        weights = facts.get("weights_path") or weights
    command = (f"extract-features {shlex.quote(splits.data_dir or 'DATA_DIR')} --layer {TUNED_LAYER} --pooling none "
               f"--input-size {facts.get('input_size')} --weights {shlex.quote(str(weights))}"
               + (f" --seed {facts.get('weights_seed', 0)}" if weights == "random" else "")
               + (f" --dtype {facts['dtype']}" if facts.get("dtype", "float32") != "float32" else "")
               + f" --cache {shlex.quote(str(cache))}")
    return (f"--head finetune tunes VGG16's block5 from cached unpooled {TUNED_LAYER} maps; configuration "
            f"{splits.fingerprint} holds {describe(facts)}. Make them with: {command}")
