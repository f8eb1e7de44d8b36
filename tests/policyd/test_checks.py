"""Each check through the engine, over the fake directory, MemoryStore and stub DNS."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mailwarden.store import StoreCall, StoreUnavailable
from policyd.checks.base import TEMPFAIL_REPLY
from tests.policyd.conftest import World

AUTH = {"sasl_username": "taro@example.jp", "sasl_method": "PLAIN", "sender": "taro@example.jp"}
OUT = "friend@remote.example"


class DownStore:
    """A store whose backend is gone."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        def fail(*_a: object, **_k: object) -> None:
            raise StoreUnavailable("redis store redis://127.0.0.1:1/0: Connection refused")

        return fail


# ---------------------------------------------------------------- relay


def test_mail_for_a_local_domain_from_outside_is_not_refused(world_with: Callable[..., World]) -> None:
    w = world_with('[policyd]\nchecks = ["relay"]\n')
    assert w.action(recipient="taro@example.jp") == "DUNNO"
    assert w.action(recipient="nobody@example.ne.jp") == "DUNNO"


def test_third_party_relay_is_refused(world: World) -> None:
    decision = world.decide(recipient=OUT)
    assert decision.action == f"554 5.7.1 <{OUT}>: Relay access denied"
    assert decision.check == "relay"


def test_smtp_auth_login_may_relay(world: World) -> None:
    decision = world.decide(recipient=OUT, **AUTH)
    assert decision.action == "OK" and "taro@example.jp" in decision.reason


def test_login_without_smtp_auth_service_may_not_relay(world: World) -> None:
    decision = world.decide(recipient=OUT, sasl_username="nosmtp@example.jp", sender="nosmtp@example.jp")
    assert decision.action.startswith("554 5.7.1")


def test_disabled_account_may_not_relay(world: World) -> None:
    decision = world.decide(recipient=OUT, sasl_username="jiro@example.jp", sender="jiro@example.jp")
    assert decision.action.startswith("554 5.7.1")


def test_trusted_network_may_relay(world: World) -> None:
    assert world.action(recipient=OUT, client_address="127.0.0.1") == "OK"


def test_pop_before_smtp_window_lets_the_ip_relay_until_it_expires(world: World) -> None:
    world.services.pbs.open("198.51.100.7", "taro@example.jp", 600)
    assert world.action(recipient=OUT, client_address="198.51.100.7", instance="a") == "OK"
    assert world.action(recipient=OUT, client_address="198.51.100.8", instance="b").startswith("554")
    world.clock.advance(601)
    assert world.action(recipient=OUT, client_address="198.51.100.7", instance="c").startswith("554")


def test_pop_before_smtp_window_is_looked_up_on_the_event_loop_without_waiting(world: World) -> None:
    world.services.pbs.open("198.51.100.7", "taro@example.jp", 600)
    action, made = world.on_the_loop(recipient=OUT, client_address="198.51.100.7", instance="a")
    assert action == "OK"
    assert made[0] == StoreCall("get", ("pbs:198.51.100.7",))
    action, made = world.on_the_loop(recipient="other@remote.example", client_address="198.51.100.7",
                                     instance="a")
    assert action == "OK" and made == [], "the window of the transaction is known"


def test_pop_before_smtp_window_of_a_user_without_the_service_does_not_count(world: World) -> None:
    world.services.pbs.open("198.51.100.7", "nosmtp@example.jp", 600)
    assert world.action(recipient=OUT, client_address="198.51.100.7").startswith("554")


def test_relay_with_directory_down_is_a_temporary_failure(world: World) -> None:
    world.directory.down = True
    decision = world.decide(recipient=OUT, **AUTH)
    assert decision.action == TEMPFAIL_REPLY and decision.check == "relay"


def test_relay_with_store_down_is_a_temporary_failure(world_with: Callable[..., World]) -> None:
    w = world_with(store=DownStore())
    decision = w.decide(recipient=OUT, client_address="198.51.100.7")
    assert decision.action == TEMPFAIL_REPLY and decision.check == "relay"


def test_relay_failure_action_dunno_is_configurable(world_with: Callable[..., World]) -> None:
    w = world_with('[policyd.relay]\nfailure_action = "dunno"\n[policyd]\nchecks = ["relay"]\n')
    w.directory.down = True
    assert w.action(recipient=OUT, **AUTH) == "DUNNO"


# ---------------------------------------------------------------- SMTP-AUTH sender


@pytest.mark.parametrize("sender", [
    "taro@example.jp", "taro.yamada@example.jp", "taro@example.ne.jp", "TARO@Example.JP",
])
def test_login_may_send_as_its_own_addresses(world: World, sender: str) -> None:
    assert world.action(recipient=OUT, sasl_username="taro@example.jp", sender=sender) == "OK"


def test_login_may_not_send_as_someone_else(world: World) -> None:
    decision = world.decide(recipient=OUT, sasl_username="taro@example.jp", sender="jiro@example.jp")
    assert decision.action == "553 5.7.1 <jiro@example.jp>: Sender address not owned by user taro@example.jp"
    assert decision.check == "sender_login"


def test_sender_ownership_applies_to_local_recipients_too(world: World) -> None:
    decision = world.decide(recipient="jiro@example.jp", sasl_username="taro@example.jp",
                            sender="boss@example.com")
    assert decision.action.startswith("553 5.7.1")


def test_allowed_senders_of_the_domain_are_honoured(world: World) -> None:
    assert world.action(recipient=OUT, sasl_username="alice@example.com",
                        sender="sales@partner.example") == "OK"


def test_login_without_smtp_auth_is_refused_even_for_local_mail(world: World) -> None:
    decision = world.decide(recipient="taro@example.jp", sasl_username="nosmtp@example.jp",
                            sender="nosmtp@example.jp")
    assert decision.action == "554 5.7.1 SMTP-AUTH is not enabled for this account"


def test_unknown_login_is_refused(world: World) -> None:
    decision = world.decide(sasl_username="ghost@example.jp", sender="ghost@example.jp")
    assert decision.action.startswith("554 5.7.1") and decision.check == "sender_login"


def test_exempt_login_domain_may_use_any_sender(world_with: Callable[..., World]) -> None:
    w = world_with('[policyd.sender_login]\nexempt_login_domains = ["example.jp"]\n')
    assert w.action(recipient=OUT, sasl_username="taro@example.jp", sender="list@lists.example") == "OK"


def test_null_sender_for_logins_follows_the_setting(world_with: Callable[..., World]) -> None:
    assert world_with().action(recipient=OUT, sasl_username="taro@example.jp", sender="") == "OK"
    w = world_with("[policyd.sender_login]\nallow_null_sender = false\n")
    assert w.action(recipient=OUT, sasl_username="taro@example.jp", sender="").startswith("553")


def test_login_without_domain_uses_login_domain(world_with: Callable[..., World]) -> None:
    plain = world_with().action(recipient=OUT, sasl_username="taro", sender="taro@example.jp")
    assert plain.startswith("554")
    w = world_with('[policyd]\nlogin_domain = "example.jp"\n')
    assert w.action(recipient=OUT, sasl_username="taro", sender="taro@example.jp") == "OK"


# ---------------------------------------------------------------- envelope and engine


def test_junk_recipient_gets_a_defined_answer(world: World) -> None:
    assert world.action(recipient="no-at-sign") == "501 5.1.3 Bad recipient address syntax"
    assert world.action(sender="bad sender@x") == "501 5.1.7 Bad sender address syntax"


def test_a_crashing_check_answers_its_failure_action(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    relay = world.app.engine.checks[0]

    def boom(ctx: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(relay, "evaluate", boom)
    decision = world.decide(recipient=OUT)
    assert decision.action == TEMPFAIL_REPLY and "internal error" in decision.reason


def test_checks_run_in_the_configured_order(world_with: Callable[..., World]) -> None:
    w = world_with('[policyd]\nchecks = ["sender_login", "relay"]\n')
    decision = w.decide(recipient=OUT, sasl_username="taro@example.jp", sender="jiro@example.jp")
    assert decision.check == "sender_login"
    w2 = world_with('[policyd]\nchecks = ["relay"]\n')
    assert w2.action(recipient=OUT, sasl_username="taro@example.jp", sender="jiro@example.jp") == "OK"


def test_other_stages_without_checks_answer_dunno(world: World) -> None:
    assert world.action(protocol_state="CONNECT") == "DUNNO"
