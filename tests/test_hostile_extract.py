"""Hostile inputs to stage 1, on the real command: special files, huge files, absurd option
values, folder links that multiply, a cache reached through a link, odd cache files and
names, a closed pipe, escape sequences in file names. Its main() runs in this process, or
in a process of its own where a FIFO could hang it or the process is the subject."""

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

import helpers
from conftest import SIZE, make_dataset, make_image
from extract import FeatureCache, files
from extract.backbone import Backbone
from helpers import EXTRACT, one_line
from extract.sources.folder import MAX_DEPTH
from extract.reader import HEADER_CHECK_BYTES, MAX_FILE_BYTES
from extract.sources.folder import Folder


def arguments(data, cache, weights_file, *extra, quiet=True) -> list:
    """The command's arguments; paths may be bytes (names that are not UTF-8)."""
    return [data, "--cache", cache, "--weights", weights_file, "--input-size", SIZE, "--pooling", "avg",
            *(["--quiet"] if quiet else []), *extra]


def command(data, cache, weights_file, *extra, quiet=True) -> list:
    """The command line, for a plain subprocess."""
    return helpers.command_line(EXTRACT, *arguments(data, cache, weights_file, *extra, quiet=quiet))


def run(data, cache, weights_file, *extra, quiet=True) -> subprocess.CompletedProcess:
    """main() in this process."""
    return helpers.call(EXTRACT, *arguments(data, cache, weights_file, *extra, quiet=quiet))


def run_apart(data, cache, weights_file, *extra, timeout=60) -> subprocess.CompletedProcess:
    """The command in a process of its own, ended after `timeout` (where a FIFO could hang it)."""
    return helpers.run(EXTRACT, *arguments(data, cache, weights_file, *extra), timeout=timeout)


def summary(done) -> dict:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# 1, 2: special files and huge files


def test_a_fifo_and_a_socket_are_failure_rows_not_a_hang(dataset, tmp_path, weights_file):
    os.mkfifo(dataset / "train" / "cat" / "x.jpg")
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(dataset / "train" / "cat" / "s.png"))
    try:
        failures = dict(summary(run_apart(dataset, tmp_path / "c.h5", weights_file, "--json", timeout=90))["failures"])
    finally:
        listening.close()
    assert failures == {"train/cat/x.jpg": "not a regular file (a FIFO)", "train/cat/s.png": "not a regular file (a socket)"}


def peak_rss_mb(arguments) -> tuple[subprocess.CompletedProcess, float]:
    """Run a command from a fresh parent, which reports its child's peak resident memory."""
    measure = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(done.returncode)")
    done = subprocess.run([sys.executable, "-c", measure, *arguments], capture_output=True, timeout=180)
    *rest, peak = done.stderr.decode().strip().split("\n")
    done.stderr = ("\n".join(rest) + "\n").lstrip("\n").encode()
    return done, int(peak) / 1024


def test_a_device_and_huge_files_are_refused_before_they_are_read(dataset, tmp_path, weights_file):
    """/dev/zero behind a link never ends; sparse files of 1 GiB (over the cap) and 200 MiB
    (under it, but no image) cost no memory: they are refused by size and by header."""
    folder = dataset / "train" / "cat"
    (folder / "z.jpg").symlink_to("/dev/zero")
    for name, size in (("huge-1.jpg", 2**30), ("huge-2.jpg", 2**30), ("zeros.png", 200 * 2**20)):
        with open(folder / name, "wb") as file:
            file.truncate(size)
    assert 200 * 2**20 < MAX_FILE_BYTES < 2**30
    large = make_image(folder / "large.bmp", size=(1500, 1000))  # a real image past the header check's size
    assert large.stat().st_size > HEADER_CHECK_BYTES
    done, peak = peak_rss_mb(command(dataset, tmp_path / "c.h5", weights_file, "--json"))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    result = json.loads(done.stdout)
    assert result["rows"] == 7
    failures = dict(result["failures"])
    assert failures["train/cat/z.jpg"] == "not a regular file (a character device)"
    assert failures["train/cat/huge-1.jpg"].startswith(f"file too large: {2**30} bytes")
    assert failures["train/cat/zeros.png"] == "not an image Pillow can read (unknown format or corrupt header)"
    assert peak < 1500, f"peak resident memory {peak:.0f} MB"  # TensorFlow itself: about 700 MB


# 3: absurd numbers


@pytest.mark.parametrize("option, value, expected", [
    ("--input-size", "100000", "Expected --input-size between 32 (VGG16's minimum without its top) and 1024; received 100000."),
    ("--batch-size", "1000000", "Expected --batch-size between 1 and 1024; received 1000000."),
    ("--workers", "100000", "Expected --workers between 1 and 64; received 100000."),
    ("--save-every", "nan", "Expected --save-every between 0 and 86400; received nan."),
    ("--save-every", "1e300", "Expected --save-every between 0 and 86400"),
    ("--augment", "3000", "Expected --augment between 0 and 100; received 3000."),
    ("--seed", "-1", "Expected --seed between 0 and 4294967295; received -1."),
    ("--validation-percent", "nan", "Expected --validation-percent between 0 and 100 (100 excluded); received nan."),
    ("--shear", "inf", "Expected --shear between 0 and 90 (90 excluded); received inf."),
])
def test_absurd_numbers_are_refused_at_once(dataset, tmp_path, weights_file, option, value, expected, monkeypatch):
    extra = ("--augment", "1") if option == "--shear" else ()
    monkeypatch.setattr(Backbone, "__init__", lambda *a: pytest.fail("the network was built for a refused run"))
    done = run(dataset, tmp_path / "c.h5", weights_file, option, value, *extra)
    one_line(done, 2, expected)
    assert not (tmp_path / "c.h5").exists()


def test_views_in_flight_are_bounded_whatever_k(tmp_path):
    """With K views per image, the reader lets through images while images and views in
    flight stay within `prefetch` (so 100 views of 64 images are never held at once)."""
    from extract.augment import Augmentation
    from extract.reader import ViewRequest, load_all

    paths = make_dataset(tmp_path, "unlabeled", classes=("a", "b"), per_class=10)
    from extract.layout import scan_folder

    images, taken = scan_folder(tmp_path).images, []

    def listing():
        for image in images:
            taken.append(image)
            yield image

    request = ViewRequest(Augmentation(), lambda image, sha256: list(range(1, 31)), per_image=30)
    loaded = load_all(Folder(tmp_path), listing(), SIZE, "bilinear", workers=2, prefetch=64, views=request)
    first = next(loaded)
    assert len(first.views) == 30 and len(taken) <= 3  # 64 // 31 images in flight, not 64
    assert len([first, *loaded]) == len(paths)


# 4: folder links


def test_links_to_folders_list_each_real_folder_once(dataset, tmp_path, weights_file):
    """16 folders, each linking twice to the next: one image, not 65,536 rows of it."""
    chain = dataset / "train" / "cat" / "chain"
    for level in range(16):
        (chain / f"d{level}").mkdir(parents=True)
    make_image(chain / "d16" / "deep.png", seed=99)
    for level in range(16):
        for link in ("a", "b"):
            (chain / f"d{level}" / link).symlink_to(chain / f"d{level + 1}")
    result = summary(run(dataset, tmp_path / "c.h5", weights_file, "--json"))
    assert result["rows"] == 6 + 1
    failures = dict(result["failures"])
    assert failures["train/cat/chain/d0/b/"] == "the same folder as train/cat/chain/d0/a/ (reached again through a link); listed once"
    assert len(failures) == 16 + 16  # each real folder once: through d<n>/a; d<n>/b and chain/d<n+1> are links to them
    with FeatureCache(tmp_path / "c.h5") as cache:
        assert "train/cat/chain/d0/a/a/a/a/a/a/a/a/a/a/a/a/a/a/a/a/deep.png" in cache.paths()


def test_folders_nested_too_deep_are_a_failure_row(dataset, tmp_path, weights_file):
    deep = dataset / "train" / "cat" / "/".join(["n"] * (MAX_DEPTH + 5))
    make_image(deep / "deep.png")
    result = summary(run(dataset, tmp_path / "c.h5", weights_file, "--json"))
    assert result["rows"] == 6
    (path, reason), = result["failures"]
    assert path.count("/") == MAX_DEPTH + 1 and reason == f"folders nested deeper than {MAX_DEPTH} levels; not listed"


# 5, 6, 7: the cache's own path


def test_a_cache_reached_through_a_link_is_written_in_place_under_one_lock(dataset, tmp_path, weights_file):
    real, link = tmp_path / "real.h5", tmp_path / "link.h5"
    summary(run(dataset, real, weights_file, "--json"))
    link.symlink_to(real)
    with open(f"{real}.lock", "a") as held:  # a writer of real.h5
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        one_line(run(dataset, link, weights_file), 1, "is being written by")
    make_image(dataset / "train" / "cat" / "new.png", seed=7)
    assert summary(run(dataset, link, weights_file, "--json"))["new"] == 1
    assert link.is_symlink() and not Path(f"{link}.shards").exists()
    with FeatureCache(link) as through_link, FeatureCache(real) as direct:
        assert len(through_link.paths()) == len(direct.paths()) == 7


def _a_process_gone() -> int:
    """The id of a process that has ended (reaped): what a writer killed with -9 leaves."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_leftover_cleanup_removes_only_this_caches_temporaries(dataset, tmp_path, weights_file):
    folder = tmp_path / "c"
    gone = _a_process_gone()
    tag = files.owned_prefix(".features[v2].h5.commit-").replace(f"-{os.getpid()}-", f"-{gone}-")
    killed = folder / f"{tag}k1ll3d00"  # a killed writer's commit: its folder, its catalog
    killed.mkdir(parents=True)
    (killed / "features[v2].h5").write_text("x")
    (folder / ".features[v2].h5.commit-notes").mkdir()  # named like one, holding something else
    mine = folder / ".features[v2].h5.commit-USER1"  # named like one, holding a file named as the catalog
    mine.mkdir()
    (mine / "features[v2].h5").write_text("mine")
    live = folder / f"{files.owned_prefix('.features[v2].h5.commit-')}l1ve0000"  # this process's: alive
    live.mkdir()
    (live / "features[v2].h5").write_text("x")
    others = [folder / "features2.h5.tmp-1", folder / "features[v2].h5.tmp-notes",  # glob's [v2] matches "2"
              folder / "features[v2].h5.tmp-123", folder / ".features[v2].h5.commit-file",
              folder / ".features[v2].h5.commit-notes" / "notes.txt", mine / "features[v2].h5",
              live / "features[v2].h5"]
    for path in others:
        if not path.exists():
            path.write_text("x")
    summary(run(dataset, folder / "features[v2].h5", weights_file, "--json"))
    assert all(path.exists() for path in others) and (mine / "features[v2].h5").read_text() == "mine"
    assert not killed.exists()


def test_rebuild_keeps_the_old_cache_in_place_until_its_first_write(dataset, tmp_path, weights_file):
    """While TensorFlow starts (seconds), readers still find the old cache; the catalog is
    missing only between the move aside and the first commit, milliseconds apart."""
    cache = tmp_path / "c.h5"
    summary(run(dataset, cache, weights_file, "--json"))
    process = helpers.start(EXTRACT, *arguments(dataset, cache, weights_file, "--rebuild"))
    missing_since, longest = None, 0.0
    while process.poll() is None:
        now = time.monotonic()
        if cache.exists():
            if missing_since is not None:
                longest, missing_since = max(longest, now - missing_since), None
        elif missing_since is None:
            missing_since = now
        time.sleep(0.002)
    assert process.returncode == 0, process.communicate()[1]
    assert cache.exists() and longest < 0.5, f"no cache for {longest:.3f} s"
    assert len(list(tmp_path.glob("c.h5.replaced-*/c.h5"))) == 1


def test_an_interrupted_rebuild_before_its_first_write_keeps_the_old_cache(dataset, tmp_path, weights_file):
    """A plain subprocess: the seconds TensorFlow takes to start are the moment this is about."""
    cache = tmp_path / "c.h5"
    summary(run(dataset, cache, weights_file, "--json"))
    before = cache.read_bytes()
    process = subprocess.Popen(command(dataset, cache, weights_file, "--rebuild"), stderr=subprocess.PIPE)
    lock = Path(f"{cache}.lock")
    while lock.read_text() != f"process {process.pid}":  # it holds the lock: its writer is made
        assert process.poll() is None
        time.sleep(0.01)
    time.sleep(0.3)  # TensorFlow is starting: no batch yet
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 130
    assert cache.read_bytes() == before and not list(tmp_path.glob("c.h5.replaced-*"))


# 8, 9: where the cache is, and what it is


def test_a_cache_inside_the_data_folder_is_left_out_of_the_listing(dataset, tmp_path, weights_file):
    first = summary(run(dataset, dataset / "cache" / "f.h5", weights_file, "--json"))
    again = summary(run(dataset, dataset / "cache" / "f.h5", weights_file, "--json"))
    assert (first["layout"], first["skipped"]) == ("splits", 0) and first["computed"] > 0
    assert (again["layout"], again["computed"], again["skipped"], again["unchanged"]) == ("splits", 0, 0, first["computed"])


@pytest.mark.parametrize("rebuild", [False, True])
def test_a_folder_as_cache_is_refused_and_left_alone(dataset, tmp_path, weights_file, rebuild):
    folder = tmp_path / "cache"
    (folder / "mine").mkdir(parents=True)
    done = run(dataset, folder, weights_file, *(["--rebuild"] if rebuild else []))
    one_line(done, 2, "is a folder", "features.h5")
    assert (folder / "mine").is_dir() and not list(tmp_path.glob("cache.*"))


def damage_no_version(file, fingerprint):
    del file.attrs["format_version"]


def damage_configs_not_a_group(file, fingerprint):
    del file["configs"]
    file["configs"] = [1, 2, 3]


def damage_empty_config(file, fingerprint):
    del file["configs"][fingerprint]
    file["configs"].create_group(fingerprint)


@pytest.mark.parametrize("damage, words", [
    (damage_no_version, ["checksum does not match", "--repair", "--rebuild"]),  # the root's digest
    (damage_configs_not_a_group, ["lacks its configs group", "--repair", "--rebuild"]),
    (damage_empty_config, ["is damaged", "--repair", "--rebuild"]),
])
def test_a_cache_missing_its_parts_says_what_to_do(dataset, tmp_path, weights_file, damage, words):
    cache = tmp_path / "c.h5"
    fingerprint = summary(run(dataset, cache, weights_file, "--json"))["fingerprint"]
    with h5py.File(cache, "r+") as file:
        damage(file, fingerprint)
    one_line(run(dataset, cache, weights_file), 1, *words)
    from extract import CacheError

    with pytest.raises(CacheError, match="--rebuild"):
        FeatureCache(cache).close()
    assert summary(run(dataset, cache, weights_file, "--rebuild", "--json"))["rows"] == 6


# 10, 12: names


def test_names_that_are_not_utf8(dataset, tmp_path, weights_file):
    inner = os.fsencode(dataset / "train" / "cat") + b"/bad\xff"
    os.mkdir(inner)
    os.link(dataset / "train" / "cat" / "0.png", inner + b"/0.png")
    os.link(dataset / "train" / "cat" / "0.png", os.fsencode(dataset / "train" / "dog") + b"/\xfe.png")
    failures = dict(summary(run(dataset, tmp_path / "c.h5", weights_file, "--json"))["failures"])
    assert failures == {"train/cat/bad\\xff/": "folder name is not valid UTF-8; not listed (rename it)",
                        "train/dog/\\xfe.png": "file name is not valid UTF-8 (rename it)"}
    odd = os.fsencode(tmp_path) + b"/odd\xff"
    os.mkdir(odd)
    for where, arguments in (
        ("DATA_DIR", (odd, tmp_path / "c.h5", weights_file)),
        ("--cache", (dataset, odd + b"/c.h5", weights_file)),
        ("--weights", (dataset, tmp_path / "c.h5", odd)),
    ):
        one_line(run(*arguments), 2, f"Expected {where} to be a path in UTF-8", "odd\\udcff")


def test_control_characters_in_names_are_escaped_on_the_terminal(dataset, tmp_path, weights_file):
    name = "evil\x1b]0;owned\x07\x1b[2J\nnext.jpg"
    (dataset / "train" / "cat" / name).write_text("not an image")
    done = run(dataset, tmp_path / "c.h5", weights_file, quiet=False)
    out = done.stdout
    assert done.returncode == 0 and "\x1b" not in out and "\x07" not in out
    assert "  failed: train/cat/evil\\x1b]0;owned\\x07\\x1b[2J\\nnext.jpg: not an image" in out
    failures = dict(summary(run(dataset, tmp_path / "c.h5", weights_file, "--json"))["failures"])
    assert f"train/cat/{name}" in failures  # --json keeps it verbatim (JSON escapes it)


# 11: a closed pipe


def test_a_closed_stdout_ends_quietly(dataset, tmp_path, weights_file):
    read, write = os.pipe()
    os.close(read)  # as `| head -c10` does once it has its bytes
    try:
        done = subprocess.run(command(dataset, tmp_path / "c.h5", weights_file, "--json"), stdout=write,
                              stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 0 and done.stderr == b"", done.stderr.decode()  # as every command (docs/exit-status.md)
    with FeatureCache(tmp_path / "c.h5") as cache:
        assert len(cache.paths()) == 6


# Found in a hostile pass of our own


def test_a_lock_file_that_is_a_fifo_or_a_link_is_refused_not_waited_on_or_written(dataset, tmp_path, weights_file):
    cache = tmp_path / "c.h5"
    os.mkfifo(f"{cache}.lock")
    one_line(run_apart(dataset, cache, weights_file), 1, "is not a regular file; remove it")
    os.unlink(f"{cache}.lock")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, f"{cache}.lock")
    one_line(run(dataset, cache, weights_file), 1, "is a symbolic link; remove it")
    assert victim.read_text() == "keep me"


def test_a_cache_path_that_is_a_fifo_is_refused(dataset, tmp_path, weights_file):
    os.mkfifo(tmp_path / "c.h5")
    one_line(run_apart(dataset, tmp_path / "c.h5", weights_file), 2, "is not a regular file (a FIFO)")


def test_a_batch_too_large_for_memory_is_refused(dataset, tmp_path, weights_file):
    done = run(dataset, tmp_path / "c.h5", weights_file, "--batch-size", "1024", "--input-size", "1024")
    one_line(done, 2, "received 1024 x 1024²", "Lower --batch-size")


def test_a_file_swapped_for_a_fifo_after_listing_is_not_waited_on(tmp_path):
    """The reader checks the opened descriptor itself: a FIFO put where a listed image was
    fails at once (the alarm would end a blocking open)."""
    from extract.layout import ImageFile
    from extract.reader import load

    os.mkfifo(tmp_path / "x.png")
    signal.alarm(10)
    try:
        loaded = load(Folder(tmp_path), ImageFile("x.png", "", "unlabeled", 10, 0), SIZE, "bilinear")
    finally:
        signal.alarm(0)
    assert loaded.error == "cannot read file: not a regular file (a FIFO)"
