"""Logging set-up: one formatted line per event, to stderr or syslog."""

from __future__ import annotations

import logging
import logging.handlers

import pytest

from mailwarden.config import GeneralConfig
from mailwarden.log import setup_logging


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
