"""Rate limits: per login, per sender domain, per client IP; counted at END-OF-MESSAGE."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from policyd.checks.base import TEMPFAIL_REPLY
from tests.policyd.conftest import World
from tests.policyd.test_checks import DownStore

OUT = "friend@remote.example"
CHECKS = '[policyd]\nchecks = ["relay", "rate_limit"]\n'


def send(w: World, n: int, *, recipients: int = 1, size: int = 100, **who: str) -> list[str]:
    """One message per round: RCPT (recipients times) then END-OF-MESSAGE; the answers."""
    answers = []
    for _ in range(n):
        w.counter += 1
        inst = f"msg{w.counter}"
        rcpt = [w.action(recipient=f"r{j}@remote.example", instance=inst, **who) for j in range(recipients)]
        refused = [a for a in rcpt if a[0] in "45"]
        if refused:
            answers.append(refused[0])
            continue
        answers.append(w.action(protocol_state="END-OF-MESSAGE", recipient="", instance=inst,
                                recipient_count=str(recipients), size=str(size), **who))
    return answers


LOGIN = {"sasl_username": "taro@example.jp", "sender": "taro@example.jp"}


def test_login_gets_n_messages_then_waits(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS)
    # example.jp: rate_limit_messages 3 per 60 s
    answers = send(w, 5, **LOGIN)
    assert answers[:3] == ["DUNNO"] * 3
    assert answers[3].startswith("450 4.7.1 Rate limit reached: 3 messages per 60 s for user taro@example.jp")
    assert answers[4] == answers[3]


def test_window_end_resets_the_budget(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS)
    assert send(w, 4, **LOGIN)[-1].startswith("450")
    w.clock.advance(61)
    assert send(w, 1, **LOGIN) == ["DUNNO"]


def test_message_over_the_recipient_budget_is_refused_and_not_counted(
    world_with: Callable[..., World],
) -> None:
    w = world_with(CHECKS)
    who = {"sasl_username": "big@example.jp", "sender": "big@example.jp"}
    # big@: 5 recipients and 1000 bytes per window, messages unlimited
    assert send(w, 1, recipients=3, **who) == ["DUNNO"]
    (over,) = send(w, 1, recipients=3, **who)
    assert over.startswith(
        "450 4.7.1 Rate limit exceeded: recipients limit 5 per 60 s for user big@example.jp")
    assert w.store.get("rl:user:big@example.jp:r") == "3"  # the refused message was taken back out
    assert send(w, 1, recipients=2, **who) == ["DUNNO"]
    assert send(w, 1, recipients=1, **who)[0].startswith("450 4.7.1 Rate limit reached")


def test_bytes_are_counted_at_end_of_message(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS)
    who = {"sasl_username": "big@example.jp", "sender": "big@example.jp"}
    assert send(w, 2, size=400, **who) == ["DUNNO", "DUNNO"]
    assert send(w, 1, size=400, **who)[0].startswith("450 4.7.1 Rate limit exceeded: bytes limit 1000")


def test_user_without_the_rate_limits_service_is_not_limited(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS)
    assert send(w, 6, sasl_username="free@example.jp", sender="free@example.jp") == ["DUNNO"] * 6


def test_domain_total_counts_all_its_users(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS + "[policyd.rate_limit.sender_domain]\nmessages = 4\n")
    assert send(w, 2, sasl_username="free@example.jp", sender="free@example.jp") == ["DUNNO"] * 2
    assert send(w, 2, **LOGIN) == ["DUNNO"] * 2
    assert send(w, 1, sasl_username="free@example.jp", sender="free@example.jp")[0].startswith(
        "450 4.7.1 Rate limit reached: 4 messages per 3600 s for domain example.jp")


def test_pop_before_smtp_user_is_counted_as_that_user(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS)
    w.services.pbs.open("198.51.100.7", "taro@example.jp", 600)
    who = {"client_address": "198.51.100.7", "sender": "taro@example.jp"}
    assert send(w, 4, **who)[-1].startswith("450 4.7.1 Rate limit reached: 3 messages per 60 s for user taro")


def test_anonymous_clients_are_limited_per_ip_and_trusted_ones_not(world_with: Callable[..., World]) -> None:
    w = world_with('[policyd]\nchecks = ["rate_limit"]\n[policyd.rate_limit.client]\nmessages = 2\n')
    inbound = {"client_address": "192.0.2.1"}
    answers = []
    for i in range(3):
        inst = f"in{i}"  # one message each
        answers.append(w.action(recipient="taro@example.jp", instance=inst, **inbound))
        answers.append(w.action(protocol_state="END-OF-MESSAGE", recipient="", instance=inst,
                                recipient_count="1", size="10", **inbound))
    assert answers[:4] == ["DUNNO"] * 4
    assert answers[4].startswith("450 4.7.1 Rate limit reached: 2 messages per 3600 s for client 192.0.2.1")
    assert w.action(recipient="taro@example.jp", instance="other", client_address="192.0.2.2") == "DUNNO"
    for i in range(5):
        assert w.action(protocol_state="END-OF-MESSAGE", instance=f"t{i}", client_address="127.0.0.1",
                        recipient_count="1") == "DUNNO"


def test_store_down_passes_by_default_and_tempfails_when_configured(world_with: Callable[..., World]) -> None:
    w = world_with('[policyd]\nchecks = ["rate_limit"]\n', store=DownStore())
    assert w.action(protocol_state="END-OF-MESSAGE", recipient_count="1", **LOGIN) == "DUNNO"
    w = world_with('[policyd]\nchecks = ["rate_limit"]\n[policyd.rate_limit]\nfailure_action = "tempfail"\n',
                   store=DownStore())
    assert w.action(protocol_state="END-OF-MESSAGE", recipient_count="1", **LOGIN) == TEMPFAIL_REPLY


def test_one_store_read_serves_every_rcpt_of_a_message(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS + "[policyd.rate_limit.sender_domain]\nmessages = 100\n")
    reads: list[list[str]] = []
    real_get_many = w.services.store.get_many

    def counting_get_many(keys: Sequence[str]) -> list[str | None]:
        reads.append(list(keys))
        return real_get_many(keys)

    w.services.store.get_many = counting_get_many  # type: ignore[method-assign]
    for j in range(5):
        assert w.action(recipient=f"r{j}@remote.example", instance="one-message", **LOGIN) == "OK"
    assert reads == [["rl:user:taro@example.jp:over", "rl:domain:example.jp:over"]]


def test_end_of_message_counts_every_scope_in_one_atomic_write(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS + "[policyd.rate_limit.sender_domain]\nmessages = 100\nbytes = 100000\n")
    writes: list[list[tuple[str, int, float | None]]] = []
    real_incr_many = w.services.store.incr_many

    def counting_incr_many(items: Sequence[tuple[str, int, float | None]]) -> list[int]:
        writes.append(list(items))
        return real_incr_many(items)

    w.services.store.incr_many = counting_incr_many  # type: ignore[method-assign]
    assert w.action(protocol_state="END-OF-MESSAGE", recipient_count="2", size="500", **LOGIN) == "DUNNO"
    assert len(writes) == 1
    counted = {k: a for k, a, _ in writes[0]}
    assert {"rl:user:taro@example.jp:m": 1, "rl:user:taro@example.jp:r": 2, "rl:domain:example.jp:m": 1,
            "rl:domain:example.jp:b": 500}.items() <= counted.items()
    assert w.store.get_many(["rl:user:taro@example.jp:m", "rl:domain:example.jp:b"]) == ["1", "500"]


def test_on_the_event_loop_each_store_operation_pauses_the_request_and_is_made_once(
    world_with: Callable[..., World],
) -> None:
    w = world_with(CHECKS)
    made: list[str] = []

    def on_the_loop(**attrs: str) -> str:
        action, calls = w.on_the_loop(**attrs)
        made.extend(call.name for call in calls)
        return action

    answers = []
    for i in range(4):
        who = {**LOGIN, "instance": f"loop{i}"}
        answers.append(on_the_loop(recipient=OUT, **who))
        if answers[-1] == "OK":
            answers.append(on_the_loop(protocol_state="END-OF-MESSAGE", recipient="", recipient_count="1",
                                       size="100", **who))
    assert answers == ["OK", "DUNNO", "OK", "DUNNO", "OK", "DUNNO",
                       "450 4.7.1 Rate limit reached: 3 messages per 60 s for user taro@example.jp; "
                       "try again later"]
    # RCPT: one read; END-OF-MESSAGE: the counters, and at the limit their ttl and the flag
    assert made == ["get_many", "incr_many"] * 2 + ["get_many", "incr_many", "ttl", "set", "get_many"]
    assert w.store.get("rl:user:taro@example.jp:m") == "3", "each message counted once"


def test_on_the_event_loop_an_anonymous_clients_messages_are_counted(
    world_with: Callable[..., World],
) -> None:
    """The client's POP-before-SMTP window is looked up once (kept for the request) before
    the counters change; the check that runs again after each pause still counts."""
    w = world_with('[policyd]\nchecks = ["relay", "rate_limit"]\n[policyd.rate_limit.client]\nmessages = 2\n')
    inbound = {"client_address": "192.0.2.1", "sender": "someone@outside.example"}
    answers = [w.on_the_loop(protocol_state="END-OF-MESSAGE", recipient="", recipient_count="1", size="100",
                             instance=f"anon{i}", **inbound)[0] for i in range(3)]
    assert answers[:2] == ["DUNNO", "DUNNO"]
    assert answers[2].startswith(
        "450 4.7.1 Rate limit exceeded: messages limit 2 per 3600 s for client 192.0.2.1")
    assert w.store.get("rl:client:192.0.2.1:m") == "2"
