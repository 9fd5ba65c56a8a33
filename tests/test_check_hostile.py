"""check-data attacked as a hostile user would (docs/faults.md, "check-data, attacked"):
features that are not finite, classes too small for out-of-fold predictions, two runs
finishing into one --out. Each test failed before its fix."""

from pathlib import Path

import numpy as np
import pytest

from helpers import CHECK, call, one_line

HEADER = "path,split,given_label,suggested_label,score"


def cache_of(path: Path, X: np.ndarray, labels, splits=None, precision="float32", paths=None, hashes=None) -> Path:
    """A cache of the rows `X` (one image each, distinct contents unless `hashes` says), written
    by the cache's own writer."""
    from extract import FeatureConfig, fingerprint
    from extract.recovery import open_stored
    from extract.state import ConfigState, Row
    from extract.writer import Writer

    splits = splits or ["train"] * len(X)
    hashes = hashes or [f"{row:064x}" for row in range(len(X))]
    attrs = {"feature_shape": list(X.shape[1:]), "dtype": str(X.dtype), "backbone": "vgg16", "weights": "random",
             "weights_seed": 0, "input_size": 32, "interpolation": "bilinear", "pooling": "avg", "precision": precision}
    key = fingerprint(FeatureConfig.from_facts(attrs, None).identity())  # as extract-features names it
    writer = Writer(open_stored(path, key))
    writer.append(hashes, X)
    paths = paths or [f"{split}/{label}/{row}.png" for row, (label, split) in enumerate(zip(labels, splits))]
    rows = {path: Row(digest, label, split, 1, 1) for path, digest, label, split in zip(paths, hashes, labels, splits)}
    writer.commit(ConfigState(attrs=attrs, rows=rows))
    return path


def two_blobs(n: int = 20, d: int = 8) -> tuple[np.ndarray, list[str]]:
    X = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    X[: n // 2] += 3
    return X, ["a"] * (n // 2) + ["b"] * (n - n // 2)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_row_with_an_infinity_is_an_outlier_not_a_failure(tmp_path, dtype):
    X, labels = two_blobs()
    X = X.astype(dtype)
    X[3, 1] = np.inf  # a float16 extraction overflows to inf above 65504
    cache = cache_of(tmp_path / "c.h5", X, labels, precision=dtype)
    done = call(CHECK, "--cache", cache, "--out", tmp_path / "out", "-k", "3", "--quiet")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    outliers = (tmp_path / "out/outliers.csv").read_text().splitlines()
    assert outliers[1].startswith("train/a/3.png,")  # similarity 0 to everything: the farthest


@pytest.mark.parametrize("labels", [["a", "b", "c", "d"], ["a", "a", "b"]])
def test_classes_too_small_for_folds_are_a_note_not_a_refusal(tmp_path, labels):
    X, _ = two_blobs(len(labels))
    cache = cache_of(tmp_path / "c.h5", X, labels)
    done = call(CHECK, "--cache", cache, "--out", tmp_path / "out", "-k", "2")
    assert done.returncode == 0, done.stderr
    assert "Labels not checked" in done.stdout and "2 images or more" in done.stdout
    assert (tmp_path / "out/label_issues.csv").read_text().splitlines() == [HEADER]
    assert len((tmp_path / "out/outliers.csv").read_text().splitlines()) == len(labels) + 1


def test_another_run_finishing_first_into_the_same_out_keeps_its_files(tmp_path, monkeypatch):
    import classify.check

    X, labels = two_blobs()
    cache = cache_of(tmp_path / "c.h5", X, labels)
    out = tmp_path / "out"
    real = classify.check.write_csvs

    def other_run_finishes_first(folder, *args):
        real(folder, *args)
        out.mkdir()
        (out / "theirs.csv").write_text("kept")

    monkeypatch.setattr(classify.check, "write_csvs", other_run_finishes_first)
    error = one_line(call(CHECK, "--cache", cache, "--out", out), 2, "another run", "check is not saved", "new --out")
    assert "head" not in error and "trained" not in error
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith("out")] == ["out"]
    assert [path.name for path in out.iterdir()] == ["theirs.csv"]


def cached_image(tmp_path: Path, paths=None) -> tuple[Path, Path]:
    """An image, and a cache of 4 rows (at `paths`) whose first holds its content: --similar-to it
    runs no network."""
    import hashlib

    from conftest import make_image

    image = make_image(tmp_path / "query.png")
    X, labels = two_blobs(4)
    hashes = [hashlib.sha256(image.read_bytes()).hexdigest()] + [f"{row:064x}" for row in range(1, 4)]
    return image, cache_of(tmp_path / "c.h5", X, labels, paths=paths, hashes=hashes)


def test_a_name_holding_a_newline_cannot_forge_a_row_of_similar_to(tmp_path):
    forged = "x.png\n    1.0000  train      cat          trusted.png"
    image, cache = cached_image(tmp_path, [forged, "b.png", "c.png", "d.png"])
    done = call(CHECK, "--cache", cache, "--similar-to", image, "-k", "4")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 5 and lines[1].endswith("x.png\\n    1.0000  train      cat          trusted.png")


def test_out_with_similar_to_is_refused_not_ignored(tmp_path):
    image, cache = cached_image(tmp_path)
    assert call(CHECK, "--cache", cache, "--similar-to", image).returncode == 0
    done = call(CHECK, "--cache", cache, "--similar-to", image, "--out", tmp_path / "out")
    one_line(done, 2, "--out", "--similar-to", "writes nothing")
    assert not (tmp_path / "out").exists()


def test_similar_to_features_unlike_the_cached_ones_are_one_line(tmp_path):
    from conftest import make_image

    X, labels = two_blobs(4)  # 8 features a row, where the configuration computes VGG16's 512
    cache = cache_of(tmp_path / "c.h5", X, labels)
    done = call(CHECK, "--cache", cache, "--similar-to", make_image(tmp_path / "new.png", seed=5))
    one_line(done, 1, "512", "8", "--rebuild")


def test_near_pairs_by_the_million_take_bytes_a_pair_not_the_hashes(tmp_path):
    """-k 1000 with a low --near-threshold: every neighbour a near pair. Comparing the pairs'
    contents by their SHA-256 strings (256 bytes each as numpy holds them) took 5.5 GB for
    10,000 images (-k 1000, --memory-budget 1G); by content id, about 120 bytes a neighbour."""
    import tracemalloc

    from classify.findings import Images, duplicates
    from classify.neighbours import Graph

    n, k = 2000, 200
    rows = Images(np.array([f"train/a/{row}.png" for row in range(n)]), np.array(["train"] * n), np.array(["a"] * n),
                 np.array([f"{row:064x}" for row in range(n)]))
    ids = (np.arange(n)[:, None] + np.arange(1, k + 1)[None, :]) % n  # each row's k next rows
    graph = Graph(np.full((n, k), 0.5, np.float32), ids.astype(np.int64), "exact")
    tracemalloc.start()
    try:
        pairs = duplicates(rows, graph, 0.01)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(pairs.a) == n * k  # k < n / 2: every (row, one of its k next rows) is a pair of its own
    assert peak < 200 * n * k, f"{peak / 2**20:.0f} MiB for {n * k:,} neighbours"  # 535 bytes each before
