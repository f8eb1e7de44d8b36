"""The hosts themselves: rendered configuration, the shared Maildir volume, a sealed network."""

from __future__ import annotations

import pytest

from harness.containers import FRONT_INSTANCES, MailStack


def test_front_node_runs_the_rendered_postfix_instances_and_the_dovecot_proxy(stack: MailStack) -> None:
    for role in FRONT_INSTANCES:
        main_cf = stack.read_file("front", f"/etc/postfix-{role}/main.cf")
        assert "Rendered by `mailwarden render postfix`" in main_cf
        status = stack.exec("front", "postfix", "-c", f"/etc/postfix-{role}", "status", check=False)
        assert status.returncode == 0, (role, status.stderr)
    doveconf = stack.read_file("front", "/var/log/mailwarden/doveconf-proxy.txt")
    assert "driver = prefetch" in doveconf and "auth_policy_server_url = http://127.0.0.1:10032/" in doveconf


@pytest.mark.parametrize("host", ["mbox1", "mbox2"])
def test_mailbox_hosts_run_the_nfs_settings_rendered_for_them(stack: MailStack, host: str) -> None:
    # `doveconf -n` as captured when the host started: what differs from Dovecot's defaults.
    doveconf = stack.read_file(host, "/var/log/mailwarden/doveconf-mailbox.txt")
    for line in ("mmap_disable = yes", "mail_fsync = always", "mail_nfs_storage = yes",
                 "mail_location = maildir:~/Maildir:INDEX=/var/lib/dovecot/index/%d/%n",
                 "lmtp_rcpt_check_quota = yes"):
        assert line in doveconf, line
    assert f"# Hostname: {host}.example.jp" in doveconf
    # The NFS settings that equal Dovecot's defaults, as Dovecot resolves them.
    effective = stack.exec(host, "doveconf", "-c", "/etc/dovecot-mailbox/dovecot.conf",
                           "mail_nfs_index", "lock_method", "dotlock_use_excl").stdout.splitlines()
    assert effective == ["mail_nfs_index = no", "lock_method = fcntl", "dotlock_use_excl = yes"]


def test_both_mailbox_hosts_see_one_maildir_volume(stack: MailStack, token: str) -> None:
    path = f"/srv/mail/volume-check-{token}"
    stack.exec("mbox2", "sh", "-c", f"echo {token} > {path}")
    try:
        assert stack.read_file("mbox1", path).strip() == token
    finally:
        stack.exec("mbox1", "rm", "-f", path)


def test_network_is_internal_and_names_resolve_only_through_the_stub(stack: MailStack) -> None:
    internal = stack.docker("network", "inspect", "-f", "{{.Internal}}", stack.network).stdout.strip()
    assert internal == "true"
    # The stub answers for the stack's zone and NXDOMAIN for anything else, at once.
    lookup = ("import socket,sys\n"
              "print(socket.gethostbyname('mx.outside.test'))\n"
              "try:\n socket.gethostbyname('deb.debian.org')\n"
              "except socket.gaierror as e:\n print('unknown', e.errno)\n")
    done = stack.exec("front", "python3", "-c", lookup, timeout=20)
    assert done.stdout.split() == [stack.ip("internet"), "unknown", "-2"]  # EAI_NONAME
