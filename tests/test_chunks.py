"""Chunks compressed on threads and written as they are read back as HDF5 wrote them."""

import h5py
import numpy as np
import pytest

from extract.chunks import _pipeline, fletcher32, write_rows


def test_fletcher32_is_hdf5s(tmp_path):
    rng = np.random.default_rng(0)
    lengths = [1, 2, 3, 719, 720, 721, 722, 65537, *rng.integers(1, 3000, 40)]
    with h5py.File(tmp_path / "sums.h5", "w") as file:
        for i, length in enumerate(lengths):
            # random bytes, and all 0xFF, where the 32-bit sums wrap
            for name, data in (("random", rng.integers(0, 256, length, dtype=np.uint8)), ("ones", np.full(length, 255, np.uint8))):
                dataset = file.create_dataset(f"{name}{i}", data=data, chunks=(length,), fletcher32=True)
                _, stored = dataset.id.read_direct_chunk((0,))
                assert stored[:-4] == data.tobytes()
                assert int.from_bytes(stored[-4:], "little") == fletcher32(data.tobytes()), (name, length)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shuffle", [False, True])  # caches written before shuffle was dropped have it
def test_threaded_chunks_read_back_as_written(tmp_path, dtype, shuffle):
    rng = np.random.default_rng(1)
    rows = np.maximum(rng.normal(size=(23, 2, 2, 8)), 0).astype(dtype)  # ReLU-like: many zeros
    with h5py.File(tmp_path / "c.h5", "w") as file:
        dataset = file.create_dataset("features", shape=rows.shape, dtype=dtype, chunks=(4, 2, 2, 8),
                                      compression="gzip", compression_opts=1, shuffle=shuffle, fletcher32=True)
        assert _pipeline(dataset) == (shuffle, 1)
        dataset[:6] = rows[:6]  # through HDF5's own filters
        calls = []
        write_rows(dataset, 6, len(rows), lambda a, b: calls.append((a, b)) or rows[a:b], workers=3)
    # in order: the rest of the chunk row 6 is in (through HDF5), whole chunks, the last one short
    assert calls == [(6, 8), (8, 12), (12, 16), (16, 20), (20, 23)]
    with h5py.File(tmp_path / "c.h5", "r") as file:
        np.testing.assert_array_equal(file["features"][:], rows)  # every chunk passes its checksum
        assert file["features"].shuffle == shuffle and file["features"].fletcher32


def test_a_garbled_threaded_chunk_fails_its_checksum(tmp_path):
    rows = np.arange(32, dtype=np.float32).reshape(8, 4)
    with h5py.File(tmp_path / "c.h5", "w") as file:
        dataset = file.create_dataset("features", shape=rows.shape, dtype="float32", chunks=(4, 4),
                                      compression="gzip", fletcher32=True)
        write_rows(dataset, 0, len(rows), lambda a, b: rows[a:b])
        offset = dataset.id.get_chunk_info(1).byte_offset
    with open(tmp_path / "c.h5", "r+b") as raw:
        raw.seek(offset + 3)
        byte = raw.read(1)
        raw.seek(offset + 3)
        raw.write(bytes([byte[0] ^ 0xFF]))
    with h5py.File(tmp_path / "c.h5", "r") as file:
        np.testing.assert_array_equal(file["features"][:4], rows[:4])
        with pytest.raises(OSError):
            file["features"][4:]


@pytest.mark.parametrize("filters", [{"compression": "lzf"}, {}, {"compression": "gzip"}])
def test_other_filters_are_written_through_hdf5(tmp_path, filters):
    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    with h5py.File(tmp_path / "c.h5", "w") as file:
        dataset = file.create_dataset("features", shape=rows.shape, dtype="float32", chunks=(4, 4), **filters)
        assert _pipeline(dataset) is None  # no Fletcher-32 here: not what encode() makes
        write_rows(dataset, 0, len(rows), lambda a, b: rows[a:b])
        np.testing.assert_array_equal(dataset[:], rows)
