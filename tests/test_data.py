"""classify.data: labeled rows in memory or streamed from the cache, and heads that stream."""

import json
from pathlib import Path
from dataclasses import replace

import numpy as np
import pytest

from classify import train_head
from classify.train_cli import main as train_main
from classify.data import Reader, Rows, memory_budget
from classify.evaluation import evaluate
from classify.heads import HEADS
from classify.splits import load_splits
from classify.training import fit
from conftest import write_synthetic_cache
from extract import FeatureCache, UsageError, import_keras

SPLITS = {"train": (("a", "b", "c"), 30), "validation": (("a", "b", "c"), 10)}


@pytest.fixture
def cache(tmp_path):
    return write_synthetic_cache(tmp_path / "c.h5", SPLITS)


def small_windows(rows: Rows, block: int = 4, window: int = 12) -> Rows:
    return replace(rows, block_rows=block, window_rows=window)


def test_streamed_rows_read_what_the_cache_holds(augmented):
    with load_splits(augmented, None, 0.2, seed=0) as splits, FeatureCache(augmented) as cache:
        train = splits.train
        assert train.X is None and len(train) == 19 * 3  # 19 images, then 2 views of each
        n = splits.training_images
        assert (np.diff(train.entry[:n]) > 0).all() and (np.diff(splits.validation.entry) > 0).all()  # drawn, kept in order
        images = cache.features().reshape(24, -1)
        views = cache.views()
        np.testing.assert_array_equal(train.features(np.arange(n)), images[train.entry[:n]])
        by_row = {(row, view): feature for row, view, feature in
                  zip(views.row, views.view, views.features.reshape(len(views.row), -1))}
        for position in range(n, len(train)):  # each view is a view of its image
            image_row = train.entry[train.images[position]]
            assert any(np.array_equal(train.features([position])[0], by_row[(image_row, view)]) for view in (1, 2))
        loaded = train.load()
        np.testing.assert_array_equal(loaded.X, train.features(np.arange(len(train))))
        assert loaded.nbytes == train.nbytes == len(train) * train.n_features * 4


def test_a_shuffle_keeps_blocks_together_and_repeats_under_a_seed():
    rows = small_windows(Rows.from_arrays(np.zeros((40, 1)), np.zeros(40)), block=4, window=12)
    order = rows.shuffled(np.random.RandomState(0))
    assert sorted(order) == list(range(40)) and list(order) != list(range(40))
    windows = [set(order[start : start + 12]) for start in range(0, 40, 12)]
    for block in range(10):  # the four rows of a block end in one window
        assert sum(set(range(4 * block, 4 * block + 4)) <= window for window in windows) == 1
    np.testing.assert_array_equal(order, rows.shuffled(np.random.RandomState(0)))
    whole = Rows.from_arrays(np.zeros((40, 1)), np.zeros(40))  # in memory: one block, one window
    assert sorted(whole.shuffled(np.random.RandomState(1))) == list(range(40))


def test_batches_across_windows_are_the_rows_asked_for(augmented):
    with load_splits(augmented, None, 0.2, seed=0) as splits:
        streamed = small_windows(splits.train, block=2, window=5)
        order = streamed.shuffled(np.random.RandomState(3))
        got = list(streamed.batches(7, order))  # batches straddle windows of 5
        expected = splits.train.load().X[order]
    np.testing.assert_array_equal(np.concatenate([X for X, _ in got]), expected)
    assert [len(X) for X, _ in got] == [7] * 8 + [1]
    assert np.concatenate([y for _, y in got]).tolist() == streamed.y[order].tolist()


def test_a_reader_holds_at_most_two_windows():
    rows = small_windows(Rows.from_arrays(np.arange(30.0)[:, None], np.zeros(30)), window=5)
    rows = replace(rows, X=None, cache=_Counting(rows.X))
    reader = Reader(rows, np.arange(30))
    for start in range(0, 30, 3):
        np.testing.assert_array_equal(reader.take(start, start + 3)[:, 0], np.arange(start, start + 3))
        assert len(reader._windows) <= 2
    assert rows.cache.reads == 6  # each window once


class _Counting:
    """A stand-in FeatureCache over an array that counts its reads."""

    def __init__(self, X):
        self.X, self.reads = X, 0

    def features_at(self, rows, views=None):
        self.reads += 1
        return self.X[rows]


@pytest.mark.parametrize("name", ["mlp", "sgd-logreg", "sgd-svm"])
def test_a_head_streamed_learns_what_it_learns_in_memory(augmented, name):
    with load_splits(augmented, None, 0.2, seed=0) as splits:
        streamed, validation = small_windows(splits.train), splits.validation
        in_memory = small_windows(streamed.load())  # the same blocks and windows, so the same order
        options = {"epochs": 3} if name == "mlp" else {}
        from_cache = fit(HEADS[name].build(random_state=0, **options), streamed, validation)
        from_memory = fit(HEADS[name].build(random_state=0, **options), in_memory, validation.load())
        X = validation.load().X
        np.testing.assert_allclose(from_cache.predict_proba(X), from_memory.predict_proba(X), rtol=1e-5, atol=1e-6)
        assert evaluate(from_cache, validation) == evaluate(from_memory, validation.load())
    if name == "mlp":  # one view of each image per epoch, scored on validation after each
        assert from_cache.history_["val_loss"] == pytest.approx(from_memory.history_["val_loss"], rel=1e-5)


def test_a_budget_too_small_streams_the_heads_that_can(tmp_path):
    # 300 validation rows of 16 floats (19,200 bytes) and 90 training rows (5,760): 24,000 bytes
    # are too few to hold them, but a quarter of them holds the training rows in one read
    cache = write_synthetic_cache(tmp_path / "c.h5", {"train": (("a", "b", "c"), 30), "validation": (("a", "b", "c"), 100)})
    in_memory = train_head(cache, "mlp", out=tmp_path / "memory", epochs=3)
    streamed = train_head(cache, "mlp", out=tmp_path / "streamed", epochs=3, memory_budget=24000)
    assert (in_memory.streamed, streamed.streamed) == (False, True)
    recorded = [json.loads((tmp_path / run / "head.json").read_text())["arguments"]["streamed"] for run in ("memory", "streamed")]
    assert recorded == [False, True]
    # the training rows fit in one block, so the order is the in-memory one: the same head
    scores, expected = streamed.results[0].scores["validation"], in_memory.results[0].scores["validation"]
    assert scores["log_loss"] == pytest.approx(expected["log_loss"], rel=1e-5)
    assert dict(scores, log_loss=None) == dict(expected, log_loss=None)
    with pytest.raises(UsageError, match=r"logreg cannot train here: .* more than --memory-budget 1,000 bytes\. "
                                         r"Train a head that streams \(mlp, sgd-logreg, sgd-svm\)"):
        train_head(cache, "logreg", out=tmp_path / "refused", memory_budget=1000)
    assert not (tmp_path / "refused").exists()


def test_train_head_all_trains_the_heads_that_stream(cache, tmp_path, capsys):
    code = train_main(["--cache", str(cache), "--head", "all", "--memory-budget", "1K", "--epochs", "2",
                       "--out", str(tmp_path / "run"), "--json"])
    captured = capsys.readouterr()
    assert code == 0
    result = json.loads(captured.out)
    assert result["streamed"] is True
    assert sorted(row["head"] for row in result["leaderboard"]) == ["mlp", "sgd-logreg", "sgd-svm"]
    assert all(row["validation_accuracy"] > 0.9 for row in result["leaderboard"])
    assert "logreg, linear-svm, sklearn-mlp, knn, random-forest left out" in captured.err


def test_search_and_cross_validation_stream(cache, tmp_path):
    result = train_head(cache, "sgd-logreg", out=tmp_path / "run", search=True, cv=3, memory_budget=1).results[0]
    assert [row["params"]["alpha"] for row in result.search] == [1e-5, 1e-4, 1e-3, 1e-2]
    assert result.estimator.alpha == max(result.search, key=lambda row: row["validation_accuracy"])["params"]["alpha"]
    assert result.cross_validation["folds"] == 3 and result.cross_validation["accuracy_mean"] > 0.9


@pytest.mark.parametrize("given, size", [("8G", 8 * 2**30), ("512M", 512 * 2**20), ("1.5GiB", 3 * 2**29),
                                         ("4000000", 4000000), (" 2k ", 2048), ("8Gi", 8 * 2**30), (1024, 1024),
                                         (np.float64(1e9), 10**9)])
def test_memory_budget_sizes(given, size):
    assert memory_budget(given) == size


@pytest.mark.parametrize("given", ["lots", "-1G", "0", "8X", "1e9", True, "1.5", 1.9, "\u0663G", "1" + "0" * 400,
                                   float("nan")])
def test_memory_budget_refuses_what_is_not_a_size(given):
    with pytest.raises(UsageError, match="--memory-budget"):
        memory_budget(given)


def test_the_default_budget_is_half_the_memory_available(monkeypatch):
    from classify import data

    assert 0 < data.available_memory() < 2**50
    monkeypatch.setattr(data, "available_memory", lambda: 6 * 2**30)
    assert memory_budget() == memory_budget(None) == 3 * 2**30


def test_a_chunk_found_damaged_while_streaming_is_one_line(cache, tmp_path, capsys):
    import h5py

    (shard,) = Path(f"{cache}.shards").glob("*/*.h5")
    with h5py.File(shard, "r") as file:
        offset = file["features"].id.get_chunk_info(0).byte_offset
    content = bytearray(shard.read_bytes())
    content[offset + 16 : offset + 32] = bytes(16)
    shard.write_bytes(bytes(content))
    # unstandardized, the first read is a batch Keras asks for, in TensorFlow's thread
    code = train_main(["--cache", str(cache), "--head", "mlp", "--no-standardize", "--memory-budget", "1",
                       "--epochs", "2", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err  # a cache error, as in every command (docs/exit-status.md)
    assert shard.name in err and "is damaged" in err and "--repair" in err
    assert not (tmp_path / "run").exists()


def test_a_read_failing_in_tensorflows_thread_is_raised_as_itself():
    from conftest import blobs

    X, y = blobs(per_class=20)
    rows = small_windows(Rows.from_arrays(X, y), block=8, window=8)
    # Keras first looks at two batches of 32 (all 8 windows) in this thread; the 11th read is in TensorFlow's
    rows = replace(rows, X=None, cache=_FailingAfter(X, reads=10))
    head = HEADS["mlp"].build(random_state=0, epochs=3, standardize=False)
    with pytest.raises(OSError, match="the disk went away"):
        fit(head, rows)
    assert rows.cache.reads == 11  # training stopped at the failure, not after three epochs of 8 windows


class _FailingAfter(_Counting):
    def __init__(self, X, reads):
        super().__init__(X)
        self.fail_at = reads

    def features_at(self, rows, views=None):
        if self.reads >= self.fail_at:
            self.reads += 1
            raise OSError("the disk went away")
        return super().features_at(rows, views)


def test_a_tiny_budget_reads_no_split_whole(cache, tmp_path, monkeypatch):
    """Streamed, each read of the cache holds at most a quarter of --memory-budget (here 2,000
    bytes: 7 rows of 16 floats), whether it is a training window, a pass for the moments or
    the predictions, the validation batches or the report's map: never a whole split."""
    sizes = []
    features_at = FeatureCache.features_at

    def recording(self, rows, views=None):
        sizes.append(len(rows))
        return features_at(self, rows, views)

    monkeypatch.setattr(FeatureCache, "features_at", recording)
    training = train_head(cache, "all", out=tmp_path / "run", epochs=2, memory_budget=2000)
    assert training.streamed and [result.head for result in training.results] == ["mlp", "sgd-logreg", "sgd-svm"]
    assert 'id="map-image"' in training.report.read_text()  # the map is drawn, from 7 images
    assert sizes and max(sizes) == 2000 // 4 // 64 < 30  # the validation split has 30 rows, training 90


def test_the_mlp_scores_validation_rows_in_memory_without_copying_them():
    """In memory, the validation rows handed to Keras are the caller's, not a copy: numpy's
    allocations while the head fits (a few batches) stay far below the validation features' 32 MB."""
    import tracemalloc

    rng = np.random.default_rng(0)
    X, y = rng.random((60, 1000), dtype=np.float32), np.arange(60) % 3
    validation = Rows.from_arrays(rng.random((8000, 1000), dtype=np.float32), np.arange(8000) % 3)
    head = HEADS["mlp"].build(random_state=0, epochs=1, hidden_units=8)
    import_keras()  # its import allocates much, once
    tracemalloc.start()
    try:
        head.fit_rows(Rows.from_arrays(X, y), validation)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < validation.nbytes / 4
