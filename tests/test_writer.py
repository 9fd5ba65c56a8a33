"""A run's writes: commits, shards adopted after a kill, compaction (also interrupted), repair."""

from pathlib import Path

import h5py
import numpy as np
import pytest

from extract import CacheError, FeatureCache
from extract import writer as writer_module
from extract.state import ConfigState, Row
from extract.writer import Writer
from extract import compaction
from extract.compaction import compact
from extract.recovery import check, open_stored
from test_catalog import attrs, commit, features_of, sha, stored


def shard_files(path: Path, fingerprint="k") -> list[Path]:
    return sorted(Path(f"{path}.shards", fingerprint).glob("*.h5"))


def rows_in(shard: Path) -> int:
    with h5py.File(shard, "r") as file:
        return len(file["features"])


def rows_of(numbers) -> dict:
    return {f"c{n % 2}/{n}.png": Row(sha(n), f"c{n % 2}", "train", n, n * 10) for n in numbers}


def test_a_failed_commit_leaves_the_old_cache_intact(tmp_path, monkeypatch):
    path = tmp_path / "c.h5"
    commit(path, range(5))
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("extract.commit.write_column", disk_full)
    with pytest.raises(CacheError, match="No space left on device.*unchanged"):
        commit(path, range(9))
    assert path.read_bytes() == before and not list(tmp_path.glob(".c.h5.commit-*"))
    assert stored(path) == {f"c{n % 2}/{n}.png": n for n in range(5)}


def test_a_shard_no_catalog_points_at_is_adopted(tmp_path, monkeypatch):
    """Killed between writing a checkpoint's shard and committing the catalog: the next
    writer takes the shard up and computes none of its rows again."""
    path = tmp_path / "c.h5"
    commit(path, range(4))
    writer = Writer(open_stored(path, "k"))
    writer.append([sha(n) for n in range(4, 10)], np.stack([features_of(n) for n in range(4, 10)]))
    monkeypatch.setattr(writer_module, "write_catalog", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        writer.commit(ConfigState(attrs=attrs(), rows=rows_of(range(10))))
    monkeypatch.undo()
    assert len(stored(path)) == 4 and len(shard_files(path)) == 2  # the catalog as before, the new shard beside it
    assert not list(Path(f"{path}.shards/k").glob("pending/*"))  # the batches are in the shard now: only it is left
    again = Writer(open_stored(path, "k"))
    assert all(again.knows(sha(n)) for n in range(10))
    again.commit(ConfigState(attrs=attrs(), rows=rows_of(range(10))))
    assert stored(path) == {f"c{n % 2}/{n}.png": n for n in range(10)}


def test_a_shard_whose_rows_are_all_stored_elsewhere_is_deleted_on_adoption(tmp_path):
    path = tmp_path / "c.h5"
    commit(path, range(6))
    (shard,) = shard_files(path)
    copy = shard.with_name("0" * 32 + ".h5")
    copy.write_bytes(shard.read_bytes())  # e.g. a compaction's output, killed before its commit
    Writer(open_stored(path, "k"))
    assert shard_files(path) == [shard]


def test_a_partial_shard_is_discarded_and_what_is_not_a_shard_is_left_alone(tmp_path):
    import os

    path = tmp_path / "c.h5"
    commit(path, range(3))
    folder = Path(f"{path}.shards/k")
    partial = folder / f"{'1' * 32}.h5.tmp"
    partial.write_bytes(b"half a shard")
    junk = {folder / "notes.h5": "file", folder / "pipe.h5": "fifo", folder / "dir.h5": "dir",
            folder / "pending" / "batch-000001.npz": "fifo", folder / "pending" / "batch-abc.npz": "file",
            folder / "pending" / "x.tmp": "dir"}
    for junk_path, kind in junk.items():
        junk_path.parent.mkdir(parents=True, exist_ok=True)
        {"file": lambda p: p.write_bytes(b"not hdf5 at all"), "fifo": os.mkfifo, "dir": os.mkdir}[kind](junk_path)
    commit(tmp_path / "other.h5", range(10, 13), "k2")  # a shard of another configuration, same rows' shape
    (shard,) = shard_files(tmp_path / "other.h5", "k2")
    stray = folder / shard.name
    stray.write_bytes(shard.read_bytes())
    writer = Writer(open_stored(path, "k"))  # would hang on a FIFO, or fail on a folder, if it opened them
    assert not partial.exists() and all(junk_path.exists() for junk_path in junk)
    assert stray.exists() and not writer.knows(sha(10))  # never taken for this configuration's
    writer.commit(ConfigState(attrs=attrs(), rows=rows_of(range(3))))
    compact(writer, "full")
    assert stored(path) == {f"c{n % 2}/{n}.png": n for n in range(3)}


def test_renamed_with_its_shards_it_reads_and_the_next_run_repoints_plain_h5py(tmp_path):
    path = tmp_path / "c.h5"
    commit(path, range(6))
    commit(path, range(9))
    path.rename(tmp_path / "e.h5")
    Path(f"{path}.shards").rename(tmp_path / "e.h5.shards")
    renamed = tmp_path / "e.h5"
    assert stored(renamed) == {f"c{n % 2}/{n}.png": n for n in range(9)}
    with h5py.File(renamed, "r") as file:  # the virtual dataset still names c.h5.shards/: NaN until re-pointed
        assert np.isnan(file["configs/k/features"][:]).all()
    writer = Writer(open_stored(renamed, "k"))
    assert writer.stored.relocated and len(shard_files(renamed)) == 2  # nothing taken for a stray and deleted
    writer.commit(ConfigState(attrs=attrs(), rows=rows_of(range(9))))
    with FeatureCache(renamed) as cache, h5py.File(renamed, "r") as file:
        np.testing.assert_array_equal(file["configs/k/features"][:], cache.features())


def test_a_shard_left_behind_stands_in_for_a_missing_one(tmp_path):
    path = tmp_path / "c.h5"
    commit(path, range(6))
    (shard,) = shard_files(path)
    copy = shard.with_name("0" * 32 + ".h5")
    copy.write_bytes(shard.read_bytes())
    shard.unlink()
    writer = Writer(open_stored(path, "k"))
    assert check(writer.stored, repair=False) == 0 and writer.stored.relocated  # every row is in the copy: nothing lost
    writer.commit(ConfigState(attrs=attrs(), rows=rows_of(range(6))))
    compact(writer)
    assert shard_files(path) == [copy] and stored(path) == {f"c{n % 2}/{n}.png": n for n in range(6)}


def test_deleted_rows_are_compacted_away_touching_only_their_shard(tmp_path):
    path = tmp_path / "c.h5"
    commit(path, range(100))
    commit(path, range(100, 200))  # a second shard
    assert [rows_in(shard) for shard in shard_files(path)] == [100, 100]
    writer = commit(path, [n for n in range(200) if n < 100 or n % 4 == 0])  # 75 of the second shard's rows die
    kept = [shard for shard in shard_files(path)]
    assert compact(writer) == 25  # the second shard's 25 live rows rewritten, nothing else
    after = shard_files(path)
    assert len(after) == 2 and len(set(after) & set(kept)) == 1
    assert stored(path) == {f"c{n % 2}/{n}.png": n for n in range(200) if n < 100 or n % 4 == 0}


def test_small_shards_are_merged_past_the_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(compaction, "MERGE_SMALL_AT", 4)
    path = tmp_path / "c.h5"
    for last in range(1, 4):
        assert compact(commit(path, range(last * 10))) == 0  # 1, 2, 3 small shards: not yet
    writer = commit(path, range(40))
    assert len(shard_files(path)) == 4
    assert compact(writer) == 40 and len(shard_files(path)) == 1
    assert stored(path) == {f"c{n % 2}/{n}.png": n for n in range(40)}
    with FeatureCache(path) as cache, h5py.File(path, "r") as file:
        assert len(file["configs/k/shards/path"]) == 1
        np.testing.assert_array_equal(file["configs/k/features"][:], cache.features())


@pytest.mark.parametrize("step", range(6))
def test_compaction_cut_off_at_any_step_leaves_a_cache_that_reads_right(tmp_path, monkeypatch, step):
    """Each file-system step of a compaction (shard written, catalog committed, old shards
    deleted) in turn is the last one before a kill; the cache reads right after it, and
    the next writer tidies up."""
    path = tmp_path / "c.h5"
    for last in range(1, 5):
        commit(path, range(last * 5))
    expected = {f"c{n % 2}/{n}.png": n for n in range(20)}
    writer = Writer(open_stored(path, "k"))
    steps = {"count": 0}

    def counted(function):
        def wrapper(*args, **kwargs):
            if steps["count"] == step:
                raise KeyboardInterrupt  # the kill
            steps["count"] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(writer_module, "write_shard", counted(writer_module.write_shard))
    monkeypatch.setattr(compaction, "write_catalog", counted(compaction.write_catalog))
    monkeypatch.setattr(Path, "unlink", counted(Path.unlink))
    try:
        compact(writer, "full")
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert stored(path) == expected
    compact(Writer(open_stored(path, "k")), "never")
    assert stored(path) == expected
    with h5py.File(path, "r") as file:
        listed = set(file["configs/k/shards/path"].asstr()[:])
    assert {str(shard.relative_to(tmp_path / "c.h5.shards")) for shard in shard_files(path)} == listed  # no stray shard


def test_repair_forgets_only_the_rows_of_a_damaged_shard(tmp_path):
    path = tmp_path / "c.h5"
    commit(path, range(30))
    commit(path, range(40))
    (first, second) = sorted(shard_files(path), key=rows_in)
    with h5py.File(second, "r") as file:
        offset = file["features"].id.get_chunk_info(0).byte_offset
    with open(second, "r+b") as raw:  # garble a feature chunk: same size, same uuid
        raw.seek(offset + 10)
        raw.write(b"\xff" * 8)
    with pytest.raises(CacheError, match="damaged"):
        FeatureCache(path).features()
    writer = Writer(open_stored(path, "k"))
    assert check(writer.stored, repair=False) == 0  # the index of the shard is fine: only reading tells
    assert check(writer.stored, repair=True) == 30
    assert set(writer.state.rows) == {f"c{n % 2}/{n}.png" for n in range(30, 40)}
