"""classify/neighbours.py: unit rows, the k-nearest-neighbour graph (exact and IVF), the
index `nearest` searches, and the memory budget they keep."""

import numpy as np
import pytest

from classify import neighbours
from classify.neighbours import index, knn_graph, vectors
from extract import UsageError

BUDGET = 2**30
PATHS = {"exact": neighbours.EXACT_BELOW, "ivf": 0}  # exact_below=0 forces the IVF index


def unit(rows, d, seed=0):
    return vectors(np.random.default_rng(seed).random((rows, d), dtype=np.float32))


def clustered(rows, d, centres, seed=0):
    rng = np.random.default_rng(seed)
    middles = rng.normal(0, 1, (centres, d))
    return vectors(np.maximum(middles[rng.integers(0, centres, rows)] + rng.normal(0, 0.3, (rows, d)), 0))


def graph(X, k, **options):
    return knn_graph(lambda rows: X[rows], len(X), X.shape[1], k, options.pop("budget", BUDGET), **options)


def brute_force(X, k):
    similarities = X @ X.T
    np.fill_diagonal(similarities, -np.inf)
    ids = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(similarities, ids, axis=1), ids


def test_vectors_average_a_map_over_its_positions_then_make_unit_rows():
    maps = np.random.default_rng(0).random((3, 2, 5, 4), dtype=np.float32)
    pooled = maps.mean(axis=(1, 2))
    np.testing.assert_allclose(vectors(maps), pooled / np.linalg.norm(pooled, axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(vectors(maps), vectors(pooled), rtol=1e-6)
    assert vectors(maps).dtype == np.float32


def test_vectors_keep_a_zero_row_zero():
    X = vectors(np.array([[0, 0, 0], [3, 0, 4]], dtype=np.float64))
    np.testing.assert_allclose(X, [[0, 0, 0], [0.6, 0, 0.8]], rtol=1e-6)


def test_exact_graph_equals_a_brute_force():
    X = unit(300, 16)
    found = graph(X, 7)
    similarities, ids = brute_force(X, 7)
    np.testing.assert_array_equal(found.ids, ids)
    np.testing.assert_allclose(found.similarities, similarities, rtol=1e-5)
    assert found.similarities.dtype == np.float32 and found.ids.dtype == np.int64
    assert found.description == "exact (faiss IndexFlatIP)"


def test_ivf_graph_finds_nearly_all_true_neighbours_of_clustered_rows():
    X = clustered(4000, 32, centres=40)
    found = graph(X, 10, exact_below=0)
    _, ids = brute_force(X, 10)
    recall = np.mean([len(np.intersect1d(a, b)) for a, b in zip(found.ids, ids)]) / 10
    assert recall >= 0.95
    assert found.description.startswith("IVF, 100 lists, 8 probed (faiss IndexIVFFlat)")  # 4000 rows: 40 a list


def test_ivf_graph_is_the_same_for_the_same_seed():
    X = clustered(3000, 16, centres=30)
    first, again = graph(X, 5, exact_below=0, seed=3), graph(X, 5, exact_below=0, seed=3)
    np.testing.assert_array_equal(first.ids, again.ids)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("copies", [3, 8])  # fewer copies than k+1, and more: the row itself may not be found
def test_a_row_is_never_its_own_neighbour_but_its_exact_copies_are(path, copies):
    X = np.vstack([np.repeat(unit(1, 8, seed=1), copies, axis=0), unit(200, 8)])
    found = graph(X, 4, exact_below=PATHS[path])
    assert not (found.ids == np.arange(len(X))[:, None]).any()
    for row in range(copies):
        expected = min(copies - 1, 4)
        assert set(found.ids[row, :expected]) <= set(range(copies)) - {row}
        np.testing.assert_allclose(found.similarities[row, :expected], 1, rtol=1e-6)


def test_rows_are_read_in_sorted_blocks_within_the_budget():
    X, k = unit(5000, 8), 3
    reads = []

    def read(rows):
        reads.append(rows.copy())
        return X[rows]

    budget = 35 * 2**19  # faiss's 16 MiB of scratch, the index, the graph and blocks of ~3,800 rows
    found = knn_graph(read, len(X), X.shape[1], k, budget)
    held = len(X) * X.shape[1] * 4 + len(X) * k * 12 + neighbours.FAISS_SCRATCH
    largest = max(len(rows) for rows in reads)
    assert 1 < largest < len(X) and held + largest * (X.shape[1] * 4 + (k + 1) * 12) <= budget
    assert all((np.diff(rows) > 0).all() for rows in reads)
    np.testing.assert_array_equal(np.bincount(np.concatenate(reads)), 2)  # once to index, once to search
    np.testing.assert_array_equal(found.ids, brute_force(X, k)[1])


@pytest.mark.parametrize("path", PATHS)
def test_a_budget_that_cannot_hold_the_index_is_one_line_naming_the_budget_needed(path):
    with pytest.raises(UsageError) as error:
        graph(unit(100, 4), 3, budget=10 * 2**20, exact_below=PATHS[path])
    message = str(error.value)
    assert "\n" not in message and "received a memory budget of 10.0 MB" in message
    assert "give --memory-budget 17M or more" in message


@pytest.mark.parametrize("path", PATHS)
def test_a_single_row_has_no_neighbours(path):
    found = graph(unit(1, 5), 3, exact_below=PATHS[path])
    np.testing.assert_array_equal(found.ids, [[-1, -1, -1]])
    assert np.isnan(found.similarities).all()


@pytest.mark.parametrize("path", PATHS)
def test_fewer_rows_than_k_pad_with_minus_one(path):
    X = unit(3, 4)
    found = graph(X, 5, exact_below=PATHS[path])
    np.testing.assert_array_equal(found.ids[:, 2:], -1)
    assert np.isnan(found.similarities[:, 2:]).all()
    np.testing.assert_array_equal(np.sort(found.ids[:, :2], axis=1), [[1, 2], [0, 2], [0, 1]])


@pytest.mark.parametrize("path", PATHS)
def test_one_feature_all_equal_rows_and_zero_rows_still_give_k_others(path):
    one_feature = vectors(np.random.default_rng(0).normal(size=(50, 1)))
    for X in (one_feature, vectors(np.ones((50, 6))), np.zeros((50, 6), np.float32)):
        found = graph(X, 4, exact_below=PATHS[path])
        assert (found.ids >= 0).all() and not (found.ids == np.arange(50)[:, None]).any()
        assert np.isfinite(found.similarities).all()
    np.testing.assert_array_equal(found.similarities, 0)  # zero rows: similar to nothing


@pytest.mark.parametrize("path", PATHS)
def test_the_index_finds_a_querys_nearest_rows_and_pads_past_the_last(path):
    X = clustered(2000, 16, centres=20)
    found = index(lambda rows: X[rows], len(X), X.shape[1], BUDGET, exact_below=PATHS[path])
    query = X[:1] * 0.9 + X[1:2] * 0.1
    similarities, ids = found.search(query, 3)
    expected = np.argsort(-(X @ query[0]))[:3]
    np.testing.assert_array_equal(ids[0], expected)
    np.testing.assert_allclose(similarities[0], X[expected] @ query[0], rtol=1e-5)
    _, few = index(lambda rows: X[rows], 2, 16, BUDGET).search(query, 3)
    np.testing.assert_array_equal(few[0, 2], -1)


def test_rows_whose_probed_lists_hold_fewer_than_k_are_searched_over_every_list(monkeypatch):
    monkeypatch.setattr(neighbours, "PROBED_LISTS", 1)  # 50 lists of ~40 rows, one probed: many hold fewer than 31
    X = clustered(2000, 16, centres=20)
    found = graph(X, 30, exact_below=0)
    assert (found.ids >= 0).all() and np.isfinite(found.similarities).all()
