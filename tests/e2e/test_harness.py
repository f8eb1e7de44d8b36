"""The harness itself, against the real daemons: Postfix, the sink, Dovecot, SASL, LMTP."""

from __future__ import annotations

import imaplib
import poplib
import time
from collections.abc import Iterator

import pytest

from harness.dovecot import DovecotServer
from harness.ports import free_port
from harness.postfix import PostfixError, PostfixInstance, make_message, send_mail
from harness.smtpsink import SmtpSink
from tests.e2e.conftest import skip_without_mail_stack

pytestmark = [pytest.mark.slapd, skip_without_mail_stack()]


@pytest.fixture(scope="module")
def lmtp_sink() -> Iterator[SmtpSink]:
    """A stand-in mailbox host speaking LMTP."""
    with SmtpSink(lmtp=True) as server:
        yield server


@pytest.fixture(scope="module")
def submission_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def mx(sink: SmtpSink, lmtp_sink: SmtpSink, dovecot: DovecotServer, submission_port: int
       ) -> Iterator[PostfixInstance]:
    """Relays out to the sink, delivers example.com to Dovecot, lab.example.org to the
    LMTP sink, and offers SMTP AUTH (Dovecot SASL) on a submission port."""
    instance = PostfixInstance(main_cf={
        "relayhost": sink.relayhost,
        "virtual_mailbox_domains": "example.com lab.example.org",
        "virtual_transport": dovecot.lmtp_nexthop,
    })
    transport = instance.dir / "transport"
    transport.write_text(f"lab.example.org {lmtp_sink.nexthop}\n")
    instance.postconf(transport_maps=f"texthash:{transport}")
    instance.add_smtpd({
        **dovecot.postfix_sasl_settings(),
        "syslog_name": "postfix-mw/submission",
        "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
    }, port=submission_port)
    with instance:
        assert instance.log_problems() == []  # the harness's configuration draws no warnings
        yield instance


@pytest.fixture(autouse=True)
def _fresh_sinks(sink: SmtpSink, lmtp_sink: SmtpSink) -> None:
    sink.clear()
    lmtp_sink.clear()


# -- Postfix and the sink ---------------------------------------------------------------


def test_trusted_client_relays_to_the_sink(mx: PostfixInstance, sink: SmtpSink) -> None:
    since = mx.log_offset()
    result = mx.send("alice@example.com", ["friend@example.org", "Other@Example.NET"],
                     make_message("alice@example.com", ["friend@example.org"], subject="relay me"))
    assert result.accepted and result.queue_id
    [msg] = sink.wait_for(1)
    assert msg.envelope_sender == "alice@example.com"
    assert sorted(msg.recipients) == ["Other@Example.NET", "friend@example.org"]
    assert msg.header("Subject") == "relay me"
    assert "[127.0.0.1]" in msg.headers("Received")[0]
    assert sink.messages_for("other@example.net") == [msg]
    mx.wait_for_log(rf"{result.queue_id}: to=<friend@example.org>.*status=sent", since=since)


def test_outsider_is_refused_relay_and_nothing_leaves(mx: PostfixInstance, sink: SmtpSink) -> None:
    since = mx.log_offset()
    result = mx.send("x@example.net", ["friend@example.org"], source_address="127.0.0.2")
    assert result.rcpt["friend@example.org"][0] == 454
    assert "Relay access denied" in result.refusal[1]
    assert result.data == (0, "")
    mx.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.2\]", since=since)
    mx.wait_queue_empty()
    assert sink.messages == []


def test_xclient_poses_as_another_client(mx: PostfixInstance) -> None:
    since = mx.log_offset()
    result = mx.send("x@example.net", ["friend@example.org"], xclient={"ADDR": "192.0.2.7"})
    assert result.rcpt["friend@example.org"][0] == 454  # 192.0.2.7 is not in mynetworks
    mx.wait_for_log(r"reject: RCPT from unknown\[192\.0\.2\.7\]", since=since)


def test_wait_for_log_times_out_showing_the_log(mx: PostfixInstance) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"(?s)no log line matching.*daemon started"):
        mx.wait_for_log("this never appears", timeout=0.2)
    assert time.monotonic() - started < 2


def test_sendmail_goes_through_pickup(mx: PostfixInstance, sink: SmtpSink) -> None:
    mx.sendmail(b"Subject: picked up\n\nhello\n", "root@mx.mailwarden.test", ["friend@example.org"])
    [msg] = sink.wait_for(1)
    assert msg.header("Subject") == "picked up"
    assert msg.envelope_sender == "root@mx.mailwarden.test"


def test_deferred_mail_is_queued_then_flushed(mx: PostfixInstance, sink: SmtpSink) -> None:
    sink.data_reply = "451 4.3.0 try again later"
    try:
        result = mx.send("alice@example.com", ["later@example.org"])
        assert result.accepted
        deadline = time.monotonic() + 10
        while not (queued := mx.queue()) and time.monotonic() < deadline:
            time.sleep(0.05)
        [entry] = queued
        assert entry["queue_id"] == result.queue_id
        mx.wait_for_log(rf"{result.queue_id}: .*status=deferred .*451 4\.3\.0 try again later")
    finally:
        sink.data_reply = None
    mx.flush()
    mx.wait_queue_empty()
    assert [m.recipients for m in sink.messages] == [("later@example.org",)]


def test_sink_refuses_the_recipients_it_is_told_to(mx: PostfixInstance, sink: SmtpSink) -> None:
    sink.reject_recipients["gone@example.org"] = "550 5.1.1 no such user"
    try:
        result = mx.send("owner@example.net", ["gone@example.org", "here@example.org"])
        assert result.accepted
        mx.wait_for_log(rf"{result.queue_id}: to=<gone@example.org>.*status=bounced .*550 5\.1\.1")
        mx.wait_queue_empty()
    finally:
        del sink.reject_recipients["gone@example.org"]
    # The delivery and the bounce to the (remote) sender both went out through the sink.
    delivered = [m for m in sink.messages if m.envelope_sender]
    assert [m.recipients for m in delivered] == [("here@example.org",)]
    assert [m.recipients for m in sink.messages if not m.envelope_sender] == [("owner@example.net",)]


def test_send_mail_dot_stuffs_and_sink_unstuffs(sink: SmtpSink) -> None:
    body = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\n"
    result = send_mail("127.0.0.1", sink.port, "a@example.org", ["b@example.org"], body)
    assert result.accepted
    [msg] = sink.wait_for(1)
    assert msg.data == b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n"


def test_lmtp_sink_gets_its_domain(mx: PostfixInstance, lmtp_sink: SmtpSink, sink: SmtpSink) -> None:
    result = mx.send("x@example.net", ["prof@lab.example.org"], source_address="127.0.0.2")
    assert result.accepted  # a hosted domain: no relay permission needed
    [msg] = lmtp_sink.wait_for(1)
    assert msg.recipients == ("prof@lab.example.org",)
    assert msg.helo == "mx.mailwarden.test"
    assert sink.messages == []


def test_broken_configuration_fails_start_with_postfix_reason() -> None:
    broken = PostfixInstance(main_cf={"inet_interfaces": "192.0.2.55"})
    try:
        with pytest.raises(PostfixError, match=r"no local interface found for 192\.0\.2\.55"):
            broken.start()
        assert not broken.running
    finally:
        broken.cleanup()


def test_smtpd_misconfiguration_shows_in_log_problems(mx: PostfixInstance) -> None:
    since = mx.log_offset()
    port = mx.add_smtpd({"smtpd_relay_restrictions": "check_nonsense_access, reject"})
    mx.restart()
    try:
        result = mx.send("alice@example.com", ["friend@example.org"], port=port)
        assert result.rcpt["friend@example.org"] == (451, "4.3.5 Server configuration error")
        assert any("check_nonsense_access" in line for line in mx.log_problems(since))
    finally:
        mx.services.pop()
        mx.restart()


def test_restart_applies_main_cf_changes(mx: PostfixInstance) -> None:
    mx.postconf(smtpd_banner="$myhostname ESMTP changed-banner")
    try:
        mx.restart()
        assert mx.postconf_n()["smtpd_banner"] == "$myhostname ESMTP changed-banner"
        result = mx.send("alice@example.com", ["friend@example.org"])
        assert result.connect == (220, "mx.mailwarden.test ESMTP changed-banner")
    finally:
        mx.postconf(smtpd_banner="$myhostname ESMTP")
        mx.restart()


# -- Dovecot: POP3/IMAP against slapd, SASL for Postfix, LMTP ---------------------------


def pop3_login(dovecot: DovecotServer, user: str, password: str) -> bytes:
    pop = poplib.POP3("127.0.0.1", dovecot.pop3_port, timeout=10)
    try:
        pop.user(user)
        return pop.pass_(password)
    finally:
        pop.quit()


def test_pop3_login_checks_the_password_in_ldap(dovecot: DovecotServer) -> None:
    since = dovecot.log_offset()
    assert pop3_login(dovecot, "pbs@example.jp", "secret").startswith(b"+OK")
    with pytest.raises(poplib.error_proto, match="Authentication failed"):
        pop3_login(dovecot, "pbs@example.jp", "wrong")
    log = dovecot.log_text(since)
    assert "pop3-login: Info: Login: user=<pbs@example.jp>" in log
    assert "Password mismatch (for LDAP bind)" in log


def test_alternate_address_logs_in_as_the_primary(dovecot: DovecotServer) -> None:
    since = dovecot.log_offset()
    assert pop3_login(dovecot, "Taro.Yamada@example.jp", "secret").startswith(b"+OK")
    assert "Login: user=<taro@example.jp>" in dovecot.log_text(since)


@pytest.mark.parametrize("user", ["jiro@example.jp", "ghost@example.jp"])
def test_disabled_or_unknown_subscriber_cannot_log_in(dovecot: DovecotServer, user: str) -> None:
    with pytest.raises(poplib.error_proto, match="Authentication failed"):
        pop3_login(dovecot, user, "secret")


def test_imap_login(dovecot: DovecotServer) -> None:
    imap = imaplib.IMAP4("127.0.0.1", dovecot.imap_port, timeout=10)
    try:
        assert imap.login("carol@example.com", "secret")[0] == "OK"
    finally:
        imap.logout()


def test_smtp_auth_through_dovecot_sasl(mx: PostfixInstance, sink: SmtpSink, submission_port: int) -> None:
    port = submission_port
    since = mx.log_offset()
    good = mx.send("taro@example.jp", ["friend@example.org"], port=port,
                   login=("taro@example.jp", "secret"), source_address="127.0.0.3")
    assert good.auth is not None and good.auth[0] == 235
    assert good.accepted
    mx.wait_for_log(rf"{good.queue_id}: client=unknown\[127\.0\.0\.3\].*sasl_method=PLAIN, "
                    r"sasl_username=taro@example.jp", since=since)
    assert [m.recipients for m in sink.wait_for(1)] == [("friend@example.org",)]
    bad = mx.send("taro@example.jp", ["friend@example.org"], port=port,
                  login=("taro@example.jp", "wrong"), source_address="127.0.0.3")
    assert bad.auth is not None and bad.auth[0] == 535
    anonymous = mx.send("taro@example.jp", ["friend@example.org"], port=port, source_address="127.0.0.3")
    assert anonymous.rcpt["friend@example.org"][0] == 554


def test_lmtp_delivery_lands_in_the_maildir(mx: PostfixInstance, dovecot: DovecotServer) -> None:
    msg = make_message("x@example.net", ["carol@example.com"], subject="to the mailbox")
    result = mx.send("x@example.net", ["carol@example.com"], msg, source_address="127.0.0.2")
    assert result.accepted
    mx.wait_for_log(rf"{result.queue_id}: to=<carol@example.com>, relay=127\.0\.0\.1.*status=sent")
    [stored] = [m for m in dovecot.messages("carol@example.com") if m["Subject"] == "to the mailbox"]
    assert stored["Message-ID"] == msg["Message-ID"]
    pop = poplib.POP3("127.0.0.1", dovecot.pop3_port, timeout=10)
    try:
        pop.user("carol@example.com")
        pop.pass_("secret")
        count, _ = pop.stat()
        assert count >= 1
    finally:
        pop.quit()
