"""train-head's report: one self-contained HTML page for a run (`report.html`), in the
order a reader needs it, so that the first two screens answer "which head, and where does it fail":

    a warning first where the figures say little: random weights, or images in two splits
    the leaderboard (validation and test columns), best first, in a box of its own that
        scrolls sideways on a narrow screen
    the mistakes: the most confident wrong predictions of the best head (or of every head),
        each as a thumbnail of the image as the network saw it, its path, true and
        predicted label and probability; a row per split that scrolls sideways
    a map of the validation features (PCA, then t-SNE), coloured by class, mistakes marked,
        with its legend as text of the page (readable at any width)
    the run's facts, then each head folded (HTML <details>): its confusion matrices (counts
        and row shares) and, for mlp, its learning curve

Every picture is inside the page (PNG or JPEG as data: URLs), so the file can be mailed or
attached to a ticket; nothing is fetched when it is opened, and it holds no script. Plots are
the head folders' own PNG files (evaluation.py draws them) and a map drawn here with matplotlib.

What every page of the project shares (check-data's check.html too: `check_page.py`) is here,
so the pages look alike and embed pictures one way: `page` (the HTML around a body, one
style), `Thumbnails` (cached images read again and inlined), `png_url`, `escape` and
`path_html` (a path that wraps at its separators).
"""

from __future__ import annotations

import base64
import html
import io
import string
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from classify.evaluation import pyplot, natural_order
from classify.splits import leak_note
from extract import console, decode_image, describe, stored_images, write_aside

REPORT = "report.html"
MISTAKES_SHOWN = 24  # thumbnails per head and split
MAP_POINTS = 1000  # validation images on the map, drawn at random beyond this (the whole page: ~5 s for 1,000 on two cores)
THUMBNAIL = 112  # pixels a side
MAP_WIDTH = 800  # the map's pixels across, as drawn and at most as shown
LEGEND_OPEN = 30  # classes in the map's legend shown open; more are folded
MISTAKES = ("best", "all")

PAGE = string.Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin: 0 0 .4em; overflow-wrap: anywhere; } h2 { margin-top: 1.2em; border-bottom: 1px solid #ddd; } h3 { margin: 1em 0 .3em; }
p { margin: .4em 0; } code { overflow-wrap: anywhere; }
table { border-collapse: collapse; } th, td { padding: .2em .8em; text-align: right; border-bottom: 1px solid #eee; }
th:first-child, td:first-child { text-align: left; } tr.best { background: #eef6ee; font-weight: 600; }
.scroll { overflow-x: auto; max-width: 100%; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.strip { display: flex; gap: 12px; overflow-x: auto; padding-bottom: 6px; }
.strip > figure { flex: none; }
figure.mistake, figure.thumb { width: ${thumbnail}px; margin: 0; font-size: 12px; overflow-wrap: anywhere; }
figure img, .missing { width: ${thumbnail}px; height: ${thumbnail}px; display: block; image-rendering: pixelated; }
.missing { background: #eee; color: #888; display: flex; align-items: safe center; justify-content: center; text-align: center; overflow: hidden; overflow-wrap: anywhere; }
.wrong { color: #b00; } .note { color: #666; } img.plot { max-width: 100%; height: auto; }
.warning { border-left: 4px solid #b00; background: #fdf0f0; padding: .5em .8em; }
img.map { display: block; width: 100%; max-width: ${map_width}px; height: auto; }
.legend { display: flex; flex-wrap: wrap; gap: .2em 1.2em; margin: .4em 0; padding: 0; list-style: none; font-size: 16px; }
.swatch { display: inline-block; width: .9em; height: .9em; border-radius: 50%; margin-right: .35em; vertical-align: -.05em; }
.swatch.ring { background: none; border: 2px solid #000; box-sizing: border-box; }
details.head { border-bottom: 1px solid #ddd; padding: .3em 0; } details.head > summary { cursor: pointer; font-size: 1.1em; }
.pair { display: flex; flex-wrap: wrap; gap: 6px; padding: 6px; width: calc(2 * ${thumbnail}px + 6px); border: 2px solid #ddd; } .pair.leak { border-color: #b00; }
.pair > p { width: 100%; margin: 0; font-size: 12px; } .pairs { display: flex; flex-wrap: wrap; gap: 12px; }
.bar { display: inline-block; height: .8em; background: #4c78a8; vertical-align: middle; } td.bars { text-align: left; }
th { white-space: nowrap; }
@media (max-width: 600px) {  /* a phone: the same page, tighter */
  body { font-size: 14px; margin-top: .8em; } h1 { font-size: 1.3em; } h2 { margin-top: 1em; font-size: 1.3em; }
  th, td { padding: .2em .5em; } .legend { font-size: 14px; }
}
</style></head>
<body>
<h1>$title</h1>
$body
</body></html>
""")


def write_report(path: Path, training, splits, folders: dict, mistakes: str = "best", seed: int = 0) -> None:
    """Write the report of `training` (a `training.Training`) on `splits` to `path`.
    `folders`: each head's folder as it is now (before the run's folder is renamed into
    place); `mistakes`: whose mistakes to show, the best head's or every head's."""
    board = training.leaderboard()
    best = board[0]["head"]
    results = {result.head: result for result in training.results}
    order = [row["head"] for row in board]
    reader = Thumbnails(splits.data_dir)
    body = [*_warnings(training, splits), _leaderboard(board), "<h2 id=\"mistakes\">Mistakes</h2>"]
    for name in (order if mistakes == "all" else [best]):
        body.append(_mistakes(results[name], reader, best=name == best))
    body += [_map(splits, results[best], seed), _overview(training, splits), '<h2 id="heads">Each head</h2>',
             '<p class="note">Click a head for its confusion matrices (counts, and shares of each true class) '
             'and learning curve.</p>']
    for row in board:
        body.append(_head(results[row["head"]], row, Path(folders[row["head"]]), training))
    title = f"train-head: {', '.join(order) if len(order) <= 3 else f'{len(order)} heads'}"
    write_page(path, title, "\n".join(body))


def page(title: str, body: str) -> str:
    """The whole HTML document around `body` (HTML, escaped already), with every page's
    style; `title` is text, escaped here."""
    return PAGE.substitute(title=escape(title), body=body, thumbnail=THUMBNAIL, map_width=MAP_WIDTH)


def write_page(path: Path, title: str, body: str) -> None:
    """`page(title, body)` written to `path` whole or not at all (a full disk leaves no half page)."""
    text = page(title, body)
    with write_aside(path, f"{str(path)!r}") as aside:
        Path(aside).write_text(text, encoding="utf-8")


def _warnings(training, splits) -> list[str]:
    """What makes the figures below say little, before them: random weights (the demo
    offline, or --weights random), images in two splits."""
    notes = []
    if splits.config.get("weights") == "random":
        notes.append('<p class="warning" id="random-weights"><b>Random weights.</b> These features come from VGG16 '
                     'with seeded random weights (<code>--weights random</code>), not ImageNet\'s: the figures below '
                     'show that the pipeline runs, not what transfer learning achieves.</p>')
    if training.leaks:
        notes.append(f'<p class="warning"><b class="wrong">Warning:</b> {escape(leak_note(training.leaks))}</p>')
    return notes


def _overview(training, splits) -> str:
    views = f" and {training.training_views} augmented views of them" if training.training_views else ""
    validation = ("the cache's validation split" if training.validation_source == "stored"
                  else "a stratified share drawn from the training split")
    facts = [
        f"Features: configuration <code>{escape(training.fingerprint)}</code> ({escape(describe(splits.config))}), "
        f"from <code>{path_html(splits.data_dir or '?')}</code>.",
        f"Trained on {training.training_images} images{views}; scored on {validation}"
        f"{' and the test split' if splits.test is not None else ''}.",
        f"Written {datetime.now().astimezone().isoformat(timespec='seconds')} into <code>{path_html(training.folder)}</code>.",
    ]
    if training.streamed:
        facts.append("The features were streamed from the cache (larger than --memory-budget).")
    return '<h2 id="run">This run</h2>\n' + "\n".join(f"<p>{fact}</p>" for fact in facts)


def _leaderboard(board: list[dict]) -> str:
    columns = [("head", "head", "{}"), ("validation_accuracy", "validation accuracy", "{:.4f}"),
               ("macro_f1", "validation macro-F1", "{:.4f}"), ("log_loss", "validation log loss", "{:.4f}"),
               ("test_accuracy", "test accuracy", "{:.4f}"), ("cv_accuracy_mean", "CV accuracy", "{:.4f}"),
               ("fit_seconds", "fit seconds", "{:.1f}")]
    columns = [column for column in columns if any(row.get(column[0]) is not None for row in board)]

    def cell(row, key, form):
        value = row.get(key)
        if value is None:
            return "n/a"
        text = form.format(value)
        if key == "cv_accuracy_mean":
            text += f" ± {row['cv_accuracy_std']:.4f}"
        if key == "head":
            return f'<a href="#head-{escape(value)}">{escape(value)}</a>'
        return text

    head = "".join(f"<th>{escape(title)}</th>" for _, title, _ in columns)
    rows = "".join(f'<tr{" class=best" if i == 0 else ""}>' + "".join(f"<td>{cell(row, key, form)}</td>" for key, _, form in columns)
                   + "</tr>" for i, row in enumerate(board))
    return f'<h2 id="leaderboard">Leaderboard</h2>\n<div class="scroll"><table><tr>{head}</tr>{rows}</table></div>\n' \
           f'<p class="note">Best first: validation accuracy, then macro-F1.</p>'


def _mistakes(result, reader: Thumbnails, best: bool) -> str:
    parts = [f"<h3>{escape(result.head)}{' (the best head)' if best else ''}</h3>"]
    for split, made in result.predictions.items():
        wrong = int((made.predicted != made.y).sum())
        shown = made.mistakes(MISTAKES_SHOWN)
        order = "the most confident first" if made.proba is not None else "(this head gives no probabilities)"
        parts.append(f'<p>{split}: {wrong} of {len(made.y)} images wrong'
                     f'{f"; {len(shown)} shown, {order}" if wrong else ""}.</p>')
        confidence = made.confidence()
        reader.read([made.paths[i] for i in shown])
        figures = []
        for i in shown:
            probability = "" if confidence[i] != confidence[i] else f" ({confidence[i]:.1%})"
            figures.append(
                f'<figure class="mistake">{reader.html(made.paths[i])}<figcaption>'
                f'<code>{path_html(made.paths[i])}</code><br>true <b>{escape(made.y[i])}</b><br>'
                f'<span class="wrong">predicted <b>{escape(made.predicted[i])}</b>{probability}</span></figcaption></figure>')
        if figures:
            parts.append(f'<div class="strip" data-head="{escape(result.head)}" data-split="{split}">{"".join(figures)}</div>')
    return "\n".join(parts)


def _map(splits, best, seed: int) -> str:
    """The validation features in two dimensions: PCA to at most 50, then t-SNE; with very
    few images, PCA alone. Coloured by true class; the best head's mistakes circled. Of
    MAP_POINTS images at most, and, streamed, no more than one read may hold (a quarter of
    --memory-budget), read at once and centred in place. The legend is the page's text, not
    the picture's, so that it stays readable where the picture is shrunk to a phone's width."""
    rows = splits.validation
    random = np.random.RandomState(seed)
    most = min(MAP_POINTS, rows.read_rows)
    positions = np.arange(len(rows)) if len(rows) <= most else np.sort(random.choice(len(rows), most, replace=False))
    X = rows.features(positions)  # a copy, even in memory: PCA may centre it in place
    made = best.predictions["validation"]
    labels, wrong = made.y[positions], (made.predicted != made.y)[positions]
    if len(X) < 3 or np.ptp(X, axis=0).max() == 0:
        return ('<h2 id="map">Map of the validation features</h2>\n'
                f'<p class="note">No map: {len(X)} validation images{", all with the same features" if len(X) >= 3 else ""}.</p>')
    reduced = PCA(n_components=min(50, len(X), X.shape[1]), copy=False, random_state=seed).fit_transform(X)
    if len(X) >= 10:
        points = TSNE(perplexity=min(30.0, (len(X) - 1) / 3), init="pca", learning_rate="auto",
                      max_iter=500, random_state=seed).fit_transform(reduced)
        how = f"PCA to {reduced.shape[1]} dimensions, then t-SNE"
    else:
        points, how = reduced[:, :2] if reduced.shape[1] >= 2 else np.column_stack([reduced[:, 0], np.zeros(len(X))]), "PCA"
    classes = list(made.classes)
    plt = pyplot()
    from matplotlib.colors import to_hex

    figure, axes = plt.subplots(figsize=(MAP_WIDTH / 100, 0.7 * MAP_WIDTH / 100))
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo")
    legend = []
    for rank, position in enumerate(natural_order(classes)):
        inside = labels == classes[position]
        colour = colours(rank if len(classes) <= 20 else rank / max(1, len(classes) - 1))
        axes.scatter(points[inside, 0], points[inside, 1], s=22, color=colour)
        legend.append(f'<li><span class="swatch" style="background:{to_hex(colour)}"></span>{escape(classes[position])}</li>')
    axes.scatter(points[wrong, 0], points[wrong, 1], s=90, facecolors="none", edgecolors="black", linewidths=1.4)
    legend.append(f'<li><span class="swatch ring"></span>{escape(best.head)} wrong</li>')
    axes.set_xticks([])
    axes.set_yticks([])
    figure.tight_layout()
    picture = io.BytesIO()
    figure.savefig(picture, format="png", dpi=100)
    plt.close(figure)
    items = "".join(legend)
    if len(classes) > LEGEND_OPEN:
        items = f'<details><summary>{len(classes)} classes</summary><ul class="legend">{items}</ul></details>'
    else:
        items = f'<ul class="legend">{items}</ul>'
    sample = f"{len(X)} of {len(rows)} images, drawn at random" if len(X) < len(rows) else f"all {len(X)} images"
    return (f'<h2 id="map">Map of the validation features</h2>\n{items}\n'
            f'<img id="map-image" class="map" alt="map of the validation features" {_size(picture.getvalue())} '
            f'src="{png_url(picture.getvalue())}">\n'
            f'<p class="note">{how} of the features ({sample}), coloured by true class; circled: the images '
            f'{escape(best.head)} got wrong. Near points have similar features; distances between far groups mean little.</p>')


def _head(result, row: dict, folder: Path, training) -> str:
    """One head folded: its name and validation accuracy shown, its pictures inside. The
    leaderboard's link points inside the fold, not at it: a browser opens a <details> to
    show the target of a link, not to show the <details> itself."""
    accuracy = row.get("validation_accuracy")
    summary = f"<b>{escape(result.head)}</b>" + ("" if accuracy is None else f": validation accuracy {accuracy:.4f}")
    parts = [f'<details class="head"><summary>{summary}</summary><div id="head-{escape(result.head)}">']
    for split in result.scores:
        parts.append(_picture(folder / f"confusion_{split}.png", f"confusion matrix of {result.head} on {split}"))
    curve = folder / "learning_curve.png"
    if curve.exists():
        note = (" Training accuracy is measured on the augmented views it trained on (one per image each epoch), "
                "validation accuracy on the images." if training.training_views else "")
        parts.append(_picture(curve, f"learning curve of {result.head}") + f'<p class="note">Learning curve.{note}</p>')
    return "\n".join(parts) + "</div></details>"


def _picture(path: Path, alt: str) -> str:
    data = path.read_bytes()
    return f'<img class="plot" alt="{escape(alt)}" {_size(data)} src="{png_url(data)}">'


def _size(png: bytes) -> str:
    """A picture's width and height attributes, so that the page is laid out before it is decoded."""
    with Image.open(io.BytesIO(png)) as image:
        return f'width="{image.width}" height="{image.height}"'


class Thumbnails:
    """Thumbnails of cached images, read again from where they came from (`data_dir`, the
    cache's data folder: a folder, shards, a URL: `extract.stored_images`) and resized to a
    square, as the network saw them. An image gone or unreadable since says so instead, in
    the grey box of the same size."""

    def __init__(self, data_dir: str | None):
        self.data_dir = data_dir
        self.images: dict[str, bytes | str] = {}

    def read(self, paths: list[str]) -> None:
        """Read the images of `paths` not read yet, together (a shard is read once for all of its)."""
        if self.data_dir:
            wanted = [path for path in dict.fromkeys(paths) if path not in self.images]
            self.images.update(stored_images(self.data_dir, wanted))

    def html(self, relative: str) -> str:
        if not self.data_dir:
            return '<div class="missing">no data folder recorded</div>'
        data = self.images.get(relative, "not read")
        if isinstance(data, str):  # gone, not a regular file or too large since extraction
            return f'<div class="missing" title="{escape(data)}">not readable now: {escape(data)}</div>'
        try:
            pixels = decode_image(data, THUMBNAIL)
        except Exception as error:  # a file broken since extraction is a note, not a failed report
            return f'<div class="missing">not readable now: {escape(type(error).__name__)}</div>'
        jpeg = io.BytesIO()
        Image.fromarray(pixels).save(jpeg, format="JPEG", quality=85)
        return f'<img alt="{escape(relative)}" src="data:image/jpeg;base64,{base64.b64encode(jpeg.getvalue()).decode()}">'


def png_url(data: bytes) -> str:
    """A PNG file's bytes as a data: URL, for an <img> that needs nothing fetched."""
    return "data:image/png;base64," + base64.b64encode(data).decode()


def escape(value) -> str:
    """`value` as text safe in HTML, in an element or a quoted attribute: its characters
    escaped (<, &, quotes), and what would not show as itself (control and format characters
    such as a bidi override, bytes that were not UTF-8) written as Python escapes, as the
    console writes them (`console.printable`): a path shown is the path stored, and the page
    can be written as UTF-8 whatever a name holds."""
    return html.escape(console.printable(str(value)), quote=True)



def path_html(path) -> str:
    """A path as HTML that wraps after its separators, not inside a file name (`escape`d)."""
    return "/<wbr>".join(escape(part) for part in str(path).split("/"))
