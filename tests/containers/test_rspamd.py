"""rspamd as the stack's spam engine (``MW_SPAM_ENGINE=rspamd``).

Runs only on a stack whose front nodes score with rspamd, because the default stack's
other scenarios count on SpamAssassin's scores (GTUBE lands in Junk there)::

    MW_SPAM_ENGINE=rspamd .venv/bin/pytest tests/containers/test_rspamd.py

GTUBE sent through the balancer to two subscribers in one transaction: rspamd scores it
(a pre-result, counted as its reject score, 15), and the milter applies each
recipient's own settings to that one score: refused for taro (spam checking, reject
score 15), delivered untouched to bob (no spam checking)."""

from __future__ import annotations

import re

import pytest

from harness.containers import MailStack, message_text, read_maildir
from tests.containers.test_inbound import GTUBE, MX, queued_as


@pytest.fixture(autouse=True)
def _rspamd_stack(stack: MailStack) -> None:
    if stack.spam_engine != "rspamd":
        pytest.skip("the stack scores with spamd; MW_SPAM_ENGINE=rspamd runs this")


def test_gtube_through_the_balancer_is_scored_by_rspamd_and_judged_per_recipient(
    stack: MailStack, token: str
) -> None:
    config = stack.read_file("front", "/etc/mailwarden/mailwarden.toml")
    assert 'spam_engine = "rspamd"' in config
    milter_log = stack.log_size("front", "milter")
    sent = stack.swaks("internet", "--server", MX, "--from", "alice@outside.test",
                       "--to", "taro@example.jp,bob@example.com", "--header", f"Subject: offer {token}",
                       "--body", f"{GTUBE}\n{token}\n")
    assert sent.returncode == 0, sent.stdout
    queue_id = queued_as(sent.stdout)
    line = stack.wait_for_log("front", rf"^.*{queue_id}: accept .*$", name="milter",
                              after=milter_log).group(0)
    assert re.search(r"taro@example\.jp=reject\[[^]]*spam", line, re.I), line
    assert "bob@example.com=deliver" in line, line
    assert re.search(r"spam=(?:1[5-9]|[2-9]\d)\.\d", line), line
    # rspamd itself scored it: its log names the message's queue id and the GTUBE rule.
    scored = stack.wait_for_log("front", rf"^.*qid: <{queue_id}>.*$", name="rspamd").group(0)
    assert "GTUBE" in scored, scored

    [clean] = stack.wait_for_messages(stack.maildir("bob@example.com"), match=token)
    assert GTUBE in message_text(clean)
    stack.wait_queues_empty()
    for folder in ("", "Junk"):
        taro = read_maildir(stack.maildir("taro@example.jp", folder))
        assert not [m for m in taro if token in message_text(m)]
