"""What the catalog's checks cost (issue 29): opening a cache, and committing it, at N rows.

    python bench/catalog_checks.py --rows 20146 --repeat 5

A cache of N rows (pooled features, 512 float32 each; paths like train/class3/12345.jpg) is
written through the cache's own writer. Then, the median of `--repeat` times:
  open         FeatureCache(path) (root digest, the group's digest over every column,
               lengths and ranges, every shard present), as train-head and score-images do
  open bare    the same with the checks switched off (digest and range checks skipped)
  read all     cache.features() after opening (each row checked against its shard's key)
  read bare    the same without the key check
  commit       Writer.commit() of the same rows (the catalog written and sealed)
  commit bare  the same with sealing switched off
"""

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract import catalog, commit  # noqa: E402
from extract.catalog import FeatureCache  # noqa: E402
from extract.recovery import open_stored  # noqa: E402
from extract.state import ConfigState, Row  # noqa: E402
from extract.writer import Writer  # noqa: E402

ATTRS = {"feature_shape": [512], "dtype": "float32", "backbone": "vgg16", "weights": "random", "weights_seed": 0,
         "input_size": 224, "interpolation": "bilinear", "pooling": "avg", "precision": "float32"}


def rows_of(count: int) -> dict:
    return {f"train/class{i % 4}/{i:06d}.jpg": Row(f"{i:064x}", f"class{i % 4}", "train", 40_000 + i, 10**18 + i)
            for i in range(count)}


def make(path: Path, count: int) -> dict:
    writer = Writer(open_stored(path, "bench0000000001"))
    rng = np.random.default_rng(0)
    for start in range(0, count, 4096):
        keys = [f"{i:064x}" for i in range(start, min(count, start + 4096))]
        writer.append(keys, rng.random((len(keys), 512), dtype=np.float32))
    rows = rows_of(count)
    writer.commit(ConfigState(attrs=dict(ATTRS), rows=rows))
    return rows


@contextmanager
def bare():
    """The checks switched off: what opening and committing cost before them."""
    with mock.patch.object(catalog, "catalog_problem", lambda group: None), \
            mock.patch.object(catalog, "unsealed", lambda *a, **k: False), \
            mock.patch.object(commit, "seal", lambda *a, **k: None), \
            mock.patch.object(catalog.np, "array_equal", lambda *a: True):
        yield


def median_seconds(action, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(count: int, repeat: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.h5"
        rows = make(path, count)

        def open_only():
            FeatureCache(path).close()

        def read_all():
            with FeatureCache(path) as cache:
                cache.features()

        def commit_again():
            Writer(open_stored(path, "bench0000000001")).commit(ConfigState(attrs=dict(ATTRS), rows=rows))

        results = {}
        for name, action in (("open", open_only), ("read all", read_all), ("commit", commit_again)):
            results[name] = median_seconds(action, repeat)
            with bare():
                results[f"{name} bare"] = median_seconds(action, repeat)
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20146])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for count in args.rows:
        results = measure(count, args.repeat)
        print(f"{count} rows: " + ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in results.items()))


if __name__ == "__main__":
    main()
