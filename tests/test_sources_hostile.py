"""The hostile pass over issue 31's sources (docs/faults.md, "Sources, attacked"): what a
user can hand the commands in place of a data folder or a shard, through the commands."""

import os

from conftest import SIZE
from helpers import EXTRACT, call, one_line
from extract.sources.folder import walk


def extract(data, cache, *more):
    return call(EXTRACT, str(data), "--cache", str(cache), "--weights", "random", "--input-size", str(SIZE),
                "--pooling", "avg", "--quiet", *more)


def test_a_link_loop_as_data_dir_is_one_line(tmp_path):
    # Path.resolve raised RuntimeError("Symlink loop") out of extract-features: a traceback
    os.symlink("loop.tar", tmp_path / "loop.tar")
    done = extract(tmp_path / "loop.tar", tmp_path / "c.h5")
    one_line(done, 2, "symbolic link loop")
    assert not (tmp_path / "c.h5").exists()


def test_a_fifo_named_as_a_shard_as_data_dir_says_what_it_is(tmp_path):
    os.mkfifo(tmp_path / "x.tar")
    one_line(extract(tmp_path / "x.tar", tmp_path / "c.h5"), 2, "not a regular file (a FIFO)")


def test_a_link_loop_in_a_folder_is_named_a_loop(tmp_path):
    os.symlink("loop.tar", tmp_path / "loop.tar")
    assert [(path, error) for path, _, error in walk(tmp_path)] == [("loop.tar", "cannot read file: symbolic link loop")]
