"""Shared fixtures: tiny images made in the test, and an offline VGG16 weights file."""

import os
import subprocess
import sys
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


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "data"
    make_dataset(root)
    return root


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The installed command in a subprocess, as a user runs it."""
    command = [sys.executable, "-m", "extract.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
