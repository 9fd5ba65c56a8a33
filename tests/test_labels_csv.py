"""--labels labels.csv: labels and splits from a CSV, and every way such a file can be wrong."""

import json
import os

import pytest

import helpers
from conftest import SIZE, make_image
from extract import FeatureCache
from extract.labels import read_labels
from extract.layout import scan_folder, validation_fraction


def cli(*args):
    """main() in this process: (exit status, stdout, stderr)."""
    done = helpers.call(helpers.EXTRACT, *args)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def kaggle(tmp_path):
    """A Kaggle-style folder: images/ flat, the labels in a CSV (here beside the images)."""
    data = tmp_path / "data"
    for number in range(6):
        make_image(data / "images" / f"{number}.png", seed=number)
    return data


def write(path, text: str, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def test_labels_and_splits_come_from_the_csv_and_the_rest_is_skipped(kaggle, weights_file, tmp_path):
    labels = write(kaggle / "labels.csv", "path,split,label\nimages/0.png,train,cat\nimages/1.png,val,dog\n"
                                          "images/2.png,test,cat\n./images//3.png,train,dog\n")
    status, out, err = cli(kaggle, "--labels", labels, "--cache", tmp_path / "c.h5", "--weights", weights_file,
                           "--input-size", SIZE, "--json")
    summary = json.loads(out)
    assert status == 0, err
    assert summary["layout"] == "csv" and summary["rows"] == 4 and summary["class_names"] == ["cat", "dog"]
    assert summary["split_sizes"] == {"test": 1, "train": 2, "validation": 1}
    assert (summary["skipped"], summary["not_in_labels"], summary["labels_missing"]) == (3, 2, [])  # + labels.csv
    with FeatureCache(tmp_path / "c.h5") as cache:
        rows = {path: (label, split) for path, label, split in zip(cache.paths(), cache.labels(), cache.splits())}
        assert cache.config["layout"] == "csv" and cache.config["labels"] == str(labels.resolve())
    assert rows == {"images/0.png": ("cat", "train"), "images/1.png": ("dog", "validation"),
                    "images/2.png": ("cat", "test"), "images/3.png": ("dog", "train")}


def test_a_rerun_without_labels_is_refused_before_it_relabels_anything(kaggle, weights_file, tmp_path):
    """Issue 29, failure 6: without --labels, the folders' names (layout classes: "images")
    silently replaced every label of the CSV. The re-run must choose: the CSV again (edited
    is fine), or --layout to relabel from the folders."""
    labels = write(kaggle / "labels.csv", "path,label\nimages/0.png,cat\nimages/1.png,dog\n")
    cache = tmp_path / "c.h5"
    options = ("--cache", cache, "--weights", weights_file, "--input-size", SIZE)
    assert cli(kaggle, "--labels", labels, *options)[0] == 0
    catalog = cache.read_bytes()
    status, out, err = cli(kaggle, *options)
    assert status == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert f"come from --labels {str(labels.resolve())!r}" in err and "Pass --labels" in err
    assert "or --layout classes to relabel" in err
    assert cache.read_bytes() == catalog  # nothing written

    write(labels, "path,label\nimages/0.png,cat\nimages/1.png,bird\n")  # the same CSV, edited
    status, out, _ = cli(kaggle, "--labels", labels, *options, "--json")
    assert status == 0 and json.loads(out)["class_names"] == ["bird", "cat"] and not json.loads(out)["relabelled_from"]

    status, out, _ = cli(kaggle, "--layout", "classes", *options)  # relabel from the folders, by choice
    assert status == 0 and "Note:   relabelled: the labels came from --labels" in out and "now from --layout classes" in out
    with FeatureCache(cache) as opened:
        assert set(opened.labels()) == {"images"} and opened.config["layout"] == "classes"
        assert "labels" not in opened.config
    assert cli(kaggle, *options)[0] == 0  # the folders are the source now: detected, the same


def test_the_human_summary_says_what_was_not_in_the_csv_and_what_is_missing(kaggle, weights_file, tmp_path):
    labels = write(tmp_path / "labels.csv", "path,label\nimages/0.png,cat\nimages/1.png,dog\nimages/gone.png,dog\n")
    status, out, _ = cli(kaggle, "--labels", labels, "--cache", tmp_path / "c.h5", "--weights", weights_file,
                         "--input-size", SIZE)
    assert status == 0
    assert "(layout: csv, labels from" in out and "4 skipped (4 images not in labels.csv)" in out
    assert "Labels: not found in DATA_DIR: 1 of the paths in" in out and "(first: images/gone.png;" in out


def test_without_a_split_column_validation_is_drawn_as_in_the_classes_layout(kaggle, tmp_path):
    for number in range(6, 40):
        make_image(kaggle / "images" / f"{number}.png", seed=number)
    rows = "".join(f"images/{number}.png,{'ab'[number % 2]}\n" for number in range(40))
    labels = read_labels(write(tmp_path / "labels.csv", "path,label\n" + rows))
    scan = scan_folder(kaggle, validation_percent=25, labels=labels)
    assert len(scan.images) == 40
    for image in scan.images:
        assert image.split == ("validation" if validation_fraction(image.path) < 25 else "train")
    assert {image.split for image in scan.images} == {"train", "validation"}


def test_an_empty_split_cell_is_drawn_too(kaggle, tmp_path):
    labels = read_labels(write(tmp_path / "l.csv", "path,label,split\nimages/0.png,cat,\nimages/1.png,cat,test\n"))
    splits = {image.path: image.split for image in scan_folder(kaggle, validation_percent=0, labels=labels).images}
    assert splits == {"images/0.png": "train", "images/1.png": "test"}


@pytest.mark.parametrize("text, where, message", [
    ("name,label\na.png,cat\n", "line 1", "expected a comma-separated header row naming the columns path and label"),
    ("path,label,path\na.png,cat,b\n", "line 1", "the column path twice"),
    ("path,label\nimages/0.png,cat\nimages/1.png,dog,extra\n", "line 3", "expected 2 fields as in the header; found 3"),
    ("path,label\nimages/0.png\n", "line 2", "expected 2 fields as in the header; found 1"),
    ("path,label\nimages/0.png,cat\nimages/1.png,  \n", "line 3", "empty label for 'images/1.png'"),
    ("path,label,split\nimages/0.png,cat,training\n", "line 2", "unknown split 'training'"),
    ("path,label\n\nimages/0.png,cat\n../x.png,cat\n", "line 4", "leaves DATA_DIR (..)"),
    ("path,label\nimages/../../x.png,cat\n", "line 2", "leaves DATA_DIR (..)"),
    ("path,label\n/etc/x.png,cat\n", "line 2", "absolute path '/etc/x.png'"),
    ("path,label\n,cat\n", "line 2", "empty path"),
    ("path,label\nimages/0.png,cat\nimages/1.png,dog\n./images/0.png,dog\n", "line 4",
     "'images/0.png' again, with label 'dog' (line 2 gave label 'cat')"),
    (b"path,label\nimages/0.png,cat\nimages/\xff.png,dog\n", "line 3", "not UTF-8 (byte 0xff)"),
    ("path,label\nimages/0.png,\"cat\n", "line 2", "not readable as CSV"),
    ("", "", "empty; expected a header row"),
    ("path,label\n", "", "a header row but no rows"),
    # NUL: the cache's text cannot hold it (h5py's "VLEN strings do not support embedded NULLs", after the compute)
    ("path,label\nimages/0.png,cat\nimages/1.png,d\x00og\n", "line 3", "a NUL character (byte 0x00), which the cache"),
    ("path,label\nimages/0.png\x00,cat\n", "line 2", "a NUL character (byte 0x00)"),
    ("path,label\nimages/0.png,cat\n".encode("utf-16-le"), "line 1", "(a file saved as UTF-16 is full of them"),
])
def test_a_bad_csv_is_one_line_naming_the_file_and_line(kaggle, tmp_path, text, where, message):
    labels = write(tmp_path / "labels.csv", text)
    status, out, err = cli(kaggle, "--labels", labels, "--cache", tmp_path / "c.h5", "--weights", "random",
                           "--input-size", SIZE)
    assert status == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert (f"{labels} {where}: " if where else f"{labels}: ") in err and message in err
    assert not (tmp_path / "c.h5").exists()


def test_bom_crlf_and_quoted_commas_are_read(kaggle, tmp_path):
    make_image(kaggle / "images" / "a, b.png")
    text = '\ufeffPath , Label\r\n"images/a, b.png","cat, tabby"\r\nimages/1.png,dog\r\n'
    labels = read_labels(write(tmp_path / "l.csv", text))
    assert {path: entry.label for path, entry in labels.items()} == {"images/a, b.png": "cat, tabby",
                                                                     "images/1.png": "dog"}
    assert [image.label for image in scan_folder(kaggle, labels=labels).images] == ["dog", "cat, tabby"]


@pytest.mark.parametrize("make, message", [
    (lambda path: os.mkfifo(path), "is not a regular file (a FIFO)"),
    (lambda path: path.mkdir(), "is not a regular file (a folder)"),
    (lambda path: None, "Cannot read --labels"),
])
def test_a_labels_path_that_is_no_file_is_one_line(kaggle, tmp_path, make, message):
    make(tmp_path / "labels.csv")
    status, _, err = cli(kaggle, "--labels", tmp_path / "labels.csv", "--cache", tmp_path / "c.h5",
                         "--weights", "random", "--input-size", SIZE)
    assert status == 2 and message in err and err.count("\n") == 1


def test_labels_naming_nothing_here_say_where_paths_start(kaggle, tmp_path):
    labels = write(tmp_path / "labels.csv", "path,label\n0.png,cat\n1.png,dog\n")  # relative to images/, not DATA_DIR
    status, _, err = cli(kaggle, "--labels", labels, "--cache", tmp_path / "c.h5", "--weights", "random")
    assert status == 2 and "Found none of the 2 images the labels file names" in err and "relative to DATA_DIR" in err


def test_labels_with_a_layout_is_a_usage_error(kaggle, tmp_path):
    labels = write(tmp_path / "labels.csv", "path,label\nimages/0.png,cat\n")
    status, _, err = cli(kaggle, "--labels", labels, "--layout", "classes", "--cache", tmp_path / "c.h5")
    assert status == 2 and "--labels" in err and "--layout classes" in err and err.count("\n") == 1
