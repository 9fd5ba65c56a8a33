"""The frozen VGG16 convolutional base and its preprocessing: the only module that
builds a model (what it computes is `config.FeatureConfig`).

It runs on the Keras backend that `KERAS_BACKEND` names: tensorflow (the default), jax or
torch, each through Keras's own compiled inference (`predict_on_batch`), on a GPU where
the backend sees one. The backend is imported only when a `Backbone` is built, and
TensorFlow only on the tensorflow backend.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from extract.config import IMAGENET_FILE, IMAGENET_URL, FeatureConfig, keras_backend
from extract.errors import ExtractError, UsageError, WeightsUnavailableError
from extract.options import TOP_LAYER

BACKENDS = {"tensorflow": "tensorflow", "jax": "jax[cpu] (or jax[cuda12])", "torch": "torch"}  # name -> pip install
IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)


class Backbone:
    """VGG16 without its top, frozen, up to the configured layer (the base's output,
    block5_pool, by default), with the configured pooling and precision.

    Call it on a batch of shape (n, size, size, 3) in RGB order, uint8 (images) or float32
    (augmented views); it applies `keras.applications.vgg16.preprocess_input` (in the model,
    on the device) and returns features as `config.dtype`. `backend` and `device` ("CPU",
    "GPU") say where it runs.
    """

    def __init__(self, config: FeatureConfig, xla: bool | None = None):
        self.config = config
        keras = import_keras()
        self.backend = keras.backend.backend()
        self.device = _device(self.backend)
        self.model = _build_vgg16(keras, config)
        self._keras, self._xla = keras, xla
        self._to_float = keras.layers.Rescaling(1.0, name="to_float", dtype="float32")
        self._preprocess = caffe_preprocessing(keras)
        self._forwards: dict = {}  # input dtype -> the Keras model whose predict_on_batch runs it

    def features_of(self, pixels):
        """The backbone on a symbolic batch of pixels (a Keras tensor): for models built on it."""
        return self.model(self._preprocess(self._to_float(pixels)))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8:  # images travel as uint8 (a quarter of the bytes), views as float32
            pixels = pixels.astype(np.float32, copy=False)
        count = len(pixels)
        if not count:
            return np.zeros((0, *self.config.feature_shape), self.config.dtype)
        if self.backend == "jax":  # JAX compiles once per batch shape: a batch is padded to a power of two
            padded = 1 << (count - 1).bit_length()
            pixels = np.concatenate([pixels, np.zeros((padded - count, *pixels.shape[1:]), pixels.dtype)])
        features = self._forward(pixels.dtype).predict_on_batch(pixels)[:count]
        return np.asarray(features, dtype=self.config.dtype)

    def _forward(self, dtype: np.dtype):
        if dtype not in self._forwards:
            keras, size = self._keras, self.config.input_size
            inputs = keras.Input((size, size, 3), dtype=dtype.name, name="rgb")
            model = keras.Model(inputs, self.features_of(inputs), name=f"vgg16_features_{dtype.name}")
            if self._xla is not None:
                model.jit_compile = self._xla  # default: Keras's choice per backend (XLA on JAX and TF GPUs)
            self._forwards[dtype] = model
        return self._forwards[dtype]


def caffe_preprocessing(keras):
    """keras.applications.vgg16.preprocess_input as a frozen 1x1 convolution (only built-in
    layers, so a saved model loads anywhere): RGB to BGR, minus the ImageNet means."""
    layer = keras.layers.Conv2D(3, 1, name="vgg16_preprocess", trainable=False, dtype="float32")
    layer.build((None, None, None, 3))
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    for channel in range(3):
        kernel[0, 0, 2 - channel, channel] = 1.0  # output BGR from input RGB
    layer.set_weights([kernel, -np.array(IMAGENET_BGR_MEANS, np.float32)])
    return layer


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), on Linux."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def import_keras():
    """Keras on the backend KERAS_BACKEND names (tensorflow if unset), refusing one it cannot
    start in one line. Each backend takes GPU memory as needed, not all of it at start:
    TensorFlow by memory growth, JAX by XLA_PYTHON_CLIENT_PREALLOCATE=false (unless set),
    PyTorch by its own caching allocator. TensorFlow's C++ start-up chatter (oneDNN, CUDA
    probing) is held back."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    name = keras_backend()
    if name not in BACKENDS:
        raise UsageError(f"Expected KERAS_BACKEND to be one of {', '.join(BACKENDS)}; received {name!r}.")
    with _quiet_native_stderr():
        try:
            import keras
        except (ImportError, ValueError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            missing = (getattr(error, "name", None) or "").split(".")[0]
            fix = f"Install it (pip install {BACKENDS[name]})" if missing in (name, "jaxlib") else "Install what it names"
            raise UsageError(
                f"Keras cannot start on KERAS_BACKEND={name} ({reason}). {fix} "
                f"or set KERAS_BACKEND to another of {', '.join(BACKENDS)}."
            ) from None
        if name == "tensorflow":
            import tensorflow as tf

            for gpu in tf.config.list_physical_devices("GPU"):
                with contextlib.suppress(RuntimeError):  # devices already initialised
                    tf.config.experimental.set_memory_growth(gpu, True)
    return keras


def _device(backend: str) -> str:
    """Where the backend computes: "GPU" when it sees one, else "CPU" (or "TPU", "MPS")."""
    if backend == "tensorflow":
        import tensorflow as tf

        return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    if backend == "jax":
        import jax

        return jax.default_backend().upper()
    import torch

    return "GPU" if torch.cuda.is_available() else "MPS" if torch.backends.mps.is_available() else "CPU"


def _build_vgg16(keras, config: FeatureConfig):
    """The frozen base up to `config.layer`, with the configured pooling and precision."""
    previous_policy = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(config.precision)
    try:
        base = _vgg16(keras, config, pooling=config.pooling if config.layer == TOP_LAYER else "none")
        model = base
        if config.layer != TOP_LAYER:
            output = base.get_layer(config.layer).output
            if config.pooling != "none":
                pool = keras.layers.GlobalAveragePooling2D if config.pooling == "avg" else keras.layers.GlobalMaxPooling2D
                output = pool(name=f"{config.layer}_{config.pooling}")(output)
            model = keras.Model(base.inputs, output, name=f"vgg16_to_{config.layer}")
    finally:
        keras.mixed_precision.set_dtype_policy(previous_policy)
    model.trainable = False
    return model


def _vgg16(keras, config: FeatureConfig, pooling: str):
    """Keras's VGG16 without its top, with the weights `config` names (refused in one line
    when they cannot be had)."""
    weights = config.weights
    if weights == "random":
        keras.utils.set_random_seed(config.seed)
        weights = None
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Keras reports downloads on stdout, which is for results
            return keras.applications.VGG16(
                include_top=False,
                weights=weights,
                input_shape=(config.input_size, config.input_size, 3),
                pooling=None if pooling == "none" else pooling,
            )
    except Exception as error:
        raise weights_error(config.weights, error) from error


def vgg16_top(config: FeatureConfig, trainable: bool = False):
    """The rest of the base above `config.layer` (an unpooled map below block5_pool: see
    `FeatureConfig.is_map_below_top`), as a Keras model from that layer's map to block5_pool's,
    with the same weights as the base that made the features, computing in float32.
    `trainable`: its layers learn (fine-tuning); else frozen (features for the other heads)."""
    if not config.is_map_below_top:
        raise ValueError(f"Expected features of an unpooled layer below {TOP_LAYER}; received layer {config.layer}, "
                         f"pooling {config.pooling}.")
    keras = import_keras()
    base = _vgg16(keras, config, pooling="none")
    names = [layer.name for layer in base.layers]
    inputs = keras.Input(config.feature_shape, name=config.layer)
    x = inputs
    for name in names[names.index(config.layer) + 1:]:
        layer = base.get_layer(name)
        copy = type(layer).from_config(dict(layer.get_config(), dtype="float32", trainable=trainable))
        x = copy(x)
        copy.set_weights(layer.get_weights())
    return keras.Model(inputs, x, name=f"vgg16_above_{config.layer}")


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
