"""Peak memory of extraction and scoring as the number of images grows.

    python bench/memory.py --counts 1000 4000

For each count: makes that many tiny PNGs under bench/memory-data/ (git-ignored), then runs
`extract-features` (cold, 32 px, seeded random weights), `train-head --head logreg` and
`score-images` over all of them without a cache (every image through VGG16 again), each in
its own process, and reports each process's peak resident memory (ru_maxrss).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

BIN = Path(sys.executable).parent


def peak_mb(command: list[str]) -> float:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{command[0]} failed: {process.stderr.read().decode()[-500:]}")
    return round(usage.ru_maxrss / 1024, 1)  # kilobytes on Linux


def make_images(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / "train" / f"c{i % 4}" / f"{i:05d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 4000])
    args = parser.parse_args()
    results = []
    for count in args.counts:
        data = Path("bench/memory-data") / str(count)
        make_images(data, count)
        work = Path(tempfile.mkdtemp())
        cache, head = work / "c.h5", work / "head"
        common = ["--input-size", "32", "--weights", "random", "--quiet"]
        results.append({
            "images": count,
            "extract_peak_mb": peak_mb([str(BIN / "extract-features"), str(data), "--cache", str(cache), *common]),
            "train_logreg_peak_mb": peak_mb([str(BIN / "train-head"), "--cache", str(cache), "--head", "logreg",
                                             "--out", str(head), "--quiet"]),
            "score_peak_mb": peak_mb([str(BIN / "score-images"), str(data), "--head", str(head),
                                      "--output", str(work / "s.csv"), "--quiet"]),
        })
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
