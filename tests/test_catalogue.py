"""The catalogue: value parsing, keyword rules, and the generated LDAP schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailwarden.catalogue import (
    IDENTITY,
    SERVICES,
    SETTINGS,
    InvalidValue,
    KeywordRule,
    Service,
    default_attribute_map,
)
from mailwarden.schema import ATTRIBUTE_NUMBERS, AUDIT_ATTRIBUTES, attribute_types, schema_ldif

ROOT = Path(__file__).resolve().parents[1]


def test_service_names_accept_dashes_and_case() -> None:
    assert Service.parse("Virus-Scan") is Service.VIRUS_SCAN
    with pytest.raises(ValueError, match="unknown service 'antivirus'"):
        Service.parse("antivirus")


def test_every_issue_service_exists() -> None:
    wanted = {"virus_scan", "spam_check", "keyword_filter", "extension_filter", "pop_before_smtp",
              "smtp_auth", "archive", "dkim_signing", "greylisting", "rate_limits"}
    assert {s.value for s in SERVICES} == wanted


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("spam_threshold", ["4.5"], 4.5),
        ("quota", ["1073741824"], 1073741824),
        ("forward_keep_copy", ["FALSE"], False),
        ("vacation_active", ["TRUE"], True),
        ("spam_action", ["Junk"], "junk"),
        ("notice_recipients", ["recipient", "ADMIN"], ("recipient", "admin")),
        ("banned_extensions", [".EXE", "!js"], ("exe", "!js")),
        ("allowed_senders", ["@Example.COM", "Boss@example.com"], ("@example.com", "boss@example.com")),
        ("mail_host", ["MBOX1.example.jp"], "mbox1.example.jp"),
        ("mail_host", ["[192.0.2.7]:2525"], "[192.0.2.7]:2525"),
    ],
)
def test_setting_values_parse_to_types(name: str, raw: list[str], expected: object) -> None:
    assert SETTINGS[name].parse(raw) == expected


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("spam_threshold", ["abc"], "not a number"),
        ("spam_threshold", ["nan"], "not a finite number"),
        ("spam_threshold", ["5000"], "above the maximum"),
        ("quota", ["-1"], "below the minimum"),
        ("quota", ["1.5"], "not an integer"),
        ("forward_keep_copy", ["maybe"], "not a boolean"),
        ("spam_action", ["delete"], "not an allowed value"),
        ("spam_action", ["junk", "tag"], "single-valued"),
        ("spam_action", [], "empty value"),
        ("banned_extensions", ["a/b"], "not a file extension"),
        ("admin_address", ["nobody"], "no local part"),
        ("mail_host", ["bad host!"], "not a host name"),
        ("vacation_subject", ["x" * 201], "longer than 200"),
        ("banned_extensions", ["exe"] * 201, "more than 200 values"),
        ("spam_subject_tag", ["a\x00b"], "NUL byte"),
    ],
)
def test_bad_setting_values_say_why(name: str, raw: list[str], message: str) -> None:
    with pytest.raises(InvalidValue, match=message):
        SETTINGS[name].parse(raw)


def test_keyword_rule_round_trip_with_japanese_pattern() -> None:
    rule = KeywordRule.parse("Subject contains JUNK 未承諾広告 です")
    assert rule == KeywordRule("subject", "contains", "junk", "未承諾広告 です")
    assert KeywordRule.parse(str(rule)) == rule
    assert KeywordRule.parse("header:X-Mailer regex reject ^bulk").scope == "header:x-mailer"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("subject contains", "expected 'SCOPE OP ACTION PATTERN'"),
        ("everywhere contains junk x", "scope"),
        ("subject like junk x", "op"),
        ("subject contains bounce x", "action"),
        ("body regex junk (unclosed", "regex"),
        ("body regex reject (a+)+$", "nested unbounded repeats"),
        ("subject regex junk (x)\\1", "backreference"),
        ("body regex junk a.*b.*c.*d", "unbounded repeats"),
        ("body contains junk " + "x" * 600, "longer than 512"),
    ],
)
def test_bad_keyword_rules_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidValue, match=message):
        KeywordRule.parse(text)


def test_setting_format_round_trips() -> None:
    for spec in SETTINGS.values():
        if spec.multi and not spec.default:
            continue
        if spec.kind in ("text", "address", "host") and spec.default == "":
            continue
        assert spec.parse(spec.format(spec.default)) == spec.default, spec.name


def test_shipped_schema_file_is_the_generated_one() -> None:
    assert (ROOT / "ldap" / "mailwarden.ldif").read_text() == schema_ldif()


def test_every_mapped_attribute_has_a_fixed_oid() -> None:
    attrs = set(default_attribute_map().values()) - {"mail"} | set(AUDIT_ATTRIBUTES)
    assert attrs == set(ATTRIBUTE_NUMBERS)
    assert len(set(ATTRIBUTE_NUMBERS.values())) == len(ATTRIBUTE_NUMBERS)
    assert len(attribute_types()) == len(attrs)
    assert {s.name for s in IDENTITY.values()} <= set(default_attribute_map())


def test_readme_documents_every_setting_service_and_config_key() -> None:
    readme = (ROOT / "README.md").read_text()
    for spec in SETTINGS.values():
        assert f"| `{spec.name}` | `{spec.ldap_attribute}` |" in readme, spec.name
    for service in SERVICES.values():
        assert f"| `{service.service.value}` | `{service.ldap_value}` |" in readme


def test_configuration_reference_is_current() -> None:
    from mailwarden.config import reference_markdown

    assert (ROOT / "docs" / "configuration.md").read_text() == reference_markdown()


def test_spf_actions_are_result_action_pairs() -> None:
    spec = SETTINGS["spf_actions"]
    assert spec.parse([" SoftFail = Reject", "fail=tag"]) == ("softfail=reject", "fail=tag")
    for bad in ("softfail", "temperror=reject", "fail=bounce", "=reject"):
        with pytest.raises(InvalidValue, match="RESULT=ACTION"):
            spec.parse([bad])
