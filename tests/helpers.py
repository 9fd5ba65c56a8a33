"""What the test modules share to run the three commands, and to run them fast.

- `call(entry, *args)`: a command's `main(argv)` in this process, as a CompletedProcess (status,
  stdout, stderr). For tests about what a command computes, prints or refuses.
- `start(entry, *args)` / `run(entry, *args)`: the command as a process of its own, through its
  console-script entry point (`extract.cli:run` ...), for tests whose subject is the process:
  kill -9, Ctrl-C and SIGTERM, a second process at the same moment, a full disk (RLIMIT_FSIZE).
  The process is forked from a warm interpreter that has imported Keras, TensorFlow and the
  project once (multiprocessing's forkserver with preloaded modules), so it starts in a
  fraction of a second instead of the ~6 s TensorFlow's import costs here; from its entry point
  on it is the real command. Tests about the start itself (an environment variable, a closed
  stdout at start, peak memory, which modules get imported, the documentation's shell lines)
  keep a plain `subprocess`.
- `command_line(entry, *args)`: the argv of a plain subprocess running that entry point.
- `one_line(done, status, *words)`: a refusal is one line on stderr, no traceback.
- `listing(folder, pattern)`: what a running command has written there so far.
- `BackboneKeeper`: built backbones kept per configuration for the session (conftest installs
  it), so in-process runs build VGG16 once per configuration rather than once per test.
"""

from __future__ import annotations

import glob
import importlib
import io
import multiprocessing
import os
import resource
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

EXTRACT, TRAIN, SCORE, CHECK = "extract.cli:run", "classify.train_cli:run", "classify.score_cli:run", "classify.check_cli:run"
SCRIPT = "helpers:run_script"  # start(SCRIPT, path): a Python script, as `python path` runs it
MAINS = {EXTRACT: "extract.cli:main", TRAIN: "classify.train_cli:main", SCORE: "classify.score_cli:main",
         CHECK: "classify.check_cli:main"}
NAMES = {EXTRACT: "extract-features", TRAIN: "train-head", SCORE: "score-images", CHECK: "check-data"}
# what the forked processes find imported
WARM = ["keras", "extract.cli", "classify.train_cli", "classify.score_cli", "classify.check_cli", "helpers"]


def _function(entry: str):
    module, name = entry.split(":")
    return getattr(importlib.import_module(module), name)


def _arguments(args) -> list[str]:
    """Command-line arguments as the process would get them: bytes (names that are not
    UTF-8) decoded as Python decodes sys.argv."""
    return [os.fsdecode(arg) if isinstance(arg, bytes) else str(arg) for arg in args]


def call(entry: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """The command's main(argv) in this process (argparse's exit as its status)."""
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                status = _function(MAINS.get(entry, entry))(_arguments(args))
            except SystemExit as exit:  # argparse: usage errors, --help, --version
                status = exit.code
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess([NAMES.get(entry, entry), *_arguments(args)], status, out.getvalue(),
                                       err.getvalue())


def _child(entry: str, argv: list[str], out: str, err: str, cwd, env, file_size_limit) -> None:
    """In the forked process: its own stdout and stderr files, folder, environment and file-size
    limit; then the console-script entry point, which exits with the command's status."""
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    if cwd is not None:
        os.chdir(cwd)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    if file_size_limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    interruptible()
    sys.argv = [NAMES.get(entry, entry), *argv]
    _function(entry)()


def run_script() -> None:
    """The script sys.argv[1] as `python SCRIPT ARGS` runs it (an exception: its traceback, status 1)."""
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")


def interruptible() -> None:
    """Ctrl-C raises KeyboardInterrupt, as in a Python started from a terminal, even where the
    suite itself runs with SIGINT ignored (a shell's background job): also a preexec_fn."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # across an exec: SIG_DFL, where Python installs it


_context = None


def _forkserver():
    global _context
    if _context is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(WARM)
    return _context


class Forked:
    """A command running as its own process; the subset of subprocess.Popen the tests use."""

    def __init__(self, entry: str, *args, cwd=None, env=None, file_size_limit=None):
        self._folder = tempfile.TemporaryDirectory(prefix="forked-")
        self._out, self._err = (os.path.join(self._folder.name, name) for name in ("out", "err"))
        self.args = [NAMES.get(entry, entry), *_arguments(args)]
        self._process = _forkserver().Process(
            target=_child, args=(entry, self.args[1:], self._out, self._err, cwd, env, file_size_limit), daemon=True)
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode  # negative: ended by that signal, as Popen says it

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return Path(self._out).read_text(errors="replace"), Path(self._err).read_text(errors="replace")

    def __del__(self):
        if getattr(self, "_process", None) is not None and self._process.exitcode is None:
            self.kill()
            self._process.join(10)


def start(entry: str, *args, **options) -> Forked:
    """The command as its own process (forked warm; see the module's docstring)."""
    return Forked(entry, *args, **options)


def run(entry: str, *args, timeout: float = 180, **options) -> subprocess.CompletedProcess:
    """The command as its own process, to its end: (status, stdout, stderr)."""
    process = Forked(entry, *args, **options)
    try:
        out, err = process.communicate(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def command_line(entry: str, *args, setup: str = "") -> list:
    """A plain subprocess's argv: Python running `setup`, then the entry point under its
    command's name (bytes arguments are passed as they are)."""
    module, name = entry.split(":")
    code = f"{setup}import sys; sys.argv[0] = {NAMES.get(entry, entry)!r}; from {module} import {name}; {name}()"
    return [sys.executable, "-c", code, *(arg if isinstance(arg, bytes) else str(arg) for arg in args)]


def listing(folder: Path, pattern: str) -> list[str]:
    """The paths under `folder` matching `pattern`, while a running process creates and
    removes them: the glob module passes over a folder that vanishes as it is listed
    (Path.glob raises FileNotFoundError)."""
    return glob.glob(os.path.join(glob.escape(str(folder)), pattern))


def wait_for(folder: Path, pattern: str, process, timeout: float = 120) -> bool:
    """Wait until a running `process` has written something matching `pattern` under `folder`
    (True), or has ended first (False); fails the test after `timeout` seconds of neither."""
    deadline = time.monotonic() + timeout
    while not listing(folder, pattern):
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.005)
    return True


def ctrl_c(process, folder: Path, pattern: str, settle: float) -> str:
    """Ctrl-C a running command `settle` seconds after it wrote `pattern` under `folder`; it must
    end with status 130 and one line on stderr saying it was interrupted (returned)."""
    assert wait_for(folder, pattern, process), process.communicate()
    time.sleep(settle)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err, err
    return err


def one_line(done: subprocess.CompletedProcess, status: int, *words: str) -> str:
    """The error of a run that must end with `status` and one line on stderr holding `words`."""
    err = done.stderr.decode(errors="replace") if isinstance(done.stderr, bytes) else done.stderr
    assert done.returncode == status, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


class BackboneKeeper:
    """Stands in for `Backbone` where the pipeline builds one: the same configuration (and the
    same weights file, unchanged) gets the backbone built the first time. A test that patches
    `Backbone.__init__` (to assert that nothing is built) gets the class itself, so its patch
    still sees every request for a network."""

    def __init__(self, backbone_class, most: int = 8):
        self.backbone_class, self.most, self.built = backbone_class, most, {}
        self._init = backbone_class.__init__

    def __call__(self, config, *args, **options):
        if self.backbone_class.__init__ is not self._init:
            return self.backbone_class(config, *args, **options)
        from extract.config import keras_backend

        weights = Path(config.weights)
        stamp = (weights.resolve(), weights.stat().st_mtime_ns, weights.stat().st_size) if weights.is_file() else None
        key = (config, stamp, keras_backend(), args, tuple(sorted(options.items())))
        if key not in self.built:
            if len(self.built) >= self.most:
                self.built.pop(next(iter(self.built)))
            self.built[key] = self.backbone_class(config, *args, **options)
        return self.built[key]

