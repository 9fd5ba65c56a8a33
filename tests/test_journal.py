import os

import numpy as np
import pytest

from extract.errors import CacheBusyError
from extract.journal import Journal, WriterLock


def test_batches_survive_a_reopen(tmp_path):
    journal = Journal(tmp_path / "c.h5", "abc").open()
    first = np.arange(6, dtype=np.float32).reshape(2, 3)
    journal.append(["a" * 64, "b" * 64], first)
    journal.append(["c" * 64], first[:1] + 10)
    again = Journal(tmp_path / "c.h5", "abc").open()
    assert len(again) == 3
    np.testing.assert_array_equal(again.features("b" * 64), first[1])
    np.testing.assert_array_equal(again.features("c" * 64), first[0] + 10)
    again.append(["d" * 64], first[:1])
    assert sorted(path.name for path in again.folder.iterdir()) == [
        "batch-000001.npz", "batch-000002.npz", "batch-000003.npz"
    ]


def test_a_batch_interrupted_while_written_is_ignored(tmp_path):
    journal = Journal(tmp_path / "c.h5", "abc").open()
    journal.append(["a" * 64], np.zeros((1, 3), np.float32))
    (journal.folder / "batch-000002.npz.tmp").write_bytes(b"half a batch")
    again = Journal(tmp_path / "c.h5", "abc").open()
    assert list(again.index) == ["a" * 64]
    assert not list(again.folder.glob("*.tmp"))


def test_clear_removes_the_journal(tmp_path):
    journal = Journal(tmp_path / "c.h5", "abc").open()
    journal.append(["a" * 64], np.zeros((1, 3), np.float32))
    journal.clear()
    assert not (tmp_path / "c.h5.journal").exists() and len(journal) == 0


def test_a_second_writer_is_refused_with_the_first_ones_process(tmp_path):
    with WriterLock(tmp_path / "c.h5"):
        with pytest.raises(CacheBusyError, match=f"process {os.getpid()}"):
            with WriterLock(tmp_path / "c.h5"):
                pass
    with WriterLock(tmp_path / "c.h5"):  # released on exit
        pass
