"""The one-line-per-decision log (policy decisions, milter messages), written in batches.

At thousands of decisions per second, a write and flush per line is a large share
of a daemon's CPU.  When mailwarden logs to a stream (stderr, the systemd way),
decision lines logged on the event loop's thread are formatted by the configured
handler as usual (the prefix once per millisecond) but written together once per
event-loop turn; lines from other threads, and every line with syslog or any other
handler, go through :mod:`logging` unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TextIO

ROOT = "mailwarden"
_PROBE = "<decision line>"


class DecisionLog:
    """Format decision lines with the configured handler; write them in batches."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.pending: list[str] = []
        self.handler: logging.StreamHandler[TextIO] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._prefix_ok = False
        self._prefix = ""
        self._prefix_ms = -1

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Batch when the only destination is one stream handler (else log normally)."""
        self._loop = loop
        self._thread = threading.get_ident()
        root = logging.getLogger(ROOT)
        handlers = root.handlers
        own = any(lg.handlers for lg in _between(self.logger, root))
        if (not own and not root.propagate and len(handlers) == 1
                and type(handlers[0]) is logging.StreamHandler):
            self.handler = handlers[0]
            self._prefix_ok = _prefix_format(self.handler.formatter, self.logger)

    def _line(self, line: str) -> str:
        """``line`` formatted as the handler would (the prefix is computed once per millisecond)."""
        handler = self.handler
        assert handler is not None
        logger = self.logger
        if not self._prefix_ok:
            record = logger.makeRecord(logger.name, logging.INFO, "", 0, "%s", (line,), None)
            return handler.format(record) + handler.terminator
        now = time.time()
        ms = int(now * 1000)
        if ms != self._prefix_ms:
            record = logger.makeRecord(logger.name, logging.INFO, "", 0, "", (), None)
            self._prefix, self._prefix_ms = handler.format(record), ms
        return self._prefix + line + handler.terminator

    def info(self, line: str) -> None:
        """Log one decision line at INFO."""
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        handler = self.handler
        if handler is None or self._loop is None or threading.get_ident() != self._thread:
            logger.info("%s", line)
            return
        self.pending.append(self._line(line))
        if len(self.pending) == 1:
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is pending (one write and flush)."""
        if not self.pending or self.handler is None:
            return
        text = "".join(self.pending)
        self.pending.clear()
        try:
            self.handler.acquire()
            try:
                self.handler.stream.write(text)
                self.handler.flush()
            finally:
                self.handler.release()
        except (OSError, ValueError) as exc:
            # The same stance as logging.Handler.handleError: logging must not stop the daemon.
            self.handler = None
            self.logger.error("decision log stream failed (%s); logging line by line", exc)


def _between(logger: logging.Logger, root: logging.Logger) -> list[logging.Logger]:
    """``logger`` and its parents below ``root``."""
    out = []
    current: logging.Logger | None = logger
    while current is not None and current is not root:
        out.append(current)
        current = current.parent if isinstance(current.parent, logging.Logger) else None
    return out


def _prefix_format(formatter: logging.Formatter | None, logger: logging.Logger) -> bool:
    """Whether a line is ``format(record without message) + message`` for this formatter.

    Asked of the formatter itself: two records of the same millisecond, logger and
    process, one without a message and one with a probe line, that differ in every
    field that varies between two decision lines (source line, function, thread,
    time since start).  Only a plain :class:`logging.Formatter` is asked, whose
    ``format`` depends on nothing but the record.
    """
    if type(formatter) is not logging.Formatter:
        return False
    empty = logger.makeRecord(logger.name, logging.INFO, "", 0, "", (), None)
    line = logger.makeRecord(logger.name, logging.INFO, "probe.py", 1, "%s", (_PROBE,), None,
                             func="probe")
    line.created, line.msecs = empty.created, empty.msecs
    line.relativeCreated = empty.relativeCreated + 1.0
    line.thread = (empty.thread or 0) + 1
    line.threadName = f"{empty.threadName}-probe"
    return formatter.format(line) == formatter.format(empty) + _PROBE
