"""``mailwarden trace`` over the log forms it reads (the real-Postfix run is in
tests/milter/test_operations.py)."""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailwarden.cli.trace import trace_cmd
from mailwarden.trace import parse_line, parse_logs, trace

# Node mx1: the policy daemon (stderr lines), Postfix (syslog), the milter (JSON lines,
# through journald), the re-injection smtpd; node mbox1: the next hop's Postfix.
MX1 = Path(__file__).parent / "data" / "trace-mx1.log"
LMTP = "mbox1[private/dovecot-lmtp]"
MBOX1 = [
    {"time": "2026-12-06T22:30:02.500000+00:00", "node": "mbox1", "program": "postfix/lmtp", "pid": 9,
     "message": f"4QCCC3: to=<bob@example.com>, relay={LMTP}, status=sent (250 2.0.0 Saved)"},
    {"time": "2026-12-06T22:30:02.600000+00:00", "node": "mbox1", "program": "postfix/lmtp", "pid": 9,
     "message": f"4QDDD4: to=<junky@example.com>, relay={LMTP}, status=sent (250 2.0.0 Saved)"},
]


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Lines without a zone are local time: here UTC, like the lines with one."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def logs(tmp_path: Path) -> list[str]:
    mx1 = tmp_path / "mx1.log.gz"
    with gzip.open(mx1, "wt") as stream:
        stream.write(MX1.read_text())
    mbox1 = tmp_path / "mbox1.json"
    mbox1.write_text("".join(json.dumps(line) + "\n" for line in MBOX1))
    return [str(mx1), str(mbox1)]


EXPECTED = [
    "stage=RCPT", "4QAAA1: client=", "stage=RCPT", "4QAAA1: message-id=", "4QAAA1: accept mwid=",
    "4QBBB2: client=", "stage=END-OF-MESSAGE", "4QAAA1: to=<bob", "4QBBB2: to=<junky",
    "4QCCC3: to=<bob", "4QDDD4: to=<junky",
]


def test_one_message_from_every_id_it_has(tmp_path: Path, utc: None) -> None:
    sources = logs(tmp_path)
    with gzip.open(sources[0], "rt") as mx1, Path(sources[1]).open() as mbox1:
        parsed = parse_logs([*mx1, *mbox1], year=2026)
    for wanted in ("4QAAA1", "0cnmp4c0a5cdd1f8", "<m1@example.org>", "m1@example.org", "4QBBB2", "4QDDD4"):
        found = trace(parsed, wanted)
        heads = [e.message for e in found.events]
        assert len(heads) == len(EXPECTED), (wanted, heads)
        assert all(want in head for want, head in zip(EXPECTED, heads, strict=True)), (wanted, heads)
        assert found.queue_ids == ["4QAAA1", "4QBBB2", "4QCCC3", "4QDDD4"]
        assert found.mwids == ["0cnmp4c0a5cdd1f8"]
    assert trace(parsed, "4QNONE").events == []


def test_the_command_prints_the_message_in_order(tmp_path: Path, utc: None) -> None:
    sources = logs(tmp_path)
    args = ["m1@example.org", *(a for s in sources for a in ("--logs", s))]
    result = CliRunner().invoke(trace_cmd, args)
    assert result.exit_code == 0, result.output
    first, *events = result.output.splitlines()
    assert first.startswith("queue ids: 4QAAA1, 4QBBB2, 4QCCC3, 4QDDD4; mailwarden ids: 0cnmp4c0a5cdd1f8")
    assert events[4].endswith("reinjected=4QBBB2 ms=55.0") and " mx1 mailwarden/milter[8]: " in events[4]
    assert events[-1].startswith("2026-12-06 22:30:02.600 mbox1 postfix/lmtp[9]: 4QDDD4:")
    as_json = CliRunner().invoke(trace_cmd, [*args, "--json"])
    messages = [json.loads(line)["message"] for line in as_json.output.splitlines()]
    assert messages[3].startswith("4QAAA1: message-id")
    missing = CliRunner().invoke(trace_cmd, ["4QNONE", "--logs", sources[1]])
    assert missing.exit_code == 1 and "not found" in missing.output
    unreadable = CliRunner().invoke(trace_cmd, ["4QAAA1", "--logs", str(tmp_path / "none")])
    assert unreadable.exit_code == 2


def test_lines_of_no_known_form_are_skipped() -> None:
    assert parse_line("garbage") is None
    assert parse_line("{not json") is None
    assert parse_line('{"time": "yesterday"}') is None
    event = parse_line("Dec 06 22:49:31 mx postfix-mw/smtpd[638]: 90AA120EA81: client=unknown[127.0.0.2]")
    assert event is not None and event.queue_id == "90AA120EA81" and event.program == "postfix-mw/smtpd"


def test_the_journal_is_read_through_journalctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 utc: None) -> None:
    """``--logs journal`` runs journalctl (a stand-in here that records its arguments)."""
    fake = tmp_path / "bin" / "journalctl"
    fake.parent.mkdir()
    lines = tmp_path / "journal.txt"
    lines.write_text(MX1.read_text())
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncat {lines}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    result = CliRunner().invoke(trace_cmd, ["4QBBB2", "--logs", "journal", "--since", "today"])
    assert result.exit_code == 0, result.output
    assert "4QAAA1: accept mwid=0cnmp4c0a5cdd1f8" in result.output and "4QZZZ9" not in result.output
    assert (tmp_path / "args").read_text().split() == ["--no-pager", "--quiet", "--output=short-iso",
                                                       "--since=today"]


def test_a_time_without_a_year_is_never_in_the_future() -> None:
    tomorrow = datetime.now() + timedelta(days=2)
    event = parse_line(f"{tomorrow:%b %d %H:%M:%S} mx postfix/qmgr[1]: 4QAAA1: removed")
    assert event is not None and event.time.year == tomorrow.year - 1
    given = parse_line(f"{tomorrow:%b %d} 00:00:00 mx postfix/qmgr[1]: x", year=2030)
    assert given is not None and given.time.year == 2030
    assert parse_line("Feb 29 00:00:00 mx postfix/qmgr[1]: x", year=2027) is None
