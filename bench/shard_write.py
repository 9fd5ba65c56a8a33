"""Does extract/chunks.py still earn its place? Writing one shard two ways.

    python bench/shard_write.py --photos 64 --repeat 8

The unpooled 224-px maps of N bench photos (bench/extract_speed.py's), repeated to N x R
rows, written as one shard (a) by `shards.write_shard`, which compresses the chunks on a
pool of threads and hands HDF5 the bytes, and (b) through h5py with HDF5's own gzip and
Fletcher-32 filters (one thread: h5py holds one lock over HDF5), the same chunks. Best of
three each, in ms per row, and the two files' sizes.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.extract_speed import photo_folder  # noqa: E402
from extract.backbone import Backbone  # noqa: E402
from extract.config import FeatureConfig  # noqa: E402
from extract.layout import scan_folder  # noqa: E402
from extract.reader import load_all  # noqa: E402
from extract.sources.folder import Folder  # noqa: E402
from extract.schema import COMPRESSION_LEVEL, feature_chunk_rows  # noqa: E402
from extract.shards import write_shard  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=8)
    args = parser.parse_args()
    data = photo_folder(args.photos)
    images = scan_folder(data).images[: args.photos]
    pixels = np.stack([item.pixels for item in load_all(Folder(data), images, 224, "bilinear", workers=2)])
    backbone = Backbone(FeatureConfig(weights="random"))
    maps = np.concatenate([backbone(pixels[start : start + 32]) for start in range(0, len(pixels), 32)])
    rows = np.concatenate([maps] * args.repeat)
    keys = [f"{i:064x}" for i in range(len(rows))]
    shape, folder = rows.shape[1:], Path(tempfile.mkdtemp())
    chunk = feature_chunk_rows(shape, "float32")

    def threads() -> Path:
        shard = write_shard(folder, folder, "bench", keys, lambda a, b: rows[a:b], shape, "float32")
        return folder / shard.path

    def hdf5_filters() -> Path:
        path = folder / f"filters-{time.monotonic_ns()}.h5"
        with h5py.File(path, "w", rdcc_nbytes=0) as file:
            file.create_dataset("features", data=rows, chunks=(chunk, *shape), compression="gzip",
                                compression_opts=COMPRESSION_LEVEL, fletcher32=True)
        return path

    results = {"rows": len(rows), "chunk_rows": chunk}
    for name, write in (("threads", threads), ("hdf5_filters", hdf5_filters)):
        times = []
        for _ in range(3):
            started = time.perf_counter()
            path = write()
            times.append(time.perf_counter() - started)
        results[f"{name}_ms_per_row"] = round(min(times) / len(rows) * 1000, 3)
        results[f"{name}_mb"] = round(path.stat().st_size / 2**20, 1)
    results["speedup"] = round(results["hdf5_filters_ms_per_row"] / results["threads_ms_per_row"], 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
