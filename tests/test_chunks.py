"""Chunks compressed on threads and written as they are read back as HDF5 wrote them."""

import h5py
import numpy as np
import pytest

from extract.chunks import fletcher32, write_rows


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
def test_threaded_chunks_read_back_as_written(tmp_path, dtype):
    rng = np.random.default_rng(1)
    rows = np.maximum(rng.normal(size=(23, 2, 2, 8)), 0).astype(dtype)  # ReLU-like: many zeros
    with h5py.File(tmp_path / "c.h5", "w") as file:
        dataset = file.create_dataset("features", shape=rows.shape, dtype=dtype, chunks=(4, 2, 2, 8),
                                      compression="gzip", compression_opts=1, fletcher32=True)
        calls = []
        write_rows(dataset, len(rows), lambda a, b: calls.append((a, b)) or rows[a:b], workers=3)
    assert calls == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 23)]  # in order, the last one short
    with h5py.File(tmp_path / "c.h5", "r") as file:
        np.testing.assert_array_equal(file["features"][:], rows)  # every chunk passes its checksum
        assert file["features"].compression == "gzip" and file["features"].fletcher32


def test_a_garbled_threaded_chunk_fails_its_checksum(tmp_path):
    rows = np.arange(32, dtype=np.float32).reshape(8, 4)
    with h5py.File(tmp_path / "c.h5", "w") as file:
        dataset = file.create_dataset("features", shape=rows.shape, dtype="float32", chunks=(4, 4),
                                      compression="gzip", fletcher32=True)
        write_rows(dataset, len(rows), lambda a, b: rows[a:b])
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


@pytest.mark.parametrize("filters", [{"compression": "lzf"}, {}, {"compression": "gzip"}, {"compression": "gzip", "fletcher32": True, "shuffle": True}])
def test_other_filters_are_refused(tmp_path, filters):
    with h5py.File(tmp_path / "c.h5", "w") as file:
        dataset = file.create_dataset("features", shape=(10, 4), dtype="float32", chunks=(4, 4), **filters)
        with pytest.raises(ValueError, match="deflate and Fletcher-32"):
            write_rows(dataset, 10, lambda a, b: np.zeros((b - a, 4), np.float32))
