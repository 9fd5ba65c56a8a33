"""check.html: check-data's page of a `Check`, built here by hand over a small real extraction
(so the thumbnails are real images), checked in the file and, where Chromium is installed, in
a real browser."""

import base64
import errno
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classify.findings import Check
from classify.check_page import CLASSES_SHOWN, SHOWN, write_check_page
from conftest import SIZE, make_dataset
from helpers import render

SECTIONS = ("overview", "balance", "label-issues", "duplicates", "outliers")


@pytest.fixture(scope="module")
def extraction(tmp_path_factory, weights_file) -> dict:
    """Twelve images of three classes (train and validation), extracted at 32 px: what a
    Check needs of the cache."""
    from extract import FeatureCache, extract_features

    folder = tmp_path_factory.mktemp("check_page")
    make_dataset(folder / "data", "splits", classes=("cat", "dog", "fox"), per_class=4)
    extract_features(folder / "data", folder / "c.h5", input_size=SIZE, weights=weights_file, progress=False)
    with FeatureCache(folder / "c.h5") as cache:
        return {"fingerprint": cache.fingerprint, "config": dict(cache.config), "data_dir": cache.config["data_dir"],
                "rows": list(zip(cache.paths().tolist(), cache.splits().tolist(), cache.labels().tolist()))}


def a_check(extraction, tmp_path, **changes) -> Check:
    """A Check of the extraction: 3 label issues, a leak, an exact pair within train and
    another leak (leaks first, as check_data orders them), 4 outliers."""
    rows = extraction["rows"]
    train = [row for row in rows if row[1] == "train"]
    validation = [row for row in rows if row[1] == "validation"]
    issues = [{"path": path, "split": split, "given_label": label, "suggested_label": "fox" if label != "fox" else "cat",
               "score": 0.01 * (i + 1)} for i, (path, split, label) in enumerate(train[:3])]
    duplicates = [_pair(train[0], validation[0], 0.99, "near", True), _pair(train[3], validation[1], 1.0, "exact", True),
                  _pair(train[1], train[2], 1.0, "exact", False)]
    outliers = [{"path": path, "split": split, "label": label, "mean_distance": 0.5 - 0.1 * i}
                for i, (path, split, label) in enumerate(rows[-4:])]
    classes: dict = {}
    for _, split, label in rows:
        classes.setdefault(split, {}).setdefault(label, 0)
        classes[split][label] += 1
    check = Check(out=tmp_path / "check", fingerprint=extraction["fingerprint"], config=extraction["config"],
                  data_dir=extraction["data_dir"], images=len(rows), classes=classes, k=5, near_threshold=0.97,
                  index="exact", reduced=None, label_issues=issues, duplicates=duplicates, outliers=outliers,
                  counts={"label_issues": 7, "exact": 2, "near": 1, "leaks": 2, "outliers": 4},
                  notes=["test split: none stored"], label_head="logreg", folds=3)
    for name, value in changes.items():
        setattr(check, name, value)
    return check


def _pair(a, b, similarity, kind, leak) -> dict:
    return {"path_a": a[0], "split_a": a[1], "path_b": b[0], "split_b": b[1], "similarity": similarity, "kind": kind,
            "leak": leak}


def written(check: Check, tmp_path) -> str:
    write_check_page(tmp_path / "check.html", check)
    return (tmp_path / "check.html").read_text(encoding="utf-8")


def section(page: str, name: str) -> str:
    """The HTML of one section: from its heading to the next."""
    return re.search(rf'<h2 id="{name}">.*?(?=<h2 |</body>)', page, re.S).group(0)


def jpegs(html: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', html)]


def test_the_page_shows_each_section_with_real_thumbnails(extraction, tmp_path):
    check = a_check(extraction, tmp_path)
    page = written(check, tmp_path)
    positions = [page.index(f'<h2 id="{name}">') for name in SECTIONS]
    assert positions == sorted(positions)
    assert check.fingerprint in page and "input size 32" in page and extraction["data_dir"] in page
    counts = dict(re.findall(r"<tr><td>([^<]+)</td><td>(\d+)</td></tr>", section(page, "overview")))
    assert counts == {"label issues": "7", "exact duplicate pairs": "2", "near-duplicate pairs": "1",
                      "pairs across train and validation or test (leaks)": "2",
                      "outliers (mean distance beyond the far fence)": "4"}
    assert "test split: none stored" in page
    issues = section(page, "label-issues")
    assert len(jpegs(issues)) == 3 and "7 labels look wrong" in issues and "the first 3 shown" in issues
    first = check.label_issues[0]
    assert f'given <b>{first["given_label"]}</b>' in issues and f'suggested <b>{first["suggested_label"]}</b>' in issues
    assert len(jpegs(section(page, "duplicates"))) == 6 and len(jpegs(section(page, "outliers"))) == 4
    assert all(Image.open(io.BytesIO(picture)).size == (112, 112) for picture in jpegs(page))
    assert "missing" not in re.sub(r"<style>.*?</style>", "", page, flags=re.S)  # every image read


def test_the_balance_table_counts_each_class_in_each_split(extraction, tmp_path):
    balance = section(written(a_check(extraction, tmp_path), tmp_path), "balance")
    assert "<th>class</th><th>train</th><th>validation</th><th>images</th>" in balance
    for label in ("cat", "dog", "fox"):
        assert f"<tr><td>{label}</td><td>3</td><td>1</td><td>4</td>" in balance


def test_leaks_come_first_and_are_marked(extraction, tmp_path):
    check = a_check(extraction, tmp_path)
    duplicates = section(written(check, tmp_path), "duplicates")
    pairs = re.findall(r'<div class="pair( leak)?" data-kind="(\w+)">', duplicates)
    assert pairs == [(" leak", "near"), (" leak", "exact"), ("", "exact")]
    assert duplicates.count('<b class="wrong">leak</b>') == 2 and "2 of them leaks" in duplicates
    positions = [duplicates.index(row["path_a"]) for row in check.duplicates]
    assert positions == sorted(positions)


def test_nothing_is_fetched(extraction, tmp_path):
    page = written(a_check(extraction, tmp_path), tmp_path)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert all(source.startswith("data:image/") for source in re.findall(r'src="([^"]*)"', page))
    assert not re.search(r'href="(?!#)', page)  # links only within the page


def test_names_are_escaped_and_shown_as_stored(extraction, tmp_path):
    """A path with markup, quotes, a bidi override and a byte that was not UTF-8 (a surrogate
    escape, as a folder listing gives it): escaped, the invisible ones shown as escapes, and
    the page still written as UTF-8."""
    hostile = 'train/<script>alert("x")</script>&\'\u202egnp.exe\udcff.png'
    check = a_check(extraction, tmp_path)
    check.label_issues[0].update(path=hostile, given_label="<u>cat</u>")
    check.outliers[0]["label"] = "a&b"
    check.notes = ["labels: <none>"]
    page = written(check, tmp_path)
    assert "<script>" not in page and "<u>cat</u>" not in page and "<none>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#x27;\\u202egnp.exe\\udcff.png" in page
    assert "\u202e" not in page and "a&amp;b" in page and "&lt;u&gt;cat&lt;/u&gt;" in page
    assert section(page, "label-issues").count('class="missing" title="cannot read file: No such file') == 1
    assert "1 of 9 images shown could not be read now: cannot read file: No such file" in section(page, "overview")


def test_a_missing_data_folder_shows_grey_boxes(extraction, tmp_path):
    check = a_check(extraction, tmp_path, data_dir=str(tmp_path / "gone"))
    page = written(check, tmp_path)
    assert jpegs(page) == [] and page.count('<div class="missing" title=') == 3 + 6 + 4  # of 8 images
    assert "8 of 8 images shown could not be read now: Expected DATA_DIR" in section(page, "overview")
    assert "gone&#x27; does not exist." in section(page, "overview")  # the reason once, whole
    page = written(a_check(extraction, tmp_path, data_dir=None), tmp_path)
    assert jpegs(page) == [] and page.count('<div class="missing">no data folder recorded</div>') == 13


def test_an_empty_check_says_what_was_not_found(extraction, tmp_path):
    note = "Labels not checked: the cache is unlabeled; duplicates and outliers are."  # as check_data notes it
    check = a_check(extraction, tmp_path, label_issues=[], duplicates=[], outliers=[], label_head=None, folds=None,
                    counts={"exact": 0, "near": 0, "leaks": 0, "outliers": 0}, notes=[note],
                    classes={"train": {"": 12}})
    page = written(check, tmp_path)
    assert all(f'<h2 id="{name}">' in page for name in SECTIONS)
    assert f'<p class="note">{note}</p>' in section(page, "label-issues")
    assert "<tr><td>label issues</td><td>n/a</td></tr>" in page
    assert "No exact or near duplicates" in page and "No outliers ranked" in page
    assert "<i>(unlabeled)</i>" in section(page, "balance") and "<figure" not in page
    check.label_head, check.folds, check.counts["label_issues"] = "logreg", 5, 0
    assert "No label looks wrong (out-of-fold probabilities of logreg (5 folds)" in written(check, tmp_path)


def test_the_page_is_bounded_whatever_the_check_holds(extraction, tmp_path):
    check = a_check(extraction, tmp_path)
    check.label_issues = check.label_issues * 100
    check.duplicates = check.duplicates * 100
    check.outliers = check.outliers * 100
    check.classes = {"train": {f"class{i}": i + 1 for i in range(1000)}}
    page = written(check, tmp_path)
    assert section(page, "label-issues").count("<figure") == SHOWN
    assert len(re.findall(r'<div class="pair[ "]', section(page, "duplicates"))) == SHOWN // 2
    assert section(page, "outliers").count("<figure") == SHOWN
    balance = section(page, "balance")
    assert balance.count("<tr>") == 1 + CLASSES_SHOWN and f"The first {CLASSES_SHOWN} of 1000 classes" in balance
    assert "the smallest, class0, holds 1 images, the largest 1000" in balance
    assert len(page) < 3_000_000


def test_a_page_that_cannot_be_written_leaves_the_old_one(extraction, tmp_path, monkeypatch):
    (tmp_path / "check.html").write_text("before")
    real = Path.write_text

    def write_text(self, *args, **kwargs):  # a disk that fills up as the page is written
        if "check.html" in self.name:  # the file it is written into aside
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(OSError, match="No space left"):
        write_check_page(tmp_path / "check.html", a_check(extraction, tmp_path))
    assert [path.name for path in tmp_path.iterdir()] == ["check.html"]
    assert (tmp_path / "check.html").read_text() == "before"


def test_the_page_renders_in_a_headless_browser(extraction, tmp_path):
    """Headless Chromium opens the page from disk (no server, no network) and takes a
    screenshot: not blank, the thumbnails drawn; its DOM holds every section and thumbnail."""
    write_check_page(tmp_path / "check.html", a_check(extraction, tmp_path))
    pixels, dom = render(tmp_path / "check.html", tmp_path)
    assert pixels.shape[:2] == (3000, 1280)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # random blocks drawn, not blank
    leak_red = (np.abs(pixels - np.array([187, 0, 0])).max(axis=2) < 25).sum()  # the leaks' borders (#b00)
    assert leak_red > 500
    for name in SECTIONS:
        assert f'id="{name}"' in dom
    assert dom.count('<figure class="thumb">') == 3 + 6 + 4 and dom.count("data:image/jpeg;base64,") == 13
