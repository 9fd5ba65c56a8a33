"""Images from shards: WebDataset tars (and Parquet files, tests/test_parquet.py) through the
one source contract, end to end: extraction, incremental runs per sample, failures, scoring."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import SIZE, make_dataset
from extract import FeatureCache, extract_features
from extract.errors import UsageError


def write_tar(path: Path, samples: list[tuple[str, bytes, str | None]], json_labels: bool = False) -> Path:
    """A WebDataset tar: each sample as KEY.png and its label as KEY.cls (or KEY.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, data, label in samples:
            members = [(f"{key}.png", data)]
            if label is not None:
                members.append((f"{key}.json", json.dumps({"label": label}).encode()) if json_labels
                               else (f"{key}.cls", label.encode()))
            for name, content in members:
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def tars_of(dataset: Path, out: Path, per_tar: int = 4) -> dict[str, bytes]:
    """The images of a splits-layout `dataset` as tars below `out` (train/ and validation/
    folders give the split, .cls the label); returns member path -> image bytes."""
    members = {}
    for split in ("train", "validation"):
        files = sorted((dataset / split).rglob("*.png"))
        for start in range(0, len(files), per_tar):
            name = f"{split}/{start // per_tar:06d}.tar"
            chunk = [(f"{file.parent.name}_{file.stem}", file.read_bytes(), file.parent.name)
                     for file in files[start:start + per_tar]]
            write_tar(out / name, chunk)
            members.update({f"{name}#{key}": data for key, data, _ in chunk})
    return members


@pytest.fixture
def extract(weights_file, tmp_path):
    def run(data, **options):
        options = {"weights": weights_file, "input_size": SIZE, "progress": False, "pooling": "avg", **options}
        return extract_features(data, options.pop("cache", tmp_path / "cache" / "features.h5"), **options)

    return run


def rows_of(cache_path) -> dict[str, tuple]:
    with FeatureCache(cache_path) as cache:
        return {path: (label, split, sha256) for path, label, split, sha256 in
                zip(cache.paths(), cache.labels(), cache.splits(), cache.sha256())}


def features_by_content(cache_path) -> dict[str, np.ndarray]:
    with FeatureCache(cache_path) as cache:
        return dict(zip(cache.sha256(), cache.features()))


def test_tars_give_the_folder_features_labels_and_splits(extract, dataset, tmp_path):
    members = tars_of(dataset, tmp_path / "shards")
    folder = extract(dataset, cache=tmp_path / "folder.h5")
    tars = extract(tmp_path / "shards", cache=tmp_path / "tars.h5")
    assert tars.layout == "shards" and tars.failed == 0 and tars.rows == len(members) == folder.rows
    rows = rows_of(tars.cache)
    assert set(rows) == set(members)
    assert rows["train/000000.tar#cat_0"][:2] == ("cat", "train")
    assert {split for _, split, _ in rows.values()} == {"train", "validation"}
    by_folder, by_tar = features_by_content(folder.cache), features_by_content(tars.cache)
    assert set(by_folder) == set(by_tar)
    for sha256, feature in by_folder.items():
        np.testing.assert_array_equal(feature, by_tar[sha256])


def test_a_rerun_reads_no_unchanged_shard_and_a_change_costs_only_its_samples(extract, dataset, tmp_path):
    shards = tmp_path / "shards"
    tars_of(dataset, shards)
    first = extract(shards)
    again = extract(shards)
    assert (again.computed, again.unchanged, again.new, again.reused) == (0, first.rows, 0, 0)
    # a new tar: only its rows; one of its images is new content
    new = make_dataset(tmp_path / "more", per_class=1, seed=7)
    write_tar(shards / "train" / "000009.tar", [("extra_cat", new[0].read_bytes(), "cat")])
    added = extract(shards)
    assert (added.new, added.computed, added.unchanged) == (1, 1, first.rows)
    # a changed member replaces its row; the other samples of that tar are read, not computed
    tar = shards / "train" / "000009.tar"
    write_tar(tar, [("extra_cat", new[1].read_bytes(), "cat")])
    changed = extract(shards)
    assert (changed.changed, changed.computed, changed.new) == (1, 1, 0)
    # a removed tar removes its rows
    tar.unlink()
    removed = extract(shards)
    assert (removed.removed, removed.computed, removed.rows) == (1, 0, first.rows)


def test_the_same_image_in_a_folder_and_a_tar_is_computed_once(extract, tmp_path):
    make_dataset(tmp_path / "data", layout="unlabeled", per_class=2)
    image = sorted((tmp_path / "data").rglob("*.png"))[0]
    write_tar(tmp_path / "data" / "copies.tar", [("copy", image.read_bytes(), "cat")])
    summary = extract(tmp_path / "data", layout="unlabeled")
    rows = rows_of(summary.cache)
    tar_row = rows["copies.tar#copy"]
    assert tar_row[:2] == ("", "unlabeled")
    assert tar_row[2] == rows[image.relative_to(tmp_path / "data").as_posix()][2]
    assert summary.computed == summary.rows - 1


def test_samples_without_labels_or_images_are_failure_rows(extract, dataset, tmp_path):
    image = sorted(dataset.rglob("*.png"))[0].read_bytes()
    tar = write_tar(tmp_path / "shards" / "a.tar", [("good", image, "cat"), ("nolabel", image, None)])
    with tarfile.open(tar, "a") as archive:
        info = tarfile.TarInfo("noimage.cls")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"dog"))
    summary = extract(tmp_path / "shards")
    failures = dict(summary.failures)
    assert summary.rows == 1 and set(failures) == {"a.tar#nolabel", "a.tar#noimage"}
    assert "no label" in failures["a.tar#nolabel"] and "no image" in failures["a.tar#noimage"]
    # a shard with failures is read again next time (its failures stay known), nothing computed again
    again = extract(tmp_path / "shards")
    assert (again.computed, again.failed, again.rows) == (0, 2, 1)


def test_a_truncated_tar_keeps_the_samples_before_and_fails_the_rest(extract, dataset, tmp_path):
    shards = tmp_path / "shards"
    members = tars_of(dataset, shards, per_tar=4)
    tar = shards / "train" / "000000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[:len(data) * 2 // 3])
    summary = extract(shards)
    failures = dict(summary.failures)
    assert "train/000000.tar" in failures and "truncated" in failures["train/000000.tar"]
    kept = [path for path in rows_of(summary.cache) if path.startswith("train/000000.tar#")]
    assert 1 <= len(kept) < 4 and summary.rows == len(members) - 4 + len(kept)
    tar.write_bytes(data)  # repaired: its rows come back, only the samples lost are computed
    again = extract(shards)
    assert again.failed == 0 and again.rows == len(members) and again.computed == 4 - len(kept)


def test_a_shard_file_a_brace_pattern_and_json_labels(extract, dataset, tmp_path):
    images = sorted(dataset.rglob("*.png"))
    for number in range(3):
        write_tar(tmp_path / "shards" / f"{number:03d}.tar",
                  [(f"s{number}", images[number].read_bytes(), "cat")], json_labels=True)
    one = extract(tmp_path / "shards" / "001.tar", cache=tmp_path / "one.h5")
    assert list(rows_of(one.cache)) == ["001.tar#s1"] and one.layout == "shards"
    picked = extract(str(tmp_path / "shards" / "{000..001}.tar"), cache=tmp_path / "picked.h5")
    assert sorted(rows_of(picked.cache)) == ["000.tar#s0", "001.tar#s1"]
    assert picked.data_dir == str((tmp_path / "shards").resolve())
    wider = extract(str(tmp_path / "shards" / "{000..002}.tar"), cache=tmp_path / "picked.h5")
    assert (wider.new, wider.unchanged, wider.computed) == (1, 2, 1)
    missing = extract(str(tmp_path / "shards" / "{001..004}.tar"), cache=tmp_path / "picked.h5")
    assert sorted(path for path, _ in missing.failures) == ["003.tar", "004.tar"]


def test_images_beside_shards_are_refused_unless_unlabeled(extract, dataset, tmp_path):
    image = sorted(dataset.rglob("*.png"))[0]
    write_tar(dataset / "extra.tar", [("x", image.read_bytes(), "cat")])
    with pytest.raises(UsageError, match="both shards .* and image files"):
        extract(dataset)


def test_a_killed_run_leaves_a_partly_read_shard_to_be_read_again(extract, dataset, tmp_path, monkeypatch):
    """Rows of a shard not read to its end carry no stamp: the next run reads it again."""
    from extract import reader

    shards = tmp_path / "shards"
    members = tars_of(dataset, shards, per_tar=8)
    real = reader.load_bytes
    calls = []

    def interrupted(*arguments, **options):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*arguments, **options)

    monkeypatch.setattr(reader, "load_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract(shards, batch_size=2, save_every=0)
    monkeypatch.setattr(reader, "load_bytes", real)
    resumed = extract(shards)
    assert resumed.rows == len(members) and resumed.failed == 0
    with FeatureCache(resumed.cache) as cache:
        assert set(cache.paths()) == set(members)
    again = extract(shards)
    assert again.computed == 0 and again.unchanged == len(members)


def test_stored_images_reads_samples_and_files_again_for_report_pages(dataset, tmp_path):
    from extract import stored_images

    members = tars_of(dataset, tmp_path / "shards")
    wanted = ["train/000000.tar#cat_1", "validation/000000.tar#dog_2", "train/000000.tar#gone", "nope.tar#x"]
    images = stored_images(str(tmp_path / "shards"), wanted)
    assert images[wanted[0]] == members[wanted[0]] and images[wanted[1]] == members[wanted[1]]
    assert "not in train/000000.tar" in images[wanted[2]] and "cannot read nope.tar" in images[wanted[3]]
    files = stored_images(str(dataset), ["train/cat/0.png", "train/cat/none.png"])
    assert files["train/cat/0.png"] == (dataset / "train/cat/0.png").read_bytes()
    assert "cannot read file" in files["train/cat/none.png"]


def write_parquet(path: Path, images: list[Path], names: list[str] | None = None) -> Path:
    """Images in the Hugging Face layout: image a struct of bytes and path; label an index into
    the ClassLabel names of the file's metadata (or the class name itself, without `names`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = [image.parent.name for image in images]
    table = pa.table({"image": [{"bytes": image.read_bytes(), "path": image.name} for image in images],
                      "label": [names.index(label) for label in labels] if names else labels})
    if names:
        features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=3)
    return path


def test_parquet_gives_the_folder_features_and_class_names(extract, dataset, tmp_path):
    pytest.importorskip("pyarrow")
    for split in ("train", "validation"):
        write_parquet(tmp_path / "pq" / split / "part-0.parquet", sorted((dataset / split).rglob("*.png")),
                      names=["cat", "dog"])
    folder = extract(dataset, cache=tmp_path / "folder.h5")
    parquet = extract(tmp_path / "pq", cache=tmp_path / "pq.h5")
    assert parquet.rows == folder.rows and parquet.failed == 0 and parquet.class_names == ["cat", "dog"]
    by_folder, by_parquet = features_by_content(folder.cache), features_by_content(parquet.cache)
    assert by_folder.keys() == by_parquet.keys()
    for sha256, feature in by_folder.items():
        np.testing.assert_array_equal(feature, by_parquet[sha256])
    assert rows_of(parquet.cache)["train/part-0.parquet#0"][:2] == ("cat", "train")


def test_a_parquet_file_without_an_image_column_is_refused_before_any_work(extract, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"picture": [b"x"], "label": ["cat"]}), tmp_path / "pq" / "a.parquet")
    with pytest.raises(UsageError, match="no column 'image'; found columns picture, label"):
        extract(tmp_path / "pq")
    assert not (tmp_path / "cache").exists()


def test_a_sample_over_the_size_limit_is_a_failure_row_never_read_whole(extract, dataset, tmp_path, monkeypatch):
    from extract import reader

    images = sorted(dataset.rglob("*.png"))
    small, large = sorted(images, key=lambda image: image.stat().st_size)[::len(images) - 1]
    write_tar(tmp_path / "shards" / "a.tar", [("small", small.read_bytes(), "cat"), ("large", large.read_bytes(), "dog")])
    monkeypatch.setattr(reader, "MAX_FILE_BYTES", small.stat().st_size)
    summary = extract(tmp_path / "shards")
    assert list(rows_of(summary.cache)) == ["a.tar#small"]
    (path, reason), = summary.failures
    assert path == "a.tar#large" and str(small.stat().st_size) in reason


def test_a_brace_pattern_asks_for_each_name_and_a_fifo_it_names_is_a_failure_row(extract, dataset, tmp_path, monkeypatch):
    from extract.sources.folder import Folder

    image = sorted(dataset.rglob("*.png"))[0].read_bytes()
    write_tar(tmp_path / "shards" / "000.tar", [("a", image, "cat")])
    os.mkfifo(tmp_path / "shards" / "001.tar")
    monkeypatch.setattr(Folder, "entries", lambda *a: pytest.fail("the whole folder was listed for a pattern"))
    summary = extract(str(tmp_path / "shards" / "{000..001}.tar"))
    assert list(rows_of(summary.cache)) == ["000.tar#a"]
    assert summary.failures == [("001.tar", "not a regular file (a FIFO)")]
