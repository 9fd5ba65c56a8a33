"""Where images come from: a folder of files, or shards that hold many images each
(WebDataset tars, Parquet files), on this machine or at an fsspec URL (s3://, gs://,
https://, file://).

Every image enters through one contract. A location (`location`) lists its files: image files,
each one image, and shards (`Shard`), each many. A shard is read by streaming it once, in
order (`samples`): each of its images comes as a `Sample`, its key within the shard, its bytes,
and the label and split it carries, if any. The stored path of a sample is the shard's path,
"#", and its key (`member_path`): `shards/000012.tar#cat_0017`.

The kinds of shard, by file name (`SHARD_KINDS`):
- `tars`: WebDataset tars (what img2dataset writes): members grouped into samples by key,
  the image under jpg, jpeg, png or webp, the label in .cls or in .json under "label".
- `parquet`: Parquet files with the image in a column `image` (Hugging Face's struct of bytes
  and path, or plain binary), an optional `label` and `split`; read a batch of rows at a time.
"""

from __future__ import annotations

from typing import BinaryIO, Callable, Iterator, NamedTuple

SHARD_KINDS = {".tar": "tar", ".tar.gz": "tar", ".tgz": "tar", ".tar.bz2": "tar", ".tar.xz": "tar",
               ".parquet": "parquet", ".pq": "parquet"}
SEPARATOR = "#"  # between a shard's path and a sample's key in a stored path


class Shard(NamedTuple):
    """A file of many images, as listed: read whole when it is new or changed, else its
    samples keep their rows unread (`plan.shards_to_read`). Carries what places its samples
    (`layout.place_sample`), so a reader on any machine needs nothing else."""

    path: str  # relative to the location, "/"-separated
    kind: str  # "tar" or "parquet"
    size: int
    stamp: int  # changes when the file does: its modification time in ns, or a number made of its ETag; -1: unknown
    split: str | None  # the split its folder gives (train/, validation/, test/), else None
    labelled: bool  # False under --layout unlabeled: samples' labels are not asked for
    validation_percent: float  # the share of samples drawn for validation when nothing else gives the split


class Sample(NamedTuple):
    """One image of a shard, as read: its bytes, or why it could not be read (`error`).
    A sample with key "" and an error stands for the rest of the shard, not read (a
    truncated tar, a connection lost for good)."""

    key: str  # unique within its shard: the WebDataset key, or a Parquet row's number
    data: bytes | None  # the image's bytes; None when `error`
    label: str | None = None  # the class the sample carries (a .cls, a .json's "label", a label column)
    split: str | None = None  # the split the sample carries (a Parquet split column); None: by the layout; a name that is no split: refused
    error: str | None = None


def shard_kind(name: str) -> str | None:
    """"tar" or "parquet" for a shard's file name (by its last one or two suffixes: a
    compressed tar is read as a stream too), None for any other file."""
    lower = name.lower()
    last = lower.rfind(".")
    if last <= 0:
        return None
    before = lower.rfind(".", 0, last)
    return SHARD_KINDS.get(lower[before:]) if before > 0 and lower[before:] in SHARD_KINDS else SHARD_KINDS.get(lower[last:])


def member_path(shard: str, key: str) -> str:
    """The stored path of a shard's sample: `shards/000012.tar#cat_0017`."""
    return f"{shard}{SEPARATOR}{key}"


def shard_of(path: str, is_shard: Callable[[str], object]) -> str | None:
    """The shard a stored path names (`shards/000012.tar#key`: "shards/000012.tar"), by
    `is_shard` (a listing's membership, or `shard_kind`), or None for a file's path. A path
    may hold "#" in its shard's name or in its key: each split is tried, leftmost first."""
    at = path.find(SEPARATOR)
    while at >= 0:
        if is_shard(path[:at]):
            return path[:at]
        at = path.find(SEPARATOR, at + 1)
    return None


def samples(kind: str, file: BinaryIO, name: str, limit: int) -> Iterator[Sample]:
    """The samples of one shard of `kind`, read from the open binary `file` (named `name`
    in messages), in order; a sample over `limit` bytes is an error sample, never read whole."""
    if kind == "tar":
        from extract.sources.tars import tar_samples

        return tar_samples(file, name, limit)
    from extract.sources.parquet import parquet_samples

    return parquet_samples(file, name, limit)
