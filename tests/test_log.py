"""Logging set-up: one formatted line per event, to stderr or syslog."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.handlers
import time
from datetime import datetime

import pytest

from mailwarden.config import GeneralConfig
from mailwarden.linelog import DecisionLog
from mailwarden.log import setup_logging
from mailwarden.logfields import is_mwid, line_fields, new_mwid


def test_stderr_lines_carry_program_node_and_level(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(GeneralConfig(node_name="front1", log_level="info"), "policyd")
    logging.getLogger("mailwarden.test").info("client=192.0.2.1 action=DUNNO")
    logging.getLogger("mailwarden.test").debug("hidden at info")
    err = capsys.readouterr().err
    assert "mailwarden/policyd[" in err
    assert "front1: INFO client=192.0.2.1 action=DUNNO" in err
    assert "hidden" not in err


def test_syslog_target_uses_mail_facility(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setattr("mailwarden.log.SYSLOG_SOCKET", "/")  # exists; nothing is sent here
    monkeypatch.setattr(logging.handlers.SysLogHandler, "_connect_unixsocket",
                        lambda self, address: None)
    handler = setup_logging(GeneralConfig(log_target="syslog"), "milter")
    assert isinstance(handler, logging.handlers.SysLogHandler)
    assert handler.facility == logging.handlers.SysLogHandler.LOG_MAIL


def test_syslog_without_socket_falls_back_to_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mailwarden.log.SYSLOG_SOCKET", "/nonexistent/log")
    handler = setup_logging(GeneralConfig(log_target="syslog"), "milter")
    assert not isinstance(handler, logging.handlers.SysLogHandler)


def test_json_lines_carry_the_fields_of_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(GeneralConfig(node_name="front1", log_format="json"), "milter")
    logging.getLogger("mailwarden.milter").info(
        '4Q2b7x1Xyz: accept mwid=abcdefghijklmnop from=<a@example.org> reply="250 ok" message=x')
    logging.getLogger("mailwarden.policyd").warning("queue_id=NOQUEUE instance=1a.2b.3 stage=RCPT")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["node"] == "front1" and first["program"] == "mailwarden/milter" and first["level"] == "info"
    assert first["queue_id"] == "4Q2b7x1Xyz" and first["mwid"] == "abcdefghijklmnop"
    assert first["from"] == "<a@example.org>" and first["reply"] == "250 ok"
    assert first["message"].startswith("4Q2b7x1Xyz: accept")  # a field never replaces the line
    assert datetime.fromisoformat(first["time"]).tzinfo is not None
    assert "queue_id" not in second and second["instance"] == "1a.2b.3" and second["level"] == "warning"


def test_mailwarden_ids_are_distinct_and_sort_by_time() -> None:
    ids = [new_mwid(1_800_000_000.0 + i / 1000) for i in range(50)]
    assert len(set(ids)) == 50 and ids == sorted(ids) and all(is_mwid(i) for i in ids)
    assert not is_mwid("4Q2b7x1Xyz") and not is_mwid(ids[0].upper())


def test_fields_of_postfix_and_policyd_lines() -> None:
    postfix = ("4Q2b7x1Xyz: to=<bob@example.com>, relay=127.0.0.1[127.0.0.1]:2525, delay=0.1, "
               "status=sent (250 2.0.0 Ok: queued as 4Q2c)")
    assert line_fields(postfix) == {"queue_id": "4Q2b7x1Xyz", "to": "<bob@example.com>",
                                    "relay": "127.0.0.1[127.0.0.1]:2525", "delay": "0.1", "status": "sent"}
    assert line_fields('NOQUEUE: reason="a \\"b\\" c" x=') == {"reason": 'a "b" c', "x": ""}


def test_batched_decision_lines_are_whole_json_objects(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(GeneralConfig(node_name="front1", log_format="json"), "policyd")
    lines = DecisionLog(logging.getLogger("mailwarden.policyd"))
    loop = asyncio.new_event_loop()
    try:
        lines.start(loop)
        assert lines.handler is not None  # batched, one object per line all the same
        lines.info("queue_id=4Q1 instance=1.2.3.0 stage=RCPT action=DUNNO")
        lines.info("queue_id=4Q2 instance=1.2.4.0 stage=END-OF-MESSAGE action=DUNNO")
        lines.flush()
    finally:
        loop.close()
    objects = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(o["queue_id"], o["stage"], o["program"]) for o in objects] == [
        ("4Q1", "RCPT", "mailwarden/policyd"), ("4Q2", "END-OF-MESSAGE", "mailwarden/policyd")]


@pytest.mark.parametrize(("fmt", "datefmt", "templated"), [
    ("%(asctime)s mailwarden/policyd[1]: node: %(levelname)s %(message)s", None, True),
    ("%(asctime)s %(message)s", None, True),
    ("%(created)f %(message)s", None, False),
    ("%(asctime)s %(message)s", "%H:%M:%S", False),
    ("%(asctime)s %(msecs)03d %(message)s", "%H:%M:%S", True),
    ("%(levelname)s %(message)s", None, False),
])
def test_decision_line_prefix_matches_the_formatter_at_every_millisecond(
    fmt: str, datefmt: str | None, templated: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-second template gives each line the prefix the handler itself would, across
    milliseconds and seconds; a format of another shape is formatted per millisecond."""
    root = logging.getLogger("mailwarden")
    saved = (root.handlers[:], root.propagate, root.level)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt, datefmt))
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.INFO)
    loop = asyncio.new_event_loop()
    now = [1_800_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    try:
        logger = logging.getLogger("mailwarden.policyd")
        decisions = DecisionLog(logger)
        decisions.start(loop)
        expected = []
        for t in (1_800_000_000.0, 1_800_000_000.0004, 1_800_000_000.001, 1_800_000_000.4995,
                  1_800_000_000.999, 1_800_000_000.9999, 1_800_000_001.0, 1_800_000_001.123456,
                  1_800_000_059.9995, 1_800_000_060.042):
            now[0] = t
            decisions.info(f"line {t}")
            expected.append(handler.format(logger.makeRecord(logger.name, logging.INFO, "", 0, "%s",
                                                             (f"line {t}",), None)))
            assert (decisions._template is not None) is templated
        decisions.flush()
        if "created" not in fmt:  # (a sub-millisecond field is that of the millisecond's first line)
            assert stream.getvalue().splitlines() == expected
    finally:
        loop.close()
        root.handlers[:], root.propagate = saved[0], saved[1]
        root.setLevel(saved[2])
