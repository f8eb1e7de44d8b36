"""Keyword rules: scopes, decoding, safe regexes, the strongest action."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from mailwarden.catalogue import InvalidValue, KeywordRule
from mailwarden.saferegex import UnsafePattern, check_regex
from milters.filters import Context, Envelope
from milters.filters.keywords import KeywordFilter
from milters.verdict import Action, AddHeader, Recipient, RecipientOutcome, Verdict
from tests.milter.helpers import parse, sample_directory


class Policy:
    """Just enough of an EffectivePolicy for the keyword filter."""

    def __init__(self, *rules: str | KeywordRule) -> None:
        self.rules = tuple(r if isinstance(r, KeywordRule) else KeywordRule.parse(r) for r in rules)

    def get(self, name: str) -> object:
        assert name == "keyword_rules"
        return self.rules


def outcome_for(raw: bytes, *rules: str | KeywordRule, flt: KeywordFilter | None = None) -> RecipientOutcome:
    outcome = RecipientOutcome(Recipient("u@example.jp", (), Policy(*rules)))  # type: ignore[arg-type]
    ctx = Context(Envelope("s@x"), parse(raw), Verdict([outcome]), time.monotonic() + 10)
    asyncio.run((flt or KeywordFilter()).apply(ctx, [outcome]))
    return outcome


MAIL = (b"From: =?UTF-8?B?5bGx55Sw?= <yamada@remote.example>\r\nTo: u@example.jp\r\n"
        b"Cc: boss@example.jp\r\nSubject: Quarterly numbers\r\nX-Campaign: summer-2026\r\n\r\n"
        b"Dear all,\r\nthe numbers are attached.\r\n")


@pytest.mark.parametrize(("rule", "hit"), [
    ("subject contains quarterly", True),
    ("subject contains attached", False),
    ("from contains 山田", True),
    ("to contains boss@example.jp", True),
    ("headers contains x-campaign: summer", True),
    ("body contains NUMBERS ARE", True),
    ("body contains quarterly", False),
    ("any contains quarterly", True),
    ("header:x-campaign regex ^summer-\\d{4}$", True),
    ("header:x-other contains summer", False),
])
def test_scopes_look_where_they_say(rule: str, hit: bool) -> None:
    outcome = outcome_for(MAIL, rule.replace("contains", "contains junk", 1).replace(
        "regex", "regex junk", 1))
    assert (AddHeader("X-Mailwarden-Junk", "yes") in outcome.edits) is hit


def test_strongest_action_wins() -> None:
    outcome = outcome_for(MAIL, "subject contains junk quarterly", "body contains discard numbers",
                          "any contains quarantine dear")
    assert outcome.action is Action.QUARANTINE
    assert outcome_for(MAIL, "body contains discard numbers", "subject contains reject numbers").action \
        is Action.REJECT


def test_unsafe_regex_is_refused_and_logged_not_run(caplog: pytest.LogCaptureFixture) -> None:
    # KeywordRule.parse already refuses it; the filter does not rely on that alone.
    with pytest.raises(InvalidValue, match="nested unbounded repeats"):
        KeywordRule.parse("body regex reject (a+)+$")
    unsafe = KeywordRule("body", "regex", "reject", "(a+)+$")
    with caplog.at_level(logging.WARNING):
        outcome = outcome_for(b"Subject: x\r\n\r\n" + b"a" * 40 + b"!\r\n", unsafe)
    assert outcome.action is Action.DELIVER
    assert "refused, not run" in caplog.text and "nested unbounded repeats" in caplog.text


@pytest.mark.parametrize("pattern", [r"(a+)+b", r"(\w+)\1", r".*a.*b.*c.*d", r"(x*)*y"])
def test_explosive_patterns_are_recognised(pattern: str) -> None:
    with pytest.raises(UnsafePattern):
        check_regex(pattern)


def test_regex_budget_stops_a_slow_scan(caplog: pytest.LogCaptureFixture) -> None:
    raw = b"Subject: x\r\n\r\n" + b"".join(b"line %d without the word\r\n" % i for i in range(20000))
    with caplog.at_level(logging.WARNING):
        outcome = outcome_for(raw, "body regex reject zzz$", flt=KeywordFilter(regex_budget=0.0))
    assert outcome.action is Action.DELIVER and "budget" in caplog.text


def test_sample_rules_parse() -> None:
    d = sample_directory()
    rules = d.entries["uid=taro,mwDomainName=example.jp,ou=domains"]["keyword_rules"]
    assert [KeywordRule.parse(r).action for r in rules] == ["junk", "reject"]
