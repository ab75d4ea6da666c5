"""The metrics as a file for node_exporter's textfile collector (poolkeeper.service.metrics).

Written from a thread of its own every `textfile_every`, never from the main loop: rendering
the text of thousands of jobs takes milliseconds, a slow disk longer. Atomically: a temporary
file in the same directory (named so that the collector, which reads only *.prom, never reads
it), mode 0644 (node_exporter runs as another user), then rename(2); a reader sees the old
file or the new one, never part of one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable


class Unavailable(Exception):
    """The metrics cannot be exposed as asked: a textfile that cannot be written, a listener
    that cannot bind (poolkeeper.service.metrics)."""

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


class TextfileWriter:
    """Writes `text()` to `path` every `every` seconds until stop()."""

    def __init__(
        self, text: Callable[[], str], path: str, every: float, log: logging.Logger
    ) -> None:
        self.text = text
        self.log = log
        self.path = path
        self.every = every
        self._stop = threading.Event()
        self._problem: str | None = None
        self.write()  # at start, in the caller: a directory we cannot write fails the start
        self._thread = threading.Thread(target=self._run, name="metrics-textfile", daemon=True)
        self._thread.start()
        log.info("metrics: writing %s every %gs", path, every)

    def write(self) -> None:
        """One atomic write; raises Unavailable."""
        directory, name = os.path.split(self.path)
        data = self.text().encode()
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                os.fchmod(out.fileno(), 0o644)  # mkstemp makes it 0600: the collector reads it
            os.replace(tmp, self.path)
        except OSError as exc:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            why = exc.strerror or str(exc)
            raise Unavailable(
                f"metrics.textfile {self.path}: cannot write: {why}", exc.errno
            ) from None

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._write_logged()

    def _write_logged(self) -> None:
        """A write whose failure is a warning, said once until it changes or recovers:
        the metrics go on being served, and the file's age tells the rest."""
        try:
            self.write()
        except Unavailable as exc:
            problem = str(exc)
            if problem != self._problem:
                self.log.warning("metrics: textfile not written: %s", problem)
            self._problem = problem
            return
        if self._problem is not None:
            self.log.info("metrics: textfile %s written again", self.path)
            self._problem = None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._write_logged()
