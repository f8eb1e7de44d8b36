"""The one-line-per-decision log, written in batches.

At thousands of decisions per second, a write and flush per line is a large share
of the daemon's CPU.  When mailwarden logs to a stream (stderr, the systemd way),
decision lines are formatted by the configured handler as usual but written
together once per event-loop turn; with syslog or any other handler each line
goes through :mod:`logging` unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TextIO

ROOT = "mailwarden"


class DecisionLog:
    """Format decision lines with the configured handler; write them in batches."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.pending: list[str] = []
        self.handler: logging.StreamHandler[TextIO] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Batch when the only destination is one stream handler (else log normally)."""
        self._loop = loop
        root = logging.getLogger(ROOT)
        handlers = root.handlers
        own = any(lg.handlers for lg in _between(self.logger, root))
        if (not own and not root.propagate and len(handlers) == 1
                and type(handlers[0]) is logging.StreamHandler):
            self.handler = handlers[0]

    def info(self, line: str) -> None:
        """Log one decision line at INFO."""
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        handler = self.handler
        if handler is None or self._loop is None:
            logger.info("%s", line)
            return
        record = logger.makeRecord(logger.name, logging.INFO, "", 0, "%s", (line,), None)
        self.pending.append(handler.format(record) + handler.terminator)
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
