"""Per-recipient outcomes through the milter application (driven step by step) with fakes.

The directory is a FakeDirectory shaped like the sample data: taro@example.jp
(virus, extension filter, spam, keywords; notices in Japanese to recipient and
admin), hanako@example.jp (spam at 3.5 with a subject tag, no virus scan),
alice/bob/carol@example.com (parts are stripped; bob has no spam or keywords),
nobody@bare.example.net (nothing).
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness.clamd import EICAR, ClamdServer
from harness.redisserver import RedisServer
from harness.spamd import GTUBE
from mailwarden.logfields import is_mwid
from mailwarden.policy import PolicyResolver
from mailwarden.store import MemoryStore, RedisStore
from milters import protocol as p
from milters.scanners import VirusResult
from milters.scanners.clamd import ClamdScanner
from milters.service import build_service
from milters.verdict import Action
from tests.milter.helpers import (
    FakeSpamScanner,
    Harness,
    RecordingInjector,
    drive,
    harness,
    make_message,
    milter_config,
    sample_directory,
)
from tests.milter.test_message import PE, _encrypted, with_attachment, zip_of


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    """The milter over the sample directory, with fake scanners and injector."""
    return harness(tmp_path)


def delivered_copy(h: Harness, address: str) -> email.message.EmailMessage:
    """The re-injected copy that ``address`` gets."""
    copies = h.injector.to(address)
    assert len(copies) == 1, f"{address}: {len(copies)} copies"
    return email.message_from_bytes(copies[0].data, policy=email.policy.default)  # type: ignore[return-value]


def test_clean_mail_is_accepted_unchanged(h: Harness) -> None:
    ctx = h.feed(make_message(), "s@remote.example", "taro@example.jp", "nobody@bare.example.net")
    assert ctx.rc == p.ACCEPT
    assert ctx.delrcpt == [] and not ctx.headers_changed and not ctx.body_replaced
    assert is_mwid(ctx.mwid)  # the only field added: the mailwarden id
    assert h.injector.sent == []
    assert h.virus.calls == 1 and h.spam.calls == 1


def test_virus_for_every_recipient_is_refused_at_smtp_time(h: Harness) -> None:
    ctx = h.feed(make_message(body=EICAR.decode()), "s@remote.example", "taro@example.jp")
    assert ctx.rc == p.REJECT
    assert ctx.reply[0] == "550" and "virus Eicar-Test-Signature" in ctx.reply[2]
    assert h.spam.calls == 0  # no spamd time spent on refused mail


def test_what_a_client_sent_feeds_its_reputation(h: Harness) -> None:
    """A virus and a clean message from one client: counted as they are judged, written
    to the store together (a batch), which the policy daemon then reads."""
    assert h.service.reputation is not None
    assert h.feed(make_message(body=EICAR.decode()), "s@remote.example", "taro@example.jp").rc == p.REJECT
    assert h.feed(make_message(), "s@remote.example", "taro@example.jp").rc == p.ACCEPT
    rep = h.service.reputation.reputation
    assert rep.score("192.0.2.10") == 0  # not written yet
    h.service.close()
    assert rep.score("192.0.2.10") == pytest.approx(5.0 - 0.5, rel=1e-3)


def test_virus_removes_only_the_recipient_who_has_virus_scanning(h: Harness) -> None:
    msg = make_message(body="see attachment")
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="eicar.txt")
    ctx = h.feed(msg, "s@remote.example", "taro@example.jp", "hanako@example.jp")
    assert ctx.rc == p.ACCEPT
    assert ctx.delrcpt == ["<taro@example.jp>"]
    notices = [m for m in h.injector.sent if m.sender == ""]
    assert sorted(r for m in notices for r in m.recipients) == ["postmaster@example.jp", "taro@example.jp"]
    notice = email.message_from_bytes(notices[0].data, policy=email.policy.default)
    assert notice["Auto-Submitted"] == "auto-generated"
    assert "ウイルス" in str(notice["Subject"])  # example.jp notices are in Japanese
    assert "Eicar-Test-Signature" in notice.get_content()
    # The notices carry the message's mailwarden id, as hanako's copy does.
    assert is_mwid(ctx.msg["X-Mailwarden-Id"])
    ids = {m.data.split(b"X-Mailwarden-Id: ", 1)[1][:16].decode() for m in notices}
    assert ids == {ctx.msg["X-Mailwarden-Id"]}


def test_banned_exe_is_refused_for_one_domain_and_stripped_for_another(h: Harness) -> None:
    raw = with_attachment(b"MZ-not-really", "invoice.pdf.exe")
    ctx = h.feed(raw, "s@remote.example", "taro@example.jp", "bob@example.com")
    assert ctx.rc == p.ACCEPT
    # taro (example.jp: reject) is removed; bob (example.com: strip) keeps the queued copy, stripped.
    assert ctx.delrcpt == ["<taro@example.jp>"]
    assert ctx.body_replaced
    body = ctx.msg.as_bytes()
    assert b"invoice.pdf.exe" not in body.split(b"\n\n", 1)[1].replace(b"\r", b"")
    note = email.message_from_bytes(body, policy=email.policy.default)
    texts = [p.get_content() for p in note.walk() if p.get_content_type() == "text/plain"]
    assert any("was removed" in t and "invoice.pdf.exe" in t for t in texts)


@pytest.mark.parametrize("filename", ["setup.exe", "screen.scr", "invoice.pdf.exe", "INVOICE.PDF.EXE. "])
def test_banned_names_are_refused(h: Harness, filename: str) -> None:
    ctx = h.feed(with_attachment(b"x", filename), "s@remote.example", "taro@example.jp")
    assert ctx.rc == p.REJECT and "banned attachment" in ctx.reply[2]


def test_exe_hidden_in_zip_in_zip_is_found(h: Harness) -> None:
    data = zip_of({"inner.zip": zip_of({"run.scr": b"x"})})
    ctx = h.feed(with_attachment(data, "docs.zip"), "s@remote.example", "taro@example.jp")
    assert ctx.rc == p.REJECT and "run.scr" in ctx.reply[2]


def test_pe_content_behind_a_pdf_name_is_refused(h: Harness) -> None:
    ctx = h.feed(with_attachment(PE, "invoice.pdf"), "s@remote.example", "taro@example.jp")
    assert ctx.rc == p.REJECT


def test_user_unbanned_extension_passes_for_that_user_only(h: Harness) -> None:
    raw = with_attachment(b"alert(1)", "script.js")
    ctx = h.feed(raw, "s@remote.example", "alice@example.com", "bob@example.com")
    assert ctx.rc == p.ACCEPT
    # alice un-banned .js: she keeps the queued copy as sent; bob's copy is stripped and re-injected.
    assert ctx.delrcpt == ["<bob@example.com>"] and not ctx.body_replaced
    bob = delivered_copy(h, "bob@example.com")
    assert not any(p.get_filename() == "script.js" for p in bob.walk())


def test_spam_headers_only_for_the_contracted_recipient(h: Harness) -> None:
    h.spam.score = 7.0
    ctx = h.feed(make_message(), "s@remote.example", "taro@example.jp", "nobody@bare.example.net")
    assert ctx.rc == p.ACCEPT
    # Equal groups: the unedited copy stays queued for nobody, taro's variant is re-injected.
    assert ctx.delrcpt == ["<taro@example.jp>"] and not ctx.headers_changed
    taro = delivered_copy(h, "taro@example.jp")
    assert taro["X-Spam-Flag"] == "YES" and taro["X-Mailwarden-Junk"] == "yes"
    assert str(taro["X-Spam-Status"]).startswith("Yes, score=7.0 required=5.0")
    assert h.injector.sent[0].origin is not None and h.injector.sent[0].origin.queue_id == "QID1"


def test_largest_group_keeps_the_queued_copy(h: Harness) -> None:
    h.spam.score = 7.0
    ctx = h.feed(make_message(), "s@remote.example", "taro@example.jp", "carol@example.com",
                 "nobody@bare.example.net")
    # carol rejects spam, taro gets junk headers; taro's group (1) vs nobody's (1): unedited wins.
    assert sorted(ctx.delrcpt) == ["<carol@example.com>", "<taro@example.jp>"]


def test_spam_subject_tag_and_threshold_per_recipient(h: Harness) -> None:
    h.spam.score = 4.0  # spam for hanako (3.5), not for taro (5.0)
    ctx = h.feed(make_message(subject="hello"), "s@remote.example", "hanako@example.jp")
    assert ctx.rc == p.ACCEPT
    assert "[SPAM] hello" in ctx.msg.get_all("Subject")
    assert ctx.msg["X-Spam-Flag"] == "YES"
    h.feed(make_message(subject="hello"), "s@remote.example", "taro@example.jp")
    assert h.injector.sent == []


def test_gtube_over_the_reject_score_is_refused_for_contracted_only(h: Harness) -> None:
    ctx = h.feed(make_message(body=GTUBE), "s@remote.example", "taro@example.jp", "bob@example.com")
    assert ctx.rc == p.ACCEPT and ctx.delrcpt == ["<taro@example.jp>"]
    assert ctx.msg["X-Spam-Status"] is None  # bob has no spam service: no spam headers


def test_keyword_rule_hits_for_one_of_two_recipients(h: Harness) -> None:
    msg = make_message(subject="=?ISO-2022-JP?B?GyRCTCQ+NUJ6OS05cCEjGyhC?= sale")  # 未承諾広告。
    ctx = h.feed(msg, "s@remote.example", "taro@example.jp", "nobody@bare.example.net")
    assert ctx.rc == p.ACCEPT and ctx.delrcpt == ["<taro@example.jp>"]
    assert delivered_copy(h, "taro@example.jp")["X-Mailwarden-Junk"] == "yes"


def test_keyword_regex_reject_on_decoded_japanese_body(h: Harness) -> None:
    msg = make_message()
    msg.set_content("ＣＨＥＡＰ　ＰＩＬＬＳ 今だけ".encode("iso-2022-jp"), maintype="text", subtype="plain",
                    cte="7bit")
    msg.replace_header("Content-Type", 'text/plain; charset="iso-2022-jp"')
    ctx = h.feed(msg, "s@remote.example", "taro@example.jp")
    assert ctx.rc == p.REJECT and "keyword rule" in ctx.reply[2]


def test_directory_outage_defers_the_recipient(h: Harness) -> None:
    h.directory.down = True
    ctx = h.feed(make_message(), "s@remote.example", "someone@example.org")
    assert ctx.rc == p.TEMPFAIL and ctx.reply[0] == "451"


def test_clamd_down_defers_the_message(h: Harness) -> None:
    h.virus.error = "connection refused"
    ctx = h.feed(make_message(), "s@remote.example", "taro@example.jp", "nobody@bare.example.net")
    assert ctx.rc == p.TEMPFAIL and ctx.reply[0] == "451"
    assert h.injector.sent == []


def test_clamd_down_is_accepted_where_the_domain_says_so(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.directory.entries["mwDomainName=example.com,ou=domains"]["virus_failure_action"] = ["accept"]
    h.virus.error = "connection refused"
    ctx = h.feed(make_message(), "s@remote.example", "bob@example.com")
    assert ctx.rc == p.ACCEPT


def test_spamd_down_defers_only_when_someone_contracted_spam(h: Harness) -> None:
    h.spam.error = "timed out"
    assert h.feed(make_message(), "s@remote.example", "bob@example.com").rc == p.ACCEPT
    assert h.feed(make_message(), "s@remote.example", "taro@example.jp").rc == p.TEMPFAIL


def test_password_protected_zip_is_refused_by_default(h: Harness) -> None:
    """It stays encrypted on every retry: refused at once (5xx), not deferred for days."""
    raw = with_attachment(_encrypted(zip_of({"doc.txt": b"x" * 50})), "locked.zip")
    ctx = h.feed(raw, "s@remote.example", "taro@example.jp")
    assert ctx.rc == p.REJECT and ctx.reply[0] == "550" and "encrypted" in ctx.reply[2]


def _nested_mime(levels: int) -> bytes:
    inner = b"Content-Type: text/plain\r\n\r\nhi\r\n"
    for i in range(levels):
        inner = (f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n".encode() + inner
                 + f"\r\n--b{i}--\r\n".encode())
    return b"From: a@remote.example\r\nSubject: deep\r\n" + inner


def _zipped(depth: int, name: str, payload: bytes) -> bytes:
    """``payload`` as ``name`` in a zip, in a zip, ... ``depth`` zips in all."""
    data = zip_of({name: payload})
    for level in range(depth - 1, 0, -1):
        data = zip_of({f"level{level}.zip": data})
    return data


def test_what_a_retry_cannot_change_is_refused_by_default(h: Harness) -> None:
    ctx = h.feed(_nested_mime(30), "s@remote.example", "taro@example.jp")
    assert ctx.rc == p.REJECT and ctx.reply[0] == "550"
    assert "unscannable: MIME nesting deeper than 20" in ctx.reply[2]


@pytest.mark.parametrize(("action", "rc"), [("tempfail", p.TEMPFAIL), ("reject", p.REJECT),
                                            ("accept", p.ACCEPT)])
def test_an_explicit_unscannable_action_is_the_subscribers_choice(tmp_path: Path, action: str,
                                                                   rc: str) -> None:
    h = harness(tmp_path)
    h.directory.entries["uid=taro,mwDomainName=example.jp,ou=domains"]["unscannable_action"] = [action]
    assert h.feed(_nested_mime(30), "s@remote.example", "taro@example.jp").rc == rc


@pytest.mark.parametrize(("signature", "rc"), [
    ("Heuristics.Limits.Exceeded.MaxScanTime", p.TEMPFAIL),  # clamd was slow: a retry may pass
    ("Heuristics.Limits.Exceeded.MaxFileSize", p.REJECT),
    ("Heuristics.Encrypted.Zip", p.REJECT),
])
def test_clamd_unscannable_answers_are_deferred_only_when_a_retry_may_pass(
    h: Harness, signature: str, rc: str,
) -> None:
    async def unscannable(stream: Any, deadline: float) -> VirusResult:
        return VirusResult(infected=False, signature=signature, upstream="fake", unscannable=signature)

    h.virus.scan = unscannable  # type: ignore[method-assign]
    ctx = h.feed(make_message(), "s@remote.example", "taro@example.jp")
    assert ctx.rc == rc and f"clamd: {signature}" in ctx.reply[2]


def test_archives_deeper_than_the_lister_looks_are_left_to_clamd(h: Harness) -> None:
    """The lister stops at archive_max_depth (4): for the virus scan that is no reason to
    defer, clamd unpacks deeper; for the extension filter a name it cannot see is
    unscannable, and what a retry cannot change is refused by default."""
    h.directory.add_user("virusonly@example.jp", disabled_service=["extension-filter"])
    raw = with_attachment(_zipped(6, "report.txt", b"quarterly figures\n"), "deep.zip")
    ctx = h.feed(raw, "s@remote.example", "virusonly@example.jp")
    assert ctx.rc == p.ACCEPT and h.virus.calls == 1
    ctx = h.feed(raw, "s@remote.example", "taro@example.jp")
    assert ctx.rc == p.REJECT and "unscannable: archives nested deeper than 4" in ctx.reply[2]


def test_eicar_zipped_six_deep_is_found_by_the_real_clamd(tmp_path: Path, clamd: ClamdServer) -> None:
    directory = sample_directory()
    directory.add_user("virusonly@example.jp", disabled_service=["extension-filter"])
    cfg = milter_config(tmp_path)
    service = build_service(cfg, store=MemoryStore(), virus_scanner=ClamdScanner([clamd.unix_address]),
                            spam_scanner=FakeSpamScanner(), injector=RecordingInjector(),
                            resolver=PolicyResolver(directory, cfg))
    infected = with_attachment(_zipped(6, "eicar.com", EICAR), "deep.zip")
    fed = asyncio.run(drive(service, infected, "s@remote.example", ["virusonly@example.jp"], "QID6"))
    assert service.delivery.flush_notices(10)
    assert fed.rc == p.REJECT and fed.reply[0] == "550"
    assert "virus" in fed.reply[2] and "EICAR" in fed.reply[2].upper()
    # The same depth without the virus: clamd says clean, so it is delivered, not deferred.
    clean = with_attachment(_zipped(6, "report.txt", b"quarterly figures\n"), "deep.zip")
    fed = asyncio.run(drive(service, clean, "s@remote.example", ["virusonly@example.jp"], "QID7"))
    assert fed.rc == p.ACCEPT


def test_unscannable_is_refused_where_the_domain_says_so(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.directory.entries["mwDomainName=example.jp,ou=domains"]["unscannable_action"] = ["reject"]
    raw = with_attachment(_encrypted(zip_of({"doc.txt": b"x" * 50})), "locked.zip")
    assert h.feed(raw, "s@remote.example", "taro@example.jp").rc == p.REJECT


def test_the_same_body_resent_is_scanned_once(h: Harness) -> None:
    for i in range(3):
        msg = make_message(body="same body every time")
        msg.replace_header("Message-ID", f"<resend-{i}@botnet.example>")
        h.feed(msg, f"bot{i}@remote.example", "taro@example.jp")
    assert h.virus.calls == 1


def test_cached_virus_verdict_is_used_for_a_resend(h: Harness) -> None:
    h.feed(make_message(body=EICAR.decode()), "a@remote.example", "taro@example.jp")
    ctx = h.feed(make_message(body=EICAR.decode()), "b@remote.example", "taro@example.jp")
    assert h.virus.calls == 1 and ctx.rc == p.REJECT


def test_failed_reinjection_defers_the_whole_message(h: Harness) -> None:
    h.spam.score = 7.0
    h.injector.fail = True
    ctx = h.feed(make_message(), "s@remote.example", "taro@example.jp", "nobody@bare.example.net")
    assert ctx.rc == p.TEMPFAIL and ctx.delrcpt == []


def test_quarantine_keeps_the_message_for_that_recipient(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.directory.entries["mwDomainName=example.com,ou=domains"]["virus_action"] = ["quarantine"]
    ctx = h.feed(make_message(body=EICAR.decode()), "s@remote.example", "bob@example.com")
    assert ctx.rc == p.DISCARD
    quarantine = h.service.delivery.quarantine
    assert quarantine is not None
    (entry,) = quarantine.entries()
    assert entry.recipients == ["bob@example.com"] and "virus" in entry.reason
    assert EICAR in quarantine.read(entry.id)
    assert is_mwid(entry.mwid)  # its release will carry it


def test_forged_junk_header_is_removed(h: Harness) -> None:
    msg = make_message(headers={"X-Mailwarden-Junk": "yes"})
    ctx = h.feed(msg, "s@remote.example", "nobody@bare.example.net")
    assert ctx.rc == p.ACCEPT and ctx.msg["X-Mailwarden-Junk"] is None


FORGED = {"X-Spam-Flag": "YES", "x-spam-status": "Yes, score=99.0", "X-Spam-Level": "*****",
          "X-Mailwarden-Notice": "virus", "X-Mailwarden-Junk": "yes"}


def test_forged_spam_and_mailwarden_headers_are_removed_for_every_recipient(h: Harness) -> None:
    """Ham for a spam-check subscriber and for one without the service: one variant,
    the queued copy, without any field only mailwarden may set."""
    h.spam.score = 1.0
    msg = make_message(headers={**FORGED, "X-Spammer-Note": "kept", "X-Mailer": "kept"})
    ctx = h.feed(msg, "s@remote.example", "taro@example.jp", "nobody@bare.example.net")
    assert ctx.rc == p.ACCEPT and ctx.delrcpt == [] and h.injector.sent == []
    assert h.spam.calls == 1
    for name in FORGED:
        assert ctx.msg[name] is None, name
    assert ctx.msg["X-Spammer-Note"] == "kept" and ctx.msg["X-Mailer"] == "kept"


def test_spam_headers_on_spam_are_ours_alone(h: Harness) -> None:
    h.spam.score = 7.0
    msg = make_message(headers={"X-Spam-Flag": "NO", "X-Spam-Score": "-5.0"})
    ctx = h.feed(msg, "s@remote.example", "taro@example.jp", "nobody@bare.example.net", "bob@example.com")
    assert ctx.rc == p.ACCEPT and ctx.delrcpt == ["<taro@example.jp>"]
    taro = delivered_copy(h, "taro@example.jp")
    assert taro.get_all("X-Spam-Flag") == ["YES"] and taro.get_all("X-Spam-Score") == ["7.0"]
    # The queued copy (nobody and bob, no spam service) carries none.
    assert ctx.msg["X-Spam-Flag"] is None and ctx.msg["X-Spam-Score"] is None


def test_no_notice_to_the_sender_of_machine_mail(h: Harness) -> None:
    msg = make_message(body=EICAR.decode(), headers={"Auto-Submitted": "auto-replied"})
    h.feed(msg, "robot@remote.example", "bob@example.com")  # example.com notifies senders
    assert "robot@remote.example" not in [r for m in h.injector.sent for r in m.recipients]
    h.feed(make_message(body=EICAR.decode() + " "), "person@remote.example", "bob@example.com")
    assert "person@remote.example" in [r for m in h.injector.sent for r in m.recipients]


def test_a_domain_can_choose_no_notices(h: Harness) -> None:
    h.feed(make_message(body=EICAR.decode()), "person@remote.example", "bob@example.com")
    assert h.injector.sent, "example.com notifies recipient and sender"
    h.injector.sent.clear()
    h.directory.entries["mwDomainName=example.com,ou=domains"]["notice_recipients"] = ["none"]
    h.service.resolver.invalidate()
    ctx = h.feed(make_message(body=EICAR.decode() + " "), "person@remote.example", "bob@example.com")
    assert ctx.rc == p.REJECT and h.injector.sent == []


def test_notices_are_rate_limited_per_address(tmp_path: Path) -> None:
    h = harness(tmp_path, "notice_limit = 2\n")
    for i in range(5):
        h.feed(make_message(body=EICAR.decode() + " " * i), "s@remote.example", "bob@example.com")
    assert len(h.injector.to("bob@example.com")) == 2


def test_message_for_nobody_with_services_is_not_touched(h: Harness) -> None:
    ctx = h.feed(make_message(body=GTUBE), "s@remote.example", "nobody@bare.example.net")
    assert ctx.rc == p.ACCEPT and not ctx.headers_changed and h.spam.calls == 0 and h.virus.calls == 0


def test_filter_bug_defers_instead_of_passing(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(h.service.pipeline.filters[1], "apply", boom)
    ctx = h.feed(make_message(), "s@remote.example", "taro@example.jp")
    assert ctx.rc == p.TEMPFAIL


def test_abort_mid_message_drops_the_spool(h: Harness, tmp_path: Path) -> None:
    from milters.app import ContentMilter
    from milters.server import CONTINUE, Macros

    milter = ContentMilter(h.service, Macros())
    milter.mail("s@remote.example", ())
    assert asyncio.run(milter.rcpt("<taro@example.jp>", ())) == CONTINUE
    milter.body(b"x" * 100)
    assert milter.spool is not None
    milter.abort()
    assert milter.spool is None


def test_huge_body_spools_to_disk_and_is_scanned(tmp_path: Path) -> None:
    h = harness(tmp_path, "memory_limit = 65536\n")
    big = base64.b64encode(b"\x00" * 400_000).decode()
    ctx = h.feed(make_message(body=big + "\n" + EICAR.decode()), "s@remote.example", "taro@example.jp")
    assert ctx.rc == p.REJECT
    assert list((tmp_path / "spool").iterdir()) == []


def test_outcome_strength_keeps_the_strongest_block() -> None:
    from milters.verdict import Recipient, RecipientOutcome
    from tests.milter.helpers import sample_directory

    del sample_directory
    outcome = RecipientOutcome(Recipient("a@b", (), None))  # type: ignore[arg-type]
    outcome.block(Action.DISCARD, "one")
    outcome.block(Action.REJECT, "two")
    outcome.block(Action.QUARANTINE, "three")
    assert outcome.action is Action.REJECT and outcome.reasons == ["one", "two", "three"]


def test_log_line_is_one_line_whatever_the_sender_put_in_names(h: Harness,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    raw = (b"From: a@b\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
           b'Content-Type: application/octet-stream; name="=?UTF-8?Q?x=0Afake:_line.exe?="\r\n\r\n'
           b"x\r\n--B--\r\n")
    with caplog.at_level("INFO", logger="mailwarden.milter"):
        h.feed(raw, "s@remote.example", "taro@example.jp")
    (line,) = [r.getMessage() for r in caplog.records
               if r.name == "mailwarden.milter" and "QID1:" in r.getMessage()]
    assert "\n" not in line and "reject[banned attachment x?fake: line.exe" in line


def test_the_reply_waits_for_no_notice(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """Notices leave from the outbox thread after the milter has answered."""
    release = threading.Event()
    record = h.injector.send

    def slow(sender: str, recipients: Sequence[tuple[str, tuple[str, ...]]], data: Iterable[bytes],
             **kw: Any) -> str:
        if sender == "":  # a notice: its smtpd is slow today
            release.wait(10)
        return record(sender, recipients, data, **kw)

    h.injector.send = slow  # type: ignore[method-assign]
    started = time.monotonic()
    with caplog.at_level("INFO"):
        ctx = h.feed(make_message(body=EICAR.decode()), "s@remote.example", "bob@example.com", notices=False)
        assert ctx.rc == p.REJECT and time.monotonic() - started < 5
        assert h.injector.sent == []
        (line,) = [r.getMessage() for r in caplog.records if r.name == "mailwarden.milter"]
        assert "notices=virus>bob@example.com:queued" in line
        release.set()
        assert h.service.delivery.flush_notices(10)
    # example.com tells the recipient and the sender
    assert sorted(r for m in h.injector.sent for r in m.recipients) == ["bob@example.com", "s@remote.example"]
    logged = [r.getMessage() for r in caplog.records]
    mwid = line.split("mwid=", 1)[1].split()[0]
    assert f"QID1: notice virus to <bob@example.com>: sent mwid={mwid}" in logged
    assert f"QID1: notice virus to <s@remote.example>: sent mwid={mwid}" in logged


def test_two_nodes_on_one_redis_scan_the_same_mail_once(tmp_path: Path, redis_server: RedisServer) -> None:
    from mailwarden.store import open_async_store
    from milters.filters.virus import StoreScanCache, VirusFilter

    prefix = f"mwtest{time.time_ns()}:"
    node_a, node_b = harness(tmp_path / "a"), harness(tmp_path / "b")
    for node in (node_a, node_b):
        store = open_async_store("redis", redis_url=redis_server.url, key_prefix=prefix)
        node.service.pipeline.filters[1] = VirusFilter(node.virus, StoreScanCache(store, 600))
    node_a.feed(make_message(body="one body, two nodes"), "s@remote.example", "taro@example.jp")
    node_b.feed(make_message(body="one body, two nodes"), "s@remote.example", "taro@example.jp")
    assert (node_a.virus.calls, node_b.virus.calls) == (1, 0)
    assert list(RedisStore(redis_server.url, key_prefix=prefix).scan("av:")), "the result is in Redis"


def test_local_scan_cache_forgets_after_its_ttl_and_when_full() -> None:
    from milters.filters.virus import LocalScanCache
    from milters.scanners import VirusResult

    now = [0.0]
    cache = LocalScanCache(ttl=10, size=2, clock=lambda: now[0])

    async def run() -> None:
        await cache.put("a", VirusResult(infected=True, signature="Eicar"))
        await cache.put("b", VirusResult(infected=False))
        assert await cache.get("a") == VirusResult(infected=True, signature="Eicar", upstream="cache",
                                                   cached=True)
        await cache.put("c", VirusResult(infected=False))  # "b" was used least recently
        assert await cache.get("b") is None and await cache.get("c") is not None
        now[0] = 11
        assert await cache.get("a") is None

    asyncio.run(run())


def test_filters_run_on_the_loop_and_only_blocking_delivery_in_a_thread(tmp_path: Path) -> None:
    """The scans and the decision run on the event loop's thread; a quarantine, which
    writes a file and the store, runs in the loop's executor."""
    h = harness(tmp_path)
    scans: list[bool] = []
    puts: list[bool] = []
    scan, put = h.virus.scan, h.service.delivery.quarantine.put  # type: ignore[union-attr]

    async def spy_scan(stream: Any, deadline: float) -> Any:
        scans.append(threading.current_thread() is threading.main_thread())
        return await scan(stream, deadline)

    def spy_put(*args: Any, **kwargs: Any) -> Any:
        puts.append(threading.current_thread() is threading.main_thread())
        return put(*args, **kwargs)

    h.virus.scan = spy_scan  # type: ignore[method-assign]
    h.service.delivery.quarantine.put = spy_put  # type: ignore[union-attr,method-assign]
    assert h.feed(make_message(body=EICAR.decode()), "s@remote.example", "bob@example.com").rc == p.REJECT
    assert scans == [True] and puts == []
    h.directory.entries["mwDomainName=example.com,ou=domains"]["virus_action"] = ["quarantine"]
    h.service.resolver.invalidate()
    ctx = h.feed(make_message(body=EICAR.decode() + " "), "s@remote.example", "bob@example.com")
    assert ctx.rc == p.DISCARD and scans == [True, True] and puts == [False]


# ---------------------------------------------------------------- role addresses

ROLE_MAILBOX = '[policy]\nrole_mailbox = "roles@isp.example"\n'


def test_role_addresses_are_virus_scanned_even_where_the_domain_scans_nothing(tmp_path: Path) -> None:
    h = harness(tmp_path, ROLE_MAILBOX)
    ctx = h.feed(make_message(body=EICAR.decode()), "s@remote.example", "postmaster@bare.example.net")
    assert ctx.rc == p.REJECT and "virus" in ctx.reply[2]
    # The domain's own unknown users and subscribers get what the domain says: nothing.
    h.feed(make_message(body=EICAR.decode() + " "), "s@remote.example", "nobody@bare.example.net")
    assert h.virus.calls == 1


def test_role_addresses_are_extension_filtered_by_their_domain_settings(h: Harness) -> None:
    # abuse@example.com goes to example.com's admin_address; example.com strips banned parts.
    raw = with_attachment(b"MZ not really", "setup.exe")
    ctx = h.feed(raw, "s@remote.example", "abuse@example.com")
    assert ctx.rc == p.ACCEPT and ctx.body_replaced
    assert "setup.exe" not in {part.get_filename() for part in ctx.msg.walk()}


def test_spam_and_keyword_rules_never_refuse_a_complaint(h: Harness) -> None:
    h.spam.score = 50.0  # over example.com's reject score
    msg = make_message(subject="Fwd: cheap pills", body="Your customer sent: Buy cheap pills\n")
    ctx = h.feed(msg, "s@remote.example", "abuse@example.com", "carol@example.com")
    # carol (a subscriber of the same domain) refuses it; the role address takes it as sent.
    assert ctx.rc == p.ACCEPT and ctx.delrcpt == ["<carol@example.com>"]
    assert ctx.msg["X-Spam-Flag"] is None and ctx.msg["X-Mailwarden-Junk"] is None
