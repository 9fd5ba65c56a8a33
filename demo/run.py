"""`make demo`: both stages on the bundled sample data (scikit-learn's handwritten digits).

Writes the images in the blog recipe's train/validation/test layout, extracts their VGG16
features into cache/demo.h5, trains every head on them into heads/demo/all/ and prints the
leaderboard, then scores the held-out test images with the best head. Last, it caches two
augmented views of every training image (without the flip: a mirrored digit is not a digit)
and compares logreg trained with and without them (bench/compare.py augment measures more).
It ends with the same steps as commands, each naming the demo's cache, to run next.

The demo keeps its own cache (cache/demo.h5), not the commands' default (cache/features.h5):
a user's own images extracted into the default cache are never mixed with the digits, and
`make clean` can remove everything the demo wrote without touching them. So every command it
prints names `--cache cache/demo.h5`.

Run it again: when the cache holds what it held at the end of the last run (no image added,
changed or removed, the same configuration), nothing is computed: the heads in heads/demo/
and the last run's results are reused (`cache_state` says what "the same" means). A changed
cache trains everything again.

Uses the ImageNet weights when Keras has them or can download them. When it cannot
(offline), this demo, and only this demo, says so and goes on with seeded random
weights, so the whole flow still runs everywhere.

    python -m demo.run [--input-size 32] [--weights PATH]    (the tests' small, fast run)
"""

import argparse
import hashlib
import json
import logging
import shlex
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

from classify import score_images, train_head
from classify.train_cli import format_training
from extract import Augmentation, FeatureCache, WeightsUnavailableError, extract_features
from extract.cli import format_summary

from demo.make_data import main as make_data

DATA, CACHE, HEADS = "data/demo", "cache/demo.h5", Path("heads/demo")
STATE = HEADS / "state.json"  # the cache state the heads were trained on, and what the run printed
INPUT_SIZE = 64  # keeps the first demo run near a minute on two CPU cores
POOLING = "avg"
# check-data's near-duplicate threshold on random weights, by input size (measured: docs/check-data.md)
NEAR_THRESHOLDS_RANDOM = {32: "0.998", 64: "0.9987"}


def main(argv: list[str] | None = None) -> int:
    options = _parse(argv)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # e.g. retracing notes: many small models in one process
    make_data(DATA)
    config = dict(input_size=options.input_size, pooling=POOLING)
    weights = _extract(options.weights, config)
    last = _last_run(cache_state(CACHE))
    if last is not None:
        print(f"\nNothing new to compute: {CACHE} holds what it held at the end of the last demo run, whose "
              f"results follow (heads in {HEADS}/; `make clean` removes them, the cache and the images to start over):")
        print(last["results"])
    else:
        shutil.rmtree(HEADS, ignore_errors=True)  # the demo's own heads, trained on a cache that has changed since
        last = _train_and_score(weights, config)
        STATE.write_text(json.dumps(dict(last, cache=cache_state(CACHE)), indent=1))
    print(next_commands(last["best"], weights, options.input_size))
    return 0


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m demo.run", description="make demo's run (see demo/run.py)")
    parser.add_argument("--input-size", type=int, default=INPUT_SIZE, metavar="PX",
                        help=f"the backbone's input size (default {INPUT_SIZE}; the tests use 32)")
    parser.add_argument("--weights", default="imagenet", metavar="PATH",
                        help="VGG16 weights (default imagenet, or seeded random ones where they cannot be had)")
    return parser.parse_args(argv)


def _extract(weights: str, config: dict) -> str:
    """Extract the images into the demo's cache; the weights used (random when the ImageNet
    weights cannot be had here)."""
    try:
        summary = extract_features(DATA, CACHE, weights=weights, augment=0, **config)
    except WeightsUnavailableError as error:
        print(random_weights_note(error))
        weights = "random"
        summary = extract_features(DATA, CACHE, weights=weights, augment=0, **config)
    print(format_summary(summary))
    with FeatureCache(CACHE) as cache:
        print(f"Read back with extract.FeatureCache: weights {cache.config['weights']}, "
              f"features {cache.feature_shape}, classes {list(cache.class_names)}")
        for split, count in cache.split_sizes().items():
            print(f"  {split:<10} {count:>5} rows, features {cache.features(split).shape}")
    return weights


def random_weights_note(error) -> str:
    """The NOTE that the demo goes on with random weights, wrapped only at spaces: a URL in
    `error` stays whole, so it can be copied."""
    return textwrap.fill(
        f"NOTE: the ImageNet weights are not available here ({error}) The demo goes on with "
        f"seeded random weights (--weights random): the pipeline is the same, but the features "
        f"are not ImageNet features, so accuracy figures from them say little.",
        width=100, break_on_hyphens=False, break_long_words=False,
    )


def cache_state(path) -> str:
    """A digest of what the demo's heads are trained on: the configuration (its fingerprint
    covers the weights and options), every image's content, label and split, and the views
    tables. Equal digests: training again would train on the same rows."""
    with FeatureCache(path) as cache:
        digest = hashlib.sha256(cache.fingerprint.encode())
        for column in (cache.sha256(), cache.labels(), cache.splits()):
            digest.update("\n".join(map(str, column)).encode())
        digest.update(json.dumps(cache.view_tables(), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _last_run(state: str) -> dict | None:
    """The last run's record when it was made on a cache in `state` and its heads are still
    there; None when there is something to compute."""
    try:
        last = json.loads(STATE.read_text())
    except (OSError, ValueError):
        return None
    return last if last.get("cache") == state and Path(last.get("best", "")).is_dir() else None


def _train_and_score(weights: str, config: dict) -> dict:
    """Train every head, score the test images with the best, then compare logreg with and
    without augmented views; what it printed (to print again on a re-run) and the best head."""
    lines = []

    def say(text: str = "") -> None:
        print(text)
        lines.append(text)

    say(f"\nTraining every head on the cached features (train-head --head all --cache {CACHE} --out {HEADS}/all):")
    training = train_head(CACHE, "all", out=HEADS / "all", augment=False)
    say(format_training(training))
    best = training.leaderboard()[0]
    rows = list(score_images([f"{DATA}/test"], best["folder"], cache=CACHE))
    correct = sum(row.label == Path(row.path).parent.name for row in rows if row.status == "ok")
    say(f"\nScoring the {len(rows)} held-out test images with the best head, {best['head']} "
        f"(score-images {DATA}/test --head {best['folder']} --cache {CACHE}):")
    say(f"  accuracy {correct / len(rows):.4f} ({correct} of {len(rows)} right; features reused from {CACHE})")

    say("\nCaching 2 augmented views of each training image (extract-features --augment 2 --no-flip):")
    summary = extract_features(DATA, CACHE, weights=weights, augment=2, augmentation=Augmentation(flip=False), **config)
    say(format_summary(summary))
    with tempfile.TemporaryDirectory() as folder:
        accuracy = {
            augment: train_head(CACHE, "logreg", augment=augment, out=Path(folder, str(augment)), report=False)
            .results[0].scores["validation"]["accuracy"]
            for augment in (False, True)
        }
    say(f"  logreg validation accuracy: {accuracy[False]:.4f} on the images alone (train-head --no-augment), "
        f"{accuracy[True]:.4f} with their views (train-head)")
    return {"results": "\n".join(lines), "best": str(best["folder"])}


def next_commands(best: str, weights: str, input_size: int) -> str:
    """The demo's steps as commands to run next, each on the demo's cache (not the default
    one: see the module's docstring); check-data's near-duplicate threshold is raised on
    weights that are not ImageNet's, where one was measured (docs/check-data.md)."""
    threshold = None if weights == "imagenet" else NEAR_THRESHOLDS_RANDOM.get(input_size)
    near = [] if threshold is None else ["--near-threshold", threshold]
    commands = [
        ["train-head", "--head", "mlp", "--cache", CACHE],
        ["score-images", f"{DATA}/test", "--head", best, "--cache", CACHE, "--output", "scores.csv"],
        ["check-data", "--cache", CACHE, *near],
    ]
    return ("\nNext, the same steps as commands (`. .venv/bin/activate` puts them on your PATH), on the demo's cache:\n"
            + "\n".join("  " + shlex.join(command) for command in commands))


if __name__ == "__main__":
    sys.exit(main())
