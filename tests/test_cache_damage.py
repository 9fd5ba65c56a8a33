"""Damage to the cache found by a second hostile pass (issue 29, items 1, 3, 4, 5, 10, 11):
pending batches, the catalog's columns and attributes, its shards folder shared with
another cache, a cache named like a temporary, and plain h5py beside a decoy."""

import json
import os
import subprocess
import sys
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import SIZE, write_synthetic_cache
from extract import CacheError, FeatureCache, list_configs
from extract.schema import DIGEST, seal
from extract.shards import Pending
from helpers import EXTRACT, SCORE, TRAIN, call, one_line
from test_hostile_classify import world  # noqa: F401 (a fixture: an extraction, a head, new images)
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



def test_a_folder_named_like_a_pending_batch_is_left_alone_and_the_run_ends_well(dataset, tmp_path, weights_file):
    """A folder where the next batch's name would be, in a cache with a catalog (so batches
    wait in pending/): never opened, never written over; the run's batches take names after
    it (it failed every run after all the compute, exit 1, "Free some space")."""
    aside = tmp_path / "aside"
    aside.mkdir()
    later = sorted(dataset.rglob("*.png"))[:4]
    for number, image in enumerate(later):
        image.rename(aside / f"{number}.png")
    first, _ = extract(dataset, tmp_path / "c.h5", weights_file)
    for number, image in enumerate(later):
        (aside / f"{number}.png").rename(image)
    pending = tmp_path / "c.h5.shards" / first["fingerprint"] / "pending"
    (pending / "batch-000001.npz").mkdir(parents=True)  # the name the run's first batch would take
    summary, done = extract(dataset, tmp_path / "c.h5", weights_file, "--batch-size", "2", "--save-every", "3600")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert summary["computed"] == 4
    extract(dataset, tmp_path / "whole.h5", weights_file)
    got, expected = contents(tmp_path / "c.h5"), contents(tmp_path / "whole.h5")
    assert got.keys() == expected.keys() and all(np.array_equal(got[path], expected[path]) for path in expected)


@pytest.mark.parametrize("owner", ["fifo", "huge"])
def test_an_owner_file_this_code_did_not_write_is_never_read_whole_nor_waited_on(dataset, tmp_path, weights_file,
                                                                                  owner):
    """A FIFO would block a plain read forever, a sparse 8 GiB file be read whole: neither is
    an OWNER a commit wrote, so the folder is taken as unclaimed and the next commit claims it."""
    extract(dataset, tmp_path / "a.h5", weights_file)
    marker = tmp_path / "a.h5.shards" / "OWNER"
    marker.unlink()
    if owner == "fifo":
        os.mkfifo(marker)
    else:
        with open(marker, "wb") as file:
            file.truncate(8 * 2**30)
    next(dataset.rglob("*.png")).unlink()  # a change, so the run commits
    summary, done = extract(dataset, tmp_path / "a.h5", weights_file)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert marker.read_text() == f"{tmp_path}/a.h5\n"

# 3: the catalog's integrity

def edit(name):
    """A damage done by rewriting one value with h5py (its checksums then match)."""
    def damage(path: Path, fingerprint: str) -> None:
        with h5py.File(path, "r+") as file:
            group = file["configs"][fingerprint]
            if name == "shard -1":
                group["shard"][0] = -1
            elif name == "shard_row out of range":
                group["shard_row"][0] = 10**6
            elif name == "a column shortened":
                labels = group["label"][:-1]
                del group["label"]
                group["label"] = labels
            elif name == "two shard_row swapped":
                rows = group["shard_row"][:]
                rows[[0, 1]] = rows[[1, 0]]
                group["shard_row"][:] = rows
            elif name == "a path changed":
                group["path"][0] = "train/a/elsewhere.png"
    return damage


def replaced(old: bytes, new: bytes):
    """A damage done to the file's bytes: an attribute's value changed in place (its first)."""
    def damage(path: Path, fingerprint: str) -> None:
        data = path.read_bytes()
        assert old in data
        path.write_bytes(data.replace(old, new, 1))
    return damage


DAMAGES = {
    "an attribute changed": replaced(b"bilinear", b"bilineaR"),
    "an attribute garbled": replaced(b"bilinear", b"\xffilinear"),
    **{name: edit(name) for name in ("shard -1", "shard_row out of range", "a column shortened",
                                     "two shard_row swapped", "a path changed")},
}
# what a cache written before digests can still be told (its digest removed here): not a
# changed value (an attribute, a path), which it reads as it is
FOUND_UNSEALED = ("shard -1", "shard_row out of range", "a column shortened",
                  "two shard_row swapped")


def unseal(path: Path) -> None:
    """As a cache written before digests: no digest attributes."""
    with h5py.File(path, "r+") as file:
        for item in (file, *file["configs"].values()):
            del item.attrs[DIGEST]


def damaged_cache(tmp_path, damage: str, sealed: bool) -> Path:
    path = write_synthetic_cache(tmp_path / "c.h5", {"train": (("a", "b"), 4), "validation": (("a", "b"), 2)})
    if not sealed:
        unseal(path)
    DAMAGES[damage](path, "synthetic0000001")
    return path


def read_all(path: Path) -> None:
    with FeatureCache(path) as cache:
        cache.features(), cache.labels(), cache.paths()
    list_configs(path)


@pytest.mark.parametrize("damage, sealed", [*((damage, True) for damage in DAMAGES),
                                             *((damage, False) for damage in FOUND_UNSEALED)])
def test_a_damaged_catalog_is_one_line_naming_repair(tmp_path, damage, sealed):
    path = damaged_cache(tmp_path, damage, sealed)
    with pytest.raises(CacheError) as raised:
        read_all(path)
    message = str(raised.value)
    assert "catalog" in message and "--repair" in message and "\n" not in message
    one_line(call(TRAIN, "--cache", path, "--head", "knn", "--out", tmp_path / "run", "--quiet"), 1, "--repair")


def test_catalog_columns_carry_checksums_and_the_groups_a_digest(tmp_path):
    path = write_synthetic_cache(tmp_path / "c.h5", {"train": (("a", "b"), 4)})
    with h5py.File(path, "r") as file:
        group = file["configs/synthetic0000001"]
        assert DIGEST in file.attrs and DIGEST in group.attrs
        fixed = [name for name in ("sha256", "size", "mtime_ns", "shard", "shard_row", "shards/rows", "shards/uuid")]
        assert all(group[name].fletcher32 for name in fixed)


def test_a_cache_written_before_digests_opens_and_is_sealed_at_its_next_write(tmp_path):
    path = write_synthetic_cache(tmp_path / "c.h5", {"train": (("a", "b"), 4)})
    unseal(path)
    before = contents(path)
    write_synthetic_cache(path, {"train": (("a", "b"), 4)})  # the same rows again: a commit
    with h5py.File(path, "r") as file:
        assert DIGEST in file.attrs and DIGEST in file["configs/synthetic0000001"].attrs
    after = contents(path)
    assert after.keys() == before.keys() and all(np.array_equal(after[p], before[p]) for p in before)


def test_every_attribute_is_in_the_digest_even_one_added_later(tmp_path):
    path = write_synthetic_cache(tmp_path / "c.h5", {"train": (("a", "b"), 4)})
    with h5py.File(path, "r+") as file:
        group = file["configs/synthetic0000001"]
        group.attrs["a_new_attribute"] = "x"
        seal(group)
    read_all(path)
    with h5py.File(path, "r+") as file:
        file["configs/synthetic0000001"].attrs["a_new_attribute"] = "y"
    with pytest.raises(CacheError, match="checksum"):
        read_all(path)


def test_all_three_commands_refuse_a_damaged_catalog_in_one_line(world, tmp_path, weights_file):
    shutil.copy(world / "c.h5", tmp_path / "c.h5")
    shutil.copytree(world / "c.h5.shards", tmp_path / "c.h5.shards")
    replaced(b"bilinear", b"bilineaR")(tmp_path / "c.h5", "")
    cache = tmp_path / "c.h5"
    one_line(call(EXTRACT, world / "data", "--cache", cache, "--weights", weights_file, "--input-size", SIZE,
                  "--quiet"), 1, "--repair")
    one_line(call(TRAIN, "--cache", cache, "--head", "knn", "--out", tmp_path / "run", "--quiet"), 1, "--repair")
    one_line(call(SCORE, world / "new", "--head", world / "head", "--cache", cache, "--quiet"), 1, "--repair")


# 4: --repair rebuilds a damaged catalog from its intact shards

@pytest.mark.parametrize("damage", ["truncated", "an attribute changed", "shard -1"])
def test_repair_rebuilds_a_damaged_catalog_from_its_shards_computing_nothing(dataset, tmp_path, weights_file, damage):
    cache = tmp_path / "c.h5"
    first, _ = extract(dataset, cache, weights_file, "--augment", "1")
    expected = contents(cache)
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:2000])
    else:
        DAMAGES[damage](cache, first["fingerprint"])
    _, refused = extract(dataset, cache, weights_file)
    one_line(refused, 1, "catalog", "--repair")
    repaired, done = extract(dataset, cache, weights_file, "--repair", "--augment", "1")  # the options again
    assert done.returncode == 0, done.stderr
    assert (repaired["computed"], repaired["views_computed"], repaired["rows"]) == (0, 0, first["rows"])
    assert repaired["views"] == first["views"] > 0
    (note,) = repaired["notes"]
    (aside,) = tmp_path.glob("c.h5.damaged-*")
    assert str(aside) in note and "\n" not in note
    got = contents(cache)
    assert got.keys() == expected.keys() and all(np.array_equal(got[p], expected[p]) for p in expected)
    again, _ = extract(dataset, cache, weights_file)
    assert again["computed"] == 0 and again["notes"] == []


# 10: a cache named like a temporary

def test_a_cache_named_like_a_temporary_is_never_cleaned_up(dataset, tmp_path, weights_file):
    extract(dataset, tmp_path / "a.h5.tmp-5", weights_file)
    before = contents(tmp_path / "a.h5.tmp-5")
    extract(dataset, tmp_path / "a.h5", weights_file)
    extract(dataset, tmp_path / "a.h5", weights_file, "--repair")
    after = contents(tmp_path / "a.h5.tmp-5")
    assert after.keys() == before.keys() and all(np.array_equal(after[p], before[p]) for p in before)
    assert not list(tmp_path.glob(".a.h5.commit-*"))


# 5: a cache owns its shards folder

def snapshot(folder: Path) -> dict:
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_shards_folder_shared_with_another_cache_is_refused_deleting_nothing(dataset, tmp_path, weights_file):
    """A copied cache whose .shards is a link to the original's: a run on the copy that
    would compact (an image gone, --compact full) is refused, and the original keeps every shard."""
    original, copy = tmp_path / "a.h5", tmp_path / "b.h5"
    extract(dataset, original, weights_file)
    expected = contents(original)
    shutil.copy(original, copy)
    Path(f"{copy}.shards").symlink_to(Path(f"{original}.shards"))
    before = snapshot(Path(f"{original}.shards"))
    next(dataset.rglob("*.png")).unlink()
    _, done = extract(dataset, copy, weights_file, "--compact", "full")
    one_line(done, 2, "also that of the cache", str(original))
    assert snapshot(Path(f"{original}.shards")) == before
    got = contents(original)
    assert got.keys() == expected.keys() and all(np.array_equal(got[p], expected[p]) for p in expected)
    moved, done = extract(dataset, copy, weights_file, "--rebuild")  # the way out the line names
    assert done.returncode == 0 and snapshot(Path(f"{original}.shards")) == before


def test_a_moved_or_copied_cache_owns_its_own_folder(dataset, tmp_path, weights_file):
    extract(dataset, tmp_path / "a.h5", weights_file)
    shutil.copy(tmp_path / "a.h5", tmp_path / "copy.h5")
    shutil.copytree(tmp_path / "a.h5.shards", tmp_path / "copy.h5.shards")
    (tmp_path / "moved").mkdir()
    shutil.move(tmp_path / "a.h5", tmp_path / "moved" / "a.h5")
    shutil.move(tmp_path / "a.h5.shards", tmp_path / "moved" / "a.h5.shards")
    for cache in (tmp_path / "copy.h5", tmp_path / "moved" / "a.h5"):
        summary, done = extract(dataset, cache, weights_file)
        assert done.returncode == 0 and summary["computed"] == 0, done.stderr
    assert Path(f"{tmp_path}/copy.h5.shards/OWNER").read_text() == f"{tmp_path}/copy.h5\n"  # re-pointed: a commit


# 11: plain h5py, a missing shard and a same-named decoy under the working directory

def h5py_snippet() -> str:
    """docs/cache.md's plain-h5py reading, as written."""
    page = (Path(__file__).parent.parent / "docs" / "cache.md").read_text()
    section = page[page.index("## Reading it with h5py alone"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]


def test_the_documented_h5py_reading_refuses_a_missing_shard_not_reading_a_decoy(tmp_path):
    cache = write_synthetic_cache(tmp_path / "cache" / "features.h5", {"train": (("a", "b"), 3)})
    decoy = write_synthetic_cache(tmp_path / "other.h5", {"train": (("a", "b"), 3)}, seed=5)
    with h5py.File(cache, "r") as file:
        shard = file["configs/synthetic0000001/shards/path"].asstr()[0]
    with h5py.File(decoy, "r") as file:
        decoy_shard = Path(f"{decoy}.shards") / file["configs/synthetic0000001/shards/path"].asstr()[0]
    script = tmp_path / "read.py"
    script.write_text(h5py_snippet())
    reading = [sys.executable, script]
    assert subprocess.run(reading, cwd=tmp_path, capture_output=True).returncode == 0  # every shard there
    Path(f"{cache}.shards", shard).unlink()
    (tmp_path / "features.h5.shards" / shard).parent.mkdir(parents=True)
    shutil.copy(decoy_shard, tmp_path / "features.h5.shards" / shard)  # the same name under the working directory
    done = subprocess.run(reading, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0 and "shards missing" in done.stderr and shard in done.stderr
    with pytest.raises(CacheError, match="is missing"):
        with FeatureCache(cache):
            pass


def test_a_cache_from_before_checksums_opens_and_its_next_commit_upgrades_what_it_writes(tmp_path):
    shutil.copytree(Path(__file__).parent / "fixtures" / "v2-before-checksums", tmp_path / "old")
    path = tmp_path / "old" / "cache.h5"
    with h5py.File(path, "r") as file:
        group = file["configs/synthetic0000001"]
        assert DIGEST not in group.attrs and not group["size"].fletcher32 and group["path"].dtype.kind == "O"
    before = {name: contents_of(path, name) for name in ("synthetic0000001", "synthetic0000002")}
    assert [config["rows"] for config in list_configs(path)] == [12, 6]
    write_synthetic_cache(path, {"train": (("a", "b"), 4), "validation": (("a", "b"), 2)})  # a commit of the first
    with h5py.File(path, "r") as file:
        written, copied = file["configs/synthetic0000001"], file["configs/synthetic0000002"]
        assert DIGEST in file.attrs and DIGEST in written.attrs and written["size"].fletcher32
        assert written["path"].dtype.kind == "S" and DIGEST not in copied.attrs  # the other: copied as it was
    for name, expected in before.items():
        got = contents_of(path, name)
        assert got.keys() == expected.keys() and all(np.array_equal(got[p], expected[p]) for p in expected)


def contents_of(cache, config) -> dict:
    with FeatureCache(cache, config) as opened:
        return dict(zip(opened.paths(), opened.features()))
