"""`make demo`: both stages on the bundled sample data (scikit-learn's handwritten digits).

Writes the images in the blog recipe's train/validation/test layout, extracts their VGG16
features into cache/demo.h5, trains every head on them and prints the leaderboard, then
scores the held-out test images with the best head. Last, it caches two augmented views of
every training image (without the flip: a mirrored digit is not a digit) and compares
logreg trained with and without them (bench/compare.py augment measures more).
Run it twice: the second run finds every image and view cached and computes nothing.

Uses the ImageNet weights when Keras has them or can download them. When it cannot
(offline), this demo, and only this demo, says so and goes on with seeded random
weights, so the whole flow still runs everywhere.
"""

import logging
import sys
import tempfile
import textwrap
from pathlib import Path

from classify import score_images, train_head
from classify.train_cli import format_training
from extract import Augmentation, FeatureCache, WeightsUnavailableError, extract_features
from extract.cli import format_summary

from demo.make_data import main as make_data

DATA, CACHE = "data/demo", "cache/demo.h5"
OPTIONS = dict(input_size=64, pooling="avg")  # 64 px keeps the first demo run near a minute on two CPU cores


def main() -> int:
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # e.g. retracing notes: many small models in one process
    make_data(DATA)
    weights = "imagenet"
    try:
        summary = extract_features(DATA, CACHE, weights=weights, augment=0, **OPTIONS)
    except WeightsUnavailableError as error:
        print(textwrap.fill(
            f"NOTE: the ImageNet weights are not available here ({error}) The demo goes on with "
            f"seeded random weights (--weights random): the pipeline is the same, but the features "
            f"are not ImageNet features, so accuracy figures from them say little.", width=100,
        ))
        weights = "random"
        summary = extract_features(DATA, CACHE, weights=weights, augment=0, **OPTIONS)
    print(format_summary(summary))
    with FeatureCache(CACHE) as cache:
        print(f"Read back with extract.FeatureCache: weights {cache.config['weights']}, "
              f"features {cache.feature_shape}, classes {list(cache.class_names)}")
        for split, count in cache.split_sizes().items():
            print(f"  {split:<10} {count:>5} rows, features {cache.features(split).shape}")
    print("\nTraining every head on the cached features (train-head --head all):")
    training = train_head(CACHE, "all")
    print(format_training(training))
    best = training.leaderboard()[0]
    rows = list(score_images([f"{DATA}/test"], best["folder"], cache=CACHE))
    correct = sum(row.label == Path(row.path).parent.name for row in rows if row.status == "ok")
    print(f"\nScoring the {len(rows)} held-out test images with the best head, {best['head']} "
          f"(score-images {DATA}/test --head {best['folder']}):")
    print(f"  accuracy {correct / len(rows):.4f} ({correct} of {len(rows)} right; features reused from {CACHE})")

    print("\nCaching 2 augmented views of each training image (extract-features --augment 2 --no-flip):")
    summary = extract_features(DATA, CACHE, weights=weights, augment=2, augmentation=Augmentation(flip=False), **OPTIONS)
    print(format_summary(summary))
    with tempfile.TemporaryDirectory() as folder:
        accuracy = {
            augment: train_head(CACHE, "logreg", augment=augment, out=Path(folder, str(augment)))
            .results[0].scores["validation"]["accuracy"]
            for augment in (False, True)
        }
    print(f"  logreg validation accuracy: {accuracy[False]:.4f} on the images alone (train-head --no-augment), "
          f"{accuracy[True]:.4f} with their views (train-head)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
