"""Shared fixtures: tiny images made in the test, and an offline VGG16 weights file."""

import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

SIZE = 32  # VGG16's minimum without its top: keeps the suite fast on two cores


def make_image(path: Path, seed: int = 0, size=(40, 30), mode: str = "RGB", format: str | None = None) -> Path:
    """A small image of random blocks (so resizing matters), saved by extension or `format`."""
    rng = np.random.default_rng(seed)
    width, height = size
    blocks = rng.integers(0, 256, (max(1, height // 5), max(1, width // 5), 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize((width, height), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert(mode).save(path, format=format)
    return path


def make_dataset(root: Path, layout: str = "splits", classes=("cat", "dog"), per_class: int = 3, seed: int = 0) -> list[Path]:
    """Images in one of the three layouts extract-features understands."""
    paths = []
    for c, name in enumerate(classes):
        for i in range(per_class):
            number = seed * 1000 + c * 100 + i
            if layout == "splits":
                split = "validation" if i == per_class - 1 else "train"
                relative = Path(split, name, f"{i}.png")
            elif layout == "classes":
                relative = Path(name, f"{i}.jpg")
            else:
                relative = Path(f"{name}-{i}.png")
            paths.append(make_image(root / relative, seed=number, size=(30 + i, 40 - c)))
    return paths


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """Seeded weights for VGG16 without its top, in the legacy HDF5 layout of Keras's
    ImageNet file (what a user who downloaded it by hand would pass to --weights)."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(1234)
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    path = tmp_path_factory.mktemp("weights") / "vgg16_notop_test.h5"
    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, model)
    return path


@pytest.fixture(scope="session", autouse=True)
def kept_backbones():
    """The pipeline's backbones built once per configuration for the session (helpers.BackboneKeeper)."""
    import extract.featurize
    from extract.backbone import Backbone
    from helpers import BackboneKeeper

    keeper = BackboneKeeper(Backbone)
    patch = pytest.MonkeyPatch()
    for module in (extract.featurize,):
        patch.setattr(module, "Backbone", keeper)
    yield keeper
    patch.undo()


@pytest.fixture(scope="module")
def augmented(tmp_path_factory, weights_file) -> Path:
    """A real extraction: 24 images of 3 classes, 2 cached views of each training image,
    no validation split stored (one is drawn)."""
    from extract import extract_features

    folder = tmp_path_factory.mktemp("augmented")
    make_dataset(folder / "data", "classes", per_class=8, classes=("cat", "dog", "fox"))
    extract_features(folder / "data", folder / "c.h5", input_size=SIZE, weights=weights_file, augment=2,
                     validation_percent=0, progress=False)
    return folder / "c.h5"


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "data"
    make_dataset(root)
    return root


def blobs(classes=("a", "b", "c"), per_class=30, features=16, seed=0, spread=1.0):
    """Separable Gaussian blobs: (X float32, y str)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (len(classes), features))
    X = np.concatenate([center + rng.normal(0, spread, (per_class, features)) for center in centers])
    y = np.repeat(np.array(classes), per_class)
    return X.astype(np.float32), y


def write_synthetic_cache(path: Path, splits: dict, fingerprint: str = "synthetic0000001", features=16, seed=0,
                          shape=None, spread=1.0) -> Path:
    """A feature cache holding blobs, written through the cache's own writer.
    `splits` maps a split name to (classes, images per class); a larger `spread` makes
    the blobs overlap (and heads make mistakes)."""
    from extract.state import ConfigState, Row
    from extract.recovery import open_stored
    from extract.writer import Writer

    writer = Writer(open_stored(Path(path), fingerprint))
    rows = {}
    for offset, (split, (classes, per_class)) in enumerate(splits.items()):
        X, y = blobs(classes, per_class, features, seed=seed, spread=spread)  # the same centres for every split
        X = X + np.random.default_rng(seed + offset + 1).normal(0, 0.3, X.shape).astype(np.float32)
        hashes = [f"{offset:02d}{i:062x}" for i in range(len(y))]
        writer.append(hashes, X.reshape(len(X), *(shape or (features,))))
        for i, (label, digest) in enumerate(zip(y, hashes)):
            rows[f"{split}/{label}/{i}.png"] = Row(digest, str(label), split, 1, 1)
    attrs = {"feature_shape": list(shape or (features,)), "dtype": "float32", "backbone": "vgg16",
             "weights": "random", "weights_seed": 0, "input_size": 32, "interpolation": "bilinear",
             "pooling": "avg", "precision": "float32"}
    writer.commit(ConfigState(attrs=attrs, rows=rows))
    return path
