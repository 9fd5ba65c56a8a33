"""How far features from different Keras backends are apart, against how far the
precisions are: the measurement behind backends sharing a cache configuration.

    python bench/backends.py --images 64 --input-size 224

Computes the features of N bench photos (bench/extract_speed.make_photo) with the same
weights file (seeded, in the legacy HDF5 layout of Keras's ImageNet file) on each backend
installed (tensorflow, jax, torch; one process each), in float32 and mixed_bfloat16, and
prints for each pair: the largest difference over the largest feature, and 1 - the lowest
cosine similarity of two images' feature maps. PyTorch from the registry brings gigabytes of
CUDA libraries; point PYTHONPATH at an installation of it to include it.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.extract_speed import photo_folder  # noqa: E402

PRECISIONS = ("float32", "mixed_bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--features", nargs=4, metavar=("DATA", "WEIGHTS", "PRECISION", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.features:
        data, weights, precision, out = args.features
        np.save(out, features(Path(data), weights, precision, args.images, args.input_size))
        return

    data = photo_folder(args.images, workers=os.cpu_count() or 1)
    folder = Path(tempfile.mkdtemp(prefix="backends-"))
    weights = folder / "weights.h5"
    write_weights(weights, args.input_size)
    results = {}
    for backend in ("tensorflow", "jax", "torch"):
        if not find_spec(backend):
            print(f"{backend}: not installed, skipped")
            continue
        for precision in PRECISIONS:
            out = folder / f"{backend}-{precision}.npy"
            subprocess.run([sys.executable, __file__, "--features", str(data), str(weights), precision, str(out),
                            "--images", str(args.images), "--input-size", str(args.input_size)],
                           check=True, env=dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2"))
            results[backend, precision] = np.load(out)
    rows = []
    for (a, first), (b, second) in itertools.combinations(results.items(), 2):
        if a[0] != b[0] and a[1] != b[1]:
            continue  # another backend and another precision: nothing to learn
        rows.append({"first": " ".join(a), "second": " ".join(b), **distance(first, second)})
    print(f"{args.images} photos, {args.input_size} px, pooling none, feature maps {first.shape[1:]}")
    for row in rows:
        print(f"{row['first']:>26} vs {row['second']:<26} largest difference {row['max_over_largest']:.2e} "
              f"of the largest feature; 1 - lowest cosine {row['one_minus_cosine']:.2e}")
    print(json.dumps(rows))


def write_weights(path: Path, size: int) -> None:
    """Seeded VGG16 weights in the legacy HDF5 layout of Keras's ImageNet file."""
    import h5py

    from extract.backbone import import_keras

    keras = import_keras()
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(1234)
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))
    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, model)


def features(data: Path, weights: str, precision: str, count: int, size: int) -> np.ndarray:
    """The features of the first `count` photos, on this process's Keras backend."""
    from extract.backbone import Backbone
    from extract.config import FeatureConfig
    from extract.layout import scan_folder
    from extract.reader import load_all
    from extract.sources.folder import Folder

    images = scan_folder(data).images[:count]
    pixels = np.stack([item.pixels for item in load_all(Folder(data), images, size, "bilinear", workers=2, prefetch=32)])
    backbone = Backbone(FeatureConfig(input_size=size, weights=weights, precision=precision))
    return np.concatenate([backbone(pixels[start:start + 16]) for start in range(0, len(pixels), 16)])


def distance(first: np.ndarray, second: np.ndarray) -> dict:
    a, b = first.reshape(len(first), -1).astype(np.float64), second.reshape(len(second), -1).astype(np.float64)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"max_over_largest": float(np.abs(a - b).max() / np.abs(a).max()), "one_minus_cosine": float(1 - cosine.min())}


if __name__ == "__main__":
    main()
