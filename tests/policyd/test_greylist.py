"""Greylisting per recipient domain or user, postgrey's model."""

from __future__ import annotations

from collections.abc import Callable

from tests.policyd.conftest import World

CHECKS = '[policyd]\nchecks = ["greylist"]\n'
MAIL = {"client_address": "192.0.2.44", "sender": "news@outside.example",
        "recipient": "student@lab.example.org"}


def test_greylisting_is_off_unless_the_domain_or_user_has_it(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS)
    assert w.action(**{**MAIL, "recipient": "taro@example.jp"}) == "DUNNO"
    assert w.action(**{**MAIL, "recipient": "prof@lab.example.org"}) == "DUNNO"


def test_first_attempt_waits_retry_after_the_delay_passes(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS)
    assert w.action(**MAIL) == "450 4.2.0 Greylisted, try again in 300 seconds"
    w.clock.advance(120)
    assert w.action(**MAIL) == "450 4.2.0 Greylisted, try again in 181 seconds"
    w.clock.advance(181)
    assert w.action(**MAIL) == "DUNNO"
    w.clock.advance(86400)
    assert w.action(**MAIL) == "DUNNO"  # a passed triplet stays known


def test_per_user_delay(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS)
    quick = {**MAIL, "recipient": "quick@lab.example.org"}
    assert w.action(**quick).endswith("60 seconds")
    w.clock.advance(61)
    assert w.action(**quick) == "DUNNO"


def test_retry_after_the_retry_window_starts_over(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS + "[policyd.greylist]\nretry_window = 3600\n")
    assert w.action(**MAIL).startswith("450")
    w.clock.advance(3601)
    assert w.action(**MAIL) == "450 4.2.0 Greylisted, try again in 300 seconds"


def test_triplet_uses_the_client_network_and_ignores_sender_extensions(
    world_with: Callable[..., World],
) -> None:
    w = world_with(CHECKS)
    assert w.action(**MAIL).startswith("450")
    w.clock.advance(301)
    neighbour = {**MAIL, "client_address": "192.0.2.45", "sender": "news+1234@outside.example"}
    assert w.action(**neighbour) == "DUNNO"
    assert w.action(**{**MAIL, "client_address": "192.0.3.44"}).startswith("450")


def test_client_is_whitelisted_after_enough_passed_triplets(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS + "[policyd.greylist]\nauto_whitelist_clients = 2\n")
    for i in range(2):
        mail = {**MAIL, "sender": f"s{i}@outside.example"}
        assert w.action(**mail).startswith("450")
        w.clock.advance(301)
        assert w.action(**mail) == "DUNNO"
    assert w.action(**{**MAIL, "sender": "brand-new@outside.example"}) == "DUNNO"


def test_whitelists(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS + '[policyd.greylist]\nwhitelist_clients = ["192.0.2.0/28", ".trusted.example"]\n'
                   'whitelist_recipients = ["postmaster@lab.example.org"]\n'
                   'whitelist_senders = ["@bank.example"]\n')
    assert w.action(**{**MAIL, "client_address": "192.0.2.5"}) == "DUNNO"
    assert w.action(**{**MAIL, "client_name": "mx1.trusted.example"}) == "DUNNO"
    assert w.action(**{**MAIL, "recipient": "postmaster@lab.example.org"}) == "DUNNO"
    assert w.action(**{**MAIL, "sender": "alerts@bank.example"}) == "DUNNO"
    assert w.action(**MAIL).startswith("450")


def test_logins_are_not_greylisted(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS)
    assert w.action(**{**MAIL, "sasl_username": "taro@example.jp", "sender": "taro@example.jp"}) == "DUNNO"
