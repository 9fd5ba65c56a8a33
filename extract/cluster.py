"""The Ray cluster the Ray engine runs on (`ray_engine`): joining it or starting one, as
Ray's own tools do (`connect`, `session`), and what is checked before a job, so that what
can be refused is refused in one line, not as a page of Ray's notes per task: Ray itself
(`require_ray`), an address nobody answers, the folders every node must share
(`check_shared`), a weights file that is not VGG16's (`check_weights`). `job_errors`
turns a job that failed anyway into the project's one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import threading
import uuid
from pathlib import Path

from extract import errors
from extract.backbone import weights_error
from extract.config import FeatureConfig
from extract.errors import CacheError, ExtractError, UsageError
from extract.options import StrOptions, check_options

ENGINES = ("local", "ray")
CONNECT_SECONDS = 10
VGG16_CONVOLUTIONS = frozenset(f"block{block}_conv{conv}" for block, convs in enumerate((2, 2, 3, 3, 3), 1)
                               for conv in range(1, convs + 1))
INSTALL = "pip install 'bottleneck-features[ray]' (in a checkout: pip install '.[ray]')"


def check_engine(engine: str, address: str | None = None, actors: int | None = None) -> None:
    """Refuse, before any work, an unknown engine, Ray's options without `--engine ray`,
    and `--engine ray` where Ray is missing or its cluster does not answer."""
    check_options({"--engine": engine}, {"--engine": StrOptions(ENGINES)})
    if engine == "local" and (address or actors):
        raise UsageError("--ray-address and --ray-actors need --engine ray.")
    if engine == "ray":
        require_ray(address)


def require_ray(address: str | None = None) -> None:
    """Refuse --engine ray in one line where Ray is not installed, or where the cluster
    `address` (else RAY_ADDRESS) names does not answer."""
    try:
        with _signals_kept():
            import ray  # noqa: F401
            import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(f"--engine ray needs Ray Data, which is not installed: {INSTALL}.") from None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _reachable(address)


def connect(address: str | None = None) -> bool:
    """Join the Ray cluster at `address` (else `RAY_ADDRESS`), or start Ray on this machine
    when neither is set, as Ray's own tools do. Returns whether this call connected (False
    when Ray was connected already); the caller then disconnects with `ray.shutdown()`,
    which also stops a Ray this call started."""
    require_ray(address)
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        with _signals_kept():
            _init(ray, address)
    except (ConnectionError, RuntimeError, ValueError) as error:
        ray.shutdown()
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UsageError(
            f"Cannot connect to the Ray cluster at {address!r} ({first}); check --ray-address or RAY_ADDRESS "
            f"(`ray status` on the head node says whether it runs)."
        ) from None
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its notes, and failures: said in one line here
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows one bar, in images
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    return True


def _init(ray, address: str | None) -> None:
    if address:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    else:
        ray.init(logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False)


@contextlib.contextmanager
def _signals_kept():
    """Keep the process's own SIGTERM and SIGINT handlers: Ray's native code replaces them
    when it is imported and started (with one that prints a stack and dies), which would
    turn a scheduler's stop into a page of frames instead of a clean, committed exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set(kept))  # one that comes meanwhile waits for ours
    try:
        yield
    finally:
        for number, handler in kept.items():
            if handler is not None:
                signal.signal(number, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _reachable(address: str) -> None:
    """Refuse at once a cluster address nothing answers at (`ray.init` waits for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local": Ray's own ways of finding a cluster
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise UsageError(
            f"Cannot connect to the Ray cluster at {address!r} ({error.strerror or error}); check --ray-address or "
            f"RAY_ADDRESS (`ray status` on the head node says whether it runs)."
        ) from None


@contextlib.contextmanager
def session(address: str | None = None):
    """Ray connected for the duration, then disconnected (and stopped, if started here)."""
    connected = connect(address)
    try:
        yield
    finally:
        if connected:
            import ray

            ray.shutdown()


def check_shared(folder: Path | None, needed: list[Path] = ()) -> None:
    """Refuse, in one line, a shard folder that some node of the cluster cannot write or
    does not share with the driver (the driver writes a marker there; a task pinned to
    every alive node must find it and write beside it), or a file every node must read
    (`needed`: one of DATA_DIR's images, the weights file) that some node cannot see.
    Without a `folder` (scoring writes no shard), only the files are checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = folder / f".shared-{uuid.uuid4().hex}" if folder else None
    if marker:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text("written by the driver\n")
    try:
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
        answers = ray.get([
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
                marker and str(marker), [str(path) for path in needed])
            for node in nodes
        ])
    finally:
        if marker:
            marker.unlink(missing_ok=True)
    for node, why in zip(nodes, answers):
        if why:
            raise UsageError(
                f"Expected DATA_DIR, the cache's folder and the weights at the same paths on every Ray node; on node "
                f"{node.get('NodeManagerAddress')} {why}. Put them on a filesystem every node mounts at the same path."
            )


def _probe(marker: str | None, needed: list[str] = ()) -> str | None:
    """On one node: whether the driver's marker is there and a file can be written beside
    it, and whether the `needed` files are there. None if all is well, else why not."""
    for path in needed:
        if not os.path.exists(path):
            return f"{path!r} does not exist"
    if marker is None:
        return None
    if not os.path.isfile(marker):
        return f"the shard folder {os.path.dirname(marker)!r} is not the driver's (its marker is not there)"
    beside = f"{marker}.{os.getpid()}"
    try:
        with open(beside, "w") as file:
            file.write("written by a worker\n")
        os.unlink(beside)
    except OSError as error:
        return f"the shard folder {os.path.dirname(marker)!r} cannot be written ({error.strerror or error})"
    return None


def weights_file(config: FeatureConfig) -> list[Path]:
    """The weights file every actor reads, if the configuration names one."""
    return [] if config.weights in ("imagenet", "random") else [Path(config.weights).absolute()]


def check_weights(config: FeatureConfig) -> None:
    """Refuse here, in one line, a weights file Keras will not take for VGG16: in the actors
    it would fail as many times as Ray starts them, each failure a page of Ray's notes.
    Keras's legacy HDF5 layout (the ImageNet file's) must name VGG16's convolutions; a
    Keras 3 weights file (`.keras`, or HDF5 with a `layers` group) is left to Keras."""
    if config.weights in ("imagenet", "random") or config.weights.endswith(".keras"):
        return
    import h5py

    try:
        with h5py.File(config.weights, "r") as file:
            if "layer_names" not in file.attrs and "layers" in file:
                return
            names = {name.decode() if isinstance(name, bytes) else str(name) for name in file.attrs.get("layer_names", [])}
    except OSError:
        names = set()
    missing = sorted(VGG16_CONVOLUTIONS - names)
    if missing:
        raise weights_error(config.weights, ValueError(f"no layer {missing[0]}"))


@contextlib.contextmanager
def job_errors():
    """A failed Ray job as the project's own error, in one line: the ExtractError a task
    or actor raised (a weights file that is not VGG16's, a full disk), found among the
    causes or, as Ray passes a remote error on as text, in its message; else one line
    naming the job's failure."""
    try:
        yield
    except (KeyboardInterrupt, ExtractError):
        raise
    except Exception as error:
        cause = error
        while cause is not None:
            if isinstance(cause, ExtractError):
                raise type(cause)(str(cause)) from None
            cause = cause.__cause__ or getattr(cause, "cause", None)
        raised = re.findall(r"^extract\.errors\.(\w+): (.+)$", str(error), re.MULTILINE)
        kind = raised and getattr(errors, raised[-1][0], None)
        if isinstance(kind, type) and issubclass(kind, ExtractError):
            raise kind(raised[-1][1]) from None
        lines = [line for line in str(error).splitlines() if line.strip()]
        raise CacheError(f"The Ray job failed ({(lines[-1] if lines else type(error).__name__)[:300]}); "
                         f"every shard written before is kept. Run the same command again.") from None
