"""Configuration: defaults, validation naming file:key, precedence of --config and env."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mailwarden import catalogue
from mailwarden.config import (
    CONFIG_ENV,
    Config,
    ConfigError,
    LdapConfig,
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
    # Three attempts of 2 s + 3 s, and two pauses of 0.5 s between them.
    assert ldap.worst_case == 16.0
    # Postfix: smtpd_policy_service_timeout 100s, milter_command_timeout 30s.
    assert ldap.worst_case < 30


def test_ldap_worst_case_counts_every_attempt_and_pause() -> None:
    ldap = LdapConfig(network_timeout=1.0, timeout=2.0, retry_max=0, retry_delay=5.0)
    assert ldap.worst_case == 3.0
    assert dataclasses.replace(ldap, retry_max=3).worst_case == 4 * 3.0 + 3 * 5.0


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


# ---------------------------------------------------------------- registered sections


def test_daemons_register_their_sections() -> None:
    from mailwarden.config import registered_sections
    from milters.config import MilterConfig
    from policyd.config import PolicydConfig

    sections = registered_sections()
    assert sections["milter"].cls is MilterConfig
    assert sections["policyd"].cls is PolicydConfig
    cfg = parse_config("[milter]\nthreads = 3\n[policyd]\nworkers = 2\n", "mw.toml")
    assert MilterConfig.of(cfg).threads == 3
    assert PolicydConfig.of(cfg).workers == 2
    assert MilterConfig.of(Config()) == MilterConfig()


def test_registered_sections_keep_unknown_key_errors() -> None:
    assert problems("[milter]\nthread = 3\n") == ["mw.toml:milter.thread: unknown setting"]
    assert problems("[policyd.relay]\npop = true\n") == ["mw.toml:policyd.relay.pop: unknown setting"]
    assert problems("milter = 3\n") == ["mw.toml:milter: expected a table, got 3"]
    assert problems("[sections]\nmilter = {}\n") == ["mw.toml:sections: unknown setting"]


def test_registered_sections_are_described_and_checked() -> None:
    from mailwarden.config import section_problems

    keys = {item.key for item in describe(Config())}
    assert {"milter.socket", "policyd.listen", "policyd.relay.pop_before_smtp"} <= keys
    cfg = parse_config("[ldap]\ntimeout = 20.0\n[policyd]\nlisten = []\n", "mw.toml")
    found = section_problems(cfg)
    assert any(p.startswith("milter.postfix_command_timeout: the directory may take") for p in found)
    assert "policyd.listen: at least one socket is needed" in found


def test_a_section_is_replaced_by_type_and_missing_types_are_named() -> None:
    from milters.config import MilterConfig

    cfg = Config()
    changed = cfg.with_section(MilterConfig(threads=5))
    assert MilterConfig.of(changed).threads == 5
    assert MilterConfig.of(cfg).threads == MilterConfig().threads

    @dataclasses.dataclass(frozen=True)
    class Unregistered:
        x: int = 1

    with pytest.raises(LookupError, match="Unregistered"):
        cfg.section(Unregistered)
    with pytest.raises(LookupError, match="Unregistered"):
        cfg.with_section(Unregistered())
