"""The keyword-rule regex guard reads the pattern text itself (no private parser of the re module)."""

from __future__ import annotations

import pytest

from mailwarden.saferegex import MAX_UNBOUNDED, UnsafePattern, check_regex


@pytest.mark.parametrize("pattern", [
    r"^bulk", r"(?i)free\s+money", r"[a-z]{2,}@[a-z]+", r"a{1000}", r"a{,3}b{2}c?",
    r"[(]+a*", r"\(+a*", r"(?=a+)b+", r"(?<=ab)c+", r"\0+\077", r"\N{DIGIT ONE}+x*",
    r"a{}+", r"a{x}+", "(?x) a+ # a comment ( with a parenthesis\n b+", r"(?#a comment (*)x+",
    r"(?P<word>ab)+c", r"(?:ab|cd)+", r"(?>ab)+",
])
def test_patterns_within_the_limits_compile(pattern: str) -> None:
    check_regex(pattern)


@pytest.mark.parametrize(("pattern", "why"), [
    (r"(a+)+b", "nested unbounded repeats"),
    (r"(?:(?:a)+)+", "nested unbounded repeats"),
    (r"(?>a+)+", "nested unbounded repeats"),
    (r"(a|b*){2,}", "nested unbounded repeats"),
    (r"(a{1,1001})*", "nested unbounded repeats"),
    (r"(\w+)\1", "backreference"),
    (r"(?P<x>a)(?P=x)", "backreference"),
    (r"(a)?(?(1)b|c)", "backreference"),
    (r".*a.*b.*c.*d", f"4 unbounded repeats (at most {MAX_UNBOUNDED})"),
    (r"a{,}b{2,}c{1001}", "3 unbounded repeats"),
    (r"a+|b+|c+", "3 unbounded repeats"),
    ("(?x) a + b + c +", "3 unbounded repeats"),
    (r"(unclosed", "does not compile"),
])
def test_explosive_or_broken_patterns_are_refused(pattern: str, why: str) -> None:
    with pytest.raises(UnsafePattern, match=why.replace("(", r"\(").replace(")", r"\)")):
        check_regex(pattern)


def test_an_escaped_digit_triple_is_a_character_not_a_backreference() -> None:
    assert check_regex(r"\101+").search("AAA")
    with pytest.raises(UnsafePattern, match="backreference"):
        check_regex(r"(a)\1b")
