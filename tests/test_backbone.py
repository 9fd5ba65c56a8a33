import hashlib
import shutil
import socket

import h5py
import keras
import numpy as np
import pytest

from conftest import SIZE
from extract import config as backbone_config
from extract.backbone import Backbone
from extract.config import FeatureConfig, fingerprint
from extract.errors import UsageError, WeightsUnavailableError


def random_pixels(count=2, size=SIZE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"input_size": 16}, "Expected --input-size between 32 (VGG16's minimum without its top) and 1024; received 16."),
        ({"pooling": "mean"}, "Expected --pooling to be one of none, avg, max; received 'mean'."),
        ({"interpolation": "cubic"}, "Expected --interpolation"),
        ({"precision": "float64"}, "Expected --precision"),
        ({"dtype": "int8"}, "Expected --dtype"),
        ({"decode": "fast"}, "Expected --decode to be one of exact, draft; received 'fast'."),
        ({"weights": "/nowhere/weights.h5"}, "is not a file"),
    ],
)
def test_bad_configuration_is_refused_with_its_value(changes, message):
    with pytest.raises(UsageError) as error:
        FeatureConfig(**changes).validate()
    assert message in str(error.value)


@pytest.mark.parametrize(
    "size, pooling, shape",
    [(32, "none", (1, 1, 512)), (64, "none", (2, 2, 512)), (100, "none", (3, 3, 512)), (64, "avg", (512,)), (64, "max", (512,))],
)
def test_feature_shape_is_what_the_network_outputs(weights_file, size, pooling, shape):
    config = FeatureConfig(input_size=size, pooling=pooling, weights=str(weights_file))
    assert config.feature_shape == shape
    assert Backbone(config)(random_pixels(1, size)).shape == (1, *shape)


def test_weights_file_is_known_by_content_not_path(weights_file, tmp_path):
    copy = tmp_path / "elsewhere.h5"
    shutil.copy(weights_file, copy)
    first = FeatureConfig(weights=str(weights_file)).identity()
    assert first["weights"] == "file"
    assert first["weights_sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert fingerprint(first) == fingerprint(FeatureConfig(weights=str(copy)).identity())


def test_a_local_copy_of_the_imagenet_file_is_imagenet(weights_file, monkeypatch):
    monkeypatch.setattr(backbone_config, "IMAGENET_MD5", hashlib.md5(weights_file.read_bytes()).hexdigest())
    identity = FeatureConfig(weights=str(weights_file)).identity()
    assert identity["weights"] == "imagenet" and "weights_sha256" not in identity
    assert fingerprint(identity) == fingerprint(FeatureConfig(weights="imagenet").identity())


@pytest.mark.parametrize(
    "changes",
    [{"input_size": 64}, {"pooling": "avg"}, {"interpolation": "nearest"}, {"dtype": "float16"},
     {"precision": "mixed_bfloat16"}, {"weights": "random"}, {"weights": "random", "seed": 1}, {"decode": "draft"}],
)
def test_every_feature_setting_changes_the_fingerprint(changes):
    base = fingerprint(FeatureConfig().identity())
    assert fingerprint(FeatureConfig(**changes).identity()) != base


def test_exact_decoding_is_not_recorded_so_older_caches_keep_their_fingerprint():
    assert "decode" not in FeatureConfig().identity()
    assert FeatureConfig(decode="draft").identity()["decode"] == "draft"
    assert FeatureConfig.from_facts(FeatureConfig(decode="draft").identity()).decode == "draft"
    assert FeatureConfig.from_facts(FeatureConfig().identity()).decode == "exact"


def test_seed_only_matters_for_random_weights():
    assert fingerprint(FeatureConfig(seed=5).identity()) == fingerprint(FeatureConfig().identity())


def test_random_weights_are_reproducible_by_seed():
    pixels = random_pixels()
    first = Backbone(FeatureConfig(input_size=SIZE, weights="random", seed=3))(pixels)
    again = Backbone(FeatureConfig(input_size=SIZE, weights="random", seed=3))(pixels)
    other = Backbone(FeatureConfig(input_size=SIZE, weights="random", seed=4))(pixels)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_features_are_vgg16_on_caffe_preprocessed_pixels(weights_file):
    pixels = random_pixels(3)
    model = keras.applications.VGG16(include_top=False, weights=str(weights_file), input_shape=(SIZE, SIZE, 3))
    expected = model.predict(keras.applications.vgg16.preprocess_input(pixels.astype("float32")), verbose=0)
    features = Backbone(FeatureConfig(input_size=SIZE, weights=str(weights_file)))(pixels)
    assert np.abs(features).max() > 0
    np.testing.assert_allclose(features, expected, atol=1e-4)


def test_float16_storage_and_bfloat16_compute(weights_file):
    pixels = random_pixels(2)
    exact = Backbone(FeatureConfig(input_size=SIZE, pooling="avg", weights=str(weights_file)))(pixels)
    half = Backbone(FeatureConfig(input_size=SIZE, pooling="avg", weights=str(weights_file), dtype="float16"))(pixels)
    mixed = Backbone(FeatureConfig(input_size=SIZE, pooling="avg", weights=str(weights_file), precision="mixed_bfloat16"))(pixels)
    assert half.dtype == np.float16 and mixed.dtype == np.float32
    np.testing.assert_allclose(half, exact, rtol=2e-3, atol=1e-3 * np.abs(exact).max())
    cosine = (mixed * exact).sum(1) / np.linalg.norm(mixed, axis=1) / np.linalg.norm(exact, axis=1)
    assert cosine.min() > 0.95
    assert keras.mixed_precision.dtype_policy().name == "float32"  # the global policy is left as found


def test_weights_of_another_architecture_are_a_usage_error(tmp_path):
    from keras.src.legacy.saving import legacy_h5_format

    other = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Conv2D(8, 3, name="block1_conv1")])
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, other)
    with pytest.raises(UsageError, match="not a weights file for VGG16 without its top") as error:
        Backbone(FeatureConfig(input_size=SIZE, weights=str(path)))
    assert "\n" not in str(error.value)


def test_imagenet_download_failure_says_how_to_work_offline(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(keras.src.backend.config, "_KERAS_DIR", str(tmp_path))  # no cached copy
    with pytest.raises(WeightsUnavailableError) as error:
        Backbone(FeatureConfig(input_size=SIZE, weights="imagenet"))
    message = str(error.value)
    assert "--weights" in message and backbone_config.IMAGENET_FILE in message and "\n" not in message
