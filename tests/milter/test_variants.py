"""Rendering a variant: the same edits as milter changes and as re-injected bytes."""

from __future__ import annotations

import email
import email.policy

from milters.variants import HeaderChange, apply_changes, header_text, render, variant_stream
from milters.verdict import AddHeader, RemoveHeader, StripParts, TagSubject
from tests.milter.helpers import parse
from tests.milter.test_message import with_attachment


def note(edit: StripParts, part: object) -> str:
    return "removed: " + ",".join(edit.names)


def test_removals_count_from_the_last_copy_then_subject_then_additions() -> None:
    msg = parse(b"X-Spam-Flag: YES\r\nSubject: hi\r\nX-Spam-Flag: NO\r\n\r\nbody\r\n")
    edits = (AddHeader("X-Spam-Flag", "YES"), RemoveHeader("X-Spam-Flag"), TagSubject("[SPAM]"))
    r = render(msg, edits, note)
    assert r.changes == [
        HeaderChange("change", "X-Spam-Flag", "", 2), HeaderChange("change", "X-Spam-Flag", "", 1),
        HeaderChange("change", "Subject", "[SPAM] hi", 1), HeaderChange("add", "X-Spam-Flag", "YES"),
    ]
    headers = apply_changes(msg.headers, r.changes)
    assert headers == [("Subject", b"[SPAM] hi"), ("X-Spam-Flag", b"YES")]


def test_subject_tag_on_a_message_without_subject_adds_one() -> None:
    r = render(parse(b"From: a@b\r\n\r\nx\r\n"), (TagSubject("[迷惑]"),), note)
    assert r.changes == [HeaderChange("add", "Subject", "=?utf-8?b?W+i/t+aDkV0=?=")]


def test_raw_8bit_subject_is_reencoded_when_tagged() -> None:
    assert header_text("件名".encode("cp932")).startswith("=?utf-8?")
    assert header_text("件名".encode()) == "件名"


def test_stripped_variant_keeps_everything_but_the_part() -> None:
    msg = parse(with_attachment(b"MZ payload", "run.exe"))
    edit = StripParts((1,), ("run.exe",), "en", "default")
    data = b"".join(variant_stream(msg, render(msg, (edit,), note)))
    out = email.message_from_bytes(data, policy=email.policy.default)
    parts = list(out.walk())
    assert [p.get_content_type() for p in parts] == ["multipart/mixed", "text/plain", "text/plain"]
    assert parts[1].get_content().strip() == "see attached"
    assert parts[2].get_content() == "removed: run.exe"
    assert b"MZ payload" not in data


def test_a_message_that_is_itself_the_banned_file_becomes_a_note() -> None:
    raw = (b"From: a@b\r\nContent-Type: application/octet-stream; name=x.exe\r\n"
           b"Content-Disposition: attachment; filename=x.exe\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           b"TVqQAAMAAAAEAAAA\r\n")
    msg = parse(raw)
    data = b"".join(variant_stream(msg, render(msg, (StripParts((0,), ("x.exe",), "en", "default"),), note)))
    out = email.message_from_bytes(data, policy=email.policy.default)
    assert out.get_content_type() == "text/plain" and out["Content-Disposition"] is None
    assert out.get_content() == "removed: x.exe"
