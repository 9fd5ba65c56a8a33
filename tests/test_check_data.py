"""check-data: the command and `classify.check` on real extractions (planted problems and
their quality bars: test_check_quality.py; the page: test_check_page.py)."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import SIZE, make_dataset, make_image, write_synthetic_cache
from helpers import CHECK, TRAIN, call, one_line

FILES = ["check.html", "duplicates.csv", "label_issues.csv", "outliers.csv"]


def read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, weights_file) -> Path:
    """24 images of 3 classes in train/validation, one training image copied byte for byte
    into validation (a leak) and once more into train."""
    from extract import extract_features

    folder = tmp_path_factory.mktemp("check")
    make_dataset(folder / "data", "splits", classes=("cat", "dog", "fox"), per_class=8)
    shutil.copy(folder / "data/train/cat/0.png", folder / "data/validation/cat/copy.png")
    shutil.copy(folder / "data/train/cat/0.png", folder / "data/train/dog/copy.png")
    extract_features(folder / "data", folder / "c.h5", input_size=SIZE, weights=weights_file, progress=False)
    return folder / "c.h5"


def test_check_data_writes_the_four_files_and_says_what_it_found(cache, tmp_path):
    done = call(CHECK, "--cache", cache, "--out", tmp_path / "out", "-k", "3")
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == FILES
    assert "Checked 26 images" in done.stdout and "label issue" in done.stdout and "leaks" in done.stdout
    assert str(tmp_path / "out") in done.stdout
    pairs = read(tmp_path / "out/duplicates.csv")
    exact = [pair for pair in pairs if pair["kind"] == "exact"]
    assert {(pair["path_a"], pair["path_b"], pair["leak"]) for pair in exact} == {
        ("train/cat/0.png", "validation/cat/copy.png", "true"), ("train/cat/0.png", "train/dog/copy.png", "false")}
    assert pairs[0]["leak"] == "true"  # leaks first
    assert [pair["leak"] for pair in pairs] == sorted((pair["leak"] for pair in pairs), reverse=True)
    outliers = read(tmp_path / "out/outliers.csv")
    assert len(outliers) == 26 and list(outliers[0]) == ["path", "split", "label", "mean_distance"]
    distances = [float(row["mean_distance"]) for row in outliers]
    assert distances == sorted(distances, reverse=True)
    issues = read(tmp_path / "out/label_issues.csv")
    assert list(issues[0]) == ["path", "split", "given_label", "suggested_label", "score"]
    scores = [float(row["score"]) for row in issues]
    assert scores == sorted(scores) and all(row["given_label"] != row["suggested_label"] for row in issues)


def test_json_counts_what_the_files_hold(cache, tmp_path):
    done = call(CHECK, "--cache", cache, "--out", tmp_path / "out", "-k", "3", "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["counts"]["exact"] == 2 and found["counts"]["leaks"] >= 1
    assert found["counts"]["label_issues"] == len(read(tmp_path / "out/label_issues.csv"))
    pairs = read(tmp_path / "out/duplicates.csv")
    assert found["counts"]["exact"] + found["counts"]["near"] == len(pairs)
    assert found["counts"]["leaks"] == sum(pair["leak"] == "true" for pair in pairs)
    assert set(found["files"]) == set(FILES)


def test_read_from_the_cache_a_block_at_a_time_finds_the_same(cache, tmp_path, monkeypatch):
    import classify.check
    from classify.check import check_data

    held = check_data(cache, out=tmp_path / "held", k=3, page=False)
    reads = []
    real = classify.check.FeatureCache.features_at
    monkeypatch.setattr(classify.check.FeatureCache, "features_at", lambda self, rows, views=None: (
        reads.append(len(rows)), real(self, rows, views))[1])
    monkeypatch.setattr(classify.check, "LOAD_SHARE", 2**40)  # the vectors never held: read a row at a time
    streamed = check_data(cache, out=tmp_path / "streamed", k=3, page=False)
    assert max(reads) == 1 and sum(reads) > 2 * 26
    assert held.counts == streamed.counts
    for name in ("duplicates.csv", "outliers.csv", "label_issues.csv"):
        assert (tmp_path / "held" / name).read_text() == (tmp_path / "streamed" / name).read_text()


def test_similar_to_prints_the_nearest_cached_images(cache, tmp_path):
    from classify.check import nearest

    image = cache.parent / "data/train/fox/2.png"
    found = nearest(image, cache, k=4)
    assert found[0].path == "train/fox/2.png" and found[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert len(found) == 4 and [n.similarity for n in found] == sorted((n.similarity for n in found), reverse=True)
    from PIL import Image

    with Image.open(image) as original:  # a copy twice the size: content not cached, computed now
        original.resize((original.width * 2, original.height * 2)).save(tmp_path / "bigger.png")
    assert nearest(tmp_path / "bigger.png", cache, k=2)[0].path == "train/fox/2.png"
    done = call(CHECK, "--cache", cache, "--similar-to", image, "-k", "2")
    assert done.returncode == 0, done.stderr
    assert "train/fox/2.png" in done.stdout.splitlines()[1]
    done = call(CHECK, "--cache", cache, "--similar-to", image, "-k", "2", "--json")
    assert [row["path"] for row in json.loads(done.stdout)][0] == "train/fox/2.png"


def test_train_head_warns_when_validation_holds_copies_of_training_images(cache, tmp_path):
    done = call(TRAIN, "--cache", cache, "--head", "logreg", "--out", tmp_path / "run")
    assert done.returncode == 0, done.stderr
    assert "warning: 1 validation/test image is an exact copy of a training image" in done.stdout
    assert "check-data" in done.stdout
    assert "exact copy of a training image" in (tmp_path / "run/report.html").read_text()
    done = call(TRAIN, "--cache", cache, "--head", "logreg", "--out", tmp_path / "run2", "--json", "--no-report")
    assert json.loads(done.stdout)["leaks"] == 1


def test_no_leak_no_warning(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c.h5", {"train": (("a", "b"), 10), "validation": (("a", "b"), 4)})
    done = call(TRAIN, "--cache", cache, "--head", "logreg", "--out", tmp_path / "run", "--no-report")
    assert done.returncode == 0 and "warning:" not in done.stdout and "copies" not in done.stdout


@pytest.mark.parametrize("args, words", [
    (["-k", "0"], ["-k between 1 and 1000"]),
    (["--near-threshold", "1.5"], ["--near-threshold"]),
    (["--folds", "1"], ["--folds"]),
    (["--head", "finetune"], ["--head", "logreg"]),
    (["--memory-budget", "lots"], ["--memory-budget"]),
])
def test_bad_options_are_one_line_and_write_nothing(cache, tmp_path, args, words):
    done = call(CHECK, "--cache", cache, "--out", tmp_path / "out", *args)
    one_line(done, 2, *words)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_out_that_is_not_empty_is_refused_and_kept(cache, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/mine.txt").write_text("keep")
    one_line(call(CHECK, "--cache", cache, "--out", tmp_path / "out"), 2, "not empty")
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_a_cache_of_one_image_is_refused(tmp_path, weights_file):
    from extract import extract_features

    make_image(tmp_path / "data/cat/only.png")
    extract_features(tmp_path / "data", tmp_path / "c.h5", input_size=SIZE, weights=weights_file, progress=False)
    one_line(call(CHECK, "--cache", tmp_path / "c.h5", "--out", tmp_path / "out"), 2, "1 image", "at least 2")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout, note", [("unlabeled", "the cache is unlabeled"), ("one class", "every labeled image is of one class ('only')")])
def test_without_labels_to_check_duplicates_and_outliers_still_are(tmp_path, weights_file, layout, note):
    from extract import extract_features

    folder = tmp_path / "data" / ("only" if layout == "one class" else "")
    for i in range(6):
        make_image(folder / f"{i}.png", seed=i)
    shutil.copy(folder / "0.png", folder / "copy.png")
    extract_features(tmp_path / "data", tmp_path / "c.h5", input_size=SIZE, weights=weights_file, progress=False,
                     layout="unlabeled" if layout == "unlabeled" else "auto", validation_percent=0)
    done = call(CHECK, "--cache", tmp_path / "c.h5", "--out", tmp_path / "out", "-k", "2")
    assert done.returncode == 0, done.stderr
    assert f"Labels not checked: {note}" in done.stdout
    assert read(tmp_path / "out/label_issues.csv") == []
    assert len(read(tmp_path / "out/outliers.csv")) == 7
    assert any(pair["kind"] == "exact" for pair in read(tmp_path / "out/duplicates.csv"))


def test_features_all_equal_are_refused(tmp_path):
    import h5py

    from extract import shards_folder

    cache = write_synthetic_cache(tmp_path / "c.h5", {"train": (("a", "b"), 5)})
    shards = list(shards_folder(cache).glob("*/*.h5"))
    assert shards
    for shard in shards:  # every stored feature made one value
        with h5py.File(shard, "r+") as file:
            file["features"][...] = 1.0
    one_line(call(CHECK, "--cache", cache, "--out", tmp_path / "out"), 2, "same features")


def test_similar_to_a_file_that_is_not_an_image(cache, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    one_line(call(CHECK, "--cache", cache, "--similar-to", tmp_path / "notes.png"), 2, "--similar-to", "notes.png")
    one_line(call(CHECK, "--cache", cache, "--similar-to", tmp_path / "missing.png"), 2, "missing.png")


def test_similar_to_with_the_weights_gone(tmp_path, weights_file):
    from extract import extract_features

    moved = tmp_path / "weights.h5"
    shutil.copy(weights_file, moved)
    make_dataset(tmp_path / "data", "classes")
    extract_features(tmp_path / "data", tmp_path / "c.h5", input_size=SIZE, weights=moved, progress=False)
    moved.rename(tmp_path / "elsewhere.h5")
    image = tmp_path / "data/cat/0.jpg"
    one_line(call(CHECK, "--cache", tmp_path / "c.h5", "--similar-to", image), 2, "--weights PATH")
    done = call(CHECK, "--cache", tmp_path / "c.h5", "--similar-to", image, "--weights", tmp_path / "elsewhere.h5")
    assert done.returncode == 0 and "cat/0.jpg" in done.stdout.splitlines()[1]


def test_an_unknown_configuration_and_a_missing_cache(cache, tmp_path):
    one_line(call(CHECK, "--cache", cache, "--config", "ffffffff", "--out", tmp_path / "out"), 1, "ffffffff")
    one_line(call(CHECK, "--cache", tmp_path / "none.h5", "--out", tmp_path / "out"), 1, "extract-features")
    assert not (tmp_path / "out").exists()


def test_more_near_pairs_than_images_says_the_threshold_looks_too_low(cache, tmp_path):
    """Random weights put every image within ~0.99 of the others: at 0.97 every neighbour is
    'near'. The summary says so; a threshold above those similarities finds only the copies."""
    done = call(CHECK, "--cache", cache, "--out", tmp_path / "low", "-k", "3", "--json")
    found = json.loads(done.stdout)
    assert found["counts"]["near"] > found["counts"]["images"]
    assert any("--near-threshold 0.97 looks too low" in note for note in found["notes"])
    done = call(CHECK, "--cache", cache, "--out", tmp_path / "high", "-k", "3", "--near-threshold", "0.99999", "--json")
    found = json.loads(done.stdout)
    assert found["counts"]["near"] <= found["counts"]["images"] and not found["notes"]


def test_check_data_on_the_demo_digits_writes_the_four_files_and_the_page_renders(tmp_path, weights_file):
    """The demo's 1,797 digits (make demo's data), extracted at 32 px with the test's random
    weights; check-data at the near threshold measured for such features (docs/check-data.md);
    check.html opened from disk by headless Chromium: not blank, every section, thumbnails."""
    import sys

    from extract import extract_features

    subprocess.run([sys.executable, "demo/make_data.py", str(tmp_path / "data")], check=True, capture_output=True,
                   cwd=Path(__file__).parent.parent)
    extract_features(tmp_path / "data", tmp_path / "c.h5", input_size=SIZE, weights=weights_file, pooling="avg",
                     progress=False)
    done = call(CHECK, "--cache", tmp_path / "c.h5", "--out", tmp_path / "out", "--near-threshold", "0.998", "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["images"] == 1797 and sorted(path.name for path in (tmp_path / "out").iterdir()) == FILES
    assert found["counts"]["label_issues"] == len(read(tmp_path / "out/label_issues.csv")) > 0
    assert len(read(tmp_path / "out/outliers.csv")) == 1797
    browser = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(name)), None)
    if browser is None:
        pytest.skip("no Chromium here (.ci/run installs Debian's chromium package)")
    page = tmp_path / "out/check.html"
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000"]
    shot = tmp_path / "shot.png"
    subprocess.run(common + [f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    dom = subprocess.run(common + ["--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape[:2] == (2000, 1280) and pixels.std() > 20  # drawn, not blank
    for section in ("overview", "balance", "label-issues", "duplicates", "outliers"):
        assert f'id="{section}"' in dom
    assert dom.count("data:image/jpeg;base64,") >= 48  # the label issues' and the outliers' thumbnails at least
