"""What a feature is: `FeatureConfig` (how images become pixels and which network reads
them), its `identity()` (the facts that decide the numbers, the weights by content, not by
path) and the `fingerprint` that names that identity. Two runs with the same fingerprint
produce the same features, so the fingerprint is the cache's key for a configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from extract.console import why
from extract.errors import UsageError
from extract.options import EXTRACT_FEATURES, LAYER_CHANNELS, TOP_LAYER, check_options

FEATURE_CHANNELS = 512  # of the base's output, block5_pool
PREPROCESSING = (
    "keras.applications.vgg16.preprocess_input: caffe mode, RGB to BGR, "
    "minus the ImageNet means (103.939, 116.779, 123.68), no scaling"
)
IMAGENET_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + IMAGENET_FILE
IMAGENET_MD5 = "6d6bbae143d832006294945121d1f1fc"  # the hash Keras checks its download against


@dataclass(frozen=True)
class FeatureConfig:
    """What a feature vector is: how images become pixels and which network reads them."""

    input_size: int = 224
    interpolation: str = "bilinear"
    pooling: str = "none"
    weights: str = "imagenet"  # "imagenet", "random" or the path of a weights file
    seed: int = 0  # used by weights="random" only
    precision: str = "float32"
    dtype: str = "float32"  # how features are stored
    decode: str = "exact"  # "draft": JPEGs decoded at reduced size first (see reader.decode)
    layer: str = TOP_LAYER  # the layer of the base whose output is the feature (options.LAYERS)

    def validate(self) -> None:
        check_options({"--input-size": self.input_size, "--seed": self.seed, "--interpolation": self.interpolation,
                       "--pooling": self.pooling, "--precision": self.precision, "--dtype": self.dtype,
                       "--decode": self.decode, "--layer": self.layer}, EXTRACT_FEATURES)
        if self.weights not in ("imagenet", "random"):
            path_text("--weights", self.weights)
        if self.weights not in ("imagenet", "random") and not Path(self.weights).is_file():
            raise UsageError(
                f"Expected --weights to be imagenet, random or a weights file; "
                f"{self.weights!r} is not a file."
            )

    @classmethod
    def from_facts(cls, facts: dict, weights: str | None = None) -> "FeatureConfig":
        """The configuration recorded in a cache group or a head (`facts`: the attributes
        the cache schema lists), to build its backbone again. `weights` says where to find
        the weights instead (a local copy); `identity()` then tells whether they match."""
        if weights is None:
            weights = facts["weights"] if facts["weights"] in ("imagenet", "random") else facts.get("weights_path", "")
        return cls(
            input_size=int(facts["input_size"]), interpolation=facts["interpolation"], pooling=facts["pooling"],
            weights=str(weights), seed=int(facts.get("weights_seed", 0)), precision=facts["precision"],
            dtype=facts["dtype"], decode=facts.get("decode", "exact"), layer=facts.get("layer", TOP_LAYER),
        )

    @property
    def feature_shape(self) -> tuple[int, ...]:
        block = int(self.layer[len("block")])
        channels = LAYER_CHANNELS[block]
        if self.pooling != "none":
            return (channels,)
        pools = block if self.layer.endswith("_pool") else block - 1  # 2x2 max-pools below it, each rounding down
        side = self.input_size // 2**pools
        return (side, side, channels)

    @property
    def is_map_below_top(self) -> bool:
        """Whether the features are an unpooled map of a layer below the base's output: the
        rest of the base (`backbone.vgg16_top`) can run on them, frozen or fine-tuned."""
        return self.pooling == "none" and self.layer != TOP_LAYER

    def identity(self) -> dict:
        """The facts that decide the feature values, JSON-ready. A weights file is known by
        its content: a local copy of Keras's ImageNet file is "imagenet", like the download."""
        facts = asdict(self)
        facts.pop("seed")
        for name, default in (("decode", "exact"), ("layer", TOP_LAYER)):
            if facts[name] == default:
                facts.pop(name)  # recorded only when not the default, so older caches keep their fingerprints
        facts.update(backbone="vgg16", preprocessing="caffe", feature_shape=list(self.feature_shape))
        if self.weights == "random":
            facts["weights_seed"] = self.seed
            backend = keras_backend()  # Keras's seeded initializers draw other numbers on each backend;
            if backend != "tensorflow":  # TensorFlow's random weights keep their old fingerprints
                facts["weights_backend"] = backend
        elif self.weights != "imagenet":
            md5, sha256 = _file_digests(Path(self.weights))
            facts["weights"] = "imagenet" if md5 == IMAGENET_MD5 else "file"
            if facts["weights"] == "file":
                facts["weights_sha256"] = sha256
        return facts


def keras_backend() -> str:
    """The Keras backend a network built in this process runs on: Keras's own once imported,
    else KERAS_BACKEND, else tensorflow (this project's default; see backbone.import_keras)."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        return keras.backend.backend()
    return os.environ.get("KERAS_BACKEND") or "tensorflow"


def path_text(name: str, path) -> str:
    """A path argument as text the cache can record (UTF-8); refuses one that is not."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(
            f"Expected {name} to be a path in UTF-8 (the cache records it as text); received {text!r}. "
            f"Rename it, or pass a link to it whose name is UTF-8."
        ) from None
    return text


def fingerprint(identity: dict) -> str:
    """A short, stable name for a feature identity (the cache's key for a configuration)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _file_digests(path: Path) -> tuple[str, str]:
    """The weights file's MD5 and SHA-256; one that cannot be read (no permission, an I/O
    error) is refused in one line, before any work: it is the user's file to fix."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                md5.update(block)
                sha256.update(block)
    except OSError as error:
        raise UsageError(
            f"Cannot read the weights file {str(path)!r} ({why(error)}); make it readable, "
            f"or pass --weights PATH to a readable copy."
        ) from None
    return md5.hexdigest(), sha256.hexdigest()


# The options that make a configuration, in the order `describe` names them, with their
# defaults (None: always named; the others only where they differ from the default).
DESCRIBED = (("input_size", None), ("pooling", None), ("precision", None), ("layer", TOP_LAYER),
             ("interpolation", "bilinear"), ("decode", "exact"), ("dtype", "float32"))
OPTIONS = ("--weights", "--seed", "KERAS_BACKEND", "--input-size", "--pooling", "--precision", "--layer",
           "--interpolation", "--decode", "--dtype")  # what `option_differences` compares; KERAS_BACKEND: see `identity`


def describe(facts: dict) -> str:
    """A configuration in words, from its facts (`FeatureConfig.identity()`, or a cache
    group's attributes as `list_configs` gives them): "weights imagenet, input size 224,
    pooling avg, precision float32", then layer, interpolation, decode and dtype where they are
    not the default. A weights file is named by its file name where the facts record it;
    random weights by their seed (and the Keras backend that drew them, if not TensorFlow)."""
    facts = _facts(facts)
    weights = option_value("--weights", facts)
    if weights == "random":
        backend = option_value("KERAS_BACKEND", facts)
        weights += f" (seed {option_value('--seed', facts)}{'' if backend == 'tensorflow' else ', ' + backend})"
    words = [f"weights {weights}"]
    for name, default in DESCRIBED:
        value = facts.get(name, default)
        if default is None or value != default:
            words.append(f"{name.replace('_', ' ')} {value}")
    return ", ".join(words)


def option_differences(facts: dict, other: dict) -> dict[str, tuple[str, str]]:
    """The options (`OPTIONS`) whose values differ between two configurations' facts (as
    `describe` takes them), this one's value first: {"--input-size": ("224", "48")}.
    Empty when the two are the same configuration."""
    facts, other = _facts(facts), _facts(other)
    differences = {}
    for option in OPTIONS:
        mine, theirs = option_value(option, facts), option_value(option, other)
        if not (mine and theirs):  # --seed, KERAS_BACKEND: compared only when both are random weights
            continue
        if option == "--weights" and mine == theirs and facts.get("weights_sha256") != other.get("weights_sha256"):
            mine += f" (sha256 {str(facts.get('weights_sha256'))[:12]})"  # one file name, other content
            theirs += f" (sha256 {str(other.get('weights_sha256'))[:12]})"
        if mine != theirs:
            differences[option] = (mine, theirs)
    return differences


def option_value(option: str, facts: dict) -> str:
    """The value of one option (an `OPTIONS` name) in a configuration's identity facts, as
    text; "" where it does not apply (--seed and KERAS_BACKEND but for random weights)."""
    weights = str(facts.get("weights"))
    if option == "--weights":
        if weights == "file":
            return Path(facts["weights_path"]).name if facts.get("weights_path") else "file"
        return weights
    if option == "--seed":
        return str(facts.get("weights_seed", 0)) if weights == "random" else ""
    if option == "KERAS_BACKEND":
        return str(facts.get("weights_backend", "tensorflow")) if weights == "random" else ""
    name = option[2:].replace("-", "_")
    return str(facts.get(name, dict(DESCRIBED)[name]))


def _facts(facts: dict) -> dict:
    """The identity facts of a cache group's attributes (or facts that are one already),
    with the weights file's path where the attributes record it."""
    identity = facts.get("identity")
    if isinstance(identity, dict):
        return dict(identity, weights_path=facts.get("weights_path"))
    return facts
