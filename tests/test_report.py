"""report.html and predictions.csv: what train-head shows of its heads, checked in the
files and, where Chromium is installed, in a real browser."""

import base64
import csv
import html
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from classify import train_head
from classify.evaluation import natural_order
from classify.report import path_html
from conftest import write_synthetic_cache
from helpers import render

SPLITS = {"train": (("a", "b", "c"), 30), "validation": (("a", "b", "c"), 10), "test": (("a", "b", "c"), 10)}


def data_urls(page: str, kind: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(rf'src="data:image/{kind};base64,([A-Za-z0-9+/=]+)"', page)]


def test_natural_order_puts_2_before_10():
    names = ["10", "2", "img10", "img9", "B", "a", "1"]
    assert [names[i] for i in natural_order(names)] == ["1", "2", "10", "a", "B", "img9", "img10"]


def test_captions_wrap_after_a_separator_not_inside_a_name():
    assert path_html("validation/<b>/0 1.png") == "validation/<wbr>&lt;b&gt;/<wbr>0 1.png"


def test_predictions_csv_holds_every_scored_image(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c.h5", SPLITS, spread=8.0)
    result = train_head(cache, "logreg", out=tmp_path / "run").results[0]
    with open(tmp_path / "run" / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["path", "split", "true_label", "predicted_label", "probability", "correct",
                             "label_2", "probability_2", "label_3", "probability_3"]
    assert [row["split"] for row in rows] == ["validation"] * 30 + ["test"] * 30
    assert rows[0]["path"] == "validation/a/0.png"
    for split in ("validation", "test"):
        mine = [row for row in rows if row["split"] == split]
        assert np.mean([row["correct"] == "1" for row in mine]) == result.scores[split]["accuracy"]
        assert all((row["true_label"] == row["predicted_label"]) == (row["correct"] == "1") for row in mine)
    for row in rows:
        first, second, third = (float(row[key]) for key in ("probability", "probability_2", "probability_3"))
        assert first >= second >= third and abs(first + second + third - 1) < 1e-4  # three classes: all of them
        assert len({row["predicted_label"], row["label_2"], row["label_3"]}) == 3
    assert 0 < sum(row["correct"] == "0" for row in rows) < 60  # the blobs overlap: some mistakes, not all


def test_predictions_csv_defends_against_spreadsheet_formulas(tmp_path):
    splits = {split: (("=cmd", "b"), count) for split, (_, count) in SPLITS.items()}
    cache = write_synthetic_cache(tmp_path / "c.h5", splits)
    train_head(cache, "logreg", out=tmp_path / "run", report=False)
    text = (tmp_path / "run" / "predictions.csv").read_text()
    assert "'=cmd" in text and not re.search(r"(^|,)=cmd", text, re.M)
    assert not (tmp_path / "run" / "report.html").exists()


def test_the_report_shows_each_head_its_mistakes_and_a_map(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c.h5", SPLITS, spread=8.0)
    training = train_head(cache, "all", out=tmp_path / "run")
    page = (tmp_path / "run" / "report.html").read_text()
    for result in training.results:
        assert f'id="head-{result.head}"' in page
    best = training.leaderboard()[0]
    assert f'<tr class=best><td><a href="#head-{best["head"]}">' in page
    assert f"{best['validation_accuracy']:.4f}" in page and "test accuracy" in page
    assert f"{best['head']} (the best head)" in page
    assert page.count('data-head="') == 2 and 'data-split="validation"' in page  # the best head's, two splits
    assert "PCA to 16 dimensions, then t-SNE" in page and 'id="map-image"' in page
    assert "Learning curve." in page  # the mlp's
    pictures = data_urls(page, "png")
    assert len(pictures) == 1 + 2 * len(training.results) + 1  # the map, two confusion plots a head, a curve
    for picture in pictures:
        assert Image.open(io.BytesIO(picture)).size[0] > 200
    # the synthetic cache has no image files: each mistake says so instead of a thumbnail
    assert page.count('class="missing"') == page.count('<figure class="mistake">') > 0
    assert "http://" not in page and "https://" not in page and "<script" not in page  # nothing to fetch or run
    assert 'id="random-weights"' in page  # the synthetic cache says weights "random": the page says so first
    assert page.index('id="random-weights"') < page.index('id="leaderboard"') < page.index('id="mistakes"') \
        < page.index('id="map"') < page.index('id="heads"')
    assert page.count('<details class="head"><summary>') == len(training.results)  # folded


def test_every_heads_mistakes_on_request(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c.h5", SPLITS, spread=8.0)
    training = train_head(cache, "all", out=tmp_path / "run", mistakes="all")
    page = (tmp_path / "run" / "report.html").read_text()
    heads_with_mistakes = {result.head for result in training.results
                           if any((made.predicted != made.y).any() for made in result.predictions.values())}
    assert set(re.findall(r'data-head="([^"]+)"', page)) == heads_with_mistakes


def test_names_are_escaped(tmp_path):
    splits = {split: (("<script>alert(1)</script>", "b&c"), count) for split, (_, count) in SPLITS.items()}
    cache = write_synthetic_cache(tmp_path / "c.h5", splits, spread=8.0)
    train_head(cache, "knn", out=tmp_path / "run")
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "b&amp;c" in page


@pytest.mark.filterwarnings("ignore:class .* has only")
def test_thumbnails_show_the_images_and_a_gone_file_says_so(tmp_path, weights_file):
    from conftest import SIZE, make_dataset
    from extract import extract_features

    data = tmp_path / "data"
    make_dataset(data, "classes", classes=("cat", "dog", "fox"), per_class=8)
    extract_features(data, tmp_path / "c.h5", input_size=SIZE, weights=weights_file, validation_percent=50, progress=False)
    training = train_head(tmp_path / "c.h5", "logreg", out=tmp_path / "run")
    made = training.results[0].predictions["validation"]
    wrong = made.mistakes(100)
    assert len(wrong) > 0  # random weights on random blocks: the head cannot be right everywhere
    page = (tmp_path / "run" / "report.html").read_text()
    thumbnails = data_urls(page, "jpeg")
    assert len(thumbnails) == len(wrong)
    assert all(Image.open(io.BytesIO(thumbnail)).size == (112, 112) for thumbnail in thumbnails)
    assert str(made.paths[wrong[0]]) in page
    assert path_html(made.paths[wrong[0]]) in page and "/<wbr>" in path_html(made.paths[wrong[0]])
    assert "random-weights" not in page  # a weights file: no warning

    (data / made.paths[wrong[0]]).unlink()
    train_head(tmp_path / "c.h5", "logreg", out=tmp_path / "again")
    page = (tmp_path / "again" / "report.html").read_text()
    assert len(data_urls(page, "jpeg")) == len(wrong) - 1 and "not readable now" in page


def test_bad_mistakes_value_is_refused(tmp_path):
    from extract import UsageError

    cache = write_synthetic_cache(tmp_path / "c.h5", SPLITS)
    with pytest.raises(UsageError, match="Expected --mistakes to be one of best, all; received 'some'"):
        train_head(cache, "logreg", out=tmp_path / "run", mistakes="some")


def test_the_report_renders_in_a_browser(tmp_path, augmented):
    """Headless Chromium opens the page from disk (no server, no network) and takes a
    screenshot: not blank, the map drawn; its DOM holds every head, thumbnails and the map."""
    training = train_head(augmented, "all", out=tmp_path / "run", mistakes="all")
    pixels, dom = render(tmp_path / "run" / "report.html", tmp_path)
    assert pixels.shape[:2] == (3000, 1280)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # not a blank page
    orange = (np.abs(pixels - np.array([255, 127, 14])).max(axis=2) < 25).sum()  # the map's second class (tab10)
    assert orange > 30
    for result in training.results:
        assert f'id="head-{result.head}"' in dom
    assert dom.count('<figure class="mistake">') >= 1 and dom.count("data:image/jpeg;base64,") >= 1
    assert 'id="map-image"' in dom


MEASURE = """<script>
var found = {};
for (const id of ["random-weights", "leaderboard", "mistakes", "map", "map-image", "heads"]) {
  const box = document.getElementById(id)?.getBoundingClientRect();
  found[id] = box ? [box.top + scrollY, box.bottom + scrollY] : null;
}
const root = document.documentElement;
found.page = {height: root.scrollHeight, width: root.scrollWidth, window: [innerWidth, innerHeight]};
found.wider = [...document.body.querySelectorAll("*")].filter(e => e.getBoundingClientRect().right > innerWidth + 0.5
  && !e.closest(".scroll, .strip")).map(e => e.tagName + "." + e.className);
parent.document.getElementById("measured").textContent = JSON.stringify(found);
</script>"""
SMALLEST_WINDOW = 500  # Chromium's narrowest window, in CSS pixels


def measure(page, scratch, width: int, height: int) -> tuple[dict, np.ndarray]:
    """Where the report's parts lie in a viewport of `width` x `height` CSS pixels, and its
    screenshot. The page is shown in an iframe of that size (a phone's width is narrower
    than Chromium's narrowest window), as a copy with a script added at its end that writes
    the positions into the outer page's DOM (the report itself holds no script)."""
    measured = page.read_text().replace("</body>", MEASURE + "</body>")
    outer = scratch / f"measured-{width}.html"
    outer.write_text(f'<!DOCTYPE html><html><body style="margin:0"><iframe width="{width}" height="{height}" '
                     f'style="border:0; display:block" srcdoc="{html.escape(measured, quote=True)}"></iframe>'
                     '<pre id="measured"></pre></body></html>')
    pixels, dom = render(outer, scratch, max(width, SMALLEST_WINDOW), height + 100)
    found = json.loads(html.unescape(re.search(r'<pre id="measured">(.*?)</pre>', dom, re.S).group(1)))
    assert found["page"]["window"] == [width, height]
    return found, pixels[:height, :width]


@pytest.mark.parametrize("width, height", [(1400, 900), (400, 800)], ids=["desktop", "phone"])
def test_the_report_reads_at_a_glance(tmp_path_factory, width, height):
    """Issue 33: the page was 12,500 px tall, its leaderboard overflowed a phone's width. The
    warning, the leaderboard, the best head's mistakes (24 on each of two splits here, the
    most a page shows) and the whole map lie within the first two screens; the heads'
    matrices are folded below; nothing but the boxes that scroll sideways is wider than the
    window."""
    tmp_path = tmp_path_factory.mktemp(f"glance{width}")
    splits = {split: (tuple("0123456789"), count) for split, count in (("train", 40), ("validation", 20), ("test", 20))}
    cache = write_synthetic_cache(tmp_path / "c.h5", splits, spread=12.0)
    training = train_head(cache, "all", out=tmp_path / "run")
    assert all(len(made.mistakes(24)) == 24 for made in training.best.predictions.values())
    found, pixels = measure(tmp_path / "run" / "report.html", tmp_path, width, height)
    order = ["random-weights", "leaderboard", "mistakes", "map", "map-image", "heads"]
    assert all(found[name] for name in order), found
    assert [found[name][0] for name in order] == sorted(found[name][0] for name in order)
    assert found["map-image"][1] <= 2 * height, found
    assert found["page"]["height"] <= 4 * height, found  # eight folded heads below the map
    assert found["page"]["width"] == width and found["wider"] == [], found
    assert pixels.std() > 20  # drawn, not blank


def test_a_report_that_cannot_be_written_warns_and_keeps_the_heads(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from classify import load_head
    from classify.splits import HeadWarning

    real = Path.write_text

    def write_text(self, *args, **kwargs):  # a disk that fills up as the page is written
        if "report.html" in self.name:  # the page, or the file it is written into aside
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    cache = write_synthetic_cache(tmp_path / "c.h5", SPLITS)
    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.warns(HeadWarning, match=r"report.html not written \(OSError: \[Errno 28\] No space left"):
        train_head(cache, "logreg", out=tmp_path / "run")
    assert sorted(path.name for path in (tmp_path / "run").iterdir() if "report" in path.name) == []
    assert load_head(tmp_path / "run").classes == ["a", "b", "c"]
