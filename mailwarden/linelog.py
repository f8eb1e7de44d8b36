"""The one-line-per-decision log (policy decisions, milter messages), written in batches.

At thousands of decisions per second, a write and flush per line is a large share
of a daemon's CPU.  When mailwarden logs to a stream (stderr, the systemd way),
decision lines logged on the event loop's thread are formatted by the configured
handler as usual (the prefix once per millisecond, from a template made once per
second when the format allows) but written together once per
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
        self._second = -1
        self._template: tuple[str, str] | None = None

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
        second = int(now)
        ms = int((now - second) * 1000)  # as LogRecord computes msecs
        if second * 1000 + ms != self._prefix_ms:
            if second != self._second:
                self._template, self._second = _second_template(handler, logger, second), second
            if self._template is not None:
                head, tail = self._template
                self._prefix = f"{head}{ms:03d}{tail}"
            else:
                record = logger.makeRecord(logger.name, logging.INFO, "", 0, "", (), None)
                self._prefix = handler.format(record)
            self._prefix_ms = second * 1000 + ms
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


def _second_template(handler: logging.Handler, logger: logging.Logger, second: int) -> tuple[str, str] | None:
    """The prefix of every line of ``second`` as the text before and after its three
    millisecond digits (the default ``asctime``), or None when the format is not of that shape.

    Asked of the formatter: prefixes of records at 0, 500 and 999 ms into the second
    (with other sub-millisecond parts and start offsets) must differ only in those
    digits. Measured reason: a record and its formatting cost about 5 µs, and at
    thousands of decisions per second almost every line starts a new millisecond.
    """
    def prefix(ms: int, fraction: float, relative: float) -> str:
        record = logger.makeRecord(logger.name, logging.INFO, "", 0, "", (), None)
        record.created = second + ms / 1000 + fraction
        record.msecs = float(ms)
        record.relativeCreated = relative
        return handler.format(record)

    low, high = prefix(0, 0.0001, 0.0), prefix(999, 0.0002, 123456.7)
    if len(low) != len(high):
        return None
    differ = [i for i, (a, b) in enumerate(zip(low, high, strict=True)) if a != b]
    if len(differ) != 3 or differ[2] - differ[0] != 2:
        return None
    at = differ[0]
    head, tail = low[:at], low[at + 3 :]
    if low[at : at + 3] != "000" or high[at : at + 3] != "999":
        return None
    middle = f"{head}500{tail}"
    if prefix(500, 0.0003, 7654321.1) != middle or prefix(500, 0.0007, 42.0) != middle:
        return None
    return head, tail


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
