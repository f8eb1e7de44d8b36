"""Taking password hashes over from a legacy passwd file (the real Dovecot verifying them is
in tests/render/test_migration.py)."""

from __future__ import annotations

import json

import pytest

from mailwarden.access import ChangeLine
from mailwarden.audit import _change_json
from mailwarden.legacyhash import PasswdError, normalize_hash, parse_passwd, scheme_of

MD5 = "$1$Hs7x3Qab$2ZtV0gX9S.lvB0KbO8Ixk/"
SHA256 = "$5$saltsalt$" + "A" * 43
SHA512 = "$6$rounds=5000$saltsalt$" + "b" * 86
BCRYPT = "$2y$05$" + "c" * 53
DES = "Qm3Ab.cdEfGhI"
SSHA = "{SSHA}" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"  # 24 bytes: a 20-byte digest and salt


@pytest.mark.parametrize(("given", "stored"), [
    (MD5, "{MD5-CRYPT}" + MD5),
    (SHA256, "{SHA256-CRYPT}" + SHA256),
    (SHA512, "{SHA512-CRYPT}" + SHA512),
    (BCRYPT, "{CRYPT}" + BCRYPT),
    (DES, "{CRYPT}" + DES),
    ("{md5-crypt}" + MD5, "{MD5-CRYPT}" + MD5),
    ("{CRYPT}" + MD5, "{CRYPT}" + MD5),
    (SSHA, SSHA),
])
def test_crypt_strings_and_prefixed_hashes_become_scheme_prefixed(given: str, stored: str) -> None:
    assert normalize_hash(given) == stored
    assert scheme_of(stored) == stored[: stored.index("}") + 1]


@pytest.mark.parametrize(("given", "why"), [
    ("*", "locked"), ("!" + MD5, "locked"), ("", "empty"),
    ("secret", "not a crypt"), ("{PLAIN}secret", "not a scheme taken over"),
    ("{MD5}XrY7u+Ae7tCTyyK7j1rNww==", "not a scheme taken over"),
    ("{SHA512-CRYPT}" + MD5, "not a SHA512-CRYPT string"),
    ("{SSHA}QUJD", "too short"), ("{SSHA}not*base64", "not base64"),
])
def test_what_dovecot_could_not_verify_is_refused(given: str, why: str) -> None:
    with pytest.raises(PasswdError, match=why):
        normalize_hash(given)


def test_a_passwd_file_gives_users_of_the_domain_and_one_error_per_bad_line() -> None:
    text = "\n".join([
        "# vpopmail vpasswd",
        f"ann:{MD5}:1:0:Ann:/home/vpopmail/domains/old.example/ann:NOQUOTA:clear-text",
        f"Ben@Old.Example:{DES}",
        "",
        f"cat@other.example:{DES}",
        "dan:*",
        f"ann:{SHA512}",
        "nohash",
        f"bad name:{DES}",
    ])
    users, errors = parse_passwd(text, "old.example")
    assert [(u.line, u.address, u.hashed) for u in users] == [
        (2, "ann@old.example", "{MD5-CRYPT}" + MD5), (3, "ben@old.example", "{CRYPT}" + DES)]
    assert errors == [
        "line 5: cat@other.example is not in old.example",
        "line 6: dan@old.example: '*' is a locked or empty password, not a hash",
        "line 7: ann@old.example again (first on line 2)",
        "line 8: not user:hash",
        "line 9: 'bad name' is not a mailbox name",
    ]


def test_the_audit_log_shows_a_legacy_hash_by_its_scheme_only() -> None:
    shown = json.loads(_change_json(ChangeLine("legacy_password", (), ("{MD5-CRYPT}" + MD5,))))
    assert shown == {"name": "legacy_password", "old": [], "new": ["{MD5-CRYPT}(hash withheld)"]}
    other = json.loads(_change_json(ChangeLine("spam_score", ("5",), ("6",))))
    assert other["new"] == ["6"]
