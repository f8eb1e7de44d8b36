"""Logging set-up: one formatted line per event, to stderr or syslog."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
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
