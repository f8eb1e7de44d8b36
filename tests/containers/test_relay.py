"""Relay rights on the front node: SMTP-AUTH submission, POP-before-SMTP, no open relay.

The clients are this machine, each test from its own address on the stack's network
(``client_address``), so one test's POP-before-SMTP window cannot help another.
"""

from __future__ import annotations

import re
import time

from harness.containers import SAMPLE_PASSWORD, MailStack, message_text
from harness.postfix import make_message
from tests.containers.conftest import DirectoryChanges

SUBMISSION, MX, POP_BEFORE_SMTP = 587, 25, 2525


def test_submission_with_smtp_auth_delivers_to_the_internet_host(stack: MailStack, token: str) -> None:
    client = stack.client_address(1)
    friend = f"friend-{token}@outside.test"
    front_log = stack.log_size("front")
    result = stack.send("balancer", SUBMISSION, "taro@example.jp", [friend],
                        make_message("taro@example.jp", [friend], subject=f"minutes {token}"),
                        source=client, login=("taro@example.jp", SAMPLE_PASSWORD), starttls=True)
    assert result.auth == (235, "2.7.0 Authentication successful")
    assert result.accepted, result

    [message] = stack.wait_for_messages(stack.internet_maildir(), match=token, delivered_to=friend)
    assert message["From"] == "taro@example.jp"
    stack.wait_for_log("front", rf"postfix-submission/submission/smtpd\[\d+\]: {result.queue_id}: "
                       rf"client=unknown\[{re.escape(client)}\], sasl_method=PLAIN, "
                       r"sasl_username=taro@example\.jp", after=front_log)
    stack.wait_for_log("front", rf"postfix-mx/smtp\[\d+\]: \w+: to=<{re.escape(friend)}>, "
                       rf"relay=mx\.outside\.test\[{re.escape(stack.ip('internet'))}\]:25, .*status=sent",
                       after=front_log)
    stack.wait_for_log("internet", rf"to=<{re.escape(friend)}>, relay=virtual, .*status=sent")
    stack.wait_queues_empty()


def test_submission_refuses_a_sender_address_the_login_does_not_own(stack: MailStack, token: str) -> None:
    friend = f"friend-{token}@outside.test"
    result = stack.send("balancer", SUBMISSION, "hanako@example.jp", [friend], source=stack.client_address(1),
                        login=("taro@example.jp", SAMPLE_PASSWORD), starttls=True)
    code, text = result.rcpt[friend]
    assert code == 553 and "not owned by user taro@example.jp" in text
    assert not result.accepted
    # An alias of the login's own domain is the login's (domain alias example.ne.jp).
    alias = stack.send("balancer", SUBMISSION, "taro@example.ne.jp", [friend], source=stack.client_address(1),
                       login=("taro@example.jp", SAMPLE_PASSWORD), starttls=True)
    assert alias.accepted, alias
    stack.wait_for_messages(stack.internet_maildir(), delivered_to=friend)
    stack.wait_queues_empty()


def test_no_third_party_relay_on_any_port(stack: MailStack, token: str) -> None:
    stranger = stack.client_address(2)
    victim = f"victim-{token}@outside.test"
    for port in (MX, SUBMISSION, POP_BEFORE_SMTP):
        result = stack.send("balancer", port, "spammer@elsewhere.test", [victim], source=stranger,
                            starttls=port == SUBMISSION)
        code, text = result.rcpt[victim]
        assert code == 554 and ("Relay access denied" in text or "Access denied" in text), (port, text)
    # A wrong password is no way round it either.
    wrong = stack.send("balancer", SUBMISSION, "taro@example.jp", [victim], source=stranger,
                       login=("taro@example.jp", "not-the-password"), starttls=True)
    assert wrong.auth is not None and wrong.auth[0] == 535
    assert not stack.front_queue()
    assert victim not in stack.log("internet")


def test_pop_before_smtp_opens_relay_for_the_login_address_and_closes_it_after_the_ttl(
    stack: MailStack, token: str, directory: DirectoryChanges
) -> None:
    ttl = 10  # the shortest the catalogue allows
    directory.set("user", "pbs@example.jp", "pop_before_smtp_ttl", str(ttl))
    laptop, neighbour = stack.client_address(3), stack.client_address(4)
    friend = f"friend-{token}@outside.test"

    def relay(source: str, subject: str) -> tuple[int, str]:
        result = stack.send("balancer", POP_BEFORE_SMTP, "pbs@example.jp", [friend],
                            make_message("pbs@example.jp", [friend], subject=subject), source=source)
        return result.rcpt[friend]

    assert relay(laptop, "before")[0] == 554  # closed until the subscriber reads mail
    policyd_log = stack.log_size("front", "policyd")
    stack.pop3("pbs@example.jp", source=laptop).quit()
    opened = time.monotonic()
    stack.wait_for_log("front", rf"window opened for pbs@example\.jp from \[{re.escape(laptop)}\] "
                       rf"for {ttl} s", name="policyd", after=policyd_log)

    assert relay(laptop, f"open {token}") == (250, "2.1.5 Ok")
    assert relay(neighbour, "neighbour")[0] == 554  # the window is the laptop's address only
    [message] = stack.wait_for_messages(stack.internet_maildir(), match=f"open {token}", delivered_to=friend)
    assert "pbs@example.jp" in message_text(message)

    time.sleep(max(0.0, opened + ttl + 1 - time.monotonic()))
    assert relay(laptop, "after")[0] == 554  # closed again
    stack.wait_queues_empty()
