"""What every option may be, declared once, and the one function that checks it.

As scikit-learn's `_parameter_constraints`: a constraint says which values an option
takes, `Interval(Integral, 1, 1024)` (whole numbers from 1 to 1024) or
`StrOptions(("auto", "full", "never"))`; a table maps each option of a command, by the name
its user knows it by ("--batch-size"), to its constraint, or to a list of alternatives of
which None (the Python API's "default") may be one. `check_options` refuses the first
value its constraint does not take, always in the same words:

    Expected --batch-size between 1 and 1024; received 0.
    Expected --learning-rate between 0 and 10 (0 excluded); received -1.0.
    Expected --compact to be one of auto, full, never; received 'x'.

The commands and the Python functions check through it alike, so both read one message.
`EXTRACT_FEATURES` is extract-features's table (`FeatureConfig.validate`,
`Augmentation.validate` and `extract_features` check their part of it); train-head's and
score-images's tables are in classify (`training.TRAIN_HEAD`, `scoring.SCORE_IMAGES`),
the mlp's bounds with its estimator (`KerasMLPClassifier.parameter_constraints`).
Bools are not numbers, and NaN is in no interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Mapping

from extract.errors import UsageError
from extract.layout import LAYOUTS

CLOSED = ("both", "left", "right", "neither")


@dataclass(frozen=True)
class Interval:
    """Numbers of `type` (`numbers.Integral` or `numbers.Real`) from `low` to `high` (None:
    no bound), the ends included as `closed` says: "both", "left" (low only), "right"
    (high only) or "neither". `note` says why the low end is where it is."""

    type: type
    low: float | None
    high: float | None
    closed: str = "both"
    note: str = ""

    def __post_init__(self):
        if self.type not in (Integral, Real) or self.closed not in CLOSED:
            raise ValueError(f"Expected Interval(Integral or Real, low, high, closed= one of {', '.join(CLOSED)}); "
                             f"received Interval({self.type!r}, {self.low}, {self.high}, closed={self.closed!r}).")

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.type) or value != value:  # NaN
            return False
        left, right = self.closed in ("both", "left"), self.closed in ("both", "right")
        above = self.low is None or (self.low <= value if left else self.low < value)
        below = self.high is None or (value <= self.high if right else value < self.high)
        return above and below

    def expected(self, value) -> str:
        """The words after "Expected --option": "between 1 and 1024", "at least 1" ...; a
        number that is not whole, for whole numbers, is told so."""
        low = f"{self.low} ({self.note})" if self.note else f"{self.low}"
        excluded = [str(end) for end, side in ((self.low, "right"), (self.high, "left"))
                    if end is not None and self.closed in (side, "neither")]
        if self.low is not None and self.high is not None:
            text = f"between {low} and {self.high}"
        elif self.low is not None:
            text = f"{'above' if excluded else 'at least'} {low}"
        elif self.high is not None:
            text = f"{'below' if excluded else 'at most'} {self.high}"
        else:
            text = "any number"
        if self.low is not None and self.high is not None and excluded:
            text += f" ({' and '.join(excluded)} excluded)"
        if self.type is Integral and _number(value) and not isinstance(value, Integral):
            text = f"to be a whole number {text}"
        return text


@dataclass(frozen=True)
class StrOptions:
    """One of a few strings, named in this order in the message."""

    options: tuple[str, ...]

    def accepts(self, value) -> bool:
        return isinstance(value, str) and value in self.options

    def expected(self, value) -> str:
        return f"to be {'one of ' if len(self.options) > 1 else ''}{', '.join(self.options)}"


Constraint = Interval | StrOptions


def check_options(values: Mapping[str, object], constraints: Mapping[str, Constraint | list]) -> None:
    """Refuse, as UsageError, the first of `values` (option name -> value) that its entry in
    `constraints` does not take: "Expected {option} {what}; received {value}." An entry is a
    constraint, or a list of them where None means that None is taken (not named in the message)."""
    for name, value in values.items():
        entry = constraints[name]
        alternatives = entry if isinstance(entry, list) else [entry]
        if any(value is None if constraint is None else constraint.accepts(value) for constraint in alternatives):
            continue
        expected = " or ".join(constraint.expected(value) for constraint in alternatives if constraint is not None)
        raise UsageError(f"Expected {name} {expected}; received {value if _number(value) else repr(value)}.")


def _number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


# extract-features (and extract_features, FeatureConfig, Augmentation).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "hamming", "box", "lanczos")  # keras.utils.load_img's; reader maps them to Pillow's filters
POOLINGS = ("none", "avg", "max")
# The layers of VGG16's convolutional base whose output extract-features can cache (--layer),
# bottom to top, with each block's channels; block5_pool is the base's own output.
LAYER_CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
LAYERS = tuple(f"block{block}_{name}" for block in LAYER_CHANNELS
               for name in (*(f"conv{n}" for n in range(1, 3 if block < 3 else 4)), "pool"))
TOP_LAYER = "block5_pool"
DECODES = ("exact", "draft")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
DTYPES = ("float32", "float16")
COMPACTIONS = ("auto", "full", "never")
MIN_INPUT_SIZE = 32
# 1024 px is 21x the pixels of VGG16's 224: one image's first-layer activations take 268 MB,
# a batch of 32 about 8.6 GB. Larger sides only exhaust memory (100000 px would need 2.5 TB).
MAX_INPUT_SIZE = 1024
SEED = Interval(Integral, 0, 2**32 - 1)  # numpy's RandomState takes no more (train-head's --seed too)
# Past the numeric bounds a run only exhausts memory or never ends.
EXTRACT_FEATURES = {
    "--layout": StrOptions(LAYOUTS),
    "--validation-percent": Interval(Real, 0, 100, closed="left"),
    "--input-size": Interval(Integral, MIN_INPUT_SIZE, MAX_INPUT_SIZE, note="VGG16's minimum without its top"),
    "--interpolation": StrOptions(INTERPOLATIONS),
    "--decode": StrOptions(DECODES),
    "--pooling": StrOptions(POOLINGS),
    "--layer": StrOptions(LAYERS),
    "--seed": SEED,
    "--augment": [Interval(Integral, 0, 100), None],  # views per training image; 100 makes the run 101 times as long
    "--shear": Interval(Real, 0, 90, closed="left"),  # degrees
    "--zoom": Interval(Real, 0, 1, closed="left"),
    "--rotation": Interval(Real, 0, 180, closed="left"),  # degrees
    "--shift": Interval(Real, 0, 1, closed="left"),  # a fraction of the side
    "--batch-size": Interval(Integral, 1, 1024),  # see also runner.BATCH_PIXELS
    "--workers": [Interval(Integral, 1, 64), None],  # threads reading and decoding; more only contend for the cores
    "--precision": StrOptions(PRECISIONS),
    "--dtype": StrOptions(DTYPES),
    "--save-every": Interval(Real, 0, 86400),  # seconds: at least one checkpoint a day
    "--compact": StrOptions(COMPACTIONS),
    "--ray-actors": [Interval(Integral, 1, 1024), None],  # backbone actors of --engine ray (one per GPU)
}
