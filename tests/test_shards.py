import h5py
import numpy as np
import pytest

from extract.errors import CacheError
from extract.shards import Pending, problem, read_keys, split_key, view_key, write_shard


def test_a_shard_holds_its_keys_and_features(tmp_path):
    keys = ["a" * 64, view_key("b" * 64, "aug0", 3)]
    features = np.arange(2 * 12, dtype=np.float32).reshape(2, 1, 1, 12)
    shard = write_shard(tmp_path / "c.h5.shards" / "k", tmp_path, "k", keys, lambda a, b: features[a:b], (1, 1, 12), "float32")
    assert shard.path == f"c.h5.shards/k/{shard.uuid}.h5" and shard.rows == 2
    assert shard.bytes == (tmp_path / shard.path).stat().st_size
    assert read_keys(tmp_path / shard.path, "k") == (keys, shard.uuid)
    with pytest.raises(ValueError, match="configuration other"):
        read_keys(tmp_path / shard.path, "other")
    with h5py.File(tmp_path / shard.path, "r") as file:
        np.testing.assert_array_equal(file["features"][:], features)
        assert list(file["view"][:]) == [0, 3] and file["augmentation"][1] == b"aug0"
        assert file["features"].compression == "gzip" and file["features"].fletcher32
    assert problem(tmp_path, shard) is None
    assert not list((tmp_path / "c.h5.shards" / "k").glob("*.tmp"))


def test_keys_split_back(tmp_path):
    assert split_key("a" * 64) == ("a" * 64, 0, "")
    assert split_key(view_key("a" * 64, "f00", 7)) == ("a" * 64, 7, "f00")


def test_problems_are_named(tmp_path):
    features = np.zeros((3, 4), np.float32)
    one = write_shard(tmp_path / "s", tmp_path, "k", ["a", "b", "c"], lambda a, b: features[a:b], (4,), "float32")
    other = write_shard(tmp_path / "s", tmp_path, "k", ["a", "b", "d"], lambda a, b: features[a:b], (4,), "float32")
    (tmp_path / other.path).replace(tmp_path / one.path)  # another shard under this one's name, same size
    assert "another cache's shard" in problem(tmp_path, one)
    data = (tmp_path / one.path).read_bytes()
    (tmp_path / one.path).write_bytes(data[: len(data) // 2])
    assert problem(tmp_path, one).startswith("truncated")
    (tmp_path / one.path).unlink()
    assert problem(tmp_path, one) == "missing"


def test_a_failed_shard_write_leaves_nothing(tmp_path):
    def broken(a, b):
        raise OSError(28, "No space left on device")

    with pytest.raises(CacheError, match="No space left on device.*unchanged"):
        write_shard(tmp_path / "s", tmp_path, "k", ["a"], broken, (4,), "float32")
    assert not list((tmp_path / "s").iterdir())


def test_pending_batches_survive_a_reopen(tmp_path):
    pending = Pending(tmp_path / "pending").open()
    first = np.arange(6, dtype=np.float32).reshape(2, 3)
    pending.append(["a" * 64, "b" * 64], first)
    pending.append(["c" * 64], first[:1] + 10)
    (pending.folder / "batch-000003.npz.tmp").write_bytes(b"half a batch")  # a write a kill interrupted
    again = Pending(tmp_path / "pending").open()
    assert len(again) == 3 and "b" * 64 in again
    np.testing.assert_array_equal(again.features("b" * 64), first[1])
    np.testing.assert_array_equal(again.features("c" * 64), first[0] + 10)
    assert not list(again.folder.glob("*.tmp"))
    again.append(["d" * 64], first[:1])
    assert sorted(path.name for path in again.folder.iterdir())[-1] == "batch-000003.npz"
    again.clear()
    assert not again.folder.exists() and len(again) == 0
