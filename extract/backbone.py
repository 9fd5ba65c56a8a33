"""The frozen VGG16 convolutional base and its preprocessing: the only module that
builds a model.

`FeatureConfig` says what a feature is; `FeatureConfig.identity()` turns it into the facts
that decide the numbers (the weights by content, not by path), and `fingerprint` names
that identity. Two runs with the same fingerprint produce the same features, so the
fingerprint is the cache key. TensorFlow is imported only when a `Backbone` is built.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from extract.errors import ExtractError, UsageError, WeightsUnavailableError
from extract.reader import INTERPOLATIONS

POOLINGS = ("none", "avg", "max")
DECODES = ("exact", "draft")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
DTYPES = ("float32", "float16")
MIN_INPUT_SIZE = 32
FEATURE_CHANNELS = 512
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

    def validate(self) -> None:
        if not isinstance(self.input_size, int) or self.input_size < MIN_INPUT_SIZE:
            raise UsageError(
                f"Expected --input-size >= {MIN_INPUT_SIZE} (VGG16's minimum without its top); "
                f"received {self.input_size}."
            )
        for name, value, allowed in (
            ("--interpolation", self.interpolation, tuple(INTERPOLATIONS)),
            ("--pooling", self.pooling, POOLINGS),
            ("--precision", self.precision, PRECISIONS),
            ("--dtype", self.dtype, DTYPES),
            ("--decode", self.decode, DECODES),
        ):
            if value not in allowed:
                raise UsageError(f"Expected {name} to be one of {', '.join(allowed)}; received {value!r}.")
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
            dtype=facts["dtype"], decode=facts.get("decode", "exact"),
        )

    @property
    def feature_shape(self) -> tuple[int, ...]:
        if self.pooling != "none":
            return (FEATURE_CHANNELS,)
        side = self.input_size // 32  # five 2x2 max-pools, each rounding down
        return (side, side, FEATURE_CHANNELS)

    def identity(self) -> dict:
        """The facts that decide the feature values, JSON-ready. A weights file is known by
        its content: a local copy of Keras's ImageNet file is "imagenet", like the download."""
        facts = asdict(self)
        facts.pop("seed")
        if self.decode == "exact":
            facts.pop("decode")  # recorded only when not the default, so older caches keep their fingerprints
        facts.update(backbone="vgg16", preprocessing="caffe", feature_shape=list(self.feature_shape))
        if self.weights == "random":
            facts["weights_seed"] = self.seed
        elif self.weights != "imagenet":
            md5, sha256 = _file_digests(Path(self.weights))
            facts["weights"] = "imagenet" if md5 == IMAGENET_MD5 else "file"
            if facts["weights"] == "file":
                facts["weights_sha256"] = sha256
        return facts


def fingerprint(identity: dict) -> str:
    """A short, stable name for a feature identity (the cache's key for a configuration)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class Backbone:
    """VGG16 without its top, frozen, with the configured pooling and precision.

    Call it on a uint8 batch of shape (n, size, size, 3) in RGB order; it applies
    `keras.applications.vgg16.preprocess_input` and returns features as `config.dtype`.
    """

    def __init__(self, config: FeatureConfig, xla: bool = False):
        self.config = config
        keras = import_keras()
        import tensorflow as tf

        self.device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        with contextlib.redirect_stdout(sys.stderr):  # Keras reports downloads on stdout, which is for results
            self.model = _build_vgg16(keras, config)
        preprocess, model = keras.applications.vgg16.preprocess_input, self.model
        # One graph for every batch size, preprocessing included (on the GPU when there is one):
        # predict_on_batch would trace again for a run's last, smaller batch. `xla` compiles it
        # with XLA (bench/compare.py --xla; slower than oneDNN on this project's CPU).
        self._forward = tf.function(
            lambda batch: model(preprocess(batch), training=False),
            input_signature=[tf.TensorSpec((None, config.input_size, config.input_size, 3), tf.float32)],
            jit_compile=xla,
        )

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        features = self._forward(np.asarray(pixels, dtype=np.float32))
        return np.asarray(features, dtype=self.config.dtype)


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), on Linux."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def import_keras():
    """Keras on TensorFlow, imported without TensorFlow's C++ start-up chatter (oneDNN,
    CUDA probing), with GPU memory growth on so that TensorFlow takes GPU memory as needed."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    with _quiet_native_stderr():
        import keras
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            with contextlib.suppress(RuntimeError):  # devices already initialised
                tf.config.experimental.set_memory_growth(gpu, True)
    return keras


def _build_vgg16(keras, config: FeatureConfig):
    previous_policy = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(config.precision)
    try:
        weights = config.weights
        if weights == "random":
            keras.utils.set_random_seed(config.seed)
            weights = None
        try:
            model = keras.applications.VGG16(
                include_top=False,
                weights=weights,
                input_shape=(config.input_size, config.input_size, 3),
                pooling=None if config.pooling == "none" else config.pooling,
            )
        except Exception as error:
            raise _weights_error(config.weights, error) from error
    finally:
        keras.mixed_precision.set_dtype_policy(previous_policy)
    model.trainable = False
    return model


def _weights_error(weights: str, error: Exception) -> ExtractError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    if weights == "imagenet":
        return WeightsUnavailableError(
            f"Could not get the VGG16 ImageNet weights through Keras ({reason}). "
            f"Offline? Download {IMAGENET_URL} elsewhere and pass --weights PATH_TO_THAT_FILE, "
            f"or copy it into ~/.keras/models/."
        )
    return UsageError(
        f"--weights {weights}: not a weights file for VGG16 without its top ({reason}). "
        f"Expected {IMAGENET_FILE} or weights saved from keras.applications.VGG16(include_top=False)."
    )


def _file_digests(path: Path) -> tuple[str, str]:
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            md5.update(block)
            sha256.update(block)
    return md5.hexdigest(), sha256.hexdigest()


@contextlib.contextmanager
def _quiet_native_stderr():
    """TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) goes straight to file
    descriptor 2. Hold it back while TensorFlow starts; show it only if that fails."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except Exception:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
