"""check-data's page: one self-contained HTML file (`check.html`) of what `check.Check` found,
in report.html's style (`report.page`, `report.Thumbnails`):

    overview       the configuration, what was checked and how, notes, the counts of each kind
    balance        images per class and split, with a bar per class
    label-issues   the most suspicious labels first, each image with its given and suggested label
    duplicates     pairs side by side, leaks first and marked (the Check's order)
    outliers       the images farthest from their nearest neighbours first

Each section shows at most SHOWN thumbnails, whatever the Check holds: the CSV files beside
the page hold every row. Thumbnails are read again from the cache's data folder, all of the
page's in one call (a shard is read once); an image that cannot be read shows the grey box.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from classify.evaluation import natural_order
from classify.findings import Check
from classify.report import Thumbnails, escape, write_page
from extract import describe

SHOWN = 48  # thumbnails per section at most (a duplicate pair shows two)
CLASSES_SHOWN = 200  # rows of the balance table at most
BAR = 240  # pixels of the largest class's bar
SPLITS = ("train", "validation", "test")  # the balance table's first columns, in this order
COUNTS = (("label_issues", "label issues"), ("exact", "exact duplicate pairs"), ("near", "near-duplicate pairs"),
          ("leaks", "pairs across train and validation or test (leaks)"),
          ("outliers", "outliers (mean distance beyond the far fence)"))


def write_check_page(path: Path, check: Check) -> None:
    """Write the page of `check` to `path`, whole or not at all."""
    issues, pairs, outliers = check.label_issues[:SHOWN], check.duplicates[:SHOWN // 2], check.outliers[:SHOWN]
    thumbnails = Thumbnails(check.data_dir)
    thumbnails.read([row["path"] for row in issues] + [row[key] for row in pairs for key in ("path_a", "path_b")]
                    + [row["path"] for row in outliers])
    body = [_overview(check, _unread(thumbnails)), _balance(check.classes), _label_issues(check, issues, thumbnails),
            _duplicates(check, pairs, thumbnails), _outliers(check, outliers, thumbnails)]
    write_page(path, f"check-data: {check.images} images", "\n".join(body))


def _overview(check: Check, unread: str) -> str:
    reduced = f" Feature maps reduced to vectors: {check.reduced}." if check.reduced else ""
    facts = [
        f"Features: configuration <code>{escape(check.fingerprint)}</code> ({escape(describe(check.config))}), "
        f"from <code>{escape(check.data_dir or '?')}</code>.",
        f"{check.images} images checked, each against its {check.k} nearest neighbours (cosine similarity of the "
        f"features; {escape(check.index)}); near duplicates at similarity {check.near_threshold:g} or more.{escape(reduced)}",
        f"Written {datetime.now().astimezone().isoformat(timespec='seconds')} into <code>{escape(check.out)}</code>, "
        "beside the CSV files that hold every row.",
    ]
    facts += [f'<span class="note">{escape(note)}</span>' for note in [*check.notes, unread] if note]
    rows = "".join(f"<tr><td>{escape(title)}</td><td>{check.counts.get(key, 'n/a')}</td></tr>" for key, title in COUNTS)
    links = " · ".join(f'<a href="#{anchor}">{title}</a>' for anchor, title in (
        ("balance", "class balance"), ("label-issues", "label issues"), ("duplicates", "duplicates"),
        ("outliers", "outliers")))
    return ('<h2 id="overview">Overview</h2>\n' + "\n".join(f"<p>{fact}</p>" for fact in facts)
            + f'\n<table id="counts"><tr><th>found</th><th>count</th></tr>{rows}</table>\n<p>{links}</p>')


def _balance(classes: dict[str, dict[str, int]]) -> str:
    """A table of images per class (rows) and split (columns), with a total and a bar per class."""
    splits = [split for split in SPLITS if split in classes] + [split for split in classes if split not in SPLITS]
    totals: dict[str, int] = {}
    for counts in classes.values():
        for label, images in counts.items():
            totals[label] = totals.get(label, 0) + images
    if not totals:
        return '<h2 id="balance">Class balance</h2>\n<p class="note">No images.</p>'
    labels = list(totals)
    ordered = [labels[i] for i in natural_order(labels)]
    largest = max(totals.values())
    head = "".join(f"<th>{escape(split)}</th>" for split in ["class", *splits, "images"]) + "<th></th>"
    rows = "".join(
        f"<tr><td>{escape(label) if label else '<i>(unlabeled)</i>'}</td>"
        + "".join(f"<td>{classes[split].get(label, 0)}</td>" for split in splits)
        + f'<td>{totals[label]}</td><td class="bars"><span class="bar" style="width:{round(BAR * totals[label] / largest)}px">'
          "</span></td></tr>"
        for label in ordered[:CLASSES_SHOWN])
    smallest = min(totals, key=totals.get)
    more = (f'<p class="note">The first {CLASSES_SHOWN} of {len(ordered)} classes; the smallest, '
            f"{escape(smallest)}, holds {totals[smallest]} images, the largest {largest}.</p>"
            if len(ordered) > CLASSES_SHOWN else "")
    return f'<h2 id="balance">Class balance</h2>\n<table><tr>{head}</tr>{rows}</table>\n{more}'


def _label_issues(check: Check, rows: list[dict], thumbnails: Thumbnails) -> str:
    title = '<h2 id="label-issues">Label issues</h2>\n'
    if check.label_head is None:  # the notes say why (check_data writes one)
        return title + "\n".join(f'<p class="note">{escape(note)}</p>' for note in check.notes or ["Labels not checked."])
    found = check.counts.get("label_issues", len(check.label_issues))
    how = (f"out-of-fold probabilities of {escape(check.label_head)} ({check.folds} folds), judged by cleanlab's "
           "confident learning")
    if not rows:
        return title + f"<p>No label looks wrong ({how}).</p>"
    figures = [_figure(thumbnails, row["path"], row["split"],
                       f'given <b>{escape(row["given_label"])}</b><br>'
                       f'<span class="wrong">suggested <b>{escape(row["suggested_label"])}</b></span><br>'
                       f'label quality {float(row["score"]):.3f}') for row in rows]
    return (title + f"<p>{found} labels look wrong ({how}); {_shown(rows, found)}, the most suspicious "
            f'(lowest label quality) first.</p>\n<div class="grid">{"".join(figures)}</div>')


def _duplicates(check: Check, pairs: list[dict], thumbnails: Thumbnails) -> str:
    title = '<h2 id="duplicates">Duplicates</h2>\n'
    found = check.counts.get("exact", 0) + check.counts.get("near", 0)
    if not pairs:
        return title + f"<p>No exact or near duplicates (similarity {check.near_threshold:g} or more).</p>"
    shown = []
    for row in pairs:
        leak = str(row["leak"]).lower() == "true"  # a bool, or the CSV's word for it
        what = f'{escape(row["kind"])}, similarity {float(row["similarity"]):.4f}'
        mark = '<b class="wrong">leak</b>: ' if leak else ""
        shown.append(f'<div class="pair{" leak" if leak else ""}" data-kind="{escape(row["kind"])}">'
                     f"<p>{mark}{what}</p>"
                     + _figure(thumbnails, row["path_a"], row["split_a"]) + _figure(thumbnails, row["path_b"], row["split_b"])
                     + "</div>")
    leaks = check.counts.get("leaks", 0)
    return (title + f"<p>{found} pairs ({leaks} of them leaks: one image in train, the other in validation or "
            f"test); {_shown(pairs, found)}, leaks first.</p>\n"
            f'<div class="pairs">{"".join(shown)}</div>')


def _outliers(check: Check, rows: list[dict], thumbnails: Thumbnails) -> str:
    title = '<h2 id="outliers">Outliers</h2>\n'
    if not rows:
        return title + '<p class="note">No outliers ranked.</p>'
    found = check.counts.get("outliers", len(check.outliers))
    figures = [_figure(thumbnails, row["path"], row["split"],
                       f'{escape(row["label"]) if row["label"] else "<i>(unlabeled)</i>"}<br>'
                       f'mean distance {float(row["mean_distance"]):.4f}') for row in rows]
    return (title + f"<p>Each image's mean cosine distance to its {check.k} nearest neighbours: {found} beyond the far "
            f"fence of them all (Q3 + 3 IQR) count as outliers. The {len(rows)} farthest shown, the farthest first.</p>\n"
            f'<div class="grid">{"".join(figures)}</div>')


def _unread(thumbnails: Thumbnails) -> str:
    """A line on the images that could not be read again, with the reason when they share one
    (a data folder gone since extraction: its grey boxes are too small to say so)."""
    reasons = [data for data in thumbnails.images.values() if isinstance(data, str)]
    if not reasons:
        return ""
    why = f": {reasons[0]}" if len(set(reasons)) == 1 else ""
    return f"{len(reasons)} of {len(thumbnails.images)} images shown could not be read now{why}"


def _figure(thumbnails: Thumbnails, path: str, split: str, caption: str = "") -> str:
    """An image's thumbnail over its path and split, then `caption` (HTML)."""
    return (f'<figure class="thumb">{thumbnails.html(path)}<figcaption><code>{escape(path)}</code> '
            f'({escape(split)}){"<br>" + caption if caption else ""}</figcaption></figure>')


def _shown(rows: list, found: int) -> str:
    return f"all {len(rows)} shown" if len(rows) >= found else f"the first {len(rows)} shown"
