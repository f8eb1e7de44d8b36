"""A recipient's own sender lists in the milter: the block list refuses at RCPT, the allow
list spares spam and keyword filtering (never the virus scan), on a genuine sender only."""

from __future__ import annotations

from pathlib import Path

from harness.dnsstub import StubDns
from milters import protocol as p
from tests.milter.helpers import EICAR, GTUBE, Harness, harness, make_message, sample_directory
from tests.milter.test_sender_auth import dns_section, keys, stub  # noqa: F401  (fixtures)


def rig(tmp: Path, extra: str = "", *, sender_auth: bool = False) -> Harness:
    d = sample_directory()
    # taro (spam checking, keyword rules) trusts signer.example's senders and blocks one.
    d.entries[d.add_user("taro@example.jp", enabled_service=["spam-check", "keyword-filter"],
                         keyword_rules=["subject contains reject cheap"])].update(
        sender_allowlist=["@signer.example"], sender_blocklist=["pest@outside.test"])
    return harness(tmp, extra, d, sender_auth=sender_auth)


def test_a_blocked_sender_is_refused_at_rcpt(tmp_path: Path) -> None:
    h = rig(tmp_path)
    fed = h.feed(make_message(sender="pest@outside.test"), "pest@outside.test", "taro@example.jp",
                 "hanako@example.jp")
    assert fed.rcpt_replies[0].code != "c" and fed.rcpt_replies[1].code == "c"
    assert fed.rc == p.ACCEPT


def test_an_allowed_sender_skips_spam_and_keywords_but_not_viruses(tmp_path: Path) -> None:
    h = rig(tmp_path)
    spam = make_message(sender="news@signer.example", subject="cheap offer", body=GTUBE)
    fed = h.feed(spam, "news@signer.example", "taro@example.jp")
    assert fed.rc == p.ACCEPT and h.spam.calls == 0
    other = make_message(sender="news@other.example", subject="cheap offer", body=GTUBE)
    assert h.feed(other, "news@other.example", "taro@example.jp").rc == p.REJECT
    virus = make_message(sender="news@signer.example", body=EICAR.decode())
    assert h.feed(virus, "news@signer.example", "taro@example.jp").rc == p.REJECT


def test_with_sender_auth_only_a_genuine_sender_is_allowed(tmp_path: Path, stub: StubDns) -> None:  # noqa: F811
    """signer.example's SPF lists 192.0.2.0/24, the client's network in these tests; its
    DMARC policy is p=reject.  A forged From of it fails DMARC and gets no allowance."""
    h = rig(tmp_path, 'authserv_id = "mx.isp.test"\n' + dns_section(stub), sender_auth=True)
    # example.jp ignores DMARC failures: only the keyword rule can refuse the forgery.
    h.directory.entries["mwDomainName=example.jp,ou=domains"]["dmarc_action"] = ["ignore"]
    spam = make_message(sender="news@signer.example", subject="cheap offer")
    assert h.feed(spam, "news@signer.example", "taro@example.jp").rc == p.ACCEPT  # SPF pass
    forged_from = make_message(sender="news@signer.example", subject="cheap offer")
    fed = h.feed(forged_from, "bounce@elsewhere.example", "taro@example.jp")
    assert fed.rc == p.REJECT and "keyword" in fed.reply[2]
