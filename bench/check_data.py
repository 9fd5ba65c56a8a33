"""check-data's two heavy steps on synthetic features: the k=10 neighbour graph
(classify.neighbours) and the label-issue step (classify.findings.label_issues: out-of-fold
logreg + cleanlab).

    python bench/check_data.py graph --rows 100000            # seconds, peak RSS, recall@10
    python bench/check_data.py graph --rows 10000 30000 --exact-below 1000000000   # exact only
    python bench/check_data.py probes --rows 100000 --probes 4 8 16 32   # recall against nprobe
    python bench/check_data.py labels --rows 100000 --head logreg   # out-of-fold logreg + cleanlab

Each run is one step in one process (peak RSS is the process's: run one size per process to
read it for that size). The features are like VGG16's pooled ones: non-negative (a ReLU),
rows drawn with noise around CENTRES centres that lie around GROUPS groups, so that
neighbours exist and matter, and classes (10 groups each) separate.
Recall@10: of each of QUERIES sampled rows' 10 exact nearest others (numpy over all rows),
the share the graph holds.
"""

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classify import neighbours  # noqa: E402

CENTRES, FEATURES, QUERIES, CLASSES, K = 1000, 512, 1000, 10, 10
GROUPS, SPREAD, NOISE = 100, 0.5, 1.0


def features(rows: int, d: int = FEATURES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows around CENTRES centres (themselves around GROUPS, so clusters overlap as
    similar classes do), after a ReLU as VGG16's are; and each row's group (its class's source)."""
    rng = np.random.default_rng(seed)
    groups = rng.normal(0, 1, (GROUPS, d))
    group = rng.integers(0, GROUPS, CENTRES)
    centres = (groups[group] + rng.normal(0, SPREAD, (CENTRES, d))).astype(np.float32)
    owner = rng.integers(0, CENTRES, rows)
    X = np.empty((rows, d), dtype=np.float32)
    for start in range(0, rows, 10_000):  # generated in blocks, to hold little besides X
        part = owner[start : start + 10_000]
        noisy = centres[part] + rng.normal(0, NOISE, (len(part), d))
        X[start : start + len(part)] = neighbours.vectors(np.maximum(noisy, 0))
    return X, group[owner]


def peak_rss() -> str:
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB"


def rss() -> str:
    """Resident now: the features and the libraries, before the step measured."""
    with open("/proc/self/statm") as file:
        return f"{int(file.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**30:.2f} GB"


def recall(X: np.ndarray, graph, seed: int = 1) -> tuple[float, float]:
    """Recall@10 of the graph on QUERIES sampled rows, and the largest difference between a
    similarity it gives and the true one of the same pair."""
    queries = np.random.default_rng(seed).choice(len(X), min(QUERIES, len(X)), replace=False)
    found, error = 0, 0.0
    for part in np.array_split(queries, 10):  # 100 queries at a time, to hold little
        similarities = X[part] @ X.T
        given = np.take_along_axis(similarities, graph.ids[part], axis=1)
        error = max(error, float(np.abs(given - graph.similarities[part]).max()))
        similarities[np.arange(len(part)), part] = -np.inf  # self excluded, as in the graph
        exact = np.argpartition(-similarities, K, axis=1)[:, :K]
        found += sum(len(np.intersect1d(exact[i], graph.ids[q])) for i, q in enumerate(part))
    return found / (K * len(queries)), error


def graph(args) -> None:
    print(f"{'rows':>9} {'index':<58} {'seconds':>8} {'recall@10':>9} {'sim error':>9} {'RSS before':>10} "
          f"{'peak RSS':>9}")
    for rows in args.rows:
        X, _ = features(rows)
        before = rss()
        started = time.perf_counter()
        found = neighbours.knn_graph(lambda r: X[r], rows, X.shape[1], K, args.budget, exact_below=args.exact_below)
        seconds, peak = time.perf_counter() - started, peak_rss()
        share, error = recall(X, found)
        print(f"{rows:>9,} {found.description[:58]:<58} {seconds:>8.1f} {share:>9.3f} {error:>9.4f} "
              f"{before:>10} {peak:>9}", flush=True)


def probes(args) -> None:
    """Recall and time of the IVF graph for each number of probed lists, on one data set."""
    X, _ = features(args.rows[0])
    neighbours.LISTS_PER_ROOT = args.lists_per_root
    print(f"{'rows':>9} {'lists':>6} {'probed':>6} {'seconds':>8} {'recall@10':>9}")
    for probed in args.probes:
        neighbours.PROBED_LISTS = probed
        started = time.perf_counter()
        found = neighbours.knn_graph(lambda r: X[r], len(X), X.shape[1], K, args.budget, exact_below=0)
        lists = found.description.split(" lists")[0].split(", ")[1]
        seconds = time.perf_counter() - started
        print(f"{len(X):>9,} {lists:>6} {probed:>6} {seconds:>8.1f} {recall(X, found)[0]:>9.3f}", flush=True)


def labels(args) -> None:
    """check-data's label step (`classify.findings.label_issues`: out-of-fold probabilities of a
    5-fold head, then cleanlab's find_label_issues), with 5% of the labels flipped (CLASSES
    classes, each GROUPS / CLASSES groups of centres)."""
    from classify.findings import label_issues

    _register_variants()
    for rows in args.rows:
        X, group = features(rows)
        before = rss()
        rng = np.random.default_rng(2)
        y = group % CLASSES
        flipped = rng.choice(rows, rows // 20, replace=False)
        y[flipped] = (y[flipped] + rng.integers(1, CLASSES, len(flipped))) % CLASSES
        started = time.perf_counter()
        order, _, _ = label_issues(X, y.astype(str), head=args.head, folds=5, seed=0)
        seconds, peak = time.perf_counter() - started, peak_rss()
        caught = len(np.intersect1d(order[: len(flipped)], flipped)) / len(flipped)
        print(f"{rows:,} rows x {X.shape[1]}, {args.head}: {seconds:.1f} s, {len(order):,} flagged, "
              f"{caught:.0%} of the first N flipped; RSS {before} before, peak {peak}", flush=True)


def _register_variants() -> None:
    """Cheaper logregs, as heads of this process only, for `--head` to compare."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from classify.heads import head

    @head("logreg-100", "logreg, at most 100 lbfgs iterations", grid={})
    def logreg_100(random_state=None, class_weight=None):
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=100, random_state=random_state))

    @head("pca128-logreg", "standardize, PCA to 128, logreg", grid={})
    def pca128_logreg(random_state=None, class_weight=None):
        return make_pipeline(StandardScaler(), PCA(128, random_state=random_state),
                             LogisticRegression(max_iter=1000, random_state=random_state))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["graph", "probes", "labels"])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    parser.add_argument("--exact-below", type=int, default=neighbours.EXACT_BELOW)
    parser.add_argument("--probes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--lists-per-root", type=float, default=neighbours.LISTS_PER_ROOT,
                        help="IVF lists per sqrt(rows)")
    parser.add_argument("--head", default="logreg", help="logreg, sgd-logreg (train-head's), logreg-100, pca128-logreg")
    parser.add_argument("--budget", type=int, default=8 * 2**30, help="bytes")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    {"graph": graph, "probes": probes, "labels": labels}[args.step](args)


if __name__ == "__main__":
    main()
