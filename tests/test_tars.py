import gzip
import io
import random
import tarfile
import tracemalloc

import pytest

from extract.sources import Sample, samples
from extract.sources import tars
from extract.sources.tars import LABEL_LIMIT, tar_samples

LIMIT = 1000


def make_tar(path, members, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", mtime=0):
    """A tar at `path` of (name, bytes) members, in order; bytes None: a folder. A float
    `mtime` puts a pax header before each member, as webdataset's TarWriter does."""
    with tarfile.open(path, mode, format=format, encoding=encoding) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def read(path, limit=LIMIT):
    with open(path, "rb") as file:
        return list(tar_samples(file, path.name, limit))


class PayloadError(Exception):
    """What an HTTP client raises when a response is cut: not an OSError."""


class Stream:
    """A network stream: read() only, no seek, no tell, at most a block at a time."""

    def __init__(self, data, fail_after=None):
        self._data = io.BytesIO(data)
        self._fail_after = fail_after

    def read(self, size=-1):
        if self._fail_after is not None and self._data.tell() >= self._fail_after:
            raise PayloadError("connection reset by peer")
        return self._data.read(min(512, size) if size >= 0 else 512)


THREE = [
    ("a.jpg", b"A" * 50),
    ("a.cls", b"cat\n"),
    ("a.txt", b"a caption"),
    ("d/b.seg.png", b"mask"),
    ("d/b.png", b"B" * 60),
    ("d/b.json", b'{"label": "dog", "caption": "x"}'),
    ("c.webp", b"C" * 70),
]


def test_members_are_grouped_by_key_with_folders_kept_and_extensions_after_the_first_dot(tmp_path):
    members = [("d", None)] + THREE[:1] + [("d/e", None)] + THREE[1:] + [("README", b"no extension")]
    got = read(make_tar(tmp_path / "s.tar", members))
    assert got == [
        Sample("a", b"A" * 50, "cat"),
        Sample("d/b", b"B" * 60, "dog"),
        Sample("c", b"C" * 70, None),
    ]


def test_the_first_image_extension_in_order_of_preference(tmp_path):
    members = [("x.webp", b"w"), ("x.PNG", b"p"), ("x.jpeg", b"e"), ("y.png", b"p"), ("y.webp", b"w")]
    assert [s.data for s in read(make_tar(tmp_path / "s.tar", members))] == [b"e", b"p"]


@pytest.mark.parametrize(
    "members, label",
    [
        ([("k.cls", b"  7 \n")], "7"),
        ([("k.cls", b"tabby cat")], "tabby cat"),
        ([("k.json", b'{"label": 3}')], "3"),
        ([("k.json", b'{"label": "owl"}')], "owl"),
        ([("k.json", b'{"label": 2.5}')], None),
        ([("k.json", b'{"label": true}')], None),
        ([("k.json", b'{"label": ["a"]}')], None),
        ([("k.json", b"[1, 2]")], None),
        ([("k.json", b'{"caption": "x"}')], None),
        ([("k.json", b'{"label": "owl"}'), ("k.cls", b"cat")], "cat"),  # .cls wins
        ([], None),
    ],
)
def test_each_label_form(tmp_path, members, label):
    (sample,) = read(make_tar(tmp_path / "s.tar", [("k.jpg", b"img")] + members))
    assert sample == Sample("k", b"img", label)


@pytest.mark.parametrize(
    "member, error",
    [(("k.json", b"{not json"), "k.json is not valid JSON"), (("k.cls", b"\xff\xfe"), "k.cls is not UTF-8 text")],
)
def test_an_unreadable_label_is_an_error_sample(tmp_path, member, error):
    (sample,) = read(make_tar(tmp_path / "s.tar", [("k.jpg", b"img"), member]))
    assert sample.key == "k" and sample.data is None and error in sample.error


def test_a_sample_without_an_image_names_what_it_found(tmp_path):
    got = read(make_tar(tmp_path / "s.tar", [("k.txt", b"t"), ("k.cls", b"1"), ("m.jpg", b"i")]))
    assert got == [
        Sample("k", None, error="no image (expected k.jpg, .jpeg, .png or .webp); found k.txt, k.cls"),
        Sample("m", b"i"),
    ]


def test_a_member_over_the_limit_is_an_error_and_never_read(tmp_path, monkeypatch):
    taken = []
    real = tars._Blocks.data
    monkeypatch.setattr(tars._Blocks, "data", lambda self, size: taken.append(size) or real(self, size))
    members = [("a.jpg", b"x" * LIMIT), ("b.cls", b"1"), ("b.jpg", b"x" * (LIMIT + 1)), ("c.jpg", b"c")]
    got = read(make_tar(tmp_path / "s.tar", members))
    assert got == [
        Sample("a", b"x" * LIMIT),
        Sample("b", None, error=f"b.jpg is {LIMIT + 1} bytes, over the limit of {LIMIT} bytes"),
        Sample("c", b"c"),
    ]
    assert taken == [LIMIT, 1, 1]  # a.jpg, b.cls, c.jpg


def test_a_member_skipped_is_passed_over_in_pieces_never_held(tmp_path):
    big = 32 << 20
    data = make_tar(tmp_path / "s.tar", [("a.jpg", b"a"), ("b.jpg", bytes(big)), ("b.txt", bytes(big)), ("c.jpg", b"c")]).read_bytes()
    stream = io.BytesIO(data)
    tracemalloc.start()
    try:
        got = list(tar_samples(stream, "s.tar", LIMIT))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [s.key for s in got] == ["a", "b", "c"] and got[1].error.startswith("b.jpg is ")
    assert peak < 1 << 20


def test_a_label_over_a_mebibyte_is_an_error_whatever_the_limit(tmp_path):
    members = [("k.jpg", b"i"), ("k.json", b" " * (LABEL_LIMIT + 1))]
    (sample,) = read(make_tar(tmp_path / "s.tar", members), limit=10 * LABEL_LIMIT)
    assert sample.error == f"k.json is {LABEL_LIMIT + 1} bytes, over the limit of {LABEL_LIMIT} bytes"


def test_a_key_met_again_is_an_error_sample(tmp_path):
    members = [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.cls", b"x"), ("c.jpg", b"3"), ("c.jpg", b"4")]
    assert read(make_tar(tmp_path / "s.tar", members)) == [
        Sample("a", b"1"),
        Sample("b", b"2"),
        Sample("a", None, error="the key a again at member 3; keys must be unique in a tar"),
        Sample("c", None, error="the member c.jpg again at member 5; keys must be unique in a tar"),
    ]


def test_keys_are_strings_even_when_they_look_like_paths(tmp_path):
    members = [("../x.jpg", b"1"), ("/abs/y.jpg", b"2"), ("./z.png", b"3")]
    got = read(make_tar(tmp_path / "s.tar", members))
    assert [(s.key, s.data) for s in got] == [("../x", b"1"), ("/abs/y", b"2"), ("./z", b"3")]


def test_a_key_that_is_not_utf8_is_an_error_sample_shown_escaped(tmp_path):
    path = make_tar(tmp_path / "s.tar", [("caf\xe9.jpg", b"1"), ("ok.jpg", b"2")], format=tarfile.GNU_FORMAT, encoding="latin-1")
    assert read(path) == [
        Sample("caf\\xe9", None, error="the key caf\\xe9 is not valid UTF-8; rename the member"),
        Sample("ok", b"2"),
    ]


def test_a_key_with_a_nul_is_an_error_sample(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("ab.jpg")
        info.size, info.pax_headers = 1, {"path": "a\0b.jpg"}  # only a PAX header can carry a NUL
        tar.addfile(info, io.BytesIO(b"1"))
    assert read(tmp_path / "s.tar") == [Sample("a\\x00b", None, error="the key a\\x00b holds a NUL character; rename the member")]


def test_a_gzip_tar_is_read_like_a_tar(tmp_path):
    got = read(make_tar(tmp_path / "s.tar.gz", THREE, mode="w:gz"))
    assert [(s.key, s.label) for s in got] == [("a", "cat"), ("d/b", "dog"), ("c", None)]


def test_a_stream_without_seek_is_read_once_in_order(tmp_path):
    data = make_tar(tmp_path / "s.tar", THREE).read_bytes()
    assert list(tar_samples(Stream(data), "s.tar", LIMIT)) == read(tmp_path / "s.tar")
    assert [s.key for s in samples("tar", Stream(data), "s.tar", LIMIT)] == ["a", "d/b", "c"]


def member_spans(data):
    """(where its data starts, where it ends) for each member, from the tar's own headers."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.offset_data, m.offset_data + m.size) for m in tar.getmembers()]


def test_a_truncated_tar_keeps_the_samples_before_then_one_error_for_the_rest(tmp_path):
    whole = make_tar(tmp_path / "whole.tar", THREE).read_bytes()
    spans = member_spans(whole)  # a.jpg a.cls a.txt d/b.seg.png d/b.png d/b.json c.webp
    last_end = spans[6][1]
    end_marker = last_end + -last_end % 512
    cases = {
        0: "not a tar file (an empty file)",
        100: "not a tar file",  # inside the first header
        spans[0][0] + 10: "truncated tar in its first sample (0 samples read): ",  # inside a's image
        spans[2][1]: "truncated tar in its first sample (0 samples read): ",  # nothing says a has ended
        spans[3][0]: "truncated tar after sample a (1 samples read): ",  # d/b has begun: a is complete
        spans[6][0] + 10: "truncated tar after sample d/b (2 samples read): ",  # c has begun
        last_end: "truncated tar after sample d/b (2 samples read): ",  # c whole but the tar not ended
        end_marker: "truncated tar after sample d/b (2 samples read): the data ends without the tar's end marker",
        end_marker + 100: "truncated tar after sample d/b (2 samples read): ",  # inside the end marker
    }
    for cut, error in cases.items():
        (tmp_path / "cut.tar").write_bytes(whole[:cut])
        got = read(tmp_path / "cut.tar")
        kept = 0 if "0 samples" in error or "not a tar" in error else int(error.split("(")[1].split()[0])
        assert got[:-1] == read(tmp_path / "whole.tar")[:kept], cut
        assert got[-1].key == "" and got[-1].data is None and got[-1].error.startswith(error), (cut, got[-1])
    (tmp_path / "cut.tar").write_bytes(whole[: end_marker + 512])  # a whole block of zeros: the end
    assert read(tmp_path / "cut.tar") == read(tmp_path / "whole.tar")


def test_a_corrupt_member_header_ends_the_tar_with_an_error_not_silently(tmp_path):
    data = bytearray(make_tar(tmp_path / "s.tar", THREE).read_bytes())
    data[member_spans(data)[6][0] - 512] ^= 0xFF  # c.webp's header: its name's first byte
    (tmp_path / "s.tar").write_bytes(data)
    got = read(tmp_path / "s.tar")
    assert [s.key for s in got] == ["a", ""]  # d/b may have had more members: not complete
    assert got[-1].error == "truncated tar after sample a (1 samples read): a damaged member header (bad checksum)"


def test_a_truncated_gzip_tar_keeps_a_prefix_then_one_error(tmp_path):
    whole = make_tar(tmp_path / "s.tar.gz", THREE, mode="w:gz").read_bytes()
    counts = []
    for cut in range(0, len(whole), 7):
        got = list(tar_samples(Stream(whole[:cut]), "s.tar.gz", LIMIT))
        read_whole = [s.key for s in got] == ["a", "d/b", "c"]  # cut after the tar's end marker
        assert read_whole or ([s.key for s in got[:-1]] == ["a", "d/b"][: len(got) - 1] and got[-1].error), cut
        counts.append(len(got) - (not read_whole))
    assert counts == sorted(counts) and counts[0] == 0 and 1 in counts and counts[-1] == 3


def test_garbage_is_not_a_tar_file(tmp_path):
    (sample,) = tar_samples(Stream(b"PK\x03\x04 a zip file, not a tar" * 40), "s.tar", LIMIT)
    assert sample.key == "" and sample.error.startswith("not a tar file (") and sample.error.endswith("s.tar")


def test_a_stream_that_fails_keeps_the_samples_before(tmp_path):
    data = make_tar(tmp_path / "s.tar", THREE).read_bytes()
    got = list(tar_samples(Stream(data, fail_after=member_spans(data)[6][0]), "s.tar", LIMIT))
    assert got[:-1] == read(tmp_path / "s.tar")[:2]
    assert got[-1] == Sample(
        "", None, error="truncated tar after sample d/b (2 samples read): reading failed: connection reset by peer"
    )


def test_a_stream_that_fails_at_once_is_not_called_not_a_tar(tmp_path):
    data = make_tar(tmp_path / "s.tar", THREE).read_bytes()
    assert list(tar_samples(Stream(data, fail_after=0), "s.tar", LIMIT)) == [
        Sample("", None, error="truncated tar in its first sample (0 samples read): reading failed: connection reset by peer")
    ]


def test_ctrl_c_while_reading_passes_through(tmp_path):
    class Interrupted(Stream):
        def read(self, size=-1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(tar_samples(Interrupted(b""), "s.tar", LIMIT))


def test_tarfile_keeps_no_header_behind(tmp_path, monkeypatch):
    kept = []
    real = tarfile.TarFile.next
    monkeypatch.setattr(tarfile.TarFile, "next", lambda self: kept.append(len(self.members)) or real(self))
    members = [(f"\u00e9{i:04d}.jpg", b"i") for i in range(50)]  # not ASCII: PAX headers, read by tarfile
    assert len(read(make_tar(tmp_path / "s.tar", members))) == 50
    assert len(kept) > 50 and max(kept) <= 1


def test_utf8_names_are_read_as_utf8_whatever_the_locale(tmp_path, monkeypatch):
    path = make_tar(tmp_path / "s.tar", [("café.jpg", b"1")], format=tarfile.GNU_FORMAT)
    monkeypatch.setattr(tarfile.TarFile, "encoding", "ascii")  # tarfile's default: the locale's
    assert read(path) == [Sample("café", b"1")]


FORMATS = (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT)
EXTENSIONS = ("jpg", "JPG", "png", "webp", "cls", "json", "txt", "seg.png")


def random_tar(rng):
    """A tar's bytes with random members: names plain, long, not ASCII, in folders, met twice;
    folders and links; sizes around a block and the limit; in one of tarfile's formats."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=rng.choice(FORMATS)) as tar:
        keys = [rng.choice(["k", "d/k", "é", "x" * 120, "long/" * 25 + "k"]) + str(i) for i in range(rng.randint(0, 6))]
        for key in keys + rng.sample(keys, min(len(keys), rng.randint(0, 1))):
            for extension in rng.sample(EXTENSIONS, rng.randint(0, 3)):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.mtime = rng.choice([0, 1700000000, 1700000000.25])  # a float: a pax header
                kind = rng.random()
                if kind < 0.1:
                    info.type = tarfile.DIRTYPE
                elif kind < 0.15:
                    info.type, info.linkname = tarfile.SYMTYPE, "elsewhere"
                else:
                    info.size = rng.choice([0, 1, 511, 512, 513, LIMIT, LIMIT + 1, rng.randint(0, 3000)])
                label = rng.choice([b"cat", b'{"label": 3}', b"\xff", b"{"])
                data = label[: info.size] + bytes(max(0, info.size - len(label)))
                try:
                    tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
                except ValueError:  # a name ustar cannot hold
                    pass
    return out.getvalue()


def rewritten_header(data, rng):
    """`data` with one member header changed and its checksum made right again."""
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    if not offsets:
        return data
    at = rng.choice(offsets)
    header = bytearray(data[at:at + 512])
    numbers = [b"17\0", b" 17 \0", b"+17\0", b"1_7\0", b"\t17\0", b"18\0", b"\0" * 12, b"\x80" + bytes(10) + b"\x05"]
    for _ in range(rng.randint(1, 3)):
        field, value = rng.choice([
            (156, rng.choice([b"0", b"\0", b"1", b"5", b"7", b"x", b"g", b"L", b"S", b"Z"])),
            (124, rng.choice(numbers + [b"00000001000\0", b"12x", b"\xff" * 12, b"\xff" * 10 + b"\xfd\xa8"])),
            (rng.choice([100, 108, 116, 136, 329, 337]), rng.choice(numbers[:-1] + [b"9999999\0", b"\x80\0\0\0\0\0\0\x01"])),
            (header.index(0) if 0 in header[:100] else 99, b"/"),
            (345, rng.choice([b"pre", b"\0"])),
        ])
        header[field:field + len(value)] = value
    signed = rng.random() < 0.5 and any(b > 127 for b in header)
    sums = tarfile.calc_chksums(bytes(header[:148] + b" " * 8 + header[156:]))
    checksum = sums[1] if signed else sums[0]
    header[148:156] = (rng.choice([b"%06o\0 ", b"%07o\0", b" %o \0"]) % (checksum & 0o777777)).ljust(8, b"\0")[:8]
    return data[:at] + bytes(header) + data[at + 512:]


class RandomStream(Stream):
    """A stream that returns pieces of random sizes and may fail at a given byte."""

    def __init__(self, data, rng, fail_after=None):
        super().__init__(data, fail_after)
        self._rng = rng

    def read(self, size=-1):
        if self._fail_after is not None and self._data.tell() >= self._fail_after:
            raise PayloadError("connection reset by peer")
        return self._data.read(min(self._rng.randint(1, 20000), size) if size >= 0 else -1)


@pytest.mark.parametrize("seed", range(8))
def test_plain_headers_read_here_give_what_tarfile_gives(seed, monkeypatch):
    rng = random.Random(seed)
    for case in range(150):
        data = random_tar(rng)
        damage = rng.random()
        if damage < 0.3:
            data = data[: rng.randint(0, len(data))]
        elif damage < 0.45:
            at = rng.randrange(len(data))
            data = data[:at] + bytes([data[at] ^ rng.randint(1, 255)]) + data[at + 1:]
        elif damage < 0.7:
            data = rewritten_header(data, rng)
        if rng.random() < 0.2:
            data = gzip.compress(data)
        fail_after = rng.choice([None, None, rng.randint(0, len(data))])
        chunks = rng.randrange(1 << 30)
        read_here = list(tar_samples(RandomStream(data, random.Random(chunks), fail_after), "s.tar", LIMIT))
        with monkeypatch.context() as patch:
            patch.setattr(tars, "_members", tars._tarfile_members)
            by_tarfile = list(tar_samples(RandomStream(data, random.Random(chunks), fail_after), "s.tar", LIMIT))
        assert read_here == by_tarfile, (seed, case)


def by_tarfile(data, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(tars, "_members", tars._tarfile_members)
        return list(tar_samples(Stream(data), "s.tar", LIMIT))


def with_header(data, index, fields):
    """`data` with member `index`'s header fields ({offset: bytes}) replaced, its checksum made right."""
    at = member_spans(data)[index][0] - 512
    header = bytearray(data[at:at + 512])
    for offset, value in fields.items():
        header[offset:offset + len(value)] = value
    header[148:156] = b"%06o\0 " % tarfile.calc_chksums(bytes(header[:148] + b" " * 8 + header[156:]))[0]
    return data[:at] + bytes(header) + data[at + 512:]


ODD_HEADERS = {
    "size -600": {124: (256 ** 12 - 600).to_bytes(12, "big")},  # base-256
    "size -16": {124: (256 ** 12 - 16).to_bytes(12, "big")},
    "v7 folder with a size": {0: b"b/\0", 156: b"\0"},
    "an 8 in a number": {124: b"00000001278\0"},
    "a number as spaces": {100: b"   644 \0", 124: b" 1274 \0\0\0\0\0"},
}


@pytest.mark.parametrize("odd", [
    "pax", "gnu long name", "pax times", "pax times, a length of 0", "pax times, a path in the padding", "pax times twice", *ODD_HEADERS,
])
def test_tarfile_takes_over_mid_tar_as_if_it_had_read_from_the_start(tmp_path, odd, monkeypatch):
    members = [("a.jpg", b"A" * 600), ("a.cls", b"cat"), ("b.jpg", b"B" * 700), ("c.jpg", b"C")]
    if odd == "pax":
        members[2] = ("é.jpg", b"B" * 700)
    if odd == "gnu long name":
        members[2] = ("b" * 150 + ".jpg", b"B" * 700)
    data = make_tar(tmp_path / "s.tar", members, format=tarfile.GNU_FORMAT if "gnu" in odd else tarfile.PAX_FORMAT,
                    mtime=1.5 if "times" in odd else 0).read_bytes()
    records = member_spans(data)[2][0] - 1024 if "times" in odd else None  # b.jpg's pax record "13 mtime=1.5\n"
    if odd == "pax times, a length of 0":  # tarfile refuses it
        data = data[:records] + b"00" + data[records + 2:]
    if odd == "pax times, a path in the padding":  # tarfile reads it
        data = data[:records + 13] + b"14 path=x.jpg\n" + data[records + 27:]
    if odd == "pax times twice":
        data = data[:records - 512] + data[records - 512:records + 512] + data[records - 512:]
    if odd in ODD_HEADERS:
        data = with_header(data, 2, ODD_HEADERS[odd])
    for cut in [*range(0, len(data), 64), len(data)]:
        assert list(tar_samples(Stream(data[:cut]), "s.tar", LIMIT)) == by_tarfile(data[:cut], monkeypatch), cut
