"""The plan: pure functions of the listing and the catalog's rows (no files, no HDF5)."""

import numpy as np
import pytest

from extract.state import CatalogRows, Row, ViewTable
from extract.layout import ImageFile
from extract.errors import UsageError
from extract.plan import catalog_rows, check_label_source, row_changes, to_read, view_table


def image(n: int, size: int = 10, mtime_ns: int = 100, split: str = "train") -> ImageFile:
    return ImageFile(f"c{n % 2}/{n}.png", f"c{n % 2}", split, size, mtime_ns)


def sha(n: int) -> str:
    return f"{n:064x}"


def cached(numbers, size: int = 10, mtime_ns: int = 100) -> CatalogRows:
    return CatalogRows.of({f"c{n % 2}/{n}.png": Row(sha(n), f"c{n % 2}", "train", size, mtime_ns) for n in numbers})


def test_rows_of_a_mapping_are_its_columns():
    rows = cached([3, 1])
    assert rows.path.tolist() == ["c1/3.png", "c1/1.png"] and rows.sha256.tolist() == [sha(3), sha(1)]
    assert rows.size.dtype == np.int64 and list(rows) == ["c1/3.png", "c1/1.png"] and len(rows) == 2
    assert rows.row("c1/1.png") == Row(sha(1), "c1", "train", 10, 100) and rows.row("c0/2.png") is None
    assert rows.find(["c1/1.png", "nowhere.png", "c1/3.png"]).tolist() == [1, -1, 0]
    assert len(CatalogRows.of({})) == 0 and CatalogRows.of({}).find([]).tolist() == []


def test_rows_are_equal_in_any_order_and_differ_in_any_column():
    rows = cached(range(5))
    assert rows == rows.take(np.array([4, 2, 0, 1, 3]))
    assert rows != rows.take(np.arange(4))  # one row fewer
    other = rows.take(np.arange(5))
    other.mtime_ns = other.mtime_ns + np.array([0, 0, 1, 0, 0])
    assert rows != other
    relabelled = rows.take(np.arange(5))
    relabelled.label = np.array(["c0", "c1", "c0", "c1", "x"], dtype=object)
    assert rows != relabelled


def test_rows_refuse_columns_of_different_lengths():
    with pytest.raises(ValueError, match="one value per row"):
        CatalogRows(["a.png"], [sha(1)], ["a"], ["train"], [1, 2], [1])


def test_only_new_and_changed_files_are_read():
    images = [image(0), image(1, size=11), image(2, mtime_ns=101), image(3)]  # 1 and 2 changed; 3 new
    assert to_read(images, cached(range(3)), None) == [images[1], images[2], images[3]]
    assert to_read(images, cached([]), None) == images
    assert to_read([], cached(range(3)), None) == []


def test_unchanged_files_that_lack_views_are_read_too():
    images = [image(0), image(1), image(2, split="validation")]
    asked = []

    def missing_views(found: ImageFile, sha256: str) -> list:
        asked.append((found.path, sha256))
        return [1] if found.path == "c1/1.png" else []

    assert to_read(images, cached(range(3)), missing_views) == [images[1]]
    assert asked == [(images[n].path, sha(n)) for n in range(3)]  # with the cached row's SHA-256


def test_catalog_rows_keep_unread_rows_and_take_read_ones_from_the_listing():
    images = [image(0, size=99), image(1, size=11, mtime_ns=7), image(2), image(3), image(4)]
    read = {"c1/1.png": sha(41), "c1/3.png": sha(3)}  # 1 changed, 3 new; 4 not reached (nor cached)
    rows = catalog_rows(images, cached(range(3)), read, set())
    assert rows.path.tolist() == ["c0/0.png", "c1/1.png", "c0/2.png", "c1/3.png"]
    assert rows.sha256.tolist() == [sha(0), sha(41), sha(2), sha(3)]
    assert rows.size.tolist() == [10, 11, 10, 10]  # an unread row keeps its cached size and time
    assert rows.mtime_ns.tolist() == [100, 7, 100, 100]
    assert rows.label.tolist() == ["c0", "c1", "c0", "c1"] and set(rows.split.tolist()) == {"train"}


def test_catalog_rows_drop_failed_and_deleted_images_and_take_labels_from_the_listing():
    images = [image(0), image(1), ImageFile("c1/3.png", "moved", "validation", 10, 100)]
    rows = catalog_rows(images, cached(range(4)), {}, {"c1/1.png"})  # 1 failed, 2 deleted
    assert rows.path.tolist() == ["c0/0.png", "c1/3.png"]
    assert rows.row("c1/3.png") == Row(sha(3), "moved", "validation", 10, 100)
    unchanged = catalog_rows([image(n) for n in range(4)], cached(range(4)), {}, set())
    assert unchanged == cached(range(4)) and len(catalog_rows([], cached(range(4)), {}, set())) == 0


def test_row_changes_count_by_path():
    original = cached(range(5))
    images = [image(0), image(1), image(2), image(7)]  # 3 and 4 removed, 7 new
    rows = catalog_rows(images, original, {"c0/2.png": sha(22), "c1/7.png": sha(7)}, set())  # 2 changed
    assert row_changes(rows, original) == {"new": 1, "changed": 1, "unchanged": 2, "removed": 2}
    assert row_changes(original, original) == {"new": 0, "changed": 0, "unchanged": 5, "removed": 0}
    assert row_changes(original, cached([])) == {"new": 5, "changed": 0, "unchanged": 0, "removed": 0}


def test_view_table_keeps_views_of_training_images_only_and_adds_known_ones():
    rows = catalog_rows([image(0), image(1), image(2, split="validation")], cached([]),
                        {f"c{n % 2}/{n}.png": sha(n) for n in range(3)}, set())
    old = ViewTable({}, [(sha(1), 2), (sha(2), 1), (sha(9), 1)])  # 2 is no longer training, 9 gone
    table = view_table(rows, old, "aug", 2, {"views_per_image": 2}, lambda key: not key.startswith(sha(0)))
    assert table.keys == [(sha(1), 2), (sha(1), 1)] and table.attrs == {"views_per_image": 2}


CSV = {"layout": "csv", "labels": "/d/labels.csv"}


def test_a_run_that_forgets_labels_is_refused_naming_both_ways_on():
    with pytest.raises(UsageError) as refused:
        check_label_source(CSV, "classes", None, chosen=False)
    assert "Pass --labels '/d/labels.csv' to keep them, or --layout classes to relabel." in str(refused.value)


def test_a_detected_layout_other_than_the_stored_one_is_refused_too():
    with pytest.raises(UsageError, match="Pass --layout classes to keep them, or --layout splits to relabel"):
        check_label_source({"layout": "classes"}, "splits", None, chosen=False)


def test_the_same_source_goes_on_and_a_chosen_one_names_what_it_replaces():
    assert check_label_source(CSV, "csv", "/d/labels.csv", chosen=True) is None  # the same CSV, edited or not
    assert check_label_source({"layout": "splits"}, "splits", None, chosen=False) is None
    assert check_label_source(CSV, "classes", None, chosen=True) == "--labels '/d/labels.csv'"
    assert check_label_source(CSV, "csv", "/e/other.csv", chosen=True) == "--labels '/d/labels.csv'"
    assert check_label_source({"layout": "classes"}, "csv", "/d/labels.csv", chosen=True) == "--layout classes"


def test_a_configuration_that_records_no_layout_has_no_source_to_keep():
    assert check_label_source({}, "classes", None, chosen=False) is None  # a new configuration
    assert check_label_source({"data_dir": "/d"}, "unlabeled", None, chosen=False) is None
