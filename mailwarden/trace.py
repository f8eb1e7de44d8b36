"""``mailwarden trace``: one message's decisions, gathered from the mail logs of several nodes.

The logs are read as they are written: syslog lines (``Dec  6 22:42:55 host
prog[pid]: ...`` or with an RFC 3339 time, as rsyslog and ``journalctl -o
short-iso`` write them), Postfix's own ``maillog_file`` lines, mailwarden's stderr
lines (``2026-12-06 22:42:55,123 mailwarden/milter[pid]: node: INFO ...``, also
inside a journald line) and mailwarden's JSON lines.

From the id given (a Postfix queue id, a Message-ID or a mailwarden id) the
message's lines are found by following, until nothing new turns up:

* a queue id: every line that names it (Postfix's, the milter's, the policy
  daemon's ``queue_id=``), whichever way the links below point;
* the milter's line: its ``mwid=`` (every line with that mailwarden id) and the
  queue ids of the re-injected variants (``reinjected=``);
* the re-injection smtpd's line ``QUEUEID: client=..., orig_queue_id=...``;
* a delivery ``status=sent (... queued as QUEUEID)``: the next hop's queue id, in
  the logs of the next node;
* the policy daemon's line: its Postfix ``instance`` (one SMTP transaction), which
  also finds the requests answered before Postfix gave the message a queue id
  (``queue_id=NOQUEUE`` at RCPT);
* a Message-ID given: each queue id whose cleanup line names it.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailwarden.logfields import line_fields

JOURNAL = "journal"
"""The ``--logs`` value that reads the systemd journal (``journalctl``) instead of a file."""

_SYSLOG = re.compile(r"^(?P<time>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d(?:\.\d+)?|"
                     r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?) "
                     r"(?P<host>\S+) (?P<program>[^\s\[:]+)(?:\[(?P<pid>\d+)\])?: (?P<message>.*)$")
_STDERR = re.compile(r"^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) (?P<program>mailwarden/[^\s\[]+)"
                     r"\[(?P<pid>\d+)\]: (?P<message>.*)$")
_OURS = re.compile(r"^(?P<node>\S+): (?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) )?(?P<message>.*)$")
_QUEUED_AS = re.compile(r"\bqueued as ([0-9A-Za-z]+)")


@dataclass
class Event:
    """One log line of the message."""

    time: datetime
    node: str
    """The syslog host, or mailwarden's node name."""
    program: str
    pid: str
    message: str
    fields: dict[str, str] = field(default_factory=dict)
    order: int = 0
    """The line's place in the input (keeps lines of the same time in order)."""

    @property
    def queue_id(self) -> str:
        """The Postfix queue id the line names ("" for none)."""
        return self.fields.get("queue_id", "")

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view."""
        return {"time": self.time.isoformat(), "node": self.node, "program": self.program,
                "pid": self.pid, "message": self.message, **self.fields}


def _syslog_time(text: str, year: int | None) -> datetime:
    """An RFC 3339 time, or a traditional one without a year: this year's (last year's
    when that would lie in the future, a December log read in January)."""
    if text[0].isdigit():
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    stamp = text.split(".", maxsplit=1)[0]
    if year is not None:
        return datetime.strptime(f"{year} {stamp}", "%Y %b %d %H:%M:%S")
    now = datetime.now()
    when = datetime.strptime(f"{now.year} {stamp}", "%Y %b %d %H:%M:%S")
    return when.replace(year=now.year - 1) if when > now + timedelta(days=1) else when


def parse_line(line: str, *, year: int | None = None, order: int = 0) -> Event | None:
    """An event from one log line; None for a line in none of the known forms."""
    line = line.rstrip("\r\n")
    if line.startswith("{"):
        return _json_event(line, order)
    found = _STDERR.match(line)
    if found:
        when = datetime.strptime(found["time"], "%Y-%m-%d %H:%M:%S,%f")
        return _ours(when, found["program"], found["pid"], found["message"], order)
    found = _SYSLOG.match(line)
    if found is None:
        return None
    inner = parse_line(found["message"], year=year, order=order)
    if inner is not None:  # mailwarden's stderr line, as journald or a container runtime keeps it
        return inner
    try:
        when = _syslog_time(found["time"], year)
    except ValueError:  # 29 February read in another year, a 61st second
        return None
    if found["program"].startswith("mailwarden/"):
        return _ours(when, found["program"], found["pid"] or "", found["message"], order)
    return Event(when, found["host"], found["program"], found["pid"] or "", found["message"],
                 line_fields(found["message"]), order)


def _ours(when: datetime, program: str, pid: str, rest: str, order: int) -> Event | None:
    found = _OURS.match(rest)
    if found is None:
        return None
    return Event(when, found["node"], program, pid, found["message"], line_fields(found["message"]), order)


def _json_event(line: str, order: int) -> Event | None:
    try:
        obj = json.loads(line)
        when = datetime.fromisoformat(str(obj["time"]))
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(obj, dict):
        return None
    message = str(obj.get("message", ""))
    fields = {str(k): str(v) for k, v in obj.items()
              if k not in ("time", "node", "program", "pid", "level", "message")}
    fields.setdefault("queue_id", line_fields(message).get("queue_id", ""))
    if not fields["queue_id"] or fields["queue_id"] == "NOQUEUE":
        del fields["queue_id"]
    return Event(when, str(obj.get("node", "")), str(obj.get("program", "")), str(obj.get("pid", "")),
                 message, fields, order)


def read_lines(source: str, *, since: str = "") -> Iterator[str]:
    """The lines of a log file (``.gz`` too), or of the journal for :data:`JOURNAL`."""
    if source == JOURNAL:
        args = ["journalctl", "--no-pager", "--quiet", "--output=short-iso"]
        if since:
            args.append(f"--since={since}")
        with subprocess.Popen(args, stdout=subprocess.PIPE, text=True, errors="replace") as proc:
            assert proc.stdout is not None
            yield from proc.stdout
        return
    path = Path(source)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", errors="replace") as stream:
        yield from stream


def parse_logs(lines: Iterable[str], *, year: int | None = None) -> list[Event]:
    """Every event of ``lines`` that has one of the known forms."""
    events = []
    for n, line in enumerate(lines):
        event = parse_line(line, year=year, order=n)
        if event is not None:
            events.append(event)
    return events


@dataclass
class Trace:
    """One message's events in time order, and the ids that tied them together."""

    events: list[Event]
    queue_ids: list[str]
    mwids: list[str]
    message_ids: list[str]


def trace(events: list[Event], wanted: str) -> Trace:
    """The events of the message ``wanted`` names (a queue id, Message-ID or mailwarden id)."""
    wanted = wanted.strip()
    qids: set[str] = {wanted}
    mwids: set[str] = {wanted}
    msgids: set[str] = {wanted.strip("<>")} if wanted else set()
    instances: set[str] = set()
    taken: dict[int, Event] = {}
    changed = True
    while changed:
        changed = False
        for i, event in enumerate(events):
            if i in taken or not _belongs(event, qids, mwids, msgids, instances):
                continue
            taken[i] = event
            changed = True
            _follow(event, qids, mwids, instances)
    found = sorted(taken.values(), key=_sort_key)
    seen_qids = dict.fromkeys(e.queue_id for e in found if e.queue_id)
    return Trace(found, list(seen_qids),
                 list(dict.fromkeys(e.fields["mwid"] for e in found if e.fields.get("mwid"))),
                 list(dict.fromkeys(e.fields["message-id"] for e in found if e.fields.get("message-id"))))


def _belongs(event: Event, qids: set[str], mwids: set[str], msgids: set[str], instances: set[str]) -> bool:
    f = event.fields
    return bool(
        (f.get("mwid") and f["mwid"] in mwids)
        or (f.get("message-id") and f["message-id"].strip("<>") in msgids)
        or (f.get("instance", "-") != "-" and _instance_key(event) in instances)
        or not qids.isdisjoint(_queue_ids(event))
    )


def _follow(event: Event, qids: set[str], mwids: set[str], instances: set[str]) -> None:
    f = event.fields
    qids.update(_queue_ids(event))
    if f.get("mwid"):
        mwids.add(f["mwid"])
    if f.get("instance", "-") != "-":
        instances.add(_instance_key(event))


def _queue_ids(event: Event) -> set[str]:
    """The queue ids a line ties together: its own, the copies the milter re-injected,
    the original of a re-injected copy, the next hop's of a delivery."""
    f = event.fields
    found = {q for q in f.get("reinjected", "").split(",") if q}
    found.update(q for q in (event.queue_id, f.get("orig_queue_id", "")) if q)
    if f.get("status") == "sent":
        found.update(_QUEUED_AS.findall(event.message))
    return found


def _instance_key(event: Event) -> str:
    """Postfix's ``instance`` is unique within one smtpd process: with the node and the
    client it names one SMTP transaction."""
    client = event.fields.get("client", "")
    return f"{event.node}\0{event.fields.get('instance', '')}\0{client}"


_BEFORE_QUEUE = ("CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "VRFY", "ETRN")
_DELIVERY = ("qmgr", "smtp", "lmtp", "local", "virtual", "pipe", "bounce", "error", "discard")


def _phase(event: Event) -> int:
    """Where a line falls in a message's life: 0 the SMTP dialogue, 1 queueing and
    filtering, 2 the milter's answer as Postfix logs it (``milter-reject``), 3 delivery."""
    program = event.program.rpartition("/")[2]
    if program == "policyd":
        return 0 if event.fields.get("stage") in _BEFORE_QUEUE else 1
    if program in ("smtpd", "postscreen", "pickup"):
        return 1 if "orig_queue_id" in event.fields else 0
    if program == "cleanup" and ": milter-" in event.message:
        return 2
    return 3 if program in _DELIVERY else 1


def _sort_key(event: Event) -> tuple[datetime, int, datetime, int]:
    """Time order.  Postfix's ``maillog_file`` and traditional syslog write whole seconds:
    within one second, lines go in the order of a message's life (:func:`_phase`), then
    by the finer times where a log has them, then as read."""
    when = _utc(event.time)
    return when.replace(microsecond=0), _phase(event), when, event.order


def _utc(when: datetime) -> datetime:
    """Comparable times: a time without a zone is local time."""
    return when.astimezone(UTC)


def render_text(found: Trace) -> list[str]:
    """The trace as lines: a summary, then one line per event."""
    out = [f"queue ids: {', '.join(found.queue_ids) or '-'}; mailwarden ids: {', '.join(found.mwids) or '-'}"
           + (f"; message-id: {', '.join(found.message_ids)}" if found.message_ids else "")]
    for e in found.events:
        stamp = e.time.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        out.append(f"{stamp} {e.node} {e.program}{f'[{e.pid}]' if e.pid else ''}: {e.message}")
    return out
