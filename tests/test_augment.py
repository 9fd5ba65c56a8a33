import numpy as np
import pytest

from extract.augment import Augmentation, apply_transform
from extract.errors import UsageError

SHA = "3f" * 32


def asymmetric(height=32, width=32) -> np.ndarray:
    """An image that is not its own mirror: a ramp across, and a bright left edge."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)
    pixels[:, :3, 1] = 255
    pixels[::4, :, 2] = 100
    return pixels


def test_a_view_depends_only_on_content_view_and_seed():
    pixels = asymmetric()
    augmentation = Augmentation(shear=10, zoom=0.2, rotation=15, shift=0.1)
    np.testing.assert_array_equal(augmentation.view(pixels, SHA, 1), Augmentation(shear=10, zoom=0.2, rotation=15, shift=0.1).view(pixels, SHA, 1))
    others = [augmentation.view(pixels, SHA, 2), augmentation.view(pixels, "40" * 32, 1),
              Augmentation(shear=10, zoom=0.2, rotation=15, shift=0.1, seed=1).view(pixels, SHA, 1)]
    for other in others:
        assert not np.array_equal(other, augmentation.view(pixels, SHA, 1))


def test_the_fingerprint_names_the_transforms_not_the_view_count():
    assert Augmentation().fingerprint == Augmentation(shear=0.2, zoom=0.2, flip=True).fingerprint
    assert len({Augmentation().fingerprint, Augmentation(shear=0.3).fingerprint, Augmentation(flip=False).fingerprint,
                Augmentation(seed=1).fingerprint}) == 4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras's own scipy.ndimage.interpolation import
@pytest.mark.parametrize("shape", [(32, 32, 3), (24, 40, 3)])
def test_transforms_equal_keras_image_data_generator(shape):
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    pixels = np.random.default_rng(0).integers(0, 256, shape).astype(np.float32)
    augmentation = Augmentation(shear=12, zoom=0.3, rotation=20, shift=0.15)
    keras_generator = ImageDataGenerator()  # apply_transform does what the parameters say
    for view in range(1, 6):
        parameters = augmentation.parameters(SHA, view, shape)
        expected = keras_generator.apply_transform(
            pixels.copy(), dict(parameters, flip_vertical=False, channel_shift_intensity=None, brightness=None)
        )
        np.testing.assert_allclose(apply_transform(pixels, parameters), expected, atol=1e-4)


def test_a_flip_only_view_is_the_image_or_its_mirror():
    pixels = asymmetric()
    augmentation = Augmentation(shear=0, zoom=0, flip=True)
    mirrored = 0
    for view in range(1, 13):
        result = augmentation.view(pixels, SHA, view)
        if augmentation.parameters(SHA, view, pixels.shape)["flip_horizontal"]:
            np.testing.assert_array_equal(result, pixels[:, ::-1])
            mirrored += 1
        else:
            np.testing.assert_array_equal(result, pixels)
    assert 0 < mirrored < 12  # both happen, about half each


def test_no_flip_means_no_mirror():
    augmentation = Augmentation(flip=False)
    assert not any(augmentation.parameters(SHA, view, (32, 32, 3))["flip_horizontal"] for view in range(1, 50))


def test_parameters_stay_in_their_ranges():
    augmentation = Augmentation(shear=0.2, zoom=0.2, rotation=10, shift=0.25)
    drawn = [augmentation.parameters(SHA, view, (40, 20, 3)) for view in range(1, 200)]
    assert max(abs(p["shear"]) for p in drawn) <= 0.2 and max(abs(p["theta"]) for p in drawn) <= 10
    assert all(0.8 <= p["zx"] <= 1.2 and 0.8 <= p["zy"] <= 1.2 for p in drawn)
    assert max(abs(p["tx"]) for p in drawn) <= 10 and max(abs(p["ty"]) for p in drawn) <= 5  # of 40 rows, 20 columns
    assert max(abs(p["shear"]) for p in drawn) > 0.15  # they do vary


def test_the_seeds_zoom_changes_the_picture():
    pixels = asymmetric()
    view = Augmentation(shear=0, zoom=0.2, flip=False).view(pixels, SHA, 1)
    assert view.dtype == np.float32 and view.shape == pixels.shape
    assert not np.allclose(view, pixels)


@pytest.mark.parametrize("option, value", [("shear", -1), ("zoom", 1.0), ("rotation", 180), ("shift", 1.5)])
def test_out_of_range_transforms_are_refused(option, value):
    with pytest.raises(UsageError, match=f"--{option}"):
        Augmentation(**{option: value}).validate()
