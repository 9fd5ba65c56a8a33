"""Heads on features larger than memory: peak memory and epoch time, streamed vs in memory,
and the accuracy a streamed shuffle costs.

    python bench/streaming.py --rows 41000 --epochs 2     # about 4 GB of features
    python bench/streaming.py --accuracy-only             # the demo part alone

1. Writes a cache of `--rows` distinct rows of the blog recipe's features (224 px, no pooling:
   7x7x512 float32, 100 KB a row; 10 classes of Gaussian blobs, ReLU-like; 80% train, 20%
   validation) through the cache's own writer into bench/streaming-data/ (git-ignored; kept).
2. Runs `train-head --head mlp --epochs E` on it twice, each in its own process: streamed
   (`--memory-budget 1G`) and in memory (`--memory-budget 64G`, where the machine has the
   memory), reporting peak resident memory (ru_maxrss) and fit seconds per epoch.
3. On the demo's cache (cache/demo.h5, `make demo` writes it): the mlp's validation
   accuracy over 5 seeds in memory (one shuffle of every row) and streamed from the cache
   with the blocks and windows a 7x7x512 cache gets (41-row blocks, 656-row windows).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from classify import data  # noqa: E402
from synthetic import synthetic_writer  # noqa: E402 (bench/, the script's folder)

BIN = Path(sys.executable).parent
SHAPE = (7, 7, 512)
FOLDER = Path("bench/streaming-data")


def write_cache(path: Path, rows: int) -> None:
    from extract.state import ConfigState, Row

    writer, attrs, rng, centres = synthetic_writer(path, SHAPE)
    size, table = centres.shape[1], {}
    for start in range(0, rows, 1000):
        count = min(1000, rows - start)
        y = rng.integers(0, 10, count)
        X = np.maximum(centres[y] + rng.normal(0, 3, (count, size)).astype(np.float32), 0)
        keys = [f"{start + i:064x}" for i in range(count)]
        writer.append(keys, X.reshape(count, *SHAPE))
        writer.flush()  # a shard of 1,000 rows (100 MB)
        for i, (label, key) in enumerate(zip(y, keys)):
            split = "validation" if (start + i) % 5 == 0 else "train"
            table[f"{split}/c{label}/{start + i}.png"] = Row(key, f"c{label}", split, 1, 1)
        print(f"  wrote {start + count} rows", file=sys.stderr, end="\r")
    writer.commit(ConfigState(attrs=attrs, rows=table))


def run_head(cache: Path, budget: str, epochs: int) -> dict:
    out = Path(tempfile.mkdtemp()) / "head"
    command = [str(BIN / "train-head"), "--cache", str(cache), "--head", "mlp", "--epochs", str(epochs),
               "--memory-budget", budget, "--out", str(out), "--json"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    output, errors = process.stdout.read(), process.stderr.read()
    if status != 0:
        raise SystemExit(f"train-head failed: {errors.decode()[-800:]}")
    result = json.loads(output)
    row = result["leaderboard"][0]
    return {"memory_budget": budget, "streamed": result["streamed"], "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "seconds_per_epoch": round(row["fit_seconds"] / epochs, 1), "wall_seconds": round(wall, 1),
            "validation_accuracy": row["validation_accuracy"]}


def accuracy(cache: str, seeds: int) -> dict:
    from classify.evaluation import evaluate
    from classify.heads import HEADS
    from classify.splits import load_splits
    from classify.training import fit

    found = {"in_memory": [], "streamed": []}
    for seed in range(seeds):
        with load_splits(cache, None, 0.2, seed) as splits:
            streamed = replace(splits.train, block_rows=41, window_rows=656)
            for name, rows in (("streamed", streamed), ("in_memory", splits.train.load())):
                head = fit(HEADS["mlp"].build(random_state=seed), rows, splits.validation)
                found[name].append(evaluate(head, splits.validation)["accuracy"])
    return {name: {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4),
                   "values": [round(value, 4) for value in values]} for name, values in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=41000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--accuracy-only", action="store_true")
    args = parser.parse_args()
    report = {}
    if not args.accuracy_only:
        cache = FOLDER / f"rows{args.rows}.h5"
        if not cache.exists():
            FOLDER.mkdir(parents=True, exist_ok=True)
            write_cache(cache, args.rows)
        report["features_gb"] = round(args.rows * np.prod(SHAPE) * 4 / 1e9, 2)
        report["streamed"] = run_head(cache, "1G", args.epochs)
        if data.available_memory() > 3 * args.rows * np.prod(SHAPE) * 4:
            report["in_memory"] = run_head(cache, "64G", args.epochs)
        print(json.dumps(report, indent=2), flush=True)
    if Path("cache/demo.h5").exists():
        report["demo_accuracy"] = accuracy("cache/demo.h5", args.seeds)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
