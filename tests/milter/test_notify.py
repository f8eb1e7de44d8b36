"""Notice templates (Japanese and English, site overrides) and the notifier's limits."""

from __future__ import annotations

import email
import email.policy
import threading
from pathlib import Path

import pytest

from mailwarden.notify import MessageFacts, Notice, NoticeOutbox, NoticeTemplates, Notifier
from mailwarden.store import MemoryStore, StoreUnavailable

FACTS = MessageFacts(sender="virus@forged.example", from_header="Forged <virus@forged.example>",
                     subject="請求書", date="Mon, 23 Nov 2026 10:00:00 +0900", queue_id="ABC123",
                     client_address="192.0.2.7", recipients=("taro@example.jp",))


def notice(**kw: str) -> Notice:
    base = {"kind": "virus", "to": "taro@example.jp", "audience": "recipient", "recipient": "taro@example.jp",
            "domain": "example.jp", "language": "ja", "template": "default", "reason": "virus Eicar",
            "names": ("Eicar-Test-Signature",), "action": "refused"}
    base.update(kw)
    return Notice(**base)  # type: ignore[arg-type]


class Sent(list[tuple[str, bytes]]):
    def __call__(self, to: str, data: bytes) -> None:
        self.append((to, data))


@pytest.mark.parametrize("language", ["en", "ja"])
@pytest.mark.parametrize("kind", ["virus", "banned"])
@pytest.mark.parametrize("audience", ["recipient", "admin", "sender"])
def test_every_shipped_notice_renders(language: str, kind: str, audience: str) -> None:
    sent = Sent()
    n = Notifier(NoticeTemplates(node="mx1"), send=sent)
    assert n.notify(notice(kind=kind, language=language, audience=audience), FACTS) == "sent"
    msg = email.message_from_bytes(sent[0][1], policy=email.policy.default)
    assert msg["Auto-Submitted"] == "auto-generated" and msg["From"] == "postmaster@example.jp"
    body = msg.get_content()
    assert "taro@example.jp" in body and "ABC123" in body and "mx1" in body
    if language == "ja":
        assert any("\u3040" <= ch <= "\u30ff" for ch in str(msg["Subject"]) + body)


def test_japanese_virus_notice_says_what_happened() -> None:
    sent = Sent()
    Notifier(NoticeTemplates(), send=sent).notify(notice(action="quarantined"), FACTS)
    body = email.message_from_bytes(sent[0][1], policy=email.policy.default).get_content()
    assert "隔離しました" in body and "請求書" in body and "Eicar-Test-Signature" in body


def test_stripped_note_renders_in_both_languages() -> None:
    t = NoticeTemplates()
    values = Notifier(t, send=Sent()).values(notice(kind="stripped", names=("a.exe",)), FACTS)
    assert "a.exe" in t.render("default", "ja", "stripped", values) and "削除" in t.render(
        "default", "ja", "stripped", values)
    assert "removed" in t.render("default", "en", "stripped", values)


def test_site_template_set_overrides_and_falls_back(tmp_path: Path) -> None:
    (tmp_path / "lab" / "en").mkdir(parents=True)
    (tmp_path / "lab" / "en" / "virus.j2").write_text("Subject: Lab virus alert\n\nHi {{ recipient }}\n")
    t = NoticeTemplates(str(tmp_path))
    values = Notifier(t, send=Sent()).values(notice(language="en"), FACTS)
    assert t.render("lab", "en", "virus", values).startswith("Subject: Lab virus alert")
    assert t.render("lab", "en", "banned", values).startswith("Subject: Attachment")  # shipped default
    assert t.render("lab", "xx", "virus", values).startswith("Subject: Lab virus alert")  # language -> en
    assert "ウイルス" in t.render("nosuchset", "ja", "virus", values)


def test_broken_site_template_falls_back_to_the_shipped_one(tmp_path: Path) -> None:
    (tmp_path / "default" / "en").mkdir(parents=True)
    (tmp_path / "default" / "en" / "virus.j2").write_text("Subject: {{ no_such_name }}\n")
    t = NoticeTemplates(str(tmp_path))
    text = t.render("default", "en", "virus", Notifier(t, send=Sent()).values(notice(language="en"), FACTS))
    assert text.startswith("Subject: Virus found")


def test_template_set_names_cannot_leave_the_template_directories(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    t = NoticeTemplates(str(tmp_path / "site"))
    values = Notifier(t, send=Sent()).values(notice(language="en"), FACTS)
    assert t.render("../secret", "en", "virus", values).startswith("Subject: Virus found")


def test_sandbox_keeps_templates_away_from_python_internals(tmp_path: Path) -> None:
    (tmp_path / "evil" / "en").mkdir(parents=True)
    (tmp_path / "evil" / "en" / "virus.j2").write_text("Subject: x\n\n{{ ''.__class__.__mro__ }}\n")
    t = NoticeTemplates(str(tmp_path))
    text = t.render("evil", "en", "virus", Notifier(t, send=Sent()).values(notice(language="en"), FACTS))
    assert text.startswith("Subject: Virus found")


def test_notices_are_limited_per_address() -> None:
    sent = Sent()
    n = Notifier(NoticeTemplates(), send=sent, store=MemoryStore(), limit=3, window=3600)
    results = [n.notify(notice(), FACTS) for _ in range(5)]
    assert results == ["sent", "sent", "sent", "limited", "limited"]
    assert n.notify(notice(to="postmaster@example.jp", audience="admin"), FACTS) == "sent"


def test_no_notice_when_the_limit_cannot_be_counted() -> None:
    class DeadStore(MemoryStore):
        def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
            raise StoreUnavailable("down")

    sent = Sent()
    assert Notifier(NoticeTemplates(), send=sent, store=DeadStore()).notify(notice(), FACTS) == "limited"
    assert sent == []


def test_failed_send_is_reported_not_raised() -> None:
    def refuse(to: str, data: bytes) -> None:
        raise OSError("connection refused")

    assert Notifier(NoticeTemplates(), send=refuse).notify(notice(), FACTS).startswith("failed")


class Gate:
    """A send that waits for ``open`` (a slow re-injection smtpd), or refuses some addresses."""

    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self.refuse = refuse
        self.sent: list[str] = []

    def __call__(self, to: str, data: bytes) -> None:
        self.entered.set()
        self.open.wait(10)
        if to in self.refuse:
            raise OSError("connection refused")
        self.sent.append(to)


def test_the_outbox_sends_in_its_own_thread_and_logs_each_notice(caplog: pytest.LogCaptureFixture) -> None:
    gate = Gate(refuse=("gone@example.jp",))
    outbox = NoticeOutbox(Notifier(NoticeTemplates(), send=gate))
    with caplog.at_level("INFO", logger="mailwarden.notify"):
        assert outbox.post(notice(to="gone@example.jp"), FACTS)
        assert outbox.post(notice(), FACTS)  # returns at once while the first waits
        assert not outbox.flush(0.1) and gate.sent == []
        gate.open.set()
        assert outbox.flush(10)
    assert gate.sent == ["taro@example.jp"]  # a failed notice does not stop the next one
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("WARNING", "ABC123: notice virus to <gone@example.jp>: failed: connection refused") in lines
    assert ("INFO", "ABC123: notice virus to <taro@example.jp>: sent") in lines
    outbox.stop()


def test_a_full_outbox_drops_with_a_log_line_and_stop_sends_what_waits(
        caplog: pytest.LogCaptureFixture) -> None:
    gate = Gate()
    outbox = NoticeOutbox(Notifier(NoticeTemplates(), send=gate), capacity=2)
    posted = [outbox.post(notice(to="u0@example.jp"), FACTS)]
    assert gate.entered.wait(10)
    posted += [outbox.post(notice(to=f"u{i}@example.jp"), FACTS) for i in range(1, 4)]
    # One is being sent (waiting at the gate), two wait in the outbox, the fourth has no room.
    assert posted == [True, True, True, False]
    assert any("u3@example.jp> dropped: 2 notices already waiting" in r.getMessage() for r in caplog.records)
    gate.open.set()
    outbox.stop(grace=10)
    assert gate.sent == ["u0@example.jp", "u1@example.jp", "u2@example.jp"]
    assert outbox._thread is None  # ended
