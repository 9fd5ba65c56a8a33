"""Every snippet in README.md and docs/*.md runs as written.

Which snippets, by the fence's info string:
- ```python: run as a script by this Python (the project's venv), one process per snippet, so
  each snippet imports what it uses.
- ```sh: run by bash line by line, one process per line (a line ending in a backslash goes on
  to the next; blank and comment lines are skipped; `cd` and `export` do not carry over). Each
  line must exit 0, except a line whose documented point is an error: its trailing comment
  starts with `# exit N`, and it must exit with status N.
- ```text: not code (a folder layout, output, a format): never run.
- `<!-- not run: REASON -->` on the line just before a python or sh fence: not run, for the
  reason given (a Ray cluster, a GPU, a download, the whole test suite). These are counted
  and listed, with their reasons, in a warning of test_not_run_snippets_are_few_and_explained
  (pytest's warnings summary), which also fails when fewer than MIN_RUN snippets or
  MIN_COMMANDS commands run, or more than MAX_NOT_RUN are marked.
- Any other fence (a bare one, bash, console, ...) fails the test: pick one of the above.

Which configuration: after a page's snippets ran, the README's cache, `cache/features.h5`, holds
exactly the configurations the page means to make: the one the folder starts with, unless the
page says otherwise with `<!-- configurations: N (which) -->` (a snippet that drops an option, such as
`pooling="avg"`, adds a configuration silently and the next snippet trains on that one).

How: a python snippet, and a sh line that is one plain call of extract-features, train-head,
score-images or check-data (no variable, pipe, redirection, glob or ~ for bash to expand), runs as a process of
its own forked from a warm interpreter (tests/helpers.py: the same entry point the installed
command calls, without the seconds TensorFlow's import costs); every other line runs in bash.

Where: each page runs in a temporary folder of its own, its snippets in document order
sharing it (extract, then train, then score). The folder holds what the pages assume:
`data/` (train/validation/test folders of two classes, tiny images), `new_photos/`, `a.jpg`,
`b.png` and `more.txt` (a list of paths), and the cache the README's quickstart makes
(`extract-features data/ --pooling avg`, rewritten as below), made once and copied, since
train-head.md, score-images.md and cache.md say they start from it. `.venv` links to this
venv, so `.venv/bin/extract-features` resolves; PATH starts with this venv's bin, so a bare
`extract-features` is the venv's, as for a user with the venv active or a pip install. HOME
is a folder of its own.

The one rewrite: the ImageNet weights. Keras downloads them (58 MB) on first use; here and in
CI there is no network, and VGG16 at 224 px is slow on two cores. So every `extract-features`
command line, and every `extract_features(...)` call in Python, that uses the ImageNet
weights (no weights given, or `imagenet`) gets the test's weights file instead (VGG16 without
its top, seeded, in the legacy HDF5 layout of Keras's file: conftest's `weights_file`), and
every one that gives no input size gets `--input-size 32` (`input_size=32`). Nothing else is
changed: other weights (`random`, a file) are kept, train-head, score-images and `--export`
run as written (they rebuild the configuration recorded with the cache or the head), the
product's code is not patched, and a failure shows the text as it was run. The offline
example's `~/Downloads/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5` is that same test
file, placed in the test's HOME; it is not Keras's file, so the project records it by its
SHA-256, the same configuration as the rewritten runs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

import helpers
from conftest import make_image
from extract import describe, list_configs

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
RUN = ("python", "sh")
NOT_CODE = ("text",)
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<reason>.*?)\s*-->\s*$")
EXPECTED_EXIT = re.compile(r"#\s*exit (\d+)\b")
CONFIGURATIONS = re.compile(r"^<!--\s*configurations:\s*(\d+)\b.*-->\s*$", re.M)
TEST_INPUT_SIZE = 32
DOWNLOADED = "Downloads/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
TIMEOUT = 300  # seconds, per command
MIN_RUN = 12  # snippets run, over all pages: fewer means snippets went missing or were marked not run
MIN_COMMANDS = 22  # python snippets and sh command lines run, over all pages
MAX_NOT_RUN = 8  # raise it only for a snippet that truly cannot run here, with its reason in the marker


@dataclass
class Snippet:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    not_run: str | None  # the reason, when marked not run

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def snippets(page: Path) -> list[Snippet]:
    """The fenced blocks of a Markdown page, with the not-run marker that precedes each."""
    found, lines, i = [], page.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(`{3,}|~{3,})\s*(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        start, marker = i, fence.group(1)
        i += 1
        while i < len(lines) and not lines[i].startswith(marker):
            i += 1
        previous = NOT_RUN.match(lines[start - 1]) if start else None
        found.append(Snippet(page, start + 1, fence.group(2), "\n".join(lines[start + 1:i]) + "\n",
                             previous.group("reason") if previous else None))
        i += 1
    return found


# -- the rewrite ---------------------------------------------------------------------------

COMMAND = re.compile(r"(?:^|(?<=[\s;&|(]))(?:\S*/)?extract-features(?=\s|$)")
COMMAND_END = re.compile(r"\s(?:\||&&|;|[0-9]?>)")


def rewrite_shell(line: str, weights: Path) -> str:
    """Give each extract-features on the line the test's weights where it would use
    ImageNet's, and --input-size 32 where it gives no size. A trailing comment is left alone."""
    comment = re.search(r"(?:^|\s)#", line)
    if comment:
        return rewrite_shell(line[:comment.start()], weights) + line[comment.start():]
    out, position = [], 0
    for match in COMMAND.finditer(line):
        if match.start() < position:
            continue
        end = COMMAND_END.search(line, match.end())
        end = end.start() if end else len(line.rstrip())
        segment = line[match.start():end]
        segment = re.sub(r"--weights[ =]imagenet(?=\s|$)", f"--weights {weights}", segment)
        if not re.search(r"--weights[ =]", segment):
            segment += f" --weights {weights}"
        if not re.search(r"--input-size[ =]", segment):
            segment += f" --input-size {TEST_INPUT_SIZE}"
        out += [line[position:match.start()], segment]
        position = end
    return "".join(out) + line[position:]


def rewrite_python(code: str, weights: Path) -> str:
    """The same for every extract_features(...) call: weights=<test file> where it would use
    ImageNet's, input_size=32 where it gives none."""
    out, position = [], 0
    for match in re.finditer(r"(?<!def )\bextract_features\(", code):
        depth, end = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(code[end], 0)
            end += 1
        call = code[match.start():end - 1]  # without its closing parenthesis
        call = re.sub(r"""weights\s*=\s*["']imagenet["']""", f"weights={str(weights)!r}", call)
        additions = [] if re.search(r"\bweights\s*=", call) else [f"weights={str(weights)!r}"]
        if not re.search(r"\binput_size\s*=", call):
            additions.append(f"input_size={TEST_INPUT_SIZE}")
        if additions:
            call = call.rstrip() + (", " if not call.rstrip().endswith(("(", ",")) else " ") + ", ".join(additions)
        out += [code[position:match.start()], call, ")"]
        position = end
    return "".join(out) + code[position:]


def shell_commands(code: str) -> list[tuple[int, str]]:
    """(offset of the line within the block, command) for each command of a sh block."""
    commands, pending, first = [], "", 0
    for offset, line in enumerate(code.splitlines(), start=1):
        if not pending:
            first = offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command, pending = (pending + line).strip(), ""
        if command and not command.startswith("#"):
            commands.append((first, command))
    return commands


def configurations_meant(page: Path) -> int:
    """How many configurations the page means cache/features.h5 to hold once it ran: 1, or
    what its `<!-- configurations: N -->` says."""
    said = CONFIGURATIONS.findall(page.read_text(encoding="utf-8"))
    return int(said[0]) if said else 1


def expected_status(command: str) -> int:
    comment = re.search(r"\s#(.*)$", command)
    found = EXPECTED_EXIT.match("#" + comment.group(1).lstrip()) if comment else None
    return int(found.group(1)) if found else 0


# -- the folder a page runs in ---------------------------------------------------------------

def make_folder(root: Path) -> None:
    """data/ in the README's layout (with a test/ split), new_photos/, a.jpg, b.png, more.txt, kaggle/."""
    number = 0
    for split, per_class in (("train", 8), ("validation", 3), ("test", 3)):
        for c, name in enumerate(("cats", "dogs")):
            for i in range(per_class):
                number += 1
                make_image(root / "data" / split / name / f"{i:03d}.jpg", seed=number, size=(40 + i, 30 + c))
    for i in range(3):
        make_image(root / "new_photos" / f"photo{i}.jpg", seed=500 + i, size=(48, 36))
    make_image(root / "a.jpg", seed=600)
    make_image(root / "b.png", seed=601)
    (root / "more.txt").write_text("# one path a line\nnew_photos/photo0.jpg\nnew_photos/photo1.jpg\n")
    rows = ["id,path,label"]  # a Kaggle-style folder: images, and their labels in a CSV
    for i in range(8):
        make_image(root / "kaggle" / "images" / f"{i:04d}.jpg", seed=700 + i, size=(44, 33))
        rows.append(f"{i},{i:04d}.jpg,{'cat' if i % 2 else 'dog'}")
    (root / "kaggle" / "labels.csv").write_text("\n".join(rows) + "\n")


def environment(folder: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["HOME"] = str(folder / "home")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["MPLBACKEND"] = "Agg"
    env.pop("RAY_ADDRESS", None)
    return env


COMMANDS = {"extract-features": helpers.EXTRACT, "train-head": helpers.TRAIN, "score-images": helpers.SCORE,
            "check-data": helpers.CHECK}
SHELL_SYNTAX = re.compile(r"""[$`|&;<>(){}*?\[\]~"'\\]""")


def run(args, folder: Path, input: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=folder, env=environment(folder), input=input, capture_output=True, text=True,
                          timeout=TIMEOUT)


def plain_call(line: str) -> list[str] | None:
    """The words of a sh line that is one plain call of one of the commands (the same
    words bash would pass it), else None."""
    code = re.sub(r"(?:^|\s)#.*$", "", line).strip()
    if SHELL_SYNTAX.search(code):
        return None
    words = shlex.split(code)
    return words if words and words[0].split("/")[-1] in COMMANDS and "=" not in words[0] else None


def run_line(line: str, folder: Path) -> subprocess.CompletedProcess:
    """A sh line: forked warm where it is a plain call, else by bash."""
    words = plain_call(line)
    if words is None:
        return run(["bash", "-c", line], folder, input="")
    return helpers.run(COMMANDS[words[0].split("/")[-1]], *words[1:], cwd=folder, env=environment(folder),
                       timeout=TIMEOUT)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, weights_file) -> Path:
    """The folder every page starts from, with the cache of the README's first command. Pages
    run at one path, work/, each on a fresh copy of it (the cache records DATA_DIR's absolute
    path, and refuses another folder's images)."""
    root = tmp_path_factory.mktemp("docs")
    work = root / "work"
    make_folder(work)
    (work / "home" / DOWNLOADED).parent.mkdir(parents=True)
    (work / "home" / DOWNLOADED).symlink_to(weights_file)
    (work / ".venv").symlink_to(Path(sys.executable).parent.parent, target_is_directory=True)
    command = rewrite_shell("extract-features data/ --pooling avg --quiet", weights_file)
    done = run_line(command, work)
    assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
    shutil.copytree(work, root / "template", symlinks=True)
    return root


def fresh_folder(prepared: Path) -> Path:
    work = prepared / "work"
    shutil.rmtree(work)
    shutil.copytree(prepared / "template", work, symlinks=True)
    return work


def tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


# -- the tests ---------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_snippets_run_as_written(page, prepared, weights_file, tmp_path):
    found = snippets(page)
    unknown = [f"{s.where} (```{s.language})" for s in found if s.language not in RUN + NOT_CODE]
    assert not unknown, (f"Fences must be ```python or ```sh (run) or ```text (not code); got {', '.join(unknown)}. "
                         "Mark a snippet that cannot run here with <!-- not run: REASON --> on the line before it.")
    misplaced = [s.where for s in found if s.not_run is not None and s.language not in RUN]
    assert not misplaced, f"<!-- not run --> marks a python or sh snippet; ```text is never run: {misplaced}"
    to_run = [s for s in found if s.language in RUN and s.not_run is None]
    if not to_run:
        return
    folder = fresh_folder(prepared)
    for snippet in to_run:
        if snippet.language == "python":
            code = rewrite_python(snippet.code, weights_file)
            script = tmp_path / f"snippet_{snippet.line}.py"
            script.write_text(code)
            done = helpers.run(helpers.SCRIPT, script, cwd=folder, env=environment(folder), timeout=TIMEOUT)
            assert done.returncode == 0, (f"{snippet.where}: the python snippet exited {done.returncode}\n"
                                          f"--- as run:\n{code}--- output:\n{tail(done.stdout + done.stderr)}")
            continue
        for offset, command in shell_commands(snippet.code):
            as_run = rewrite_shell(command, weights_file)
            done = run_line(as_run, folder)
            expected = expected_status(command)
            assert done.returncode == expected, (
                f"{page.relative_to(ROOT)}:{snippet.line + offset}: exit status {done.returncode}, expected {expected}\n"
                f"--- as run:\n{as_run}\n--- output:\n{tail(done.stdout + done.stderr)}")
            if expected:  # an error's point is its one line
                assert done.stderr.strip(), f"{snippet.where}: `{command}` failed without saying why"

    made = [describe(facts) for facts in list_configs(folder / "cache" / "features.h5")]
    assert len(made) == configurations_meant(page), (
        f"{page.relative_to(ROOT)}: after its snippets, cache/features.h5 holds {len(made)} configurations "
        f"({'; '.join(made)}); the page means {configurations_meant(page)}. Give each snippet the options of the "
        "configuration it means, or say <!-- configurations: N --> on the page.")


def test_not_run_snippets_are_few_and_explained():
    found = [s for page in PAGES for s in snippets(page)]
    not_run = [s for s in found if s.not_run is not None]
    ran = [s for s in found if s.language in RUN and s.not_run is None]
    listing = "\n".join(f"  {s.where}: {s.not_run}" for s in not_run)
    assert all(len(s.not_run) >= 10 for s in not_run), f"Say why each snippet is not run:\n{listing}"
    assert len(ran) >= MIN_RUN, f"Only {len(ran)} snippets run (at least {MIN_RUN} expected); not run:\n{listing}"
    commands = sum(1 if s.language == "python" else len(shell_commands(s.code)) for s in ran)
    assert commands >= MIN_COMMANDS, f"Only {commands} commands run (at least {MIN_COMMANDS} expected)"
    assert len(not_run) <= MAX_NOT_RUN, f"{len(not_run)} snippets not run (at most {MAX_NOT_RUN}):\n{listing}"
    warnings.warn(f"{len(ran)} snippets run ({commands} commands); {len(not_run)} not run:\n{listing}", UserWarning, stacklevel=1)


# -- the test's own machinery, checked ---------------------------------------------------------

def test_rewrite_gives_extract_features_the_test_weights_and_size():
    weights = Path("/w.h5")
    assert rewrite_shell("extract-features data/ --pooling avg", weights) == \
        "extract-features data/ --pooling avg --weights /w.h5 --input-size 32"
    assert rewrite_shell("KERAS_BACKEND=jax .venv/bin/extract-features data/  # a note", weights) == \
        "KERAS_BACKEND=jax .venv/bin/extract-features data/ --weights /w.h5 --input-size 32  # a note"
    assert rewrite_shell("extract-features d --input-size 64 --weights random --json | head", weights) == \
        "extract-features d --input-size 64 --weights random --json | head"
    assert rewrite_shell("extract-features d --weights imagenet", weights) == \
        "extract-features d --weights /w.h5 --input-size 32"
    assert rewrite_shell("train-head --head all  # what extract-features wrote", weights) == \
        "train-head --head all  # what extract-features wrote"
    assert rewrite_python('s = extract_features("data/", weights="imagenet")\n', weights) == \
        "s = extract_features(\"data/\", weights='/w.h5', input_size=32)\n"
    assert rewrite_python("extract_features(\n    'd', augmentation=A(seed=0),\n)\n", weights) == \
        "extract_features(\n    'd', augmentation=A(seed=0), weights='/w.h5', input_size=32)\n"


def test_only_plain_calls_skip_bash():
    assert plain_call("train-head --head all --out heads/all   # every head") == ["train-head", "--head", "all", "--out",
                                                                               "heads/all"]
    assert plain_call(".venv/bin/extract-features data/ --weights /w.h5") == [".venv/bin/extract-features", "data/",
                                                                               "--weights", "/w.h5"]
    for line in ("KERAS_BACKEND=jax .venv/bin/extract-features data/", "extract-features d --json | head",
                 "extract-features d --weights ~/w.h5", "extract-features $HOME/d", "score-images *.jpg --head h",
                 "ls data/", "extract-features d > out.json", "score-images 'a b.jpg' --head h"):
        assert plain_call(line) is None, line


def test_marked_errors_and_not_run_snippets_are_read(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- not run: needs a Ray cluster -->\n```sh\nray up\n```\n\n```text\nout\n```\n"
                    "```sh\nextract-features \\\n  data/\nnope   # exit 2: why\n```\n")
    first, second, third = snippets(page)
    assert (first.not_run, second.language, second.not_run, third.not_run) == ("needs a Ray cluster", "text", None, None)
    assert shell_commands(third.code) == [(1, "extract-features    data/"), (3, "nope   # exit 2: why")]
    assert [expected_status(c) for _, c in shell_commands(third.code)] == [0, 2]
    assert expected_status("train-head  # the exit 2 here is prose") == 0
