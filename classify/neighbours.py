"""Nearest neighbours over cached features, for check-data: each image's k most similar
others (outliers, near duplicates) and the cached images most like a given one.

    unit = vectors(features)                          # (n, d) float32 unit rows
    graph = knn_graph(lambda rows: unit[rows], n, d, k=10, budget=2**30)
    graph.ids[i], graph.similarities[i]               # row i's 10 nearest others, most similar first
    found = index(lambda rows: unit[rows], n, d, budget=2**30)
    similarities, ids = found.search(vectors(query), 10)

Similarity is cosine: the inner product of unit rows. faiss finds them: an exact
`IndexFlatIP` below EXACT_BELOW rows, above it an inverted file (`IndexIVFFlat`: the rows
grouped around centroids learned from a seeded sample, and each query compared with the rows
of its PROBED_LISTS nearest groups), which keeps 100,000 rows of 512 within a minute on two
cores (16 s; exact: 92 s; docs/performance.md, "check-data"). faiss is a core dependency, so
scikit-learn's NearestNeighbors is not used for small sets: one code path.

Features are read through `read(rows)` (sorted row numbers -> their unit rows), a block at a
time, twice: once to fill the index, once to search it. What is held at once is the index,
the graph and one block, and that must fit the budget; if even the index does not, one line
says how much --memory-budget it needs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from tqdm import tqdm

from classify.data import gigabytes
from extract import UsageError

if TYPE_CHECKING:
    import faiss

MAPS_REDUCED = "feature maps averaged over their positions (global average pooling): one value per channel"
EXACT_BELOW = 20_000  # rows; exact costs under 2 s below it, IVF 1.6x less at it and 4x less at 50,000 (performance.md)
LISTS_PER_ROOT = 4  # the IVF index groups n rows around LISTS_PER_ROOT * sqrt(n) centroids
PROBED_LISTS = 8  # the groups each query is compared with: recall@10 0.997 with 4, 0.999 with 8, 1.000 with 16
RECALL = "recall@10 0.999 on 100,000 synthetic rows"  # what bench/check_data.py measured with these settings
TRAIN_PER_LIST = 40  # sample rows per centroid the IVF index learns from (faiss asks for at least 39)
BLOCK_SHARE = 4  # one block holds at most 1/BLOCK_SHARE of the budget left after the index and graph
MIN_BLOCK_ROWS = 1024  # a budget that allows fewer rows a block is refused: faiss's per-call costs would rule
FAISS_SCRATCH = 4096 * 1024 * 4  # bytes faiss's exact search uses for one tile of similarities
_GRAPH_ROW = 4 + 8  # bytes per neighbour in a graph: a float32 similarity and an int64 id

Read = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Graph:
    """Each row's k nearest other rows, most similar first: `ids` (n, k) int64 and their
    cosine `similarities` (n, k) float32; where a row has fewer than k others, the
    missing columns are id -1, similarity NaN. `description`: how they were found, in words."""

    similarities: np.ndarray
    ids: np.ndarray
    description: str


def vectors(features) -> np.ndarray:
    """(n, d) features, or (n, h, w, c) maps, as float32 (n, d) unit rows: maps are reduced
    first as MAPS_REDUCED says, so that a map and its pooled vector compare the same. A row
    of zeros, or one holding a NaN or an infinity (a broken extraction, a float16 overflow),
    is zeros (similarity 0 to everything: an outlier) rather than NaN, which faiss and the
    heads cannot take."""
    rows = np.asarray(features, dtype=np.float32)
    rows = rows.reshape(len(rows), -1) if rows.ndim < 3 else rows.reshape(len(rows), -1, rows.shape[-1]).mean(axis=1)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=np.isfinite(norms) & (norms > 0))


class Index:
    """A faiss index over n unit rows: `search(queries, k)` -> (similarities, ids) as a
    Graph holds them (-1 and NaN where fewer than k rows are indexed)."""

    def __init__(self, found: faiss.Index, description: str):
        self.found, self.description = found, description

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        found = min(k, self.found.ntotal)
        similarities, ids = self.found.search(queries, found) if found else _empty(len(queries), 0)
        short = (ids < 0).any(axis=1)
        import faiss

        if short.any() and isinstance(self.found, faiss.IndexIVF):  # its probed lists held too few rows
            similarities[short], ids[short] = self._search_all_lists(queries[short], found)
        similarities[ids < 0] = np.nan
        missing = _empty(len(queries), k - found)
        return np.hstack([similarities, missing[0]]), np.hstack([ids, missing[1]])

    def _search_all_lists(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        parameters = faiss.SearchParametersIVF(nprobe=self.found.nlist)
        return self.found.search(queries, k, params=parameters)


def knn_graph(read: Read, n: int, d: int, k: int, budget: int, seed: int = 0, progress: bool = False,
              *, exact_below: int = EXACT_BELOW) -> Graph:
    """Each of the n rows' k most similar other rows (self excluded by id, so an exact copy
    is a neighbour at similarity 1), reading rows through `read` in blocks that keep the
    index, the graph and one block within `budget` bytes. Deterministic for a `seed`."""
    plan = _Plan.of(n, d, k, budget, exact_below)
    similarities = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    with tqdm(total=2 * n, unit="row", desc="neighbours", disable=None if progress else True) as bar:
        found = _build(read, plan, seed, bar)
        for rows in _blocks(n, plan.block_rows):
            near = found.search(_read(read, rows, d), k + 1)
            similarities[rows[0] : rows[-1] + 1], ids[rows[0] : rows[-1] + 1] = _without_self(rows, *near)
            bar.update(len(rows))
    return Graph(similarities, ids, found.description)


def index(read: Read, n: int, d: int, budget: int, seed: int = 0, progress: bool = False,
          *, exact_below: int = EXACT_BELOW) -> Index:
    """The index knn_graph searches, over the n rows `read` gives, for queries of one's own
    (`nearest`): the same choice of index, the same budget for the index and one block."""
    with tqdm(total=n, unit="row", desc="indexing", disable=None if progress else True) as bar:
        return _build(read, _Plan.of(n, d, 0, budget, exact_below), seed, bar)


@dataclass(frozen=True)
class _Plan:
    """Which index, and how many rows one block reads, for n rows of d values."""

    n: int
    d: int
    lists: int  # 0: exact
    block_rows: int

    @classmethod
    def of(cls, n: int, d: int, k: int, budget: int, exact_below: int) -> _Plan:
        lists = 0 if n < exact_below else max(1, round(LISTS_PER_ROOT * math.sqrt(n)))
        held = n * d * 4 + (n * 8 + lists * d * 4 if lists else 0) + n * k * _GRAPH_ROW + FAISS_SCRATCH
        per_row = d * 4 + (k + 1) * _GRAPH_ROW  # a row read, and what its search returns
        block_rows = min(n, (budget - held) // (BLOCK_SHARE * per_row))
        if block_rows < min(n, MIN_BLOCK_ROWS):
            needed = held + BLOCK_SHARE * per_row * min(n, MIN_BLOCK_ROWS)
            raise UsageError(f"Finding neighbours among {n:,} rows of {d:,} features needs {gigabytes(needed)} "
                             f"(the index{', the graph' if k else ''} and a block of rows); received a memory "
                             f"budget of {gigabytes(budget)}: give --memory-budget {_budget(needed)} or more.")
        if lists:  # the training sample is read as one block, and faiss wants TRAIN_PER_LIST rows a list
            lists = max(1, min(lists, min(n, block_rows) // TRAIN_PER_LIST))
        return cls(n, d, lists, max(1, int(block_rows)))


def _build(read: Read, plan: _Plan, seed: int, bar) -> Index:
    import faiss  # here, not at import: `import classify` does not pay for it (0.1-0.25 s)

    faiss.omp_set_num_threads(_cores())
    if not plan.lists:
        found, description = faiss.IndexFlatIP(plan.d), "exact (faiss IndexFlatIP)"
    else:
        found = faiss.IndexIVFFlat(faiss.IndexFlatIP(plan.d), plan.d, plan.lists, faiss.METRIC_INNER_PRODUCT)
        found.cp.seed, found.nprobe = seed, min(PROBED_LISTS, plan.lists)
        sample = np.random.default_rng(seed).choice(plan.n, min(plan.n, TRAIN_PER_LIST * plan.lists), replace=False)
        found.train(_read(read, np.sort(sample), plan.d))
        description = (f"IVF, {plan.lists:,} lists, {found.nprobe} probed (faiss IndexIVFFlat); "
                       f"{RECALL} in bench/check_data.py")
    for rows in _blocks(plan.n, plan.block_rows):
        found.add(_read(read, rows, plan.d))
        bar.update(len(rows))
    return Index(found, description)


def _cores() -> int:
    """The cores this process may run on (a container's or taskset's share, where Linux says)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield np.arange(start, min(n, start + size), dtype=np.int64)


def _read(read: Read, rows: np.ndarray, d: int) -> np.ndarray:
    block = np.ascontiguousarray(read(rows), dtype=np.float32)
    if block.shape != (len(rows), d):
        raise ValueError(f"read() returned {block.shape} for {len(rows)} rows of {d} features.")
    return block


def _without_self(rows: np.ndarray, similarities: np.ndarray, ids: np.ndarray):
    """k+1 found per row -> k: the row itself dropped by id, or the last if it was not found
    (more than k exact copies can outrank it in a tie)."""
    drop = ids == rows[:, None]
    drop[~drop.any(axis=1), -1] = True
    keep = ~drop
    return similarities[keep].reshape(len(rows), -1), ids[keep].reshape(len(rows), -1)


def _empty(rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((rows, k), np.nan, dtype=np.float32), np.full((rows, k), -1, dtype=np.int64)


def _budget(size: int) -> str:
    """Bytes as --memory-budget takes them, rounded up: "300M", "2.1G"."""
    return f"{math.ceil(size / 2**20)}M" if size < 2**30 else f"{math.ceil(size / 2**30 * 10) / 10:g}G"
