"""Logging set-up shared by the daemons and the CLI: one line per event, mail-log style
(``log_format = "text"``) or one JSON object per line (``"json"``)."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from datetime import datetime
from pathlib import Path

from mailwarden.config import GeneralConfig
from mailwarden.logfields import line_fields

SYSLOG_SOCKET = "/dev/log"

JSON_KEYS = ("time", "node", "program", "pid", "level", "message")
"""The keys every JSON line has; the message's ``key=value`` fields follow (never replacing these)."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601 with offset), node, program, pid,
    level, message, then the message's ``key=value`` fields (``queue_id``, ``mwid``, ...)."""

    def __init__(self, node: str, program: str, *, prefix: str = "") -> None:
        super().__init__()
        self.node = node
        self.program = program
        self.prefix = prefix
        """Written before the object (the syslog tag)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        obj: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="microseconds"),
            "node": self.node, "program": self.program, "pid": record.process or os.getpid(),
            "level": record.levelname.lower(), "message": message,
        }
        for key, value in line_fields(message).items():
            obj.setdefault(key, value)
        return self.prefix + json.dumps(obj, ensure_ascii=False)


def setup_logging(cfg: GeneralConfig, program: str) -> logging.Handler:
    """Send mailwarden's loggers to stderr or syslog (facility mail) at the configured level.

    Text lines read ``mailwarden/PROGRAM[PID]: NODE: message`` like the Postfix daemons';
    JSON lines are objects (:class:`JsonFormatter`).  Without a syslog socket
    (containers, tests) logging falls back to stderr.
    """
    handler: logging.Handler
    tag = f"mailwarden/{program}[{os.getpid()}]: "
    syslog = cfg.log_target == "syslog" and Path(SYSLOG_SOCKET).exists()
    if syslog:
        handler = logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
    if cfg.log_format == "json":
        handler.setFormatter(JsonFormatter(cfg.node_name, f"mailwarden/{program}",
                                           prefix=tag if syslog else ""))
    elif syslog:
        handler.setFormatter(logging.Formatter(f"{tag}{cfg.node_name}: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {tag}{cfg.node_name}: %(levelname)s %(message)s")
        )
    root = logging.getLogger("mailwarden")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(cfg.log_level.upper())
    root.propagate = False
    return handler
