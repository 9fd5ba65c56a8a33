"""`make demo`: both stages on the bundled sample data (scikit-learn's handwritten digits).

Writes the images in the seed's train/validation/test layout, extracts their VGG16
features into cache/demo.h5, trains every head on them and prints the leaderboard, then
scores the held-out test images with the best head.
Run it twice: the second run finds every image unchanged and computes no feature.

Uses the ImageNet weights when Keras has them or can download them. When it cannot
(offline), this demo, and only this demo, says so and goes on with seeded random
weights, so the whole flow still runs everywhere.
"""

import sys
import textwrap
from pathlib import Path

from classify import score_images, train_head
from classify.cli import format_training
from extract import FeatureCache, WeightsUnavailableError, extract_features
from extract.cli import format_summary

from demo.make_data import main as make_data

DATA, CACHE = "data/demo", "cache/demo.h5"
OPTIONS = dict(input_size=64, pooling="avg")  # 64 px keeps the first demo run near a minute on two CPU cores


def main() -> int:
    make_data(DATA)
    try:
        summary = extract_features(DATA, CACHE, weights="imagenet", **OPTIONS)
    except WeightsUnavailableError as error:
        print(textwrap.fill(
            f"NOTE: the ImageNet weights are not available here ({error}) The demo goes on with "
            f"seeded random weights (--weights random): the pipeline is the same, but the features "
            f"are not ImageNet features, so accuracy figures from them say little.", width=100,
        ))
        summary = extract_features(DATA, CACHE, weights="random", **OPTIONS)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
