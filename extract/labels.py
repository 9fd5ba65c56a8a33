"""A labels CSV (`--labels`): which images of a data folder count, with their labels and,
optionally, their splits, as Kaggle-style data sets come.

    path,label,split
    images/0001.jpg,cat,train
    images/0002.jpg,dog,validation

A header row names the columns (any order, case and surrounding spaces ignored; other
columns are ignored): `path` (relative to DATA_DIR, "/"-separated) and `label` are
required, `split` optional (train, validation or val, test; an empty cell, or no column,
means drawn by path hash as in the `classes` layout). UTF-8 with or without a BOM, LF or
CRLF line endings, quoted fields as the `csv` module reads them; spaces around a field are
dropped; blank lines are skipped. Anything else is refused in one line naming the file and
the line, before any image is read.

A NUL character anywhere is refused too: the cache stores paths and labels as HDF5
variable-length UTF-8 strings, which end at a NUL, so h5py would refuse to write one, and
only after every image had been computed. NUL is the one character they cannot hold
(checked against every code point); text that is not UTF-8, the other thing they refuse,
does not come out of the strict decoding here. (Folder and file names cannot hold a NUL,
and `layout` makes a name that is not UTF-8 a failure row, so class names from folders
need no such check.) The whole file is checked, not only its path and label cells, so
that every Python reads it alike (3.10's `csv` refuses a NUL itself, 3.11's keeps it).
"""

from __future__ import annotations

import codecs
import csv
import io
from pathlib import Path

from extract.errors import UsageError
from extract.files import read_regular
from extract.layout import SPLIT_FOLDERS, Labelled

COLUMNS = ("path", "label", "split")
MAX_BYTES = 2**30  # a labels file of 1 GiB would name some 20 million images


def read_labels(path) -> dict[str, Labelled]:
    """The images a labels CSV names, by path relative to the data folder, in file order."""
    name = str(path)
    text = _decode(name, read_regular(name, MAX_BYTES, f"--labels {name!r}"))
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)
    labels: dict[str, Labelled] = {}
    header: dict[str, int] | None = None
    width = 0
    line = 0  # the last line of the record before this one
    try:
        for row in rows:
            start, line = line + 1, rows.line_num
            if not row:  # a blank line
                continue
            fields = [field.strip() for field in row]
            if header is None:
                header, width = _header(name, start, fields), len(fields)
                continue
            if len(fields) != width:
                raise _error(name, start, f"expected {width} fields as in the header; found {len(fields)}")
            relative = _relative(name, start, fields[header["path"]])
            label = fields[header["label"]]
            if not label:
                raise _error(name, start, f"empty label for {relative!r}")
            split = fields[header["split"]].lower() if "split" in header else ""
            if split and split not in SPLIT_FOLDERS:
                raise _error(name, start, f"unknown split {fields[header['split']]!r} for {relative!r}; "
                                          f"expected one of {', '.join(SPLIT_FOLDERS)} (or empty: drawn by path hash)")
            entry = Labelled(label, SPLIT_FOLDERS[split] if split else None, start)
            earlier = labels.setdefault(relative, entry)
            if earlier[:2] != entry[:2]:
                raise _error(name, start, f"{relative!r} again, with {_shown(entry)} (line {earlier.line} gave "
                                          f"{_shown(earlier)}); keep one row per image")
    except csv.Error as error:
        raise _error(name, line + 1, f"not readable as CSV ({error})") from None  # the record's first line
    if header is None:
        raise UsageError(
            f"{name}: empty; expected a header row naming the columns path and label (and optionally split).")
    if not labels:
        raise UsageError(f"{name}: a header row but no rows; expected one row per image (path,label).")
    return labels


def _decode(name: str, data: bytes) -> str:
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise _error(name, line, f"not UTF-8 (byte 0x{data[error.start]:02x}); save the file as UTF-8") from None
    nul = text.find("\x00")
    if nul >= 0:
        raise _error(name, text.count("\n", 0, nul) + 1,
                     "a NUL character (byte 0x00), which the cache cannot store in a path or label; remove it "
                     "(a file saved as UTF-16 is full of them: save it as UTF-8)")
    return text


def _header(name: str, line: int, fields: list[str]) -> dict[str, int]:
    columns = [field.lower() for field in fields]
    wanted = {column: columns.index(column) for column in COLUMNS if column in columns}
    repeated = sorted({column for column in columns if column in COLUMNS and columns.count(column) > 1})
    if "path" not in wanted or "label" not in wanted or repeated:
        found = ", ".join(fields)[:200]
        problem = f"the column {repeated[0]} twice" if repeated else f"{found!r}"
        raise _error(name, line, f"expected a comma-separated header row naming the columns path and label "
                                 f"(and optionally split); found {problem}")
    return wanted


def _relative(name: str, line: int, path: str) -> str:
    """A path of the file as the data folder's listing spells it: "/"-separated, no "." parts."""
    if not path:
        raise _error(name, line, "empty path")
    if path.startswith("/") or Path(path).is_absolute():
        raise _error(name, line, f"absolute path {path!r}; expected a path relative to DATA_DIR")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _error(name, line, f"path {path!r} leaves DATA_DIR (..); expected a path inside it")
    if not parts:
        raise _error(name, line, f"path {path!r} names DATA_DIR itself, not an image")
    return "/".join(parts)


def _shown(entry: Labelled) -> str:
    return f"label {entry.label!r}" + (f", split {entry.split}" if entry.split else "")


def _error(name: str, line: int, what: str) -> UsageError:
    return UsageError(f"{name} line {line}: {what}.")
