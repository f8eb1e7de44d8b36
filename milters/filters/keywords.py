"""Keyword filter: each subscriber's own rules, on decoded text.

Header fields are decoded (RFC 2047 words, raw ISO-2022-JP / Shift_JIS / EUC-JP /
UTF-8 bytes) and text parts are transfer- and charset-decoded once per message.
``contains`` rules compare NFKC-normalised, case-folded text (full-width ＳＡＬＥ
matches "sale").  ``regex`` rules run case-insensitively on NFKC text, line by
line (lines cut at :data:`MAX_LINE`), within a per-message time budget, and a
pattern whose matching time can explode (nested unbounded repeats,
backreferences, more than two unbounded repeats) is refused and logged instead of
being run.  The strongest matching action wins: reject > quarantine > discard >
junk.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import unicodedata
from functools import lru_cache
from typing import ClassVar

from mailwarden.catalogue import JUNK_HEADER, KeywordRule, Service
from mailwarden.saferegex import UnsafePattern, check_regex
from milters.filters import Backends, Context
from milters.message import Texts
from milters.text import normalize_for_match
from milters.verdict import Action, AddHeader, RecipientOutcome

log = logging.getLogger("mailwarden.milter.keywords")

MAX_LINE = 1000
_ACTIONS = {"reject": Action.REJECT, "quarantine": Action.QUARANTINE, "discard": Action.DISCARD}
_STRENGTH = {"junk": 0, "discard": 1, "quarantine": 2, "reject": 3}

@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str] | str:
    """The compiled rule, or the reason it is refused (cached per pattern)."""
    try:
        return check_regex(pattern)
    except UnsafePattern as exc:
        return str(exc)


_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(rule: KeywordRule, why: str, address: str) -> None:
    with _warned_lock:
        if rule.pattern in _warned:
            return
        _warned.add(rule.pattern)
    log.warning("keyword rule of %s refused, not run: %r: %s", address, str(rule), why)


class _Scopes:
    """The text each rule scope looks at, normalised lazily and once per message."""

    def __init__(self, texts: Texts) -> None:
        self.texts = texts
        self._raw: dict[str, str] = {}
        self._norm: dict[str, str] = {}
        self._lines: dict[str, list[str]] = {}

    def raw(self, scope: str) -> str:
        if scope not in self._raw:
            t = self.texts
            if scope == "subject":
                text = t.header("Subject")
            elif scope == "from":
                text = t.header("From")
            elif scope == "to":
                text = "\n".join(filter(None, (t.header("To"), t.header("Cc"))))
            elif scope == "headers":
                text = t.all_headers
            elif scope == "body":
                text = t.body
            elif scope == "any":
                text = t.all_headers + "\n" + t.body
            else:  # header:Name
                text = t.header(scope.partition(":")[2])
            self._raw[scope] = text
        return self._raw[scope]

    def normalised(self, scope: str) -> str:
        if scope not in self._norm:
            self._norm[scope] = normalize_for_match(self.raw(scope))
        return self._norm[scope]

    def lines(self, scope: str) -> list[str]:
        if scope not in self._lines:
            text = unicodedata.normalize("NFKC", self.raw(scope))
            out: list[str] = []
            for line in text.split("\n"):
                out.extend(line[i:i + MAX_LINE] for i in range(0, max(len(line), 1), MAX_LINE))
            self._lines[scope] = out
        return self._lines[scope]


class KeywordFilter:
    """Applies each recipient's keyword rules to the decoded message."""

    name: ClassVar[str] = "keywords"
    service: ClassVar[Service | None] = Service.KEYWORD_FILTER
    skipped_for_allowed_senders: ClassVar[bool] = True

    def __init__(self, *, text_limit: int = 1024 * 1024, regex_budget: float = 0.5) -> None:
        self.text_limit = text_limit
        self.regex_budget = regex_budget

    @classmethod
    def build(cls, backends: Backends) -> KeywordFilter:
        """``milter.keyword_text_limit`` and ``milter.keyword_regex_budget``."""
        m = backends.config
        return cls(text_limit=m.keyword_text_limit, regex_budget=m.keyword_regex_budget)

    async def apply(self, ctx: Context, outcomes: list[RecipientOutcome]) -> None:
        """Match every recipient's rules; the strongest matching action wins."""
        with_rules = [o for o in outcomes if o.policy.get("keyword_rules")]
        if not with_rules:
            return
        scopes = _Scopes(ctx.message.texts(self.text_limit))
        budget_end = time.monotonic() + self.regex_budget
        hits = 0
        for outcome in with_rules:
            matched: list[KeywordRule] = []
            for rule in outcome.policy.get("keyword_rules"):
                if self._matches(rule, scopes, budget_end, outcome.address):
                    matched.append(rule)
            if not matched:
                continue
            hits += 1
            rule = max(matched, key=lambda r: _STRENGTH[r.action])
            reason = f"keyword rule '{rule.scope} {rule.op} {rule.pattern}'"
            if rule.action == "junk":
                outcome.edit(AddHeader(JUNK_HEADER, "yes"))
                outcome.notes.append(reason + " -> junk")
            else:
                outcome.block(_ACTIONS[rule.action], reason)
        ctx.find("keywords", f"{hits}/{len(with_rules)}")

    def _matches(self, rule: KeywordRule, scopes: _Scopes, budget_end: float, address: str) -> bool:
        if rule.op == "contains":
            return normalize_for_match(rule.pattern) in scopes.normalised(rule.scope)
        compiled = _compiled(rule.pattern)
        if isinstance(compiled, str):
            _warn_once(rule, compiled, address)
            return False
        for line in scopes.lines(rule.scope):
            if compiled.search(line):
                return True
            if time.monotonic() > budget_end:
                log.warning("keyword regex budget of %gs spent; rule %r of %s not finished",
                            self.regex_budget, str(rule), address)
                return False
        return False
