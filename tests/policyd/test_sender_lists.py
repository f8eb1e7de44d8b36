"""A recipient's own sender lists (catalogue sender_allowlist / sender_blocklist)."""

from __future__ import annotations

from tests.policyd.conftest import World, fake_directory, make_world

MAIL = {"client_address": "192.0.2.44", "sender": "news@spammy.example",
        "recipient": "student@lab.example.org"}


def lists_world() -> World:
    d = fake_directory()
    d.entries["mwDomainName=lab.example.org,ou=domains"]["sender_blocklist"] = ["@spammy.example"]
    d.add_user("fan@lab.example.org", sender_blocklist=["!@spammy.example", "boss@work.example"],
               sender_allowlist=["@friends.example"])
    return make_world('[policyd]\nchecks = ["sender_lists", "greylist"]\n'
                      '[policy]\nrole_mailbox = "roles@isp.example"\n', directory=d)


def test_a_blocked_sender_is_refused_at_rcpt_for_that_recipient_only() -> None:
    w = lists_world()
    decision = w.decide(**MAIL)
    assert decision.action == ("550 5.7.1 <news@spammy.example>: Sender address rejected: "
                               "blocked by the recipient")
    assert decision.check == "sender_lists"
    # fan lifts the domain's entry ('!') and adds one of their own.
    assert w.action(**{**MAIL, "recipient": "fan@lab.example.org"}).startswith("450")  # greylisted
    boss = {**MAIL, "recipient": "fan@lab.example.org", "sender": "boss@work.example"}
    assert w.action(**boss).startswith("550 5.7.1")
    # Complaints still reach the role addresses; other domains are not affected.
    assert w.action(**{**MAIL, "recipient": "postmaster@lab.example.org"}) == "DUNNO"
    assert w.action(**{**MAIL, "recipient": "taro@example.jp"}) == "DUNNO"


def test_an_allowed_sender_is_not_greylisted() -> None:
    w = lists_world()
    friend = {**MAIL, "sender": "pal@friends.example", "recipient": "fan@lab.example.org"}
    assert w.action(**friend) == "DUNNO"
    assert w.action(**{**friend, "recipient": "student@lab.example.org"}).startswith("450")
