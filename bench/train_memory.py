"""Peak memory of `train-head` against its budget: every head that streams, and in memory.

    python bench/train_memory.py                          # about 1 GB of features, 4-6 minutes on 2 cores
    python bench/train_memory.py --distinct 1439 --copies 28 --budget 1G   # the 4 GB of issue 29

1. Writes a cache through the cache's own writer into bench/data/ (git-ignored; kept): `--distinct`
   rows of the blog recipe's features (224 px, no pooling: 7x7x512 float32, 100 KB a row; 10
   classes of ReLU-like Gaussian blobs) and `--copies` catalog rows of each (copies of an image
   share their stored features, as extract-features stores copies), a share `--validation`
   of them in the validation split, so the validation split alone can exceed the budget.
2. Measures "the model": a process that imports the project and fits the mlp on 64 rows.
3. Runs `train-head` (report on, one epoch) in its own process for each head that streams
   (`--memory-budget BUDGET`) and once in memory (`--memory-budget 64G`), and prints each
   peak resident set (ru_maxrss) against the goals of issue 29: streamed, at most budget + model
   + 512 MiB; in memory, at most 1.2x the features (and, where TensorFlow alone is a large
   share of that, 1.2x the features + the model).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from classify.data import memory_budget  # noqa: E402
from synthetic import synthetic_writer  # noqa: E402 (bench/, the script's folder)

BIN = Path(sys.executable).parent
SHAPE = (7, 7, 512)
FOLDER = Path("bench/data")
MIB = 2**20
STREAMING_HEADS = ("mlp", "sgd-logreg", "sgd-svm")

MODEL = """
import numpy as np
from classify.heads import HEADS
rng = np.random.default_rng(0)
X, y = rng.random((64, {features}), dtype=np.float32), np.arange(64) % 10
HEADS["mlp"].build(random_state=0, epochs=1).fit(X, y)
"""


def write_cache(path: Path, distinct: int, copies: int, validation: float) -> None:
    from extract.state import ConfigState, Row

    writer, attrs, rng, centres = synthetic_writer(path, SHAPE)
    size, labels = centres.shape[1], rng.integers(0, 10, distinct)
    keys = [f"{i:064x}" for i in range(distinct)]
    for start in range(0, distinct, 500):
        stop = min(start + 500, distinct)
        X = np.maximum(centres[labels[start:stop]] + rng.normal(0, 3, (stop - start, size)).astype(np.float32), 0)
        writer.append(keys[start:stop], X.reshape(stop - start, *SHAPE))
        writer.flush()  # a shard of 500 rows (50 MB)
    table, every = {}, copies * distinct
    for copy in range(copies):
        for i, key in enumerate(keys):
            split = "validation" if (copy * distinct + i) % 100 < 100 * validation else "train"
            table[f"{split}/c{labels[i]}/{copy}-{i}.png"] = Row(key, f"c{labels[i]}", split, 1, 1)
    writer.commit(ConfigState(attrs=attrs, rows=table))
    print(f"wrote {path}: {distinct} distinct rows, {every} catalog rows", file=sys.stderr)


def peak(command: list[str]) -> tuple[float, str, float]:
    """A command's peak resident set (MiB), its stdout and its wall seconds."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as errors:  # a file: stderr cannot fill a pipe while stdout is read
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors)
        output = process.stdout.read()  # before waiting: a full pipe would block it
        _, status, usage = os.wait4(process.pid, 0)
        if status != 0:
            errors.seek(0)
            raise SystemExit(f"{command[:3]} failed: {errors.read().decode()[-800:]}")
    return usage.ru_maxrss / 1024, output.decode(), time.perf_counter() - started  # kilobytes on Linux


def train(cache: Path, head: str, budget: str, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "head"
        command = [str(BIN / "train-head"), "--cache", str(cache), "--head", head, "--memory-budget", budget,
                   "--out", str(out), "--json", *(["--epochs", str(epochs)] if head == "mlp" else [])]
        rss, output, wall = peak(command)
        if not (out / "report.html").exists():
            raise SystemExit(f"{head}: no report.html was written")
    result = json.loads(output)
    return {"head": head, "memory_budget": budget, "streamed": result["streamed"], "peak_rss_mib": round(rss),
            "wall_seconds": round(wall, 1), "validation_accuracy": result["leaderboard"][0]["validation_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distinct", type=int, default=500, help="stored rows (100 KB each)")
    parser.add_argument("--copies", type=int, default=20, help="catalog rows of each stored row")
    parser.add_argument("--validation", type=float, default=0.4, help="share of rows in the validation split")
    parser.add_argument("--budget", default="256M", help="--memory-budget of the streamed runs")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--heads", nargs="*", default=list(STREAMING_HEADS), help="heads that stream, to run")
    parser.add_argument("--no-in-memory", action="store_true", help="skip the run in memory")
    args = parser.parse_args()
    cache = FOLDER / f"train-memory-{args.distinct}x{args.copies}-{args.validation}.h5"
    if not cache.exists():
        FOLDER.mkdir(parents=True, exist_ok=True)
        write_cache(cache, args.distinct, args.copies, args.validation)
    rows = args.distinct * args.copies
    row_bytes = int(np.prod(SHAPE)) * 4
    features, validation = rows * row_bytes / MIB, round(rows * args.validation) * row_bytes / MIB
    budget = memory_budget(args.budget) / MIB
    model = peak([sys.executable, "-c", MODEL.format(features=int(np.prod(SHAPE)))])[0]
    report = {"rows": rows, "features_mib": round(features), "validation_mib": round(validation),
              "budget_mib": round(budget), "model_mib": round(model), "runs": []}
    if validation <= budget:
        print(f"note: the validation split ({validation:.0f} MiB) is not larger than the budget", file=sys.stderr)
    goal = budget + model + 512
    for head in args.heads:
        run = train(cache, head, args.budget, args.epochs)
        run.update(goal_mib=round(goal), within=run["peak_rss_mib"] <= goal)
        report["runs"].append(run)
        print(json.dumps(run), file=sys.stderr)
    if not args.no_in_memory:
        run = train(cache, "mlp", "64G", args.epochs)
        run.update(goal_mib=round(1.2 * features), within=run["peak_rss_mib"] <= 1.2 * features,
                   goal_with_model_mib=round(1.2 * features + model),
                   within_with_model=run["peak_rss_mib"] <= 1.2 * features + model)
        report["runs"].append(run)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
