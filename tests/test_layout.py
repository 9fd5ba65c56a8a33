import os

import pytest

from conftest import make_dataset, make_image
from extract.errors import UsageError
from extract.layout import scan_folder, validation_fraction


def test_splits_layout_takes_split_and_label_from_folders(tmp_path):
    make_dataset(tmp_path, "splits", classes=("cat", "dog"), per_class=3)
    make_image(tmp_path / "test" / "dog" / "t.png")
    scan = scan_folder(tmp_path)
    assert scan.layout == "splits"
    placed = {image.path: (image.label, image.split) for image in scan.images}
    assert placed["train/cat/0.png"] == ("cat", "train")
    assert placed["validation/dog/2.png"] == ("dog", "validation")
    assert placed["test/dog/t.png"] == ("dog", "test")
    assert scan.class_names == ["cat", "dog"]


def test_val_folder_is_the_validation_split(tmp_path):
    make_image(tmp_path / "train" / "a" / "1.png")
    make_image(tmp_path / "val" / "a" / "2.png")
    assert [image.split for image in scan_folder(tmp_path).images] == ["train", "validation"]


def test_both_val_and_validation_is_an_error(tmp_path):
    for split in ("train", "val", "validation"):
        make_image(tmp_path / split / "a" / "1.png")
    with pytest.raises(UsageError, match="both val/ and validation/"):
        scan_folder(tmp_path)


def test_split_folders_beside_class_folders_is_ambiguous(tmp_path):
    make_image(tmp_path / "train" / "a" / "1.png")
    make_image(tmp_path / "cats" / "1.png")
    with pytest.raises(UsageError, match="--layout splits or --layout classes"):
        scan_folder(tmp_path)


def test_classes_layout_draws_validation_by_path_hash(tmp_path):
    make_dataset(tmp_path, "classes", classes=("a", "b"), per_class=40)
    scan = scan_folder(tmp_path, validation_percent=25)
    assert scan.layout == "classes"
    for image in scan.images:
        expected = "validation" if validation_fraction(image.path) < 25 else "train"
        assert image.split == expected
    share = sum(image.split == "validation" for image in scan.images) / len(scan.images)
    assert 0.1 < share < 0.4


def test_adding_images_never_moves_old_ones_across_splits(tmp_path):
    make_dataset(tmp_path, "classes", classes=("a", "b"), per_class=20)
    before = {image.path: image.split for image in scan_folder(tmp_path).images}
    make_dataset(tmp_path / "a", "unlabeled", classes=("new",), per_class=30, seed=7)
    after = {image.path: image.split for image in scan_folder(tmp_path).images}
    assert len(after) == len(before) + 30
    assert all(after[path] == split for path, split in before.items())


def test_unlabeled_layout(tmp_path):
    make_dataset(tmp_path, "unlabeled", per_class=2)
    scan = scan_folder(tmp_path)
    assert scan.layout == "unlabeled"
    assert {(image.label, image.split) for image in scan.images} == {("", "unlabeled")}


def test_layout_can_be_forced(tmp_path):
    make_dataset(tmp_path, "classes", per_class=2)
    scan = scan_folder(tmp_path, layout="unlabeled")
    assert len(scan.images) == 4 and all(image.label == "" for image in scan.images)


def test_a_class_folder_whose_name_is_not_utf8_is_a_failure_row_never_a_class(tmp_path):
    """Class names go into the cache as HDF5 text, which holds UTF-8 without NUL; a folder
    name cannot hold a NUL, and one that is not UTF-8 must never reach the catalog."""
    make_dataset(tmp_path, "classes", classes=("cat",), per_class=2)
    odd = os.fsencode(tmp_path) + b"/d\xffg"
    os.mkdir(odd)
    os.link(tmp_path / "cat" / "0.jpg", odd + b"/0.jpg")
    scan = scan_folder(tmp_path, layout="classes")
    assert scan.class_names == ["cat"] and len(scan.images) == 2
    assert scan.failures == [("d\\xffg/", "folder name is not valid UTF-8; not listed (rename it)")]


def test_non_images_and_stray_files_are_skipped_and_counted(tmp_path):
    make_dataset(tmp_path, "splits", per_class=2)
    (tmp_path / "README.txt").write_text("not an image")
    (tmp_path / "train" / "cat" / "notes.csv").write_text("a,b")
    make_image(tmp_path / "train" / "loose.png")  # in a split folder but in no class folder
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0")
    scan = scan_folder(tmp_path)
    assert sorted(scan.skipped) == ["README.txt", "train/cat/notes.csv", "train/loose.png"]
    assert len(scan.images) == 4


def test_image_extensions_are_case_insensitive(tmp_path):
    make_image(tmp_path / "a" / "1.JPG", format="JPEG")
    assert [image.path for image in scan_folder(tmp_path).images] == ["a/1.JPG"]


def test_symlink_loop_is_reported_not_followed(tmp_path):
    make_image(tmp_path / "a" / "1.png")
    os.symlink(tmp_path / "a", tmp_path / "a" / "again")
    scan = scan_folder(tmp_path)
    assert [image.path for image in scan.images] == ["a/1.png"]
    assert scan.failures == [("a/again/", "symbolic link loop: the folder contains itself")]


def test_broken_symlink_is_a_failure(tmp_path):
    make_image(tmp_path / "a" / "1.png")
    os.symlink(tmp_path / "missing.png", tmp_path / "a" / "2.png")
    scan = scan_folder(tmp_path)
    assert scan.failures == [("a/2.png", "cannot read file: broken symbolic link")]


def test_symlinked_image_keeps_its_path_inside_the_folder(tmp_path):
    outside = make_image(tmp_path / "outside" / "x.png")
    make_image(tmp_path / "data" / "a" / "1.png")
    os.symlink(outside, tmp_path / "data" / "a" / "2.png")
    assert [image.path for image in scan_folder(tmp_path / "data").images] == ["a/1.png", "a/2.png"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "no images"),
        (lambda root: (root / "notes.txt").write_text("x"), "no images"),
    ],
)
def test_folder_without_images_is_a_usage_error(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(UsageError, match=message):
        scan_folder(tmp_path)


def test_missing_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        scan_folder(tmp_path / "nope")


@pytest.mark.parametrize("percent", [-1, 100, 150])
def test_validation_percent_out_of_range(tmp_path, percent):
    make_dataset(tmp_path, "classes")
    with pytest.raises(UsageError, match="--validation-percent"):
        scan_folder(tmp_path, validation_percent=percent)


# A cache inside the data folder (extract-features . with the default cache/features.h5)


def make_cache_files(folder, name="features.h5"):
    """What a cache leaves in its folder: catalog, lock, shards, a copy moved aside by --rebuild."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in (name, f"{name}.lock", f"{name}.tmp-12"):
        (folder / entry).write_bytes(b"")
    for entry in (f"{name}.shards/abc", f"{name}.replaced-20250101-000000"):
        (folder / entry).mkdir(parents=True)
    make_image(folder / f"{name}.shards" / "abc" / "looks-like.png")  # never listed, whatever its name


@pytest.mark.parametrize("layout", ["splits", "classes", "unlabeled"])
def test_the_folder_holding_only_the_cache_is_no_class_or_split(tmp_path, layout):
    make_dataset(tmp_path, layout)
    before = scan_folder(tmp_path)
    make_cache_files(tmp_path / "cache")
    scan = scan_folder(tmp_path, cache=tmp_path / "cache" / "features.h5")
    assert scan.layout == layout and scan.images == before.images and scan.skipped == [] and scan.failures == []


@pytest.mark.parametrize("where", ["work/caches/f.h5", "f.h5"])
def test_a_cache_deeper_or_at_the_top_of_the_data_folder_is_left_out(tmp_path, where):
    make_dataset(tmp_path, "splits")
    make_cache_files((tmp_path / where).parent, "f.h5")
    scan = scan_folder(tmp_path, cache=tmp_path / where)
    assert scan.layout == "splits" and len(scan.images) == 6 and scan.skipped == [] and scan.failures == []


def test_a_cache_beside_images_leaves_their_folder_a_class(tmp_path):
    make_dataset(tmp_path, "classes")
    make_cache_files(tmp_path / "cat")
    scan = scan_folder(tmp_path, cache=tmp_path / "cat" / "features.h5")
    assert scan.layout == "classes" and scan.class_names == ["cat", "dog"] and scan.skipped == []


def test_a_folder_holding_more_than_the_cache_still_counts(tmp_path):
    make_dataset(tmp_path, "splits")
    make_cache_files(tmp_path / "cache")
    (tmp_path / "cache" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"beside other folders \(cache\)"):
        scan_folder(tmp_path, cache=tmp_path / "cache" / "features.h5")
