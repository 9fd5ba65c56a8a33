"""Fit time of each head on N x D synthetic features (Gaussian blobs, 10 classes).

    python bench/head_speed.py --rows 10000 --features 512
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from classify.heads import HEADS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--heads", nargs="*", default=list(HEADS))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (10, args.features))
    y = rng.integers(0, 10, args.rows)
    X = np.maximum(centres[y] + rng.normal(0, 2, (args.rows, args.features)), 0).astype(np.float32)  # ReLU-like
    for name in args.heads:
        estimator = HEADS[name].build(random_state=0)
        started = time.perf_counter()
        estimator.fit(X, y.astype(str))
        print(f"{name:<15} fit {time.perf_counter() - started:6.2f} s on {args.rows} x {args.features}")


if __name__ == "__main__":
    main()
