"""Parquet shards: one image a row, in a column `image`; the class in an optional `label`,
the split in an optional `split`.

`image` is Hugging Face's `Image()` feature (a struct of `bytes` and `path`) or plain binary.
`label` is a class name (string) or a class number (integer) whose names come from the
`ClassLabel` that the `datasets` library writes into the schema's metadata (key
`huggingface`: `{"info": {"features": {"label": {"names": [...], "_type": "ClassLabel"}}}}`).

Parquet keeps its schema in a footer at the end of the file, so `file` must be seekable: a
local file, or an fsspec file (which reads ranges). The rows are read a batch at a time
(`BATCH_ROWS`), never the whole file; a row's number in the file is its sample's key.

pyarrow is an optional dependency (`pip install 'bottleneck-features[parquet]'`), imported only
here, when a Parquet file is read.
"""

from __future__ import annotations

import json
from typing import BinaryIO, Iterator, NamedTuple

from extract.errors import UsageError
from extract.layout import SPLIT_FOLDERS
from extract.sources import Sample
from extract.sources.remote import clipped

# Memory is bounded by one batch of rows (pyarrow decodes BATCH_ROWS rows of the columns read,
# then this module hands them out one by one) and one page of the file: pages are read through a
# buffer of READ_BUFFER_BYTES, not a row group's whole column at once (a page larger than the
# buffer is read whole; the writer chose its size: `datasets` writes pages of 256 KB to 1 MB,
# pyarrow's defaults up to 1024 rows a page). 64 rows of photos of a few hundred KB are tens of
# MB, and pyarrow's cost per batch (about 30 microseconds) is then paid once for 64 rows: about
# 250,000 rows/s on one core (docs/faults.md, "Parquet shards"). An image over `limit` is never
# copied out of the batch.
BATCH_ROWS = 64
READ_BUFFER_BYTES = 1 << 20
IMAGE, LABEL, SPLIT = "image", "label", "split"
NEEDS_PYARROW = "Reading Parquet needs pyarrow: pip install 'bottleneck-features[parquet]'."


class Columns(NamedTuple):
    """What a Parquet file holds that this module reads."""

    image_in_struct: bool  # Hugging Face's {bytes, path}; False: plain binary
    label: bool  # a `label` column is there
    split: bool  # a `split` column is there
    names: list[str] | None  # the ClassLabel names of an integer `label`; None: none given


def check_parquet(file: BinaryIO, name: str) -> None:
    """Raise a one-line `UsageError` unless `file` is a Parquet file with an `image` column
    this module can read (and `label`, `split` columns of types it reads). Reads only the
    footer; an error of `file`'s own reads (a connection lost) passes as it is."""
    _open(file, name)


def parquet_samples(file: BinaryIO, name: str, limit: int) -> Iterator[Sample]:
    """The rows of the Parquet file `file` (named `name` in messages), in order, as samples
    keyed by row number ("0", "1", ...). A row without image bytes, or with more than `limit`,
    is an error sample. A file that is not Parquet, or that cannot be read from some row on
    (damaged, cut short, a read failing), ends with one error sample keyed "" after the rows
    read before."""
    try:
        parquet, columns = _open(file, name)
    except UsageError as error:
        yield Sample("", None, error=str(error))
        return
    except Exception as error:  # noqa: BLE001 - the file's own reads failing (a connection lost)
        yield _unreadable(0, error)
        return
    read = [column for column, present in ((IMAGE, True), (LABEL, columns.label), (SPLIT, columns.split))
            if present]
    batches = parquet.iter_batches(batch_size=BATCH_ROWS, columns=read, use_threads=False)
    row = 0
    while True:
        try:
            batch = next(batches, None)
        except Exception as error:  # noqa: BLE001 - only pyarrow and the file's own reads run here
            yield _unreadable(row, error)
            return
        if batch is None:
            return
        yield from _batch_samples(batch, columns, row, limit)
        row += batch.num_rows


def _open(file: BinaryIO, name: str):
    """The `pyarrow.parquet.ParquetFile` of `file` and its `Columns`, or a one-line UsageError."""
    pa, pq = _pyarrow()
    try:
        parquet = pq.ParquetFile(file, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError) as error:
        # pyarrow reports a footer it cannot parse as ArrowInvalid or a plain OSError ("Couldn't
        # deserialize thrift"); the file object's own errors come as raised (ConnectionResetError ...).
        if not isinstance(error, pa.ArrowException) and type(error) is not OSError:
            raise
        raise UsageError(f"{name}: not a Parquet file ({_reason(error)})") from None
    except UnicodeDecodeError as error:  # pyarrow decodes the footer's column names as it opens
        raise UsageError(f"{name}: not a Parquet file (a column name is not UTF-8: {_reason(error)})") from None
    if IMAGE not in schema.names:
        raise UsageError(
            f"{name}: no column 'image'; found columns {_listed(schema.names)} (expected the "
            f"image in a column named image, as Hugging Face datasets writes it)"
        )
    image_in_struct = _image_in_struct(pa, schema.field(IMAGE).type, name)
    label = _optional_column(pa, schema, LABEL, name, integer_allowed=True)
    split = _optional_column(pa, schema, SPLIT, name, integer_allowed=False)
    names = _class_names(schema.metadata) if label and pa.types.is_integer(schema.field(LABEL).type) else None
    return parquet, Columns(image_in_struct, label, split, names)


def _pyarrow():
    """pyarrow and pyarrow.parquet, or the UsageError that says how to install them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UsageError(NEEDS_PYARROW) from None
    return pyarrow, pyarrow.parquet


def _is_bytes(pa, kind) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)


def _is_text(pa, kind) -> bool:
    """A string column, or a dictionary-encoded one (as pandas' categoricals are written)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _image_in_struct(pa, kind, name: str) -> bool:
    """True for Hugging Face's struct of bytes and path, False for plain binary; anything else
    is a UsageError."""
    if _is_bytes(pa, kind):
        return False
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and _is_bytes(pa, kind.field("bytes").type):
        return True
    raise UsageError(
        f"{name}: column 'image' is of type {kind}; expected the image's bytes (binary) or Hugging Face's "
        f"Image() struct of bytes and path"
    )


def _optional_column(pa, schema, column: str, name: str, integer_allowed: bool) -> bool:
    """Whether `column` is there; a UsageError when it is of a type this module cannot read."""
    if column not in schema.names:
        return False
    kind = schema.field(column).type
    if _is_text(pa, kind) or (integer_allowed and pa.types.is_integer(kind)):
        return True
    expected = "a class name (string) or a class number (integer)" if integer_allowed else "text (train, validation, test)"
    raise UsageError(f"{name}: column {column!r} is of type {kind}; expected {expected}")


def _class_names(metadata: dict | None) -> list[str] | None:
    """The names of the `label` column's ClassLabel in the Hugging Face metadata, or None when
    there are none (no metadata, another feature type, metadata that is not valid JSON)."""
    try:
        feature = json.loads(metadata[b"huggingface"])["info"]["features"][LABEL]
    except (TypeError, KeyError, ValueError):
        return None
    names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    return [str(each) for each in names] if isinstance(names, list) else None


def _batch_samples(batch, columns: Columns, first_row: int, limit: int) -> Iterator[Sample]:
    """The samples of one record batch whose first row is the file's row `first_row`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    images = batch.column(IMAGE)
    paths = None
    if columns.image_in_struct:
        paths = _texts(pa, images.field("path")) if images.type.get_field_index("path") >= 0 else None
        images = pc.struct_field(images, "bytes")  # null where the struct itself is null
    if pa.types.is_binary_view(images.type):  # binary_length has no kernel for views
        images = images.cast(pa.large_binary())
    sizes = pc.binary_length(images).to_pylist()
    labels = _labels(_texts(pa, batch.column(LABEL)), columns.names) if columns.label else [None] * len(sizes)
    splits = _splits(_texts(pa, batch.column(SPLIT))) if columns.split else [None] * len(sizes)
    for index, size in enumerate(sizes):
        key = str(first_row + index)
        if size is None:
            path = paths[index] if paths else None
            where = f" (only a path, {clipped(repr(path))}, which is not read)" if path else ""
            yield Sample(key, None, labels[index], splits[index], error=f"no image bytes in row {key}{where}")
        elif size > limit:
            yield Sample(key, None, labels[index], splits[index],
                         error=f"image too large: {size} bytes in row {key} (at most {limit} are read for one image)")
        else:
            yield Sample(key, images[index].as_py(), labels[index], splits[index])


def _texts(pa, column) -> list:
    """A column's values; a string column's decoded here, one by one, with bytes that are not
    UTF-8 kept as surrogate escapes (pyarrow does not check UTF-8 on read, and its own
    `to_pylist` fails the whole batch on one such value). Such a label is refused where
    samples are placed (`layout.place_sample`), as a tar's is; scoring never looks at it."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_integer(column.type):
        return column.to_pylist()
    return [value if value is None else value.decode("utf-8", "surrogateescape")
            for value in column.cast(pa.large_binary()).to_pylist()]


def _labels(values: list, names: list[str] | None) -> list[str | None]:
    """Class names from a label column's values: a string as it is (None when empty); an
    integer by its ClassLabel name (None out of range), or as text when the file names no
    classes; a negative integer None (Hugging Face's -1 for "no label")."""
    return [_label(value, names) for value in values]


def _label(value, names: list[str] | None) -> str | None:
    if value is None or isinstance(value, str):
        return value or None  # an empty name is no class
    if value < 0 or (names is not None and value >= len(names)):
        return None
    return str(value) if names is None else names[value]


def _splits(values: list) -> list[str | None]:
    """The project's split names (`layout.SPLIT_FOLDERS`) from a split column's values, in any
    case and spacing; None for null or empty (drawn by the layout); any other text as it is,
    which `layout.place_sample` refuses (a "dev" set drawn into train would leak)."""
    return [_split(value) for value in values]


def _split(value: str | None) -> str | None:
    name = (value or "").strip().lower()
    return SPLIT_FOLDERS.get(name, value) if name else None


def _listed(columns: list[str], shown: int = 20) -> str:
    """Column names for a one-line message: the first `shown`, each on the line (repr when it
    holds a line break or other unprintable character)."""
    names = [column if column.isprintable() else repr(column) for column in columns[:shown]]
    more = f" and {len(columns) - shown} more" if len(columns) > shown else ""
    return (", ".join(names) or "none") + more


def _unreadable(row: int, error: Exception) -> Sample:
    """The error sample that stands for the rest of a file that cannot be read from `row` on."""
    return Sample("", None, error=f"damaged Parquet after {row} rows: {_reason(error)}")


def _reason(error: BaseException) -> str:
    """An exception as one line: its message, or its type's name when it has none."""
    text = " ".join(str(error).split())
    return text or type(error).__name__
