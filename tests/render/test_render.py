"""Rendering without daemons: derived values, refusals, secrets, CLI, the spam guard's logic."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailwarden.cli import main
from mailwarden.config import Config, parse_config
from mailwarden.render import (
    DOVECOT_ROLES,
    POSTFIX_INSTANCES,
    LdapQueries,
    RenderError,
    check,
    render_dovecot,
    render_postfix,
)
from tests.conftest import DATA

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"


def cfg(text: str = "") -> Config:
    return parse_config(text, "mw.toml")


def main_cf(out: Path, instance: str) -> str:
    return (out / f"postfix-{instance}" / "main.cf").read_text()


def test_defaults_render_five_instances_and_two_dovecot_roles(tmp_path: Path) -> None:
    written = render_postfix(cfg(), [], tmp_path)
    assert [w.name for w in written] == [f"postfix-{r}" for r in POSTFIX_INSTANCES]
    assert {"main.cf", "master.cf", "ldap-domains.cf"} <= set(written[0].files)
    assert (tmp_path / "postfix-mx" / "main.cf").is_file()
    one_dir = '[render]\ndovecot_config_dir = "/etc/dovecot-{role}"\n'
    roles = render_dovecot(cfg(one_dir), [], tmp_path)
    assert [r.name for r in roles] == [f"dovecot-{r}" for r in DOVECOT_ROLES]
    assert "sieve/mailwarden.sieve" in roles[0].files


def test_policy_service_timeouts_follow_the_policy_daemon(tmp_path: Path) -> None:
    render_postfix(cfg("[policyd]\nrequest_timeout = 20.0\nidle_timeout = 200.0\n"), ["mx"], tmp_path)
    text = main_cf(tmp_path, "mx")
    # Postfix waits longer than the daemon's own deadline, so its (4xx) answer arrives,
    # and drops idle connections before the daemon does.
    assert "timeout=30s, max_idle=170s" in text
    assert "{ default_action = 451 4.3.0 mailwarden policy service unavailable }" in text


def test_milter_wiring_comes_from_the_milter_section(tmp_path: Path) -> None:
    text = ('[milter]\nsocket = "unix:/run/mw/m.sock"\npostfix_command_timeout = 20.0\n'
            "postfix_content_timeout = 200.0\n")
    render_postfix(cfg(text), ["submission"], tmp_path)
    main = main_cf(tmp_path, "submission")
    assert "smtpd_milters = unix:/run/mw/m.sock\n" in main
    assert "milter_command_timeout = 20s\n" in main
    assert "milter_content_timeout = 200s\n" in main
    assert "milter_default_action = tempfail\n" in main


def test_refuses_sizes_the_milter_could_not_scan() -> None:
    problems = check(cfg("[render]\nmessage_size_limit = 30000000\n"))
    assert any(p.startswith("render.message_size_limit:") and "clamd_max_size" in p for p in problems)
    assert check(cfg("[render]\nmessage_size_limit = 10000000\n")) == []


def test_refuses_bad_endpoints(tmp_path: Path) -> None:
    bad = cfg('[render]\nroute_listen = "10021"\n[policyd]\nlisten = ["tcp:x"]\n')
    with pytest.raises(RenderError) as err:
        render_postfix(bad, [], tmp_path)
    assert any(p.startswith("render.route_listen:") for p in err.value.problems)
    assert any(p.startswith("policyd.listen[0]:") for p in err.value.problems)
    assert not (tmp_path / "postfix-mx").exists()


def test_bind_password_only_in_private_lookup_files(tmp_path: Path) -> None:
    text = ('[ldap]\nbind_dn = "cn=mail,dc=isp,dc=example"\nbind_password = "s3cret-pw"\n'
            '[render]\ndovecot_config_dir = "/etc/dovecot-{role}"\n')
    render_postfix(cfg(text), [], tmp_path)
    render_dovecot(cfg(text), [], tmp_path)
    holders = {p for p in tmp_path.rglob("*") if p.is_file() and "s3cret-pw" in p.read_text()}
    assert holders
    assert all(p.name.startswith("ldap-") or p.name.endswith(".conf.ext") for p in holders)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o640 for p in holders)
    assert stat.S_IMODE((tmp_path / "postfix-mx" / "main.cf").stat().st_mode) == 0o644


def test_archive_master_user_is_rendered_salted_and_private(tmp_path: Path) -> None:
    secret = tmp_path / "archive.key"
    secret.write_text("m4ster-pw\n")
    text = ('[render]\ndovecot_config_dir = "/etc/dovecot-{role}"\narchive_imap_port = 1143\n'
            f'archive_master_password_file = "{secret}"\nproxy_networks = ["10.1.0.0/24"]\n')
    render_dovecot(cfg(text), ["mailbox"], tmp_path / "out")
    passwd = tmp_path / "out" / "dovecot-mailbox" / "mailwarden-archive-master.passwd"
    user, scheme_hash, *_, extra = passwd.read_text().strip().split(":", 7)
    assert user == "mailwarden-archive" and scheme_hash.startswith("{SSHA256}")
    assert "m4ster-pw" not in passwd.read_text()
    assert extra == "allow_nets=10.1.0.0/24,127.0.0.0/8,::1"  # the front nodes only
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o640
    conf = (tmp_path / "out" / "dovecot-mailbox" / "conf.d" / "20-mailwarden-archive.conf").read_text()
    assert "master = yes" in conf and "port = 1143" in conf
    # Off by default: no master user at all.
    off = cfg('[render]\ndovecot_config_dir = "/etc/dovecot-{role}"\n')
    render_dovecot(off, ["mailbox"], tmp_path / "off")
    assert not list((tmp_path / "off").rglob("*archive*"))
    with pytest.raises(RenderError, match="archive_master_password_file"):
        render_dovecot(cfg(text.replace(str(secret), str(tmp_path / "missing"))), ["mailbox"], tmp_path / "x")


def test_archive_mailboxes_are_sdbox_unless_maildir_is_chosen(tmp_path: Path) -> None:
    """The archive account's userdb fields: sdbox, count quota and fewer syncs by default;
    with ``archive_mailbox_format = "maildir"`` only the syncs differ from a subscriber's."""
    one_dir = '[render]\ndovecot_config_dir = "/etc/dovecot-{role}"\n'

    def user_attrs(text: str, out: str) -> str:
        render_dovecot(cfg(text), ["mailbox"], tmp_path / out)
        ext = (tmp_path / out / "dovecot-mailbox" / "mailwarden-userdb-user.conf.ext").read_text()
        [line] = [x for x in ext.splitlines() if x.startswith("user_attrs")]
        return line

    sdbox = user_attrs(one_dir, "sdbox")
    assert "mwAccountStatus=mail=%{if;%{ldap:mwAccountStatus};eq;archive;sdbox;maildir}:" in sdbox
    assert "mwAccountStatus=quota=%{if;%{ldap:mwAccountStatus};eq;archive;count;maildir}:User quota" in sdbox
    assert "mwAccountStatus=mail_fsync=%{if;%{ldap:mwAccountStatus};eq;archive;optimized;always}" in sdbox
    maildir = user_attrs(one_dir + 'archive_mailbox_format = "maildir"\n', "maildir")
    assert "mail_fsync=" in maildir and "=mail=" not in maildir and "quota=" not in maildir.replace(
        "quota_rule", "")


def test_alternative_mapping_shapes_every_lookup(tmp_path: Path) -> None:
    compat = cfg((DATA / "compat.toml").read_text() + '[render]\ndovecot_config_dir = "/d/{role}"\n')
    render_postfix(compat, ["route", "mailbox"], tmp_path)
    route = tmp_path / "postfix-route"
    alias = (route / "ldap-alias-addresses.cf").read_text()
    assert "search_base = o=domains,dc=legacy,dc=test\n" in alias
    assert "(mailAlternateAddress=%s)" in alias and "result_attribute = mail\n" in alias
    domains = (route / "ldap-alias-domains.cf").read_text()
    assert "(domainAliasName=%d)" in domains and "result_format = %U@%s" in domains
    hosts = (tmp_path / "postfix-mailbox" / "ldap-mailhost-users.cf").read_text()
    assert "result_attribute = mailHost\n" in hosts
    render_dovecot(compat, ["mailbox"], tmp_path)
    user = (tmp_path / "mailbox" / "mailwarden-userdb-user.conf.ext").read_text()
    assert "mailQuota=quota_rule=*:bytes=%{ldap:mailQuota}" in user
    assert "mailForwardingAddress=sieve_env_mailwarden_forward" in user


def test_filter_placeholders_and_percent_signs_are_translated() -> None:
    text = ('[ldap.mapping]\nuser_filter = "(&(objectClass=x)(|(uid={local})(mail={address}))'
            '(note=100%))"\n')
    d = LdapQueries(cfg(text))
    assert d.postfix_user_filter() == ("(&(&(objectClass=x)(|(uid=%u)(mail=%s))(note=100%%))"
                                       "(!(mwAccountStatus=archive)))")
    assert d.dovecot_user_filter() == "(&(objectClass=x)(|(uid=%n)(mail=%u))(note=100%%))"
    bad = cfg('[ldap.mapping]\ndomain_filter = "(&(d={domain})(m={address}))"\n')
    with pytest.raises(RenderError, match="domain_filter"):
        LdapQueries(bad).postfix_domain_filter("domain")


def test_login_report_follows_the_policy_daemon(tmp_path: Path) -> None:
    text = ('[policyd]\nlogin_report_listen = ["inet:0.0.0.0:10099"]\n'
            'login_report_header = "X-Mailwarden-Key: k1"\n'
            '[render]\ndovecot_config_dir = "/etc/dovecot-{role}"\n')
    render_dovecot(cfg(text), [], tmp_path)
    report = (tmp_path / "dovecot-proxy" / "conf.d" / "95-mailwarden-login-report.conf").read_text()
    assert "auth_policy_server_url = http://127.0.0.1:10099/\n" in report
    assert "auth_policy_server_api_header = X-Mailwarden-Key: k1\n" in report
    assert "auth_policy_report_after_auth = yes\n" in report
    # With proxies in front, clients log in there: mailbox hosts do not report.
    behind = text + 'proxy_networks = ["10.1.0.0/24"]\n'
    out = tmp_path / "behind"
    render_dovecot(cfg(behind), [], out)
    assert not (out / "dovecot-mailbox" / "conf.d" / "95-mailwarden-login-report.conf").exists()
    off = tmp_path / "off"
    render_dovecot(cfg('[policyd]\nlogin_report_listen = []\n[render]\ndovecot_config_dir = "/x/{role}"\n'),
                   [], off)
    assert not list(off.rglob("95-mailwarden-login-report.conf"))


def test_dovecot_roles_need_their_own_directories(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="dovecot_config_dir"):
        render_dovecot(cfg(), [], tmp_path)
    assert [r.name for r in render_dovecot(cfg(), ["proxy"], tmp_path)] == ["dovecot-proxy"]


def test_sieve_script_names_the_milters_junk_header(tmp_path: Path) -> None:
    from mailwarden.catalogue import JUNK_HEADER

    render_dovecot(cfg(), ["mailbox"], tmp_path)
    script = (tmp_path / "dovecot" / "sieve" / "mailwarden.sieve").read_text()
    assert f'header :is "{JUNK_HEADER}" "yes"' in script


# ---------------------------------------------------------------- CLI and units


def test_cli_renders_and_exits_with_sysexits(tmp_path: Path) -> None:
    runner = CliRunner()
    conf = tmp_path / "mw.toml"
    conf.write_text('[render]\ndovecot_config_dir = "/etc/dovecot-{role}"\n')
    ok = runner.invoke(main, ["-c", str(conf), "render", "postfix", "--role", "mx", "--out", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert f"postfix-mx: {tmp_path}/postfix-mx/" in ok.output
    ok = runner.invoke(main, ["-c", str(conf), "render", "dovecot", "--out", str(tmp_path)])
    assert ok.exit_code == 0 and "dovecot-proxy" in ok.output
    bad_role = runner.invoke(main, ["-c", str(conf), "render", "postfix", "--role", "scan", "--out", "x"])
    assert bad_role.exit_code == 2
    conf.write_text("[render]\nmessage_size_limit = 99000000\n")
    refused = runner.invoke(main, ["-c", str(conf), "render", "postfix", "--out", str(tmp_path / "n")])
    assert refused.exit_code == 78
    assert f"{conf}:render.message_size_limit:" in refused.output


def _unit(name: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key, []).append(value)
    return keys


@pytest.mark.parametrize(("unit", "command"), [("mailwarden-policyd.service", "policyd"),
                                                ("mailwarden-milter.service", "milter")])
def test_systemd_units_run_the_daemons_in_the_foreground(unit: str, command: str, tmp_path: Path) -> None:
    keys = _unit(unit)
    assert keys["Type"] == ["simple"] and keys["Restart"] == ["on-failure"]
    assert keys["ExecStart"] == [f"/usr/bin/mailwarden {command} run"]
    assert keys["User"] == ["mailwarden"] and keys["NoNewPrivileges"] == ["yes"]
    assert keys["CapabilityBoundingSet"] == [""] and keys["ProtectSystem"] == ["strict"]
    assert "Before" in keys and "postfix.service" in keys["Before"][0]
    # The commands the unit runs exist.
    for pre in [*keys.get("ExecStartPre", []), keys["ExecStart"][0]]:
        if pre.startswith("/usr/bin/mailwarden"):
            args = pre.split()[1:]
            help_ = CliRunner().invoke(main, [*args, "--help"])
            assert help_.exit_code == 0, (pre, help_.output)
    analyze = shutil.which("systemd-analyze")
    if analyze:
        copy = tmp_path / unit
        venv_cli = str(Path(sys.executable).with_name("mailwarden"))
        copy.write_text((UNITS / unit).read_text().replace("/usr/bin/mailwarden", venv_cli))
        res = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True,
                             check=False, timeout=60)
        assert res.returncode == 0 and not res.stderr.strip(), res.stderr



def test_default_mailbox_host_is_the_site_layer_of_mail_host(tmp_path: Path) -> None:
    site = cfg('[policy.defaults]\nmail_host = "mbox9.isp.example"\n'
               '[render]\ndovecot_config_dir = "/etc/dovecot-{role}"\n')
    render_postfix(site, ["mailbox"], tmp_path)
    assert "relay_transport = lmtp:inet:mbox9.isp.example:24\n" in main_cf(tmp_path, "mailbox")
    render_dovecot(site, ["proxy"], tmp_path)
    auth = (tmp_path / "dovecot-proxy" / "conf.d" / "10-mailwarden-auth.conf").read_text()
    assert "args = noauthenticate proxy=y host=mbox9.isp.example\n" in auth
    clash = cfg('[policy.defaults]\nmail_host = "a.example"\n[render]\ndefault_mailbox_host = "b.example"\n')
    assert any(p.startswith("render.default_mailbox_host:") for p in check(clash))
