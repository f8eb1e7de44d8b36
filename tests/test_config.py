"""Configuration: defaults, validation naming file:key, precedence of --config and env."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailwarden import catalogue
from mailwarden.config import (
    CONFIG_ENV,
    Config,
    ConfigError,
    describe,
    load_config,
    parse_config,
    site_defaults,
)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "mw.toml")
    return info.value.problems


def test_empty_file_gives_documented_defaults() -> None:
    cfg = parse_config("", "mw.toml")
    assert cfg.store.backend == "sqlite"
    assert cfg.ldap.mapping.attributes == catalogue.default_attribute_map()
    items = describe(cfg)
    assert all(item.doc for item in items)
    assert all(item.is_default for item in items)
    assert {"ldap.uri", "policy.cache_ttl", "store.redis_url"} <= {i.key for i in items}


def test_ldap_timeouts_stay_below_postfix_timeouts() -> None:
    ldap = Config().ldap
    worst = (ldap.network_timeout + ldap.timeout + ldap.retry_delay) * (ldap.retry_max + 1)
    # Postfix: smtpd_policy_service_timeout 100s, milter_command_timeout 30s.
    assert worst < 30


def test_unknown_keys_are_errors_with_file_and_key() -> None:
    assert problems("[ldap]\nurl = 'x'\n") == ["mw.toml:ldap.url: unknown setting"]
    assert problems("[nonsense]\na = 1\n") == ["mw.toml:nonsense: unknown setting"]
    assert problems("[ldap.mapping.attributes]\nspam_level = 'x'\n") == [
        "mw.toml:ldap.mapping.attributes.spam_level: unknown concept"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[ldap]\ntimeout = 'fast'\n", "mw.toml:ldap.timeout: expected a number, got 'fast'"),
        ("[ldap]\nretry_max = 1.5\n", "mw.toml:ldap.retry_max: expected an integer, got 1.5"),
        ("[ldap]\nstart_tls = 'yes'\n", "mw.toml:ldap.start_tls: expected true or false"),
        ("[store]\nbackend = 'mysql'\n",
         "mw.toml:store.backend: 'mysql' is not one of 'sqlite' | 'redis'"),
        ("[ldap]\nmapping = 3\n", "mw.toml:ldap.mapping: expected a table, got 3"),
        ("[ldap]\ntimeout = 0\n", "mw.toml:ldap.timeout: must be greater than 0"),
        ("[policy]\ncache_ttl = -1\n", "mw.toml:policy.cache_ttl: must not be negative"),
        ("[policy.defaults]\nspam_action = 'delete'\n",
         "mw.toml:policy.defaults.spam_action: spam_action: 'delete' is not an allowed value"),
        ("[policy.defaults]\nspam_levels = 3\n",
         "mw.toml:policy.defaults.spam_levels: unknown setting"),
        ("[policy]\ndefault_services = ['antivirus']\n",
         "mw.toml:policy.default_services[0]: unknown service"),
        ("[ldap.mapping]\nuser_filter = 'mail={address}'\n",
         "mw.toml:ldap.mapping.user_filter: an LDAP filter must be in parentheses"),
        ("[ldap.mapping.service_values]\nantivirus = 'av'\n",
         "mw.toml:ldap.mapping.service_values.antivirus: unknown service"),
        ("[ldap]\nbind_password_file = '/nonexistent/pw'\n",
         "mw.toml:ldap.bind_password_file: /nonexistent/pw is not a file"),
    ],
)
def test_bad_values_name_file_key_and_problem(text: str, expected: str) -> None:
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_toml_syntax_error_names_file_and_line() -> None:
    (only,) = problems("[ldap]\nuri = \n")
    assert only.startswith("mw.toml: ") and "line 2" in only


def test_partial_attribute_mapping_keeps_shipped_names() -> None:
    cfg = parse_config("[ldap.mapping.attributes]\nmail_host = 'mailHost'\n", "mw.toml")
    attrs = cfg.ldap.mapping.attributes
    assert attrs["mail_host"] == "mailHost"
    assert attrs["spam_threshold"] == "mwSpamThreshold"


def test_site_defaults_are_parsed() -> None:
    cfg = parse_config(
        "[policy.defaults]\nspam_threshold = 4\nbanned_extensions = ['exe', 'iso']\n"
        "forward_keep_copy = false\n", "mw.toml",
    )
    assert site_defaults(cfg) == {
        "spam_threshold": 4.0, "banned_extensions": ("exe", "iso"), "forward_keep_copy": False,
    }


def test_config_file_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[store]\nbackend = 'redis'\n")
    from_env = tmp_path / "env.toml"
    from_env.write_text("[general]\nlog_level = 'debug'\n")
    monkeypatch.setenv(CONFIG_ENV, str(from_env))
    assert load_config().general.log_level == "debug"
    assert load_config(explicit).store.backend == "redis"
    assert load_config(explicit).source == str(explicit)


def test_unreadable_and_non_utf8_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"[general]\nnode_name = '\xe9t\xe9'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_shipped_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "deploy" / "mailwarden.toml.example"
    cfg = load_config(example)
    assert cfg.source == str(example)
