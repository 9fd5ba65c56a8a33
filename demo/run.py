"""`make demo`: both stages on the bundled sample data (scikit-learn's handwritten digits).

Writes the images in the seed's train/validation/test layout, extracts their VGG16
features into cache/demo.h5, then trains every head on them and prints the leaderboard.
Run it twice: the second run finds every image unchanged and computes no feature.

Uses the ImageNet weights when Keras has them or can download them. When it cannot
(offline), this demo, and only this demo, says so and goes on with seeded random
weights, so the whole flow still runs everywhere.
"""

import sys
import textwrap

from demo.make_data import main as make_data
from classify import train_head
from classify.cli import format_training
from extract import FeatureCache, WeightsUnavailableError, extract_features
from extract.cli import format_summary

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
    print(format_training(train_head(CACHE, "all")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
