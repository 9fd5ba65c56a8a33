"""Damage to the cache found by a second hostile pass (issue 29, items 1, 3, 4, 5, 10, 11):
pending batches, the catalog's columns and attributes, its shards folder shared with
another cache, a cache named like a temporary, and plain h5py beside a decoy."""

import json
from pathlib import Path

import numpy as np
import pytest

from extract import FeatureCache
from extract.shards import Pending
from helpers import EXTRACT, call
from test_hostile_extract import arguments


def extract(data, cache, weights_file, *extra):
    """extract-features in this process; its summary (--json) and the result."""
    done = call(EXTRACT, *arguments(data, cache, weights_file, "--json", *extra))
    return (json.loads(done.stdout) if done.returncode == 0 else None), done


def contents(cache) -> dict:
    with FeatureCache(cache) as opened:
        return dict(zip(opened.paths(), opened.features()))


def leftovers(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if ".tmp" in path.name]


# 1: a damaged pending batch

def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
@pytest.mark.parametrize("repair", [False, True])
def test_a_damaged_pending_batch_is_computed_again_in_one_line(dataset, tmp_path, weights_file, damage, repair):
    """As a kill -9 leaves them (--save-every 3600 --batch-size 2): three batches of two
    images, none in a shard yet; one is then damaged on disk."""
    whole, _ = extract(dataset, tmp_path / "whole.h5", weights_file)
    expected = contents(tmp_path / "whole.h5")
    with FeatureCache(tmp_path / "whole.h5") as cache:
        keys, features = cache.sha256().tolist(), cache.features()
    pending = Pending(tmp_path / "c.h5.shards" / whole["fingerprint"] / "pending")
    for start in range(0, 6, 2):
        pending.append(keys[start:start + 2], features[start:start + 2])
    batch = pending.folder / "batch-000002.npz"
    if damage == "flipped":
        flip(batch, batch.stat().st_size // 2)
    else:
        batch.write_bytes(batch.read_bytes()[:-40])
    summary, done = extract(dataset, tmp_path / "c.h5", weights_file, *(["--repair"] if repair else []))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert summary["computed"] == 2 and summary["reused"] == 4
    (note,) = summary["notes"]
    assert "batch-000002.npz" in note and "\n" not in note
    assert not leftovers(tmp_path)
    got = contents(tmp_path / "c.h5")
    assert got.keys() == expected.keys()
    for path, feature in expected.items():
        np.testing.assert_array_equal(got[path], feature)
