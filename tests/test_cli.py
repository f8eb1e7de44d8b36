"""The operator CLI through click's runner, against real slapd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import ldap
from harness.slapd import SERVICE_BIND, SERVICE_DN, SlapdServer
from mailwarden.cli import main
from tests.conftest import ADMIN_DN, DATA

USER_DN = "uid=taro,ou=users,mwDomainName=example.jp,ou=domains,dc=mailwarden,dc=test"
DOMAIN_DN = "mwDomainName=example.com,ou=domains,dc=mailwarden,dc=test"


def write_config(tmp_path: Path, server: SlapdServer, *, admin: bool = True, extra: str = "") -> Path:
    bind = f'bind_dn = "{ADMIN_DN}"\nbind_password = "secret"\n' if admin else SERVICE_BIND
    path = tmp_path / "mailwarden.toml"
    path.write_text(
        f'[ldap]\nuri = "{server.uri}"\n{bind}retry_max = 1\nretry_delay = 0.2\n{extra}',
        encoding="utf-8",
    )
    return path


def run(config: Path | None, *args: str) -> Result:
    argv = (["--config", str(config)] if config else []) + list(args)
    return CliRunner().invoke(main, argv, catch_exceptions=False)


def ldap_values(server: SlapdServer, dn: str, attr: str) -> list[str]:
    conn = ldap.initialize(server.uri)
    conn.simple_bind_s(ADMIN_DN, "secret")
    res = conn.search_s(dn, ldap.SCOPE_BASE, "(objectClass=*)", [attr])
    return sorted(v.decode() for v in res[0][1].get(attr, []))


def test_explain_shows_every_value_with_its_source(slapd: SlapdServer, tmp_path: Path) -> None:
    result = run(write_config(tmp_path, slapd, admin=False), "explain", "taro.yamada@example.ne.jp")
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("taro.yamada@example.ne.jp: subscriber (active)")
    assert "canonical       taro@example.jp" in out
    assert "domain alias example.ne.jp -> example.jp" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert lines["virus_scan"].split()[1:] == ["on", "from", "domain"]
    assert lines["spam_check"].split()[1:] == ["on", "from", "user"]
    assert lines["greylisting"].split()[1:] == ["off", "from", "default"]
    assert lines["quota"].split()[1:] == ["1073741824", "from", "user"]
    assert lines["notice_language"].split()[1:] == ["ja", "from", "domain"]
    assert "未承諾広告" in lines["keyword_rules"]


def test_explain_json_and_foreign_address(slapd: SlapdServer, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, slapd, admin=False)
    data = json.loads(run(cfg, "explain", "--json", "alice@example.com").output)
    assert data["services"]["spam_check"] == {"on": True, "source": "domain"}
    assert data["settings"]["banned_extensions"]["source"] == "default+domain+user"
    assert "js" not in data["settings"]["banned_extensions"]["value"]
    foreign = run(cfg, "explain", "x@elsewhere.example")
    assert foreign.exit_code == 0
    assert "not-local" in foreign.output and "no services apply" in foreign.output


def test_explain_says_where_a_role_address_goes_and_why(slapd: SlapdServer, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, slapd, admin=False, extra='[policy]\nrole_mailbox = "roles@isp.example"\n')
    out = run(cfg, "explain", "postmaster@lab.example.org").output
    assert out.startswith("postmaster@lab.example.org: role\n"), out
    assert "delivered to    prof@lab.example.org" in out
    assert "role address postmaster@ -> admin_address of lab.example.org" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert lines["virus_scan"].split()[1:] == ["on", "from", "role"]
    assert lines["greylisting"].split()[1:] == ["off", "from", "role"]
    data = json.loads(run(cfg, "explain", "--json", "abuse@example.ne.jp").output)
    assert data["kind"] == "role" and data["canonical"] == "hanako@example.jp"
    assert data["resolved_via"] == ["domain alias example.ne.jp -> example.jp",
                                    "role address abuse@ -> admin_address of example.jp"]
    data = json.loads(run(cfg, "explain", "--json", "abuse@bare.example.net").output)
    assert data["kind"] == "role" and data["canonical"] == "roles@isp.example"
    assert data["resolved_via"] == ["role address abuse@ -> [policy] role_mailbox"]


def test_explain_bad_address_is_a_usage_error(slapd: SlapdServer, tmp_path: Path) -> None:
    result = run(write_config(tmp_path, slapd), "explain", "no-at-sign")
    assert result.exit_code == 2
    assert "has no local part and domain" in result.output


def test_domain_enable_disable_inherit_write_ldap(slapd_rw: SlapdServer, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, slapd_rw)
    result = run(cfg, "domain", "disable", "example.com", "spam-check")
    assert result.exit_code == 0, result.output
    assert "spam_check off (from domain)" in result.output
    assert "spam-check" in ldap_values(slapd_rw, DOMAIN_DN, "mwDisabledService")
    assert "spam-check" not in ldap_values(slapd_rw, DOMAIN_DN, "mwEnabledService")
    # alice inherits the domain's choice at once
    assert "spam_check             off  from domain" in run(cfg, "explain", "alice@example.com").output
    assert run(cfg, "domain", "enable", "example.com", "greylisting").exit_code == 0
    assert "greylisting" in ldap_values(slapd_rw, DOMAIN_DN, "mwEnabledService")
    result = run(cfg, "domain", "inherit", "example.com", "spam_check")
    assert "spam_check off (from default)" in result.output
    assert ldap_values(slapd_rw, DOMAIN_DN, "mwDisabledService") == []


def test_explain_shows_each_service_with_its_source(slapd: SlapdServer, tmp_path: Path) -> None:
    """example.com switches archive and DKIM signing on; bob switched spam checking off."""
    cfg = write_config(tmp_path, slapd, admin=False)
    out = run(cfg, "explain", "bob@example.com").output
    lines = {line.split()[0]: line.split()[1:4] for line in out.splitlines() if line.startswith("  ")}
    assert lines["archive"] == lines["dkim_signing"] == ["on", "from", "domain"]
    assert lines["spam_check"] == ["off", "from", "user"]
    data = json.loads(run(cfg, "explain", "--json", "bob@example.com").output)
    assert data["services"]["archive"] == {"on": True, "source": "domain"}
    listing = {line.split()[0]: line for line in run(None, "services").output.splitlines()
               if line.startswith("  ")}
    assert "keep a copy of all passing mail with its envelope" in listing["archive"]


def test_enabling_services_stores_them(slapd_rw: SlapdServer, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, slapd_rw)
    result = run(cfg, "user", "enable", "taro@example.jp", "archive", "greylisting")
    assert result.exit_code == 0 and result.stderr == "", result.output
    assert f"{USER_DN}: archive on (from user)\n" in result.stdout
    assert f"{USER_DN}: greylisting on (from user)\n" in result.stdout
    assert {"archive", "greylisting"} <= set(ldap_values(slapd_rw, USER_DN, "mwEnabledService"))


def test_user_set_and_unset_settings(slapd_rw: SlapdServer, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, slapd_rw)
    result = run(cfg, "user", "set", "taro.yamada@example.jp", "spam_threshold", "7.5")
    assert result.exit_code == 0, result.output
    assert f"{USER_DN}: spam_threshold = 7.5 (from user)" in result.output
    assert ldap_values(slapd_rw, USER_DN, "mwSpamThreshold") == ["7.5"]
    result = run(cfg, "user", "set", "taro@example.jp", "keyword-rules",
                 "subject contains reject 当選", "from regex junk ^spam@")
    assert result.exit_code == 0, result.output
    assert ldap_values(slapd_rw, USER_DN, "mwKeywordRule") == sorted(
        ["subject contains reject 当選", "from regex junk ^spam@"])
    result = run(cfg, "user", "unset", "taro@example.jp", "mail_host")
    assert "mail_host = mbox1.example.jp (from domain)" in result.output
    result = run(cfg, "user", "disable", "taro@example.jp", "virus_scan")
    assert "virus_scan off (from user)" in result.output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("user", "set", "ghost@example.jp", "quota", "1"), 1, "no such user: ghost@example.jp"),
        (("user", "show", "x@nowhere.example"), 1, "no such domain: x@nowhere.example"),
        (("domain", "show", "nowhere.example"), 1, "no such domain nowhere.example"),
        (("user", "set", "taro@example.jp", "spam_action", "burn"), 2,
         "spam_action: 'burn' is not an allowed value (allowed: tag, subject, junk, reject)"),
        (("user", "set", "taro@example.jp", "quota", "lots"), 2, "'lots' is not an integer"),
        (("user", "set", "taro@example.jp", "spam_levels", "1"), 2, "unknown setting 'spam_levels'"),
        (("domain", "set", "example.jp", "forward_addresses", "a@b.example"), 2,
         "forward_addresses is a user setting, not a domain one"),
        (("domain", "enable", "example.jp", "antivirus"), 2, "unknown service 'antivirus'"),
    ],
)
def test_clear_errors(slapd: SlapdServer, tmp_path: Path, args: tuple[str, ...], code: int,
                      message: str) -> None:
    result = run(write_config(tmp_path, slapd), *args)
    assert result.exit_code == code, result.output
    assert message in result.output


def test_write_without_rights_is_refused_clearly(slapd: SlapdServer, tmp_path: Path) -> None:
    result = run(write_config(tmp_path, slapd, admin=False), "user", "set", "taro@example.jp",
                 "quota", "5")
    assert result.exit_code == 1
    assert f"insufficient access for {SERVICE_DN}" in result.output
    assert ldap_values(slapd, USER_DN, "mwQuota") == ["1073741824"]


def test_ldap_down_exits_tempfail(slapd_rw: SlapdServer, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, slapd_rw)
    slapd_rw.stop()
    for args in (("explain", "taro@example.jp"), ("domain", "enable", "example.jp", "archive"),
                 ("config", "check", "--connect")):
        result = run(cfg, *args)
        assert result.exit_code == 75, result.output
        assert "directory unavailable" in result.output


def test_alternative_mapping_toggles_in_replace_mode(slapd_rw: SlapdServer, tmp_path: Path) -> None:
    text = (DATA / "compat.toml").read_text().replace(
        "[ldap]\n",
        f'[ldap]\nuri = "{slapd_rw.uri}"\nbind_dn = "cn=admin,dc=legacy,dc=test"\n'
        'bind_password = "secret"\n', 1)
    cfg = tmp_path / "compat.toml"
    cfg.write_text(text)
    result = run(cfg, "user", "enable", "yui@legacy.example", "spam_check")
    assert result.exit_code == 0, result.output
    dn = "mail=yui@legacy.example,ou=Users,domainName=legacy.example,o=domains,dc=legacy,dc=test"
    # the first list written keeps what was in effect (domain: virusscan, smtp)
    assert ldap_values(slapd_rw, dn, "enabledService") == ["smtp", "spamcheck", "virusscan"]
    run(cfg, "user", "disable", "ken@legacy.example", "smtp-auth")
    ken = "mail=ken@legacy.example,ou=Users,domainName=legacy.example,o=domains,dc=legacy,dc=test"
    assert ldap_values(slapd_rw, ken, "enabledService") == ["mail", "pop3", "spamcheck"]


def test_config_show_marks_defaults(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text("[policy]\ncache_ttl = 5\n")
    out = run(path, "config", "show").output
    assert "cache_ttl = 5.0  # set: seconds a found subscriber's policy is cached" in out
    assert "negative_cache_ttl = 30.0  # default:" in out
    changed = run(path, "config", "show", "--changed").output
    assert "cache_ttl = 5.0" in changed and "negative_cache_ttl" not in changed


def test_config_check_reports_file_key_problem(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text("[store]\nbackend = 'mysql'\n[ldap]\nuri = 'ldap://x/'\nport = 389\n")
    result = run(path, "config", "check")
    assert result.exit_code == 78
    assert f"{path}:ldap.port: unknown setting" in result.output
    path.write_text("[store]\nbackend = 'sqlite'\n")
    ok = run(path, "config", "check")
    assert ok.exit_code == 0 and ok.output.strip() == f"{path}: OK"


def test_config_check_connect_reaches_directory_and_store(slapd: SlapdServer, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, slapd, extra=f"[store]\nsqlite_path = '{tmp_path}/s.db'\n")
    result = run(cfg, "config", "check", "--connect")
    assert result.exit_code == 0, result.output
    assert "directory and store reachable" in result.output
    bad = write_config(tmp_path, slapd, extra="[store]\nsqlite_path = '/proc/nope/s.db'\n")
    result = run(bad, "config", "check", "--connect")
    assert result.exit_code == 75 and "store unavailable" in result.output


def test_config_check_connect_reports_admin_addresses_that_resolve_nowhere(
    slapd_rw: SlapdServer, tmp_path: Path
) -> None:
    store = f"[store]\nsqlite_path = '{tmp_path}/s.db'\n"
    config = write_config(tmp_path, slapd_rw, extra=store)

    def warnings(path: Path) -> list[str]:
        result = CliRunner().invoke(main, ["--config", str(path), "config", "check", "--connect"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return sorted(line for line in result.stderr.splitlines() if line.startswith("warning: "))

    # The sample domains name subscribers as their admins: nothing to report.
    assert warnings(config) == []
    # An admin with no entry, and an admin that is the domain's own postmaster (a role
    # address with nowhere to go without role_mailbox), are named.
    assert run(config, "domain", "set", "example.com", "admin_address", "it@example.com").exit_code == 0
    assert run(config, "domain", "set", "example.jp", "admin_address", "postmaster@example.jp").exit_code == 0
    assert warnings(config) == [
        "warning: mwDomainName=example.com,ou=domains,dc=mailwarden,dc=test: admin_address "
        "it@example.com cannot receive mail: example.com has no subscriber, alias or role "
        "address it@example.com",
        "warning: mwDomainName=example.jp,ou=domains,dc=mailwarden,dc=test: admin_address "
        "postmaster@example.jp cannot receive mail: example.jp has no subscriber, alias or role "
        "address postmaster@example.jp",
    ]
    # A role mailbox gives example.jp's postmaster somewhere to go; one that is unknown is named.
    mailbox = '[policy]\nrole_mailbox = "nobody-here@example.com"\n'
    roles = write_config(tmp_path, slapd_rw, extra=store + mailbox)
    named = warnings(roles)
    assert ("warning: policy.role_mailbox nobody-here@example.com cannot receive mail: example.com "
            "has no subscriber, alias or role address nobody-here@example.com") in named
    assert not any("example.jp has no subscriber" in w for w in named)


def test_services_and_schema_and_generate(tmp_path: Path) -> None:
    out = run(None, "services").output
    assert "virus_scan         virus-scan" in out and "mwSpamThreshold" in out
    schema = run(None, "ldap", "schema").output
    assert schema == (Path(__file__).resolve().parents[1] / "ldap" / "mailwarden.ldif").read_text()
    ldif = run(None, "ldap", "generate", "-n", "3", "-d", "2").output
    assert ldif.count("objectClass: mwSubscriber") == 3
    assert ldif.count("objectClass: mwDomain") == 2


def test_config_check_covers_the_daemon_sections(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text("[milter]\nsocket = 'tcp:1234'\n[policyd]\nlisten = ['nowhere']\n")
    result = run(path, "config", "check")
    assert result.exit_code == 78, result.output
    assert f"{path}:milter.socket: 'tcp:1234': expected unix:/path or inet:host:port" in result.output
    assert f"{path}:policyd.listen" in result.output
