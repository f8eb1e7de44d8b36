"""Delegated administration against the real slapd with the shipped access rules: every tier's
allow and deny through ldapsearch/ldapmodify as that person and through the CLI, logging in,
the domain's narrowing in the write path, the audit log and CSV import."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.slapd import SERVICE_BIND, SERVICE_DN, SUFFIX, SlapdServer, mailwarden_database
from mailwarden import audit
from mailwarden.access import (
    AuthenticationFailed,
    ChangeRefused,
    Person,
    Role,
    apply_change,
    authenticate,
    may_edit,
)
from mailwarden.acl import acl_ldif
from mailwarden.cli import main
from mailwarden.config import parse_config
from mailwarden.ldapdir import LdapDirectory

ROOT = Path(__file__).resolve().parents[1]
B = SUFFIX
DOMAINS = f"ou=domains,{B}"
JP = f"mwDomainName=example.jp,{DOMAINS}"
COM = f"mwDomainName=example.com,{DOMAINS}"
TARO = f"uid=taro,ou=users,{JP}"
HANAKO = f"uid=hanako,ou=users,{JP}"
ALICE = f"uid=alice,ou=users,{COM}"
SYSADMIN = f"uid=root,ou=admins,{B}"
HELPDESK = f"uid=desk,ou=admins,{B}"
JP_ADMIN = f"uid=jp-admin,ou=admins,{B}"
COM_ADMIN = f"uid=com-admin,ou=admins,{B}"
ROOTDN = f"cn=admin,{B}"

pytestmark = pytest.mark.skipif(shutil.which("ldapmodify") is None, reason="ldap-utils not installed")


@pytest.fixture(scope="module")
def server() -> Iterator[SlapdServer]:
    """A slapd of its own (these tests write), with the sample tree and the shipped rules."""
    srv = SlapdServer([mailwarden_database()]).start()
    yield srv
    srv.cleanup()


def ldapmodify(server: SlapdServer, who: str | None, ldif: str) -> int:
    """Run the real ldapmodify as ``who`` (None: anonymous); its exit code (50: refused)."""
    bind = ["-D", who, "-w", "secret"] if who else []
    res = subprocess.run(["ldapmodify", "-x", "-H", server.uri, *bind], input=ldif, text=True,
                         capture_output=True, timeout=30, check=False)
    return res.returncode


def replace(server: SlapdServer, who: str | None, dn: str, attr: str, *values: str) -> int:
    lines = [f"dn: {dn}", "changetype: modify", f"replace: {attr}", *(f"{attr}: {v}" for v in values)]
    return ldapmodify(server, who, "\n".join(lines) + "\n")


def ldapsearch(server: SlapdServer, who: str | None, base: str, flt: str, *attrs: str) -> str:
    """The real ldapsearch as ``who``: its LDIF output (unwrapped)."""
    bind = ["-D", who, "-w", "secret"] if who else []
    res = subprocess.run(["ldapsearch", "-x", "-LLL", "-o", "ldif-wrap=no", "-H", server.uri, *bind,
                          "-b", base, flt, *attrs], text=True, capture_output=True, timeout=30,
                         check=False)
    assert res.returncode in (0, 32), res.stderr  # 32: the base is not visible
    return res.stdout


def values(server: SlapdServer, dn: str, attr: str) -> list[str]:
    """``attr`` of ``dn`` as the root DN sees it."""
    out = ldapsearch(server, ROOTDN, dn, "(objectClass=*)", attr)
    return [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(f"{attr}: ")]


def test_shipped_acl_file_is_the_generated_one() -> None:
    assert (ROOT / "ldap" / "acl.ldif").read_text() == acl_ldif(B)


# ------------------------------------------------------------------ the rules, with ldapmodify

WRITES = [
    # (who, entry, attribute, allowed)
    pytest.param(TARO, TARO, "mwKeywordRule", True, id="end-user-own-keyword-rules"),
    pytest.param(TARO, TARO, "mwVacationText", True, id="end-user-own-vacation"),
    pytest.param(TARO, TARO, "mwEnabledService", False, id="end-user-own-services"),
    pytest.param(TARO, TARO, "mwQuota", False, id="end-user-own-quota"),
    pytest.param(TARO, HANAKO, "mwKeywordRule", False, id="end-user-other-user"),
    pytest.param(TARO, JP, "mwSpamThreshold", False, id="end-user-domain"),
    pytest.param(JP_ADMIN, TARO, "mwEnabledService", True, id="domain-admin-user-services"),
    pytest.param(JP_ADMIN, TARO, "mwAlternateAddress", True, id="domain-admin-user-alias"),
    pytest.param(JP_ADMIN, JP, "mwNoticeTemplate", True, id="domain-admin-own-domain"),
    pytest.param(JP_ADMIN, JP, "mwDelegatedService", False, id="domain-admin-delegation"),
    pytest.param(JP_ADMIN, ALICE, "mwSpamThreshold", False, id="domain-admin-other-domain-user"),
    pytest.param(JP_ADMIN, COM, "mwSpamThreshold", False, id="domain-admin-other-domain"),
    pytest.param(JP_ADMIN, f"cn=admins,{JP}", "description", False, id="domain-admin-own-group"),
    pytest.param(HELPDESK, TARO, "mwSpamThreshold", True, id="helpdesk-user-setting"),
    pytest.param(HELPDESK, ALICE, "mwEnabledService", True, id="helpdesk-user-services"),
    pytest.param(HELPDESK, TARO, "mwAlternateAddress", False, id="helpdesk-user-alias"),
    pytest.param(HELPDESK, JP, "mwSpamThreshold", False, id="helpdesk-domain"),
    pytest.param(HELPDESK, JP_ADMIN, "description", False, id="helpdesk-admins"),
    pytest.param(SYSADMIN, JP, "mwDelegatedService", True, id="system-admin-delegation"),
    pytest.param(SYSADMIN, JP_ADMIN, "description", True, id="system-admin-admins"),
    pytest.param(JP_ADMIN, JP, "mwMigrationState", False, id="domain-admin-migration-state"),
    pytest.param(JP_ADMIN, JP, "mwLegacyMx", False, id="domain-admin-legacy-mx"),
    pytest.param(SYSADMIN, JP, "mwMigrationState", True, id="system-admin-migration-state"),
    pytest.param(JP_ADMIN, TARO, "mwLegacyPassword", True, id="domain-admin-legacy-password"),
    pytest.param(HELPDESK, TARO, "mwLegacyPassword", False, id="helpdesk-legacy-password"),
    pytest.param(TARO, TARO, "mwLegacyPassword", False, id="end-user-own-legacy-password"),
    pytest.param(SERVICE_DN, TARO, "mwSpamThreshold", False, id="service-account"),
    pytest.param(None, TARO, "mwKeywordRule", False, id="anonymous"),
]
_VALUE = {"mwKeywordRule": "subject contains test junk", "mwVacationText": "away",
          "mwEnabledService": "spam-check", "mwQuota": "5", "mwSpamThreshold": "4.5",
          "mwAlternateAddress": "t.y@example.jp", "mwNoticeTemplate": "faculty",
          "mwDelegatedService": "spam_check", "description": "changed", "mwMigrationState": "legacy",
          "mwLegacyMx": "[192.0.2.9]", "mwLegacyPassword": "{SSHA}aGVsbG8gd29ybGQxMjM0NTY3OA=="}


@pytest.mark.parametrize(("who", "dn", "attr", "allowed"), WRITES)
def test_ldapmodify_as_each_tier(server: SlapdServer, who: str | None, dn: str, attr: str,
                                 allowed: bool) -> None:
    before = values(server, dn, attr)
    rc = replace(server, who, dn, attr, _VALUE[attr])
    after = values(server, dn, attr)
    if allowed:
        assert rc == 0 and after == [_VALUE[attr]]
        assert replace(server, ROOTDN, dn, attr, *before) == 0  # put it back
    else:
        assert rc == (50 if who else 8), rc  # insufficientAccessRights; anonymous: strongerAuth
        assert after == before


def test_anonymous_reads_no_subscriber_data(server: SlapdServer) -> None:
    flt = "(|(mwForwardAddress=*)(mwKeywordRule=*)(mwVacationText=*)(mail=*))"
    assert ldapsearch(server, None, B, flt, "mwForwardAddress", "mwKeywordRule") == ""
    assert "mwForwardAddress: hanako@example.com" in ldapsearch(server, SERVICE_DN, B, flt,
                                                                "mwForwardAddress")


def test_domain_admin_reads_only_their_domain(server: SlapdServer) -> None:
    out = ldapsearch(server, JP_ADMIN, B, "(objectClass=*)", "1.1")
    dns = [line[4:] for line in out.splitlines() if line.startswith("dn: ")]
    assert TARO in dns and JP in dns
    assert not [d for d in dns if "example.com" in d or "lab.example.org" in d]
    assert "userPassword" not in ldapsearch(server, HELPDESK, TARO, "(objectClass=*)", "userPassword")


def test_a_legacy_password_hash_is_read_by_the_daemons_alone(server: SlapdServer) -> None:
    """Dovecot checks a taken-over hash through the daemons' account; no person reads it."""
    hashed = "{SSHA}aGVsbG8gd29ybGQxMjM0NTY3OA=="
    assert replace(server, ROOTDN, TARO, "mwLegacyPassword", hashed) == 0
    try:
        assert f"mwLegacyPassword: {hashed}" in ldapsearch(server, SERVICE_DN, TARO, "(objectClass=*)",
                                                            "mwLegacyPassword")
        for who in (TARO, JP_ADMIN, HELPDESK, None):
            assert "mwLegacyPassword" not in ldapsearch(server, who, TARO, "(objectClass=*)",
                                                        "mwLegacyPassword"), who
    finally:
        assert replace(server, ROOTDN, TARO, "mwLegacyPassword") == 0


def test_end_user_reads_own_entry_not_others(server: SlapdServer) -> None:
    out = ldapsearch(server, TARO, DOMAINS, "(mail=*)", "mail")
    assert out.count("dn: ") == 1 and "mail: taro@example.jp" in out


# ------------------------------------------------------------------ logging in


def directory(server: SlapdServer) -> LdapDirectory:
    cfg = parse_config(f'[ldap]\nuri = "{server.uri}"\n{SERVICE_BIND}', "t.toml")
    return LdapDirectory(cfg.ldap)


def test_authenticate_finds_each_tier(server: SlapdServer) -> None:
    d = directory(server)
    assert authenticate(d, "root", "secret").role is Role.SYSTEM_ADMIN
    assert authenticate(d, "desk", "secret").role is Role.HELPDESK
    jp = authenticate(d, "jp-admin", "secret")
    assert (jp.role, jp.domains, jp.dn) == (Role.DOMAIN_ADMIN, ("example.jp",), JP_ADMIN)
    prof = authenticate(d, "prof@lab.example.org", "secret")  # a subscriber who administers
    assert (prof.role, prof.domains, prof.address) == (Role.DOMAIN_ADMIN, ("lab.example.org",),
                                                       "prof@lab.example.org")
    taro = authenticate(d, "Taro.Yamada@example.ne.jp", "secret")  # alias, domain alias
    assert (taro.role, taro.dn, taro.address, taro.domain) == (Role.END_USER, TARO,
                                                              "taro@example.jp", "example.jp")


@pytest.mark.parametrize(("login", "password"), [
    ("root", "wrong"), ("root", ""), ("nobody-here", "secret"), ("ghost@example.jp", "secret"),
    ("not an address", "secret"), ("jiro@example.jp", "secret"),  # jiro's account is disabled
])
def test_authenticate_refuses(server: SlapdServer, login: str, password: str) -> None:
    with pytest.raises(AuthenticationFailed):
        authenticate(directory(server), login, password)


def test_may_edit_hints_follow_the_catalogue() -> None:
    taro = Person("taro@example.jp", TARO, Role.END_USER, address="taro@example.jp")
    assert may_edit(taro, "keyword_rules") and may_edit(taro, "vacation_text")
    assert not may_edit(taro, "quota") and not may_edit(taro, "enabled_service")
    assert not may_edit(taro, "spam_threshold", layer="domain")
    desk = Person("desk", HELPDESK, Role.HELPDESK)
    assert may_edit(desk, "quota") and not may_edit(desk, "spam_threshold", layer="domain")
    jp = Person("jp-admin", JP_ADMIN, Role.DOMAIN_ADMIN, domains=("example.jp",))
    assert may_edit(jp, "notice_template", layer="domain")
    assert not may_edit(jp, "delegated_services", layer="domain")


# ------------------------------------------------------------------ the write path and audit


def test_apply_change_records_who_what_old_new_and_where(server: SlapdServer) -> None:
    d = directory(server)
    person = authenticate(d, "jp-admin", "secret")
    bound = d.bound_as(person.dn, "secret")
    old = values(server, HANAKO, "mwSpamThreshold")
    lines = apply_change(bound, HANAKO, {"spam_threshold": ["2.5"]}, actor=person,
                         origin="web 192.0.2.7")
    assert [(x.name, list(x.old), list(x.new)) for x in lines] == [("spam_threshold", old, ["2.5"])]
    assert apply_change(bound, HANAKO, {"spam_threshold": ["2.5"]}, actor=person, origin="x") == []
    rec = audit.read(bound, domain="example.jp")[-1]
    assert (rec.actor, rec.creator, rec.origin, rec.target) == ("jp-admin", JP_ADMIN,
                                                                "web 192.0.2.7", HANAKO)
    assert [(c.name, c.old, c.new) for c in rec.changes] == [("spam_threshold", tuple(old), ("2.5",))]


def test_audit_is_read_by_the_tier_above_only(server: SlapdServer) -> None:
    d = directory(server)
    taro = authenticate(d, "taro@example.jp", "secret")
    as_taro = d.bound_as(TARO, "secret")
    apply_change(as_taro, TARO, {"vacation_subject": ["Away"]}, actor=taro, origin="cli t@h")
    assert audit.read(as_taro) == []  # an end user does not read the log
    jp = [r for r in audit.read(d.bound_as(JP_ADMIN, "secret"), domain="example.jp")
          if r.actor == "taro@example.jp"]
    assert jp and jp[-1].creator == TARO
    assert [r for r in audit.read(d.bound_as(HELPDESK, "secret")) if r.actor == "taro@example.jp"]
    assert not [r for r in audit.read(d.bound_as(COM_ADMIN, "secret"))
                if r.domain == "example.jp"]
    # Nobody below the system administrator removes a record.
    rec = jp[-1].dn
    for who in (JP_ADMIN, HELPDESK, TARO):
        assert ldapmodify(server, who, f"dn: {rec}\nchangetype: delete\n") == 50


def test_audit_creator_cannot_be_forged(server: SlapdServer) -> None:
    """A subscriber adding a record by hand names someone else as actor; slapd's creatorsName
    still says who bound."""
    rid = "forged-1"
    ldif = (f"dn: mwAuditId={rid},ou=audit,{JP}\nchangetype: add\nobjectClass: mwAuditRecord\n"
            f"mwAuditId: {rid}\nmwAuditActor: root\nmwAuditTarget: {HANAKO}\n"
            "mwAuditTime: 20260101000000Z\n")
    assert ldapmodify(server, TARO, ldif) == 0
    rec = [r for r in audit.read(directory(server).bound_as(ROOTDN, "secret"), domain="example.jp")
           if r.dn.startswith(f"mwAuditId={rid},")]
    assert rec and rec[0].actor == "root" and rec[0].creator == TARO


def test_domain_narrows_what_subscribers_change(server: SlapdServer) -> None:
    """example.com leaves forwarding out of its self_service_settings: slapd would let alice
    write her forward address, the write path refuses it."""
    d = directory(server)
    alice = authenticate(d, "alice@example.com", "secret")
    bound = d.bound_as(ALICE, "secret")
    with pytest.raises(ChangeRefused, match="forward_addresses"):
        apply_change(bound, ALICE, {"forward_addresses": ["a@example.net"]}, actor=alice, origin="o")
    assert values(server, ALICE, "mwForwardAddress") == []
    apply_change(bound, ALICE, {"spam_threshold": ["7"]}, actor=alice, origin="o")
    assert values(server, ALICE, "mwSpamThreshold") == ["7"]


def test_domain_admin_switches_only_delegated_services(server: SlapdServer) -> None:
    d = directory(server)
    com = authenticate(d, "com-admin", "secret")
    bound = d.bound_as(COM_ADMIN, "secret")
    before = values(server, ALICE, "mwEnabledService")
    with pytest.raises(ChangeRefused, match="virus_scan"):
        apply_change(bound, ALICE, {"enabled_service": [*before, "virus-scan"]}, actor=com, origin="o")
    apply_change(bound, ALICE, {"enabled_service": [*before, "greylisting"]}, actor=com, origin="o")
    assert "greylisting" in values(server, ALICE, "mwEnabledService")


# ------------------------------------------------------------------ through the CLI


@pytest.fixture
def cli(server: SlapdServer, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    config = tmp_path / "mw.toml"
    config.write_text(f'[ldap]\nuri = "{server.uri}"\n{SERVICE_BIND}', encoding="utf-8")
    password = tmp_path / "pw"
    password.write_text("secret\n", encoding="utf-8")
    yield config, password


def as_(cli: tuple[Path, Path], login: str, *args: str, stdin: str | None = None) -> tuple[int, str]:
    config, password = cli
    res = CliRunner().invoke(main, ["--config", str(config), "--as", login, "--password-file",
                                    str(password), *args], input=stdin)
    return res.exit_code, res.output


@pytest.mark.parametrize(("login", "args", "code"), [
    pytest.param("taro@example.jp", ["user", "set", "taro@example.jp", "vacation_active", "yes"], 0,
                 id="end-user-own-setting"),
    pytest.param("taro@example.jp", ["user", "enable", "taro@example.jp", "virus_scan"], 1,
                 id="end-user-own-service"),
    pytest.param("taro@example.jp", ["user", "set", "hanako@example.jp", "spam_action", "tag"], 1,
                 id="end-user-other-user"),
    pytest.param("jp-admin", ["user", "enable", "hanako@example.jp", "spam_check"], 0,
                 id="domain-admin-user-service"),
    pytest.param("jp-admin", ["domain", "set", "example.jp", "notice_template", "faculty"], 0,
                 id="domain-admin-own-domain"),
    pytest.param("jp-admin", ["domain", "set", "example.jp", "delegated_services", "archive"], 1,
                 id="domain-admin-delegation"),
    pytest.param("jp-admin", ["user", "set", "alice@example.com", "spam_threshold", "3"], 1,
                 id="domain-admin-other-domain"),
    pytest.param("desk", ["user", "set", "alice@example.com", "quota", "10"], 0,
                 id="helpdesk-user-setting"),
    pytest.param("desk", ["domain", "set", "example.com", "spam_threshold", "3"], 1,
                 id="helpdesk-domain"),
    pytest.param("root", ["domain", "set", "example.com", "delegated_services", "spam_check",
                          "keyword_filter", "greylisting", "rate_limits"], 0, id="system-admin"),
])
def test_cli_as_each_tier(cli: tuple[Path, Path], login: str, args: list[str], code: int) -> None:
    rc, out = as_(cli, login, *args)
    assert rc == code, out
    if code:
        assert "refused" in out or "no such" in out


def test_cli_login_failure_exits_noperm(cli: tuple[Path, Path], tmp_path: Path) -> None:
    cli[1].write_text("wrong\n", encoding="utf-8")
    rc, out = as_(cli, "root", "explain", "taro@example.jp")
    assert rc == 77 and "login as root failed" in out


def test_cli_reads_are_checked_too(cli: tuple[Path, Path]) -> None:
    rc, out = as_(cli, "com-admin", "explain", "taro@example.jp", "--json")
    assert rc == 0 and json.loads(out)["kind"] != "subscriber"  # example.jp is invisible to it
    rc, out = as_(cli, "jp-admin", "explain", "taro@example.jp", "--json")
    assert json.loads(out)["settings"]["keyword_rules"]["source"] == "user"


def test_cli_audit_show(cli: tuple[Path, Path]) -> None:
    assert as_(cli, "jp-admin", "user", "set", "taro@example.jp", "spam_action", "subject")[0] == 0
    rc, out = as_(cli, "jp-admin", "audit", "show", "--domain", "example.jp", "--since", "1h", "--json")
    last = json.loads(out.splitlines()[-1])
    assert last["actor"] == "jp-admin" and last["bound_as"] == JP_ADMIN
    assert last["origin"].startswith("cli ") and last["target"] == TARO
    assert last["changes"][-1]["name"] == "spam_action" and last["changes"][-1]["new"] == ["subject"]
    rc, out = as_(cli, "com-admin", "audit", "show", "--domain", "example.jp")
    assert rc == 1 and "no such domain" in out


def test_cli_import_dry_run_then_write(server: SlapdServer, cli: tuple[Path, Path]) -> None:
    csv = ("address,spam_threshold,keyword_rules,spam_check\n"
           'taro@example.jp,6.5,"subject contains junk sale\nbody contains reject pills",\n'
           "hanako@example.jp,-,,off\n")
    before = values(server, TARO, "mwSpamThreshold")
    log_before = len(audit.read(directory(server).bound_as(ROOTDN, "secret"), domain="example.jp"))
    rc, out = as_(cli, "jp-admin", "user", "import", "--dry-run", "-", stdin=csv)
    assert rc == 0, out
    assert "line 2: taro@example.jp: spam_threshold:" in out and "-> 6.5" in out
    assert "line 4: hanako@example.jp: disabled_service:" in out
    assert "nothing written" in out
    assert values(server, TARO, "mwSpamThreshold") == before
    after_dry = audit.read(directory(server).bound_as(ROOTDN, "secret"), domain="example.jp")
    assert len(after_dry) == log_before
    rc, out = as_(cli, "jp-admin", "user", "import", "-", stdin=csv)
    assert rc == 0 and "2 subscriber(s) changed" in out
    assert values(server, TARO, "mwSpamThreshold") == ["6.5"]
    assert "spam-check" in values(server, HANAKO, "mwDisabledService")
    assert len(audit.read(directory(server).bound_as(ROOTDN, "secret"), domain="example.jp")) \
        == log_before + 2


def test_cli_import_reports_errors_per_line_and_writes_nothing(server: SlapdServer,
                                                                cli: tuple[Path, Path]) -> None:
    csv = ("address,spam_threshold,spam_check\n"
           "taro@example.jp,abc,\n"
           "hanako@example.jp,4,maybe\n"
           "alice@example.com,4,\n"
           "jiro@example.jp,4,\n")
    before = values(server, f"uid=jiro,ou=users,{JP}", "mwSpamThreshold")
    rc, out = as_(cli, "jp-admin", "user", "import", "-", stdin=csv)
    assert rc == 2
    assert "line 2: spam_threshold: 'abc' is not a number" in out
    assert "line 3: spam_check: 'maybe' is not on, off or inherit" in out
    assert "line 4: no such domain: alice@example.com" in out  # invisible to jp-admin
    assert "nothing written" in out
    assert values(server, f"uid=jiro,ou=users,{JP}", "mwSpamThreshold") == before


def test_cli_import_goes_through_the_domains_narrowing(cli: tuple[Path, Path]) -> None:
    rc, out = as_(cli, "alice@example.com", "user", "import", "-",
                  stdin="address,forward_addresses\nalice@example.com,a@example.net\n")
    assert rc == 1 and "line 2: alice@example.com: " in out and "forward_addresses" in out


def test_config_check_names_an_anonymous_bind_that_sees_nothing(server: SlapdServer,
                                                                 tmp_path: Path) -> None:
    config = tmp_path / "anon.toml"
    config.write_text(f'[ldap]\nuri = "{server.uri}"\n[store]\nsqlite_path = "{tmp_path}/s.db"\n',
                      encoding="utf-8")
    res = CliRunner().invoke(main, ["--config", str(config), "config", "check", "--connect"])
    assert res.exit_code == 78 and "not visible to an anonymous bind" in res.output
    config.write_text(f'[ldap]\nuri = "{server.uri}"\n{SERVICE_BIND}[store]\n'
                      f'sqlite_path = "{tmp_path}/s.db"\n', encoding="utf-8")
    res = CliRunner().invoke(main, ["--config", str(config), "config", "check", "--connect"])
    assert res.exit_code == 0, res.output


def test_catalogue_declares_the_end_user_settings_and_services_shows_them() -> None:
    from mailwarden import catalogue

    marked = {n for n, s in catalogue.SETTINGS.items() if s.end_user}
    assert marked == set(catalogue.END_USER_SETTINGS) == {
        "keyword_rules", "sender_allowlist", "sender_blocklist", "forward_addresses",
        "forward_keep_copy", "vacation_active", "vacation_subject", "vacation_text",
        "vacation_period_days", "spam_threshold", "spam_action"}
    out = CliRunner().invoke(main, ["services"]).output
    rows = {line.split()[0]: line.split()[3] for line in out.splitlines()
            if line.startswith("  ") and len(line.split()) > 3}
    assert rows["keyword_rules"] == "self" and rows["vacation_text"] == "self"
    assert rows["quota"] != "self" and rows["spam_reject_score"] != "self"


def test_generated_rules_let_end_users_write_exactly_the_catalogue_column() -> None:
    from mailwarden.acl import acl_rules, end_user_attributes

    own = [r for r in acl_rules(B) if "by self write by" in r and "attrs=mw" in r]
    assert len(own) == 1
    attrs = own[0].split("attrs=", 1)[1].split()[0].split(",")
    assert attrs == end_user_attributes()
    assert "mwKeywordRule" in attrs and "mwQuota" not in attrs


def test_search_users_sees_what_the_bind_may_see(server: SlapdServer) -> None:
    d = directory(server)
    everyone = [e.first("mail") for e in d.search_users()]
    assert "taro@example.jp" in everyone and "alice@example.com" in everyone
    assert everyone == sorted(everyone)
    assert [e.first("mail") for e in d.search_users("yamada")] == ["taro@example.jp"]  # an alias
    assert len(d.search_users(limit=3)) == 3
    jp = d.bound_as(JP_ADMIN, "secret")
    mine = {e.first("mail") for e in jp.search_users()}
    assert "taro@example.jp" in mine and not {m for m in mine if m and "example.jp" not in m}
    domain = jp.find_domain("example.jp")
    assert domain is not None and [e.dn for e in jp.search_users("hana", domain)] == [HANAKO]
    assert [e.dn for e in d.bound_as(TARO, "secret").search_users()] == [TARO]
