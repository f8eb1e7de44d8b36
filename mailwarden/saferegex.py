"""Regular expressions that are safe to run on hostile text.

Subscribers write their own keyword rules; a pattern whose matching time can
explode (nested unbounded repeats, backreferences, more than
:data:`MAX_UNBOUNDED` unbounded repeats) is refused when the rule is stored
and, should one reach the milter anyway, when it is used.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

__all__ = ["MAX_UNBOUNDED", "UnsafePattern", "check_regex"]

MAX_UNBOUNDED = 2

_sre: Any = importlib.import_module("re._parser")
_sre_c: Any = importlib.import_module("re._constants")


class UnsafePattern(ValueError):
    """A regex whose matching time could explode on hostile input."""


def check_regex(pattern: str) -> re.Pattern[str]:
    """Compile a rule's regex (case-insensitive) or raise UnsafePattern saying why."""
    try:
        parsed = _sre.parse(pattern)
        compiled = re.compile(pattern, re.IGNORECASE)
    except (re.error, RecursionError, OverflowError) as exc:
        raise UnsafePattern(f"does not compile: {exc}") from None
    unbounded = _walk(parsed, inside_unbounded=False)
    if unbounded > MAX_UNBOUNDED:
        raise UnsafePattern(f"{unbounded} unbounded repeats (at most {MAX_UNBOUNDED})")
    return compiled


def _walk(items: Any, *, inside_unbounded: bool) -> int:
    """Count unbounded repeats; raise for nesting and backreferences."""
    count = 0
    for op, av in items:
        if op in (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT, getattr(_sre_c, "POSSESSIVE_REPEAT", None)):
            _, high, sub = av
            unbounded = high is _sre_c.MAXREPEAT or high > 1000
            if unbounded and inside_unbounded:
                raise UnsafePattern("nested unbounded repeats")
            count += int(unbounded) + _walk(sub, inside_unbounded=inside_unbounded or unbounded)
        elif op in (_sre_c.GROUPREF, _sre_c.GROUPREF_EXISTS):
            raise UnsafePattern("backreference")
        elif op is _sre_c.SUBPATTERN:
            count += _walk(av[-1], inside_unbounded=inside_unbounded)
        elif op is _sre_c.BRANCH:
            count += sum(_walk(branch, inside_unbounded=inside_unbounded) for branch in av[1])
        elif op in (_sre_c.ASSERT, _sre_c.ASSERT_NOT):
            count += _walk(av[1], inside_unbounded=inside_unbounded)
        elif op is getattr(_sre_c, "ATOMIC_GROUP", None):
            count += _walk(av, inside_unbounded=inside_unbounded)
    return count
