"""Logging set-up shared by the daemons and the CLI: one line per event, mail-log style."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

from mailwarden.config import GeneralConfig

SYSLOG_SOCKET = "/dev/log"


def setup_logging(cfg: GeneralConfig, program: str) -> logging.Handler:
    """Send mailwarden's loggers to stderr or syslog (facility mail) at the configured level.

    Lines read ``mailwarden/PROGRAM[PID]: NODE: message`` like the Postfix daemons'.
    Without a syslog socket (containers, tests) logging falls back to stderr.
    """
    handler: logging.Handler
    tag = f"mailwarden/{program}[{os.getpid()}]: "
    if cfg.log_target == "syslog" and Path(SYSLOG_SOCKET).exists():
        handler = logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        handler.setFormatter(logging.Formatter(f"{tag}{cfg.node_name}: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
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
