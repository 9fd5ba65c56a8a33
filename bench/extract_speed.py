"""Where extraction time goes, and what a re-run costs.

    python bench/extract_speed.py --images 2000 --input-size 224

Makes N JPEGs from scikit-learn's bundled photos (500x375, ~45 KB; see make_photo) in
bench/data/photos-N/ (git-ignored) and measures,
on this machine, each with the same images and settings:
  read     reading + SHA-256 + decode + resize alone (the reader's threads, no network)
  model    the frozen VGG16 alone on pixels already in memory (preprocess + forward)
  cold     extract-features from scratch (all of the above, overlapped, plus the cache write)
  rerun    extract-features again on the unchanged folder
Weights are seeded random ones: speed does not depend on the weight values.
"""

import argparse
import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract import extract_features  # noqa: E402
from extract.backbone import Backbone  # noqa: E402
from extract.config import FeatureConfig  # noqa: E402
from extract.layout import scan_folder  # noqa: E402
from extract.reader import load_all  # noqa: E402
from extract.sources.folder import Folder  # noqa: E402


def photo_folder(count: int, size=(500, 375), workers: int = 1) -> Path:
    """bench/data/photos-N[-WxH]/ with exactly N photos made by `make_photos` (N >= what is there)."""
    folder = Path("bench/data") / (f"photos-{count}" + ("" if size == (500, 375) else f"-{size[0]}x{size[1]}"))
    make_photos(folder, count, size, workers)
    return folder


def make_photos(folder: Path, count: int, size=(500, 375), workers: int = 1) -> None:
    """Photos 0..count-1 in `folder` (those missing are made, on `workers` processes)."""
    missing = [i for i in range(count) if not _photo_path(folder, i).is_file()]
    if workers > 1 and len(missing) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(make_photo, [folder] * len(missing), missing, [size] * len(missing), chunksize=64))
    else:
        for i in missing:
            make_photo(folder, i, size)


def make_photo(folder: Path, i: int, size=(500, 375)) -> None:
    """Photo i: a real photo, from the two that scikit-learn bundles (640x427): a random 4:3
    crop of one (seeded by i), mirrored half the time, resized to `size`, saved as JPEG
    quality 90 (500x375: ~45 KB). Larger than the sources, a crop is smoother than a
    camera's picture, which makes it cheap to decode: those get sensor-like grain (noise
    sd 6; 2000x1500: ~0.7 MB, 4000x3000: ~2.6 MB, as phone photos)."""
    source = _sources()[i % 2]
    rng = np.random.default_rng(i)
    height = int(rng.integers(280, source.shape[0] + 1))
    width = height * 4 // 3
    top, left = rng.integers(0, source.shape[0] - height + 1), rng.integers(0, source.shape[1] - width + 1)
    crop = source[top : top + height, left : left + width]
    photo = Image.fromarray(crop[:, ::-1] if rng.random() < 0.5 else crop).resize(size, Image.Resampling.BICUBIC)
    if size[0] > source.shape[1]:
        grained = np.asarray(photo, dtype=np.int16) + rng.normal(0, 6, (size[1], size[0], 3))
        photo = Image.fromarray(np.clip(grained, 0, 255).astype(np.uint8))
    path = _photo_path(folder, i)
    path.parent.mkdir(parents=True, exist_ok=True)
    photo.save(path, quality=90)


@functools.cache
def _sources() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return load_sample_images().images


def _photo_path(folder: Path, i: int) -> Path:
    return folder / "train" / f"class{i % 4}" / f"{i:05d}.jpg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--model-images", type=int, default=256, help="images for the model-only timing")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--pooling", default="none")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="float32")
    args = parser.parse_args()

    data = photo_folder(args.images)
    images = scan_folder(data).images[: args.images]
    size = args.input_size
    results = {"images": len(images), "input_size": size, "batch_size": args.batch_size, "precision": args.precision}

    start = time.perf_counter()
    loaded = list(load_all(Folder(data), images, size, "bilinear", workers=2, prefetch=64))
    results["read_images_per_s"] = round(len(loaded) / (time.perf_counter() - start), 1)
    results["mean_jpeg_kb"] = round(sum(image.size for image in images) / len(images) / 1024, 1)

    config = FeatureConfig(input_size=size, pooling=args.pooling, weights="random", precision=args.precision)
    backbone = Backbone(config)
    pixels = np.stack([item.pixels for item in loaded[: args.model_images]])
    backbone(pixels[: args.batch_size])  # warm-up: graph tracing
    start = time.perf_counter()
    for begin in range(0, len(pixels), args.batch_size):
        backbone(pixels[begin : begin + args.batch_size])
    results["model_images_per_s"] = round(len(pixels) / (time.perf_counter() - start), 2)
    del backbone

    cache = Path(tempfile.mkdtemp()) / "bench.h5"
    options = dict(input_size=size, pooling=args.pooling, weights="random", precision=args.precision,
                   batch_size=args.batch_size, progress=False)
    start = time.perf_counter()
    cold = extract_features(data, cache, **options)
    results["cold_seconds"] = round(time.perf_counter() - start, 2)
    results["cold_images_per_s"] = round(cold.rows / results["cold_seconds"], 2)
    results["cold_vs_model"] = round(results["cold_images_per_s"] / results["model_images_per_s"], 3)
    start = time.perf_counter()
    rerun = extract_features(data, cache, **options)
    results["rerun_seconds"] = round(time.perf_counter() - start, 3)
    results["rerun_computed"] = rerun.computed
    results["rerun_share_of_cold"] = round(results["rerun_seconds"] / results["cold_seconds"], 4)
    results["save_seconds"] = cold.save_seconds  # shards, commits and compaction, inside the cold run
    results["cache_mb"] = round(sum(path.stat().st_size for path in cache.parent.rglob("*") if path.is_file()) / 2**20, 1)
    shutil.rmtree(cache.parent)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
