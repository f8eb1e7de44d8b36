"""The stack's slapd (provider and consumer) run the shipped access rules
(``ldap/acl.ldif``), and every daemon binds as the daemons' account.

Mail flowing through the other scenarios shows the daemons' lookups work under the
rules; these tests show what the rules keep from everyone else."""

from __future__ import annotations

import pytest

from harness.containers import SERVICE_DN, MailStack

BASE = "dc=mailwarden,dc=test"
TARO = "(mail=taro@example.jp)"


def _search(stack: MailStack, host: str, *bind: str, flt: str = "(objectClass=*)",
            attrs: tuple[str, ...] = ()) -> str:
    done = stack.exec(host, "ldapsearch", "-x", "-LLL", "-H", "ldap://127.0.0.1/", *bind,
                      "-b", BASE, flt, *attrs, check=False)
    return done.stdout


@pytest.mark.parametrize("host", ["ldap", "ldap2"])
def test_an_anonymous_client_sees_no_subscriber_data(stack: MailStack, host: str) -> None:
    assert _search(stack, host).strip() == ""
    assert _search(stack, host, flt=TARO).strip() == ""
    # The daemons' account reads the subscriber (on the consumer: replicated), never a password.
    seen = _search(stack, host, "-D", SERVICE_DN, "-w", "secret", flt=TARO, attrs=("*",))
    assert "mail: taro@example.jp" in seen and "mwEnabledService" in seen
    assert "userPassword" not in seen
    # The consumer holds the passwords too (replicated as the root DN): taro can bind there.
    whoami = stack.exec(host, "ldapwhoami", "-x", "-H", "ldap://127.0.0.1/", "-D",
                        f"uid=taro,ou=users,mwDomainName=example.jp,ou=domains,{BASE}", "-w", "secret",
                        check=False)
    assert whoami.returncode == 0 and "uid=taro" in whoami.stdout, whoami.stderr


def test_every_rendered_daemon_config_binds_as_the_daemons_account(stack: MailStack) -> None:
    tables = stack.exec("front", "sh", "-c", "grep -H '^bind' /etc/postfix-*/ldap-*.cf").stdout.splitlines()
    assert tables and all(line.endswith(("bind = yes", f"bind_dn = {SERVICE_DN}")) or "bind_pw" in line
                          for line in tables), tables
    for host, role in (("front", "proxy"), ("mbox1", "mailbox")):
        grep = f"grep -h '^dn =' /etc/dovecot-{role}/mailwarden-*.conf.ext"
        conf = stack.exec(host, "sh", "-c", grep).stdout
        assert conf and set(conf.splitlines()) == {f"dn = {SERVICE_DN}"}, (host, conf)
    config = stack.read_file("front", "/etc/mailwarden/mailwarden.toml")
    assert f'bind_dn = "{SERVICE_DN}"' in config and "cn=admin" not in config
    # The daemons' account may not change the directory; the administrator may.
    refused = stack.mailwarden("user", "set", "jiro@example.jp", "spam_threshold", "7", check=False)
    assert refused.returncode != 0
