"""Outputs written whole or not at all: a temporary name beside the target, renamed when complete
and removed on any failure or stop (Ctrl-C, SIGTERM), for scene outputs and prepared images."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rasterio.errors import RasterioError


class RasterWriteError(OSError):
    """An output (raster or image) could not be written (read-only or full folder); nothing is
    left."""


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM (`kill`, a batch system's time limit) raises SystemExit(143) in
    the main thread as Ctrl-C raises KeyboardInterrupt, so `finally` clauses remove partial
    files; the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yields a temporary name beside `path`, renamed to `path` when the block succeeds and
    removed when it fails; write errors become `RasterWriteError` naming the file and the fix."""
    tmp = path.with_name(f".{path.name}.partial{path.suffix}")
    try:
        with sigterm_as_exit():
            yield tmp
            os.replace(tmp, path)
    except (OSError, RasterioError) as err:
        raise RasterWriteError(
            f"cannot write {path}: {err}; check that {path.parent} is writable and has free space"
        ) from err
    finally:
        tmp.unlink(missing_ok=True)
