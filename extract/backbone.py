"""The frozen VGG16 convolutional base and its preprocessing: the only module that
builds a model (what it computes is `config.FeatureConfig`). TensorFlow is imported only
when a `Backbone` is built.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from extract.config import IMAGENET_FILE, IMAGENET_URL, FeatureConfig
from extract.errors import ExtractError, UsageError, WeightsUnavailableError


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
            raise weights_error(config.weights, error) from error
    finally:
        keras.mixed_precision.set_dtype_policy(previous_policy)
    model.trainable = False
    return model


def weights_error(weights: str, error: Exception) -> ExtractError:
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
