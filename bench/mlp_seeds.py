"""The blog recipe's mlp head over several seeds, on the images alone and with each views table of
a cache (views 1..K), to tell an effect of the views from the head's seed-to-seed spread.

    python bench/mlp_seeds.py CACHE.h5 --views 2 --seeds 5

Use a cache that `bench/compare.py augment` or `extract-features --augment` wrote.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classify import KerasMLPClassifier  # noqa: E402
from extract import FeatureCache  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("--views", type=int, default=2, help="use views 1..K of each table")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    with FeatureCache(args.cache) as cache:
        X, labels, splits = cache.features().reshape(len(cache), -1), cache.labels(), cache.splits()
        tables = {table["fingerprint"]: cache.views(augmentation=table["fingerprint"]) for table in cache.view_tables()}
    train, validation = np.flatnonzero(splits == "train"), splits == "validation"
    position = {row: i for i, row in enumerate(train)}
    X_train, y_train = X[train], labels[train]
    results = {}
    for name, views in {"images alone": None, **tables}.items():
        scores = []
        for seed in range(args.seeds):
            head = KerasMLPClassifier(random_state=seed)
            if views is None:
                head.fit(X_train, y_train)
            else:
                keep = views.view <= args.views
                of = np.array([position[row] for row in views.row[keep]])
                head.fit(np.concatenate([X_train, views.features[keep].reshape(int(keep.sum()), -1)]),
                         np.concatenate([y_train, y_train[of]]), image_index=np.concatenate([np.arange(len(train)), of]))
            scores.append(round(float((head.predict(X[validation]) == labels[validation]).mean()), 4))
        label = name if views is None else f"{name} {json.dumps({k: views.augmentation[k] for k in ('shear', 'zoom', 'flip')})}"
        results[label] = {"accuracies": scores, "mean": round(float(np.mean(scores)), 4)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
