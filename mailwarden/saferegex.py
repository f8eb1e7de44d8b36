"""Regular expressions that are safe to run on hostile text.

Subscribers write their own keyword rules; a pattern whose matching time can
explode (nested unbounded repeats, backreferences, more than
:data:`MAX_UNBOUNDED` unbounded repeats) is refused when the rule is stored
and, should one reach the milter anyway, when it is used.
"""

from __future__ import annotations

import re

__all__ = ["MAX_UNBOUNDED", "UnsafePattern", "check_regex"]

MAX_UNBOUNDED = 2
LARGE_REPEAT = 1000
"""A repeat with a higher upper bound counts as unbounded."""

_QUANTIFIER = re.compile(r"\{(\d*)(,?)(\d*)\}")
_GROUP_START = re.compile(r"\((?:\?(?:P<\w+>|<?[=!]|>))?")
_FLAGS = re.compile(r"\(\?([aiLmsux]*)(?:-([imsx]*))?([:)])")


class UnsafePattern(ValueError):
    """A regex whose matching time could explode on hostile input."""


def check_regex(pattern: str) -> re.Pattern[str]:
    """Compile a rule's regex (case-insensitive) or raise UnsafePattern saying why."""
    try:
        compiled = re.compile(pattern, re.IGNORECASE)
    except (re.error, RecursionError, OverflowError) as exc:
        raise UnsafePattern(f"does not compile: {exc}") from None
    try:
        unbounded = _Walk(pattern, verbose=bool(compiled.flags & re.VERBOSE)).sequence(inside_unbounded=False)
    except UnsafePattern:
        raise
    except (IndexError, ValueError) as exc:  # a construct the walk does not know: refuse it
        raise UnsafePattern(f"cannot be analysed ({exc or type(exc).__name__})") from None
    if unbounded > MAX_UNBOUNDED:
        raise UnsafePattern(f"{unbounded} unbounded repeats (at most {MAX_UNBOUNDED})")
    return compiled


class _Walk:
    """Count a pattern's unbounded repeats; raise for nested ones and for backreferences.

    Reads the pattern text after :func:`re.compile` has accepted it, so it only
    has to tell apart what matters here: groups and lookarounds (walked into),
    repeats with their bounds, alternatives (summed), backreferences and
    conditionals (refused), and what merely matches one character (escapes,
    classes, literals).
    """

    def __init__(self, pattern: str, *, verbose: bool) -> None:
        self.text = pattern
        self.pos = 0
        self.verbose = verbose

    def sequence(self, *, inside_unbounded: bool) -> int:
        """Alternatives up to the closing parenthesis (or the end), their counts summed."""
        count = 0
        while self.pos < len(self.text) and self.text[self.pos] != ")":
            if self.text[self.pos] == "|":
                self.pos += 1
                continue
            inner = self._atom(inside_unbounded)
            if inner is None:  # nothing that can repeat (a comment, flags, whitespace)
                continue
            unbounded = self._quantifier()
            if unbounded and inside_unbounded:
                raise UnsafePattern("nested unbounded repeats")
            if unbounded and inner[1]:
                # The group held unbounded repeats that now repeat without bound.
                raise UnsafePattern("nested unbounded repeats")
            count += inner[0] + int(unbounded)
        return count

    def _atom(self, inside_unbounded: bool) -> tuple[int, bool] | None:
        """Step over one atom: (unbounded repeats in it, whether it holds any), or None."""
        text, pos = self.text, self.pos
        char = text[pos]
        if self.verbose and char.isspace():
            self.pos += 1
            return None
        if self.verbose and char == "#":
            end = text.find("\n", pos)
            self.pos = len(text) if end < 0 else end + 1
            return None
        if char == "\\":
            return self._escape()
        if char == "[":
            self._char_class()
            return 0, False
        if char != "(":
            self.pos += 1
            return 0, False
        return self._group(inside_unbounded)

    def _escape(self) -> tuple[int, bool]:
        text, pos = self.text, self.pos + 1
        char = text[pos]
        if char in "123456789":
            digits = text[pos:pos + 3]
            if not (len(digits) == 3 and all(c in "01234567" for c in digits)):
                raise UnsafePattern("backreference")
            self.pos = pos + 3
        elif char == "0":
            self.pos = pos + 1
            while self.pos < min(pos + 3, len(text)) and text[self.pos] in "01234567":
                self.pos += 1
        elif char == "N" and text.startswith("{", pos + 1):
            self.pos = text.index("}", pos) + 1
        else:
            self.pos = pos + 1 + {"x": 2, "u": 4, "U": 8}.get(char, 0)
        return 0, False

    def _char_class(self) -> None:
        text, pos = self.text, self.pos + 1
        if text.startswith("^", pos):
            pos += 1
        if text.startswith("]", pos):
            pos += 1
        while text[pos] != "]":
            pos += 2 if text[pos] == "\\" else 1
        self.pos = pos + 1

    def _group(self, inside_unbounded: bool) -> tuple[int, bool] | None:
        text, pos = self.text, self.pos
        if text.startswith("(?#", pos):
            self.pos = text.index(")", pos) + 1
            return None
        if text.startswith(("(?P=", "(?("), pos):
            raise UnsafePattern("backreference")
        flags = _FLAGS.match(text, pos)
        verbose = self.verbose
        if flags:
            on, off, end = flags.groups()
            if end == ")":  # global flags, such as (?i): nothing to repeat
                self.pos = flags.end()
                self.verbose = verbose or "x" in on
                return None
            verbose = ("x" in on or verbose) and "x" not in (off or "")
            self.pos = flags.end()
        else:
            start = _GROUP_START.match(text, pos)
            if start is None:
                raise ValueError(f"unknown group at {pos}")
            self.pos = start.end()
        outer, self.verbose = self.verbose, verbose
        count = self.sequence(inside_unbounded=inside_unbounded)
        self.verbose = outer
        self.pos += 1  # the closing parenthesis
        return count, count > 0

    def _quantifier(self) -> bool:
        """Step over a repeat after an atom; whether it is unbounded (False without one)."""
        text, pos = self.text, self.pos
        while self.verbose and pos < len(text) and (text[pos].isspace() or text[pos] == "#"):
            if text[pos] == "#":
                end = text.find("\n", pos)
                pos = len(text) if end < 0 else end + 1
            else:
                pos += 1
        if pos >= len(text):
            return False
        unbounded = False
        if text[pos] in "*+":
            unbounded, pos = True, pos + 1
        elif text[pos] == "?":
            pos += 1
        else:
            match = _QUANTIFIER.match(text, pos)
            if match is None or not (match.group(1) or match.group(2)):  # "{}" is a literal
                return False
            low, comma, high = match.groups()
            if not comma:
                high = low
            unbounded = not high or int(high) > LARGE_REPEAT
            pos = match.end()
        if pos < len(text) and text[pos] in "?+":  # lazy or possessive
            pos += 1
        self.pos = pos
        return unbounded
