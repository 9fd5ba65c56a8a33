"""Parquet shards (extract/sources/parquet.py): files written here by pyarrow, as Hugging Face
`datasets` writes them and plainer ones, read row by row in batches; every refusal and error."""

import builtins
import io
import json
import os

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from extract.errors import UsageError  # noqa: E402
from extract.sources import Sample, samples  # noqa: E402
from extract.sources import parquet as parquet_source  # noqa: E402
from extract.sources.parquet import check_parquet, parquet_samples  # noqa: E402

LIMIT = 1000
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def hf_metadata(names=None) -> dict:
    """The schema metadata `datasets` writes (ArrowWriter._build_metadata): the DatasetInfo
    as JSON under "huggingface", its features as Features.to_dict() gives them."""
    features = {"image": {"_type": "Image"}}
    if names is not None:
        features["label"] = {"names": names, "_type": "ClassLabel"}
    return {"huggingface": json.dumps({"info": {"features": features}})}


def parquet_bytes(columns: dict, metadata=None, **write) -> bytes:
    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **write)
    return buffer.getvalue()


def read(data: bytes, limit: int = LIMIT) -> list[Sample]:
    return list(parquet_samples(io.BytesIO(data), "x.parquet", limit))


def refusal(data: bytes) -> str:
    with pytest.raises(UsageError) as refused:
        check_parquet(io.BytesIO(data), "x.parquet")
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_hugging_face_layout_struct_image_and_class_label_names():
    images = pa.array([{"bytes": b"cat-0", "path": "a.jpg"}, {"bytes": b"dog-1", "path": None}], HF_IMAGE)
    data = parquet_bytes({"image": images, "label": pa.array([0, 1], pa.int64())}, hf_metadata(["cat", "dog"]))
    check_parquet(io.BytesIO(data), "x.parquet")
    assert read(data) == [Sample("0", b"cat-0", "cat"), Sample("1", b"dog-1", "dog")]


def test_samples_reaches_the_parquet_reader():
    data = parquet_bytes({"image": [b"a"]})
    assert list(samples("parquet", io.BytesIO(data), "x.parquet", LIMIT)) == [Sample("0", b"a")]


@pytest.mark.parametrize("kind", [pa.binary(), pa.large_binary(), pa.binary_view()])
def test_plain_binary_image_and_string_labels(kind):
    data = parquet_bytes({"image": pa.array([b"a", b"bb", b"c"], kind), "label": ["cat", None, ""]})
    assert read(data) == [Sample("0", b"a", "cat"), Sample("1", b"bb", None), Sample("2", b"c", None)]


def test_dictionary_encoded_labels_as_pandas_categoricals_are_written():
    labels = pa.array(["cat", "dog", "cat"]).dictionary_encode()
    assert [s.label for s in read(parquet_bytes({"image": [b"a"] * 3, "label": labels}))] == ["cat", "dog", "cat"]


def test_integer_labels_without_names_are_their_text_and_negatives_none():
    data = parquet_bytes({"image": [b"a"] * 4, "label": pa.array([3, 0, -1, None], pa.int32())})
    assert [s.label for s in read(data)] == ["3", "0", None, None]


def test_integer_labels_out_of_the_class_names_are_none():
    data = parquet_bytes({"image": [b"a"] * 4, "label": [1, 2, -1, 0]}, hf_metadata(["cat", "dog"]))
    assert [s.label for s in read(data)] == ["dog", None, None, "cat"]


@pytest.mark.parametrize("metadata", [
    {"huggingface": "{not json"},
    {"huggingface": json.dumps({"info": {"features": {"label": {"dtype": "int64", "_type": "Value"}}}})},
    {"huggingface": json.dumps({"info": {}})},
])
def test_metadata_without_class_names_leaves_integers_as_text(metadata):
    assert [s.label for s in read(parquet_bytes({"image": [b"a"], "label": [1]}, metadata))] == ["1"]


def test_split_column_names_the_projects_splits():
    splits = ["train", "Validation", "val", " TEST ", "", None]  # "holdout": below
    data = parquet_bytes({"image": [b"a"] * 6, "split": splits})
    assert [s.split for s in read(data)] == ["train", "validation", "validation", "test", None, None]


def test_split_column_naming_no_split_is_the_samples_failure():
    # "holdout" was drawn by the path's hash: a held-out set partly trained on (a labels CSV refuses it);
    # the sample keeps its bytes (score-images reads it), and is refused where it is placed
    from extract.layout import place_sample
    from extract.sources import Shard

    [sample] = read(parquet_bytes({"image": [b"a"], "label": ["cat"], "split": ["holdout"]}))
    assert (sample.data, sample.split) == (b"a", "holdout")
    refused = place_sample(Shard("x.parquet", "parquet", 1, 1, None, True, 20.0), sample)
    assert refused.startswith("unknown split 'holdout'; expected one of train")


def test_rows_are_read_in_batches_in_order(monkeypatch):
    """100 rows in row groups of 10, read 7 rows at a time: every row, in order, and no batch
    larger than asked."""
    batches = []
    whole = parquet_source._batch_samples

    def recorded(batch, *args):
        batches.append(batch.num_rows)
        return whole(batch, *args)

    monkeypatch.setattr(parquet_source, "BATCH_ROWS", 7)
    monkeypatch.setattr(parquet_source, "_batch_samples", recorded)
    data = parquet_bytes({"image": [b"%d" % n for n in range(100)], "label": [str(n % 3) for n in range(100)]},
                         row_group_size=10)
    assert pq.ParquetFile(io.BytesIO(data)).metadata.num_row_groups == 10
    got = read(data)
    assert [(s.key, s.data, s.label) for s in got] == [(str(n), b"%d" % n, str(n % 3)) for n in range(100)]
    assert sum(batches) == 100 and max(batches) <= 7


def test_an_fsspec_file_reading_ranges():
    """What a remote shard is: fsspec's buffered file, fetching byte ranges."""
    fsspec_spec = pytest.importorskip("fsspec.spec")
    data = parquet_bytes({"image": [b"%d" % n for n in range(300)]}, row_group_size=50)

    class Remote(fsspec_spec.AbstractBufferedFile):
        def _fetch_range(self, start, end):
            return data[start:end]

    file = Remote(fsspec_spec.AbstractFileSystem(), "x.parquet", mode="rb", size=len(data), block_size=512)
    assert [s.data for s in parquet_samples(file, "x.parquet", LIMIT)] == [b"%d" % n for n in range(300)]


class RecordedReads(io.BytesIO):
    """A file that records the size of each read asked of it."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.reads = []

    def read(self, size=-1):
        self.reads.append(len(self.getbuffer()) if size is None or size < 0 else size)
        return super().read(size)


def test_a_row_group_is_read_a_page_at_a_time_not_whole():
    """A row group of 6 MB in pages of about 100 KB: no read asks for more than the buffer."""
    data = parquet_bytes({"image": [os.urandom(100_000) for _ in range(60)]},
                         write_batch_size=4, data_page_size=100_000, use_dictionary=False)
    assert pq.ParquetFile(io.BytesIO(data)).metadata.num_row_groups == 1
    file = RecordedReads(data)
    assert len(list(parquet_samples(file, "x.parquet", 10**6))) == 60
    assert max(file.reads) <= parquet_source.READ_BUFFER_BYTES


def test_null_image_and_null_bytes_are_error_samples():
    images = pa.array([None, {"bytes": None, "path": "b.jpg"}, {"bytes": None, "path": None}, {"bytes": b"d", "path": None}],
                      HF_IMAGE)
    got = read(parquet_bytes({"image": images, "label": ["a", "b", "c", "d"]}))
    assert [(s.key, s.data, s.label, s.error) for s in got] == [
        ("0", None, "a", "no image bytes in row 0"),
        ("1", None, "b", "no image bytes in row 1 (only a path, 'b.jpg', which is not read)"),
        ("2", None, "c", "no image bytes in row 2"),
        ("3", b"d", "d", None),
    ]


def test_null_plain_binary_is_an_error_sample():
    assert read(parquet_bytes({"image": [b"a", None]}))[1] == Sample("1", None, error="no image bytes in row 1")


def test_an_image_over_the_limit_is_an_error_sample_naming_size_and_limit():
    got = read(parquet_bytes({"image": [b"x" * 10, b"x" * 11, b"y"]}), limit=10)
    assert got == [
        Sample("0", b"x" * 10),
        Sample("1", None, error="image too large: 11 bytes in row 1 (at most 10 are read for one image)"),
        Sample("2", b"y"),
    ]


def row_group_start(data: bytes, group: int) -> int:
    """Where the image column of row group `group` begins in a Parquet file's bytes."""
    chunk = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(group).column(0)
    return min(offset for offset in (chunk.dictionary_page_offset, chunk.data_page_offset) if offset is not None)


def damaged_after_some_rows() -> tuple[bytes, int]:
    """A file of 100 rows in row groups of 10 whose bytes are garbled from the middle of its
    sixth row group on (its footer intact); and the rows read before: the first five groups."""
    data = parquet_bytes({"image": [os.urandom(50) + b"%d" % n for n in range(100)]}, row_group_size=10,
                         compression="snappy", use_dictionary=False)
    start = row_group_start(data, 5)
    garbled = bytearray(data)
    garbled[start:start + 200] = b"\xff" * 200
    return bytes(garbled), 50


def test_a_damaged_file_keeps_the_rows_before_then_one_error_sample(monkeypatch):
    monkeypatch.setattr(parquet_source, "BATCH_ROWS", 10)
    data, good = damaged_after_some_rows()
    got = read(data)
    assert [s.key for s in got[:-1]] == [str(n) for n in range(good)]
    assert all(s.error is None for s in got[:-1])
    last = got[-1]
    assert last.key == "" and last.data is None and last.error.startswith(f"damaged Parquet after {good} rows: ")
    assert "\n" not in last.error


class FailingAfter(io.BytesIO):
    """A file whose reads fail past `offset`, as a connection lost for good."""

    def __init__(self, data: bytes, offset: int, error: BaseException):
        super().__init__(data)
        self.offset, self.error = offset, error

    def read(self, size=-1):
        if self.tell() >= self.offset:
            raise self.error
        return super().read(size)


def two_row_groups() -> tuple[bytes, int]:
    data = parquet_bytes({"image": [b"%04d" % n for n in range(20)]}, row_group_size=10)
    return data, row_group_start(data, 1)


def test_a_read_error_of_the_file_itself_is_treated_as_damage(monkeypatch):
    monkeypatch.setattr(parquet_source, "BATCH_ROWS", 10)
    data, second = two_row_groups()
    got = list(parquet_samples(FailingAfter(data, second, ConnectionResetError("connection reset")), "x", LIMIT))
    assert [s.key for s in got] == [str(n) for n in range(10)] + [""]
    assert got[-1].error == "damaged Parquet after 10 rows: connection reset"


def test_ctrl_c_while_reading_passes(monkeypatch):
    monkeypatch.setattr(parquet_source, "BATCH_ROWS", 10)
    data, second = two_row_groups()
    rows = parquet_samples(FailingAfter(data, second, KeyboardInterrupt()), "x", LIMIT)
    assert len([next(rows) for _ in range(10)]) == 10
    with pytest.raises(KeyboardInterrupt):
        next(rows)


def test_a_truncated_file_is_not_parquet():
    data = parquet_bytes({"image": [b"a"] * 100}, row_group_size=10)
    cut = data[: len(data) // 2]
    assert refusal(cut).startswith("x.parquet: not a Parquet file (Parquet magic bytes not found")
    got = read(cut)
    assert len(got) == 1 and got[0].key == "" and got[0].error.startswith("x.parquet: not a Parquet file (")


GARBLED_FOOTER = b"PAR1" + b"\xff" * 50 + (50).to_bytes(4, "little") + b"PAR1"  # pyarrow: a plain OSError


@pytest.mark.parametrize("data", [b"a,b,label\n1,2,cat\n", b"", GARBLED_FOOTER])
def test_a_csv_an_empty_file_or_a_garbled_footer_is_not_parquet(data):
    assert refusal(data).startswith("x.parquet: not a Parquet file (")


def test_a_read_error_while_reading_the_footer_is_not_called_a_wrong_file():
    data, _ = two_row_groups()
    with pytest.raises(ConnectionResetError):
        check_parquet(FailingAfter(data, 0, ConnectionResetError("connection reset")), "x.parquet")
    got = list(parquet_samples(FailingAfter(data, 0, ConnectionResetError("connection reset")), "x", LIMIT))
    assert got == [Sample("", None, error="damaged Parquet after 0 rows: connection reset")]


def test_no_image_column_lists_the_columns_found():
    data = parquet_bytes({"img": [b"a"], "label": ["cat"], "file_name": ["a.jpg"]})
    assert refusal(data) == (
        "x.parquet: no column 'image'; found columns img, label, file_name (expected the image in a column "
        "named image, as Hugging Face datasets writes it)"
    )


def test_many_or_oddly_named_columns_stay_on_one_line():
    columns = {"file\nname": ["a.jpg"], **{f"c{n}": [n] for n in range(30)}}
    message = refusal(parquet_bytes(columns))
    assert "found columns 'file\\nname', c0, c1," in message and ", c18 and 11 more (expected" in message


@pytest.mark.parametrize("image", [
    pa.array(["a.jpg"]),
    pa.array([[1, 2]], pa.list_(pa.int64())),
    pa.array([{"path": "a.jpg"}], pa.struct([("path", pa.string())])),
    pa.array([{"bytes": "text", "path": "a.jpg"}], pa.struct([("bytes", pa.string()), ("path", pa.string())])),
])
def test_an_image_column_of_another_type_is_refused(image):
    message = refusal(parquet_bytes({"image": image}))
    assert message.startswith("x.parquet: column 'image' is of type ")
    assert message.endswith("; expected the image's bytes (binary) or Hugging Face's Image() struct of bytes and path")


@pytest.mark.parametrize("column,values", [("label", [1.5]), ("split", [1]), ("label", [True])])
def test_label_or_split_of_another_type_is_refused(column, values):
    message = refusal(parquet_bytes({"image": [b"a"], column: values}))
    assert message.startswith(f"x.parquet: column '{column}' is of type ")


def test_without_pyarrow_one_line_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(UsageError, match=r"^Reading Parquet needs pyarrow: pip install 'bottleneck-features\[parquet\]'\.$"):
        check_parquet(io.BytesIO(b""), "x.parquet")
