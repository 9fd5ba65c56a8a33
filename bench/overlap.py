"""Extraction against a network as fast as a GPU's, on any machine: does the cache keep up?

    python bench/overlap.py --images 1000 --rate 250

A stand-in for VGG16 (`Backbone`) waits as long as a network of `--rate` images/s would for
each batch, without holding the GIL (as a call into a GPU does), and returns real 224-px
feature maps (VGG16's on bench photos, cycled), so that writing them costs what it would.
Then `extract_features` runs cold on N bench photos (bench/extract_speed.make_photo) and
the script prints its rate against `--rate`, and the reading alone. What is measured is
everything but the network: reading, pending batches, shards, commits.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import extract.engine  # noqa: E402
from bench.extract_speed import photo_folder  # noqa: E402
from extract import extract_features  # noqa: E402
from extract.backbone import Backbone  # noqa: E402
from extract.config import FeatureConfig  # noqa: E402
from extract.layout import scan_folder  # noqa: E402
from extract.reader import load_all  # noqa: E402
from extract.sources.folder import Folder  # noqa: E402


class FastNetwork:
    """A network of `rate` images/s on the given feature maps."""

    maps: np.ndarray
    rate: float

    def __init__(self, config: FeatureConfig):
        self.config, self.device, self.backend = config, "stand-in", "none"

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        time.sleep(len(pixels) / self.rate)
        return self.maps[np.arange(len(pixels)) % len(self.maps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=250.0, help="the stand-in network's images/s")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()

    data = photo_folder(args.images, workers=os.cpu_count() or 1)
    images = scan_folder(data).images
    started = time.perf_counter()
    loaded = [item.pixels for item in load_all(Folder(data), images, 224, "bilinear", (), args.workers, prefetch=64)]
    read_rate = len(loaded) / (time.perf_counter() - started)
    backbone = Backbone(FeatureConfig(input_size=224, weights="random"))
    FastNetwork.maps = np.concatenate([backbone(np.stack(loaded[i:i + 16])) for i in range(0, 64, 16)])
    FastNetwork.rate = args.rate
    del backbone

    extract.engine.Backbone = FastNetwork
    cache = Path(tempfile.mkdtemp()) / "features.h5"
    started = time.perf_counter()
    cold = extract_features(data, cache, input_size=224, weights="random", batch_size=args.batch_size,
                            workers=args.workers, progress=False)
    seconds = time.perf_counter() - started
    shutil.rmtree(cache.parent)
    print(json.dumps({
        "images": args.images, "network_images_per_s": args.rate, "read_images_per_s": round(read_rate, 1),
        "cold_images_per_s": cold.images_per_second, "cold_vs_network": round(cold.images_per_second / args.rate, 3),
        "cold_seconds": round(seconds, 2), "save_seconds": cold.save_seconds,
    }, indent=2))


if __name__ == "__main__":
    main()
