"""The fields of a log line, and the mailwarden id that follows one message.

Both daemons write ``key=value`` lines in the style of Postfix's own
(``queue_id=4Q2b7x1Xyz stage=RCPT ... reason="relay denied"``; the milter's line
starts with the queue id, ``4Q2b7x1Xyz: accept mwid=... from=<...>``).  One parser
reads them back: the JSON log format (:mod:`mailwarden.log`) and ``mailwarden
trace`` (:mod:`mailwarden.trace`) both use :func:`line_fields`.

The **mailwarden id** (``mwid``) names one message across nodes: the milter gives
every message one at the end of DATA, logs it, and writes it into each copy it
lets through as ``X-Mailwarden-Id`` (re-injected variants included), a field only
mailwarden may set (copies arriving from outside lose theirs at every edge).  It is
16 characters of lower-case base 32 (RFC 4648's "extended hex" alphabet, 0-9 a-v):
48 bits of milliseconds since the epoch, then 32 random bits, so ids sort by time
and two nodes practically never make the same.
"""

from __future__ import annotations

import base64
import random
import re
import time

ID_HEADER = "X-Mailwarden-Id"
"""The header field that carries a message's mailwarden id."""

NOQUEUE = "NOQUEUE"
"""Written where a message has no Postfix queue id (yet)."""

_FIELD = re.compile(r'(?:^|(?<=[\s,]))([A-Za-z_][\w.-]*)=("(?:[^"\\]|\\.)*"|<[^>\s]*>|[^\s,]*)')
_LEADING_ID = re.compile(r"^([0-9A-Za-z]{5,}|NOQUEUE): ")
_MWID = re.compile(r"^[0-9a-v]{16}$")


def new_mwid(clock: float | None = None) -> str:
    """A new mailwarden id (time-ordered, 16 characters of base 32)."""
    ms = int((time.time() if clock is None else clock) * 1000) & (2**48 - 1)
    # The random part only keeps ids of one millisecond apart (no secret): the module's
    # generator, seeded from the system and again in each forked worker, makes no system
    # call, which on the event loop's thread would hand the interpreter to a busy
    # executor thread for up to its switch interval.
    raw = ms.to_bytes(6, "big") + random.getrandbits(32).to_bytes(4, "big")
    return base64.b32hexencode(raw).decode("ascii").lower()


def is_mwid(text: str) -> bool:
    """Whether ``text`` has the form of a mailwarden id."""
    return bool(_MWID.match(text))


def line_fields(message: str) -> dict[str, str]:
    """The ``key=value`` fields of one log message (quotes removed, ``<...>`` kept).

    A message starting ``QUEUEID: `` (the milter's line, Postfix's lines) gives
    ``queue_id``; ``queue_id=NOQUEUE`` is left out, like an empty value.
    """
    found: dict[str, str] = {}
    lead = _LEADING_ID.match(message)
    if lead and lead.group(1) != NOQUEUE:
        found["queue_id"] = lead.group(1)
    for key, raw in _FIELD.findall(message):
        value = raw[1:-1].replace('\\"', '"') if raw.startswith('"') and len(raw) > 1 else raw
        found.setdefault(key, value)
    if found.get("queue_id") in ("", NOQUEUE):
        del found["queue_id"]
    return found
