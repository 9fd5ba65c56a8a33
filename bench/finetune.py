"""Fine-tuning VGG16's block5 the usual way (plain Keras on images) against `train-head --head
finetune` on a cache of block4_pool maps (issue 30), on the demo's digits, with seeded random
weights (--weights random, seed 0: no ImageNet weights here).

    python bench/finetune.py --epochs 5 --head-epochs 3 --learning-rate 1e-5   # docs/performance.md's table
    python bench/finetune.py                        # 64, 128 and 224 px: (a) vs (b) (1e-4 diverges on random weights)
    python bench/finetune.py --sizes 64 --epochs 5  # one size
    python bench/finetune.py --float16              # (b)'s accuracy from a float16 cache vs float32
    python bench/finetune.py --learning-rates       # (b) at SGD 1e-5, 1e-4, 1e-3, and --head-epochs 0
    python bench/finetune.py --memory               # peak RSS on a cache twice --budget

Everything it writes is under bench/data/ (git-ignored): the digits, a subset of them per size,
the caches. Both runs train the same head the same way: step 1, Flatten -> Normalization ->
Dense(256, relu) -> Dense(n, softmax) by Adam 1e-3 on block5's frozen output, computed once;
step 2, block5 and the head together by SGD (--learning-rate, default 1e-4, momentum 0.9, the
gradient clipped to a global norm of 1 as train-head clips it), batch 32, no early stopping.
(a) reads images decoded and resized once (the extractor's own decoder) and held in memory, so
only the network's time counts; blocks 1-4 are frozen. Its seconds per epoch of step 2 are
Keras's own epoch times (a callback: training and validation; the first epoch, which also builds
the training step, left out). (b)'s seconds per epoch are the difference of
train-head's fit_seconds between --epochs N and --epochs 1, over N - 1 (no callback), and its
one-time cost is extract-features' wall seconds. Totals for 10 epochs: (a) decoding + step 1 +
10 epochs; (b) extraction + step 1 (fit_seconds at one epoch less one epoch) + 10 epochs.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from classify.data import memory_budget  # noqa: E402
from classify.finetune import CLIP_NORM  # noqa: E402
from synthetic import synthetic_writer  # noqa: E402 (bench/, the script's folder)

BIN = Path(sys.executable).parent
FOLDER = ROOT / "bench/data"
DIGITS = FOLDER / "digits"
SUBSETS = {64: (30, 10), 128: (12, 5), 224: (6, 3)}  # size -> (train, validation) images per class
BATCH = 32
MIB = 2**20
MAP = "block4_pool"
class Diverged(Exception):
    """train-head refused the head: step 2's SGD diverged."""


def run(command: list[str]) -> tuple[str, float]:
    """A command's stdout and wall seconds; its stderr's tail on failure."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0 and ("diverged" in result.stderr or "contains NaN" in result.stderr):
        raise Diverged(result.stderr.strip().splitlines()[-1])
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed ({result.returncode}): {result.stderr[-1500:]}")
    return result.stdout, time.perf_counter() - started


def peak(command: list[str]) -> tuple[float, str]:
    """A command's peak resident set (MiB, ru_maxrss of the child) and its stdout."""
    with tempfile.TemporaryFile() as errors:  # a file: stderr cannot fill a pipe while stdout is read
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, cwd=ROOT)
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        if status != 0:
            errors.seek(0)
            raise SystemExit(f"{command[:3]} failed: {errors.read().decode()[-1500:]}")
    return usage.ru_maxrss / 1024, output.decode()


def subset(per_class: tuple[int, int]) -> Path:
    """A copy of the first images of each class of the digits' train and validation splits."""
    if not DIGITS.exists():
        run([sys.executable, "demo/make_data.py", str(DIGITS)])
    target = FOLDER / f"digits-{per_class[0]}-{per_class[1]}"
    for split, count in zip(("train", "validation"), per_class):
        for folder in sorted((DIGITS / split).iterdir()):
            for path in sorted(folder.iterdir())[:count]:
                copy = target / split / folder.name / path.name
                if not copy.exists():
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, copy)
    return target


def extract(data: Path, size: int, dtype: str = "float32") -> tuple[Path, float]:
    """A block4_pool cache of `data` at `size` px, made now (its wall seconds) or found."""
    cache = _cache_of(data, size, dtype)
    shutil.rmtree(cache.parent, ignore_errors=True)  # extracted anew each time: its cost is measured
    cache.parent.mkdir(parents=True)
    _, seconds = run([str(BIN / "extract-features"), str(data), "--cache", str(cache), "--layer", MAP,
                      "--input-size", str(size), "--weights", "random", "--seed", "0", "--dtype", dtype, "--quiet"])
    return cache, seconds


def _cache_of(data: Path, size: int, dtype: str) -> Path:
    """The cache of `data` at `size` px, in a folder of its own (with its shards)."""
    return FOLDER / f"finetune-{data.name}-{size}-{dtype}" / "features.h5"


def train_head(cache: Path, epochs: int, head_epochs: int, rate: float, *options: str) -> dict:
    """train-head --head finetune without early stopping at SGD learning rate `rate`: its
    leaderboard row (NaN when it diverged)."""
    program = [str(BIN / "train-head")]
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        try:
            output, _ = run([*program, "--cache", str(cache), "--head", "finetune", "--no-early-stopping",
                             "--epochs", str(epochs), "--head-epochs", str(head_epochs), "--learning-rate", str(rate),
                             "--no-report", "--out", str(Path(folder) / "head"), "--json", *options])
        except Diverged as error:
            print(f"diverged: {error}", file=sys.stderr)
            return {"validation_accuracy": float("nan"), "fit_seconds": float("nan")}
    return json.loads(output)["leaderboard"][0]


def from_cache(cache: Path, epochs: int, head_epochs: int, rate: float) -> dict:
    """(b): seconds per epoch of step 2 (fit_seconds at N epochs less at 1, over N - 1), step 1's
    seconds, and the validation accuracy after N epochs."""
    one, full = (train_head(cache, count, head_epochs, rate) for count in (1, epochs))
    per_epoch = (full["fit_seconds"] - one["fit_seconds"]) / (epochs - 1)
    return {"epoch_s": per_epoch, "step1_s": one["fit_seconds"] - per_epoch, "accuracy": full["validation_accuracy"]}


def usual_way(data: Path, cache: Path, size: int, epochs: int, head_epochs: int, rate: float) -> dict:
    """(a): plain Keras on the images of `cache` (decoded once, held in memory), blocks 1-4
    frozen; its block4_pool output checked against the cache's rows first."""
    from extract import FeatureCache, import_keras
    from extract.reader import decode

    keras = import_keras()
    started = time.perf_counter()
    with FeatureCache(cache) as features:
        splits = {split: (features.paths(split), features.labels(split)) for split in ("train", "validation")}
        cached = features.features("train")[:4]
    pixels = {split: np.stack([decode((data / path).read_bytes(), size) for path in paths]).astype(np.float32)
              for split, (paths, _) in splits.items()}
    X = {split: keras.applications.vgg16.preprocess_input(value) for split, value in pixels.items()}
    decode_s = time.perf_counter() - started
    classes = np.unique(splits["train"][1])
    Y = {split: keras.utils.to_categorical(np.searchsorted(classes, labels), len(classes))
         for split, (_, labels) in splits.items()}

    keras.utils.set_random_seed(0)  # the weights of --weights random --seed 0
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))
    below = keras.Model(base.inputs, base.get_layer(MAP).output)
    difference = float(np.max(np.abs(below.predict(X["train"][:4], verbose=0) - cached)))
    if difference > 1e-5:
        raise SystemExit(f"plain Keras's {MAP} differs from the cache's rows by {difference:g} (> 1e-5) at {size} px")
    for layer in base.layers:
        layer.trainable = layer.name.startswith("block5")

    started = time.perf_counter()  # step 1: the head on block5's frozen output, computed once
    frozen = {split: base.predict(value, batch_size=BATCH, verbose=0).reshape(len(value), -1)
              for split, value in X.items()}
    moments = {"mean": frozen["train"].mean(0), "variance": _variance(frozen["train"])}
    head = keras.Sequential([keras.Input(frozen["train"].shape[1:]), keras.layers.Flatten(),
                             keras.layers.Normalization(**moments),
                             keras.layers.Dense(256, activation="relu"),
                             keras.layers.Dense(len(classes), activation="softmax")])
    head.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    head.fit(frozen["train"], Y["train"], batch_size=BATCH, epochs=head_epochs,
             validation_data=(frozen["validation"], Y["validation"]), verbose=0)
    step1_s = time.perf_counter() - started

    model = keras.Sequential([keras.Input((size, size, 3)), base, keras.layers.Flatten(), head])
    model.compile(optimizer=keras.optimizers.SGD(rate, momentum=0.9, global_clipnorm=CLIP_NORM),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    timer = _EpochTimer(keras)
    history = model.fit(X["train"], Y["train"], batch_size=BATCH, epochs=epochs, callbacks=[timer.callback],
                        validation_data=(X["validation"], Y["validation"]), verbose=0)
    later = timer.seconds[1:] or timer.seconds  # the first epoch also builds the training step
    return {"epoch_s": float(np.mean(later)), "first_epoch_s": timer.seconds[0], "step1_s": step1_s,
            "decode_s": decode_s, "accuracy": _unless_diverged(history.history), "map_difference": difference,
            "train_images": len(X["train"]), "validation_images": len(X["validation"])}


def _unless_diverged(history: dict) -> float:
    """The last validation accuracy, NaN when the training loss went to NaN (as train-head refuses it)."""
    return history["val_accuracy"][-1] if np.isfinite(history["loss"][-1]) else float("nan")


def _variance(X: np.ndarray) -> np.ndarray:
    """Per-feature variance, 1 where a feature never varied (as the project's head standardizes)."""
    variance = X.var(0)
    return np.where(variance > 0, variance, 1.0)


class _EpochTimer:
    """Wall seconds of each epoch, from its start to its end (validation included)."""

    def __init__(self, keras):
        self.seconds, timer = [], self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                timer.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                timer.seconds.append(time.perf_counter() - timer.started)

        self.callback = Callback()


def compare(size: int, epochs: int, head_epochs: int, rate: float) -> dict:
    """One row of the table: (a) in a child process (its own Keras state), then (b)."""
    data = subset(SUBSETS[size])
    cache, extract_s = extract(data, size)
    output, _ = run([sys.executable, __file__, "--usual-way", str(size), "--epochs", str(epochs),
                     "--head-epochs", str(head_epochs), "--learning-rate", str(rate)])
    a = json.loads(output)
    row = {"size": size, "images": f"{a['train_images']}+{a['validation_images']}", "a": a, "extract_s": extract_s,
           "total10_a": a["decode_s"] + a["step1_s"] + 10 * a["epoch_s"]}
    b = row["b"] = from_cache(cache, epochs, head_epochs, rate)
    row["total10_b"] = extract_s + b["step1_s"] + 10 * b["epoch_s"]
    return row


def print_table(rows: list[dict], epochs: int, head_epochs: int, rate: float) -> None:
    print(f"finetune: digits, --weights random (seed 0), {os.cpu_count()} CPU cores; step 1 {head_epochs} epochs, "
          f"step 2 {epochs} epochs at SGD {rate:g}; images train+validation")
    print("| px | images | s/epoch (a) | s/epoch (b) | speed-up | accuracy (a) | accuracy (b) | extraction s "
          "| 10 epochs (a) s | 10 epochs (b) s | total speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        a, b = row["a"], row["b"]
        print(f"| {row['size']} | {row['images']} | {a['epoch_s']:.2f} | {b['epoch_s']:.2f} | "
              f"{a['epoch_s'] / b['epoch_s']:.1f}x | {a['accuracy']:.3f} | {b['accuracy']:.3f} | "
              f"{row['extract_s']:.1f} | {row['total10_a']:.0f} | {row['total10_b']:.0f} | "
              f"{row['total10_a'] / row['total10_b']:.1f}x |")


def float16(epochs: int, head_epochs: int, rate: float) -> None:
    """(b)'s validation accuracy from float16 and float32 caches of the same 64 px images."""
    data = subset(SUBSETS[64])
    print("| px | cache | accuracy (b) |\n|---|---|---|")
    for dtype in ("float32", "float16"):
        cache, _ = extract(data, 64, dtype)
        print(f"| 64 | {dtype} | {train_head(cache, epochs, head_epochs, rate)['validation_accuracy']:.3f} |")


def learning_rates(epochs: int, head_epochs: int) -> None:
    """(b)'s validation accuracy at 64 px by SGD learning rate, and without step 1."""
    cache, _ = extract(subset(SUBSETS[64]), 64)
    print("| SGD learning rate | --head-epochs | accuracy (b) |\n|---|---|---|")
    for rate, first in ((1e-5, head_epochs), (1e-4, head_epochs), (1e-3, head_epochs), (1e-2, head_epochs), (1e-4, 0)):
        print(f"| {rate:g} | {first} | {train_head(cache, epochs, first, rate)['validation_accuracy']:.3f} |")


def synthetic_map_cache(path: Path, rows: int) -> None:
    """A block4_pool cache at 64 px (4x4x512 float32, 32 KiB a row) of `rows` synthetic rows
    (ten classes of ReLU'd Gaussian blobs), a fifth of them in the validation split."""
    from extract.state import ConfigState, Row

    shape = (4, 4, 512)
    writer, attrs, rng, centres = synthetic_writer(path, shape, input_size=64, layer=MAP)
    labels, keys = rng.integers(0, 10, rows), [f"{i:064x}" for i in range(rows)]
    for start in range(0, rows, 2000):
        stop = min(start + 2000, rows)
        X = np.maximum(centres[labels[start:stop]] + rng.normal(0, 3, (stop - start, centres.shape[1])), 0)
        writer.append(keys[start:stop], X.astype(np.float32).reshape(stop - start, *shape))
        writer.flush()
    table = {f"{'validation' if i % 5 == 0 else 'train'}/c{labels[i]}/{i}.png":
             Row(keys[i], f"c{labels[i]}", "validation" if i % 5 == 0 else "train", 1, 1) for i in range(rows)}
    writer.commit(ConfigState(attrs=attrs, rows=table))


def memory(budget: str) -> None:
    """Peak RSS of train-head --head finetune --memory-budget BUDGET on a cache twice the budget,
    against budget + the model (the same run on 200 rows) + 512 MiB."""
    row_bytes = 4 * 4 * 512 * 4
    rows = 2 * memory_budget(budget) // row_bytes
    measured = {}
    for name, count in (("model", 200), ("cache", rows)):
        cache = FOLDER / f"finetune-memory-{count}.h5"
        if not cache.exists():
            synthetic_map_cache(cache, count)
        with tempfile.TemporaryDirectory(dir="/tmp") as folder:
            rss, output = peak([str(BIN / "train-head"), "--cache", str(cache), "--head", "finetune",
                                "--no-early-stopping", "--epochs", "1", "--head-epochs", "1", "--no-report",
                                "--memory-budget", budget, "--out", str(Path(folder) / "head"), "--json"])
        measured[name] = (rss, json.loads(output))
    goal = memory_budget(budget) / MIB + measured["model"][0] + 512
    rss, result = measured["cache"]
    print(json.dumps({"rows": rows, "cache_mib": round(rows * row_bytes / MIB), "budget": budget,
                      "streamed": result.get("streamed"), "model_mib": round(measured["model"][0]),
                      "peak_rss_mib": round(rss), "goal_mib": round(goal), "within": rss <= goal}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=sorted(SUBSETS), choices=sorted(SUBSETS))
    parser.add_argument("--epochs", type=int, default=3, help="epochs of step 2 (at least 2)")
    parser.add_argument("--head-epochs", type=int, default=5, help="epochs of step 1")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="SGD's in step 2, (a) and (b)")
    parser.add_argument("--float16", action="store_true", help="(b)'s accuracy from a float16 cache vs float32")
    parser.add_argument("--learning-rates", action="store_true", help="(b) by SGD learning rate at 64 px")
    parser.add_argument("--memory", action="store_true", help="peak RSS on a cache twice --budget")
    parser.add_argument("--budget", default="256M", help="--memory-budget of --memory")
    parser.add_argument("--usual-way", type=int, help=argparse.SUPPRESS)  # (a) at this size, in this process
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 ((b)'s epoch time is a difference of runs)")
    FOLDER.mkdir(parents=True, exist_ok=True)
    if args.usual_way:
        data = subset(SUBSETS[args.usual_way])
        cache = _cache_of(data, args.usual_way, "float32")
        print(json.dumps(usual_way(data, cache, args.usual_way, args.epochs, args.head_epochs, args.learning_rate)))
    elif args.float16:
        float16(args.epochs, args.head_epochs, args.learning_rate)
    elif args.learning_rates:
        learning_rates(args.epochs, args.head_epochs)
    elif args.memory:
        memory(args.budget)
    else:
        rows = []
        for size in args.sizes:
            rows.append(compare(size, args.epochs, args.head_epochs, args.learning_rate))
            print(json.dumps(rows[-1]), file=sys.stderr)
        print_table(rows, args.epochs, args.head_epochs, args.learning_rate)


if __name__ == "__main__":
    main()
