"""Rendered Postfix and Dovecot on a cluster's services, run with the real binaries.

LDAP: ``[ldap] uri`` lists a syncrepl provider and its consumer (two real slapd). The
rendered Postfix tables and the Dovecot passdb/userdb list both, and answer with the
provider stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from harness.slapd import ReplicatedSlapd
from tests.render.conftest import (
    RenderedDovecot,
    RenderedPostfix,
    Site,
    need_dovecot,
    need_postfix,
    site_root,
)

pytestmark = pytest.mark.slapd

T = TypeVar("T")


@pytest.fixture
def pair() -> Iterator[ReplicatedSlapd]:
    with ReplicatedSlapd() as running:
        yield running


def _ldap_toml(pair: ReplicatedSlapd) -> str:
    return f'[ldap]\nuri = "{pair.uris}"\nretry_max = 1\nretry_delay = 0.2\nnetwork_timeout = 1.0\n'


def _settled(call: Callable[[], T], ok: Callable[[T], bool], timeout: float = 10.0) -> T:
    """``call()`` again until ``ok`` says yes (a daemon reconnecting), or the last answer."""
    deadline = time.monotonic() + timeout
    while not ok(answer := call()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return answer


def test_postfix_ldap_tables_list_both_servers_and_answer_without_the_provider(
    pair: ReplicatedSlapd,
) -> None:
    need_postfix()
    with site_root() as root:
        site = Site(root, _ldap_toml(pair))
        site.postfix("route", "mx")
        route = RenderedPostfix(site, "route")
        table = (route.etc / "ldap-recipients.cf").read_text()
        assert f"server_host = {pair.uris}\n" in table
        assert route.lookup("ldap-recipients", "sales@example.com") == "alice@example.com"
        pair.provider.stop()
        assert route.lookup("ldap-recipients", "sales@example.com") == "alice@example.com"
        assert route.lookup("ldap-domains", "example.ne.jp") == "example.jp"
        assert RenderedPostfix(site, "mx").lookup("ldap-recipients", "taro@example.jp") is not None


def test_dovecot_ldap_lists_both_servers_and_answers_without_the_provider(pair: ReplicatedSlapd) -> None:
    need_dovecot()
    with site_root() as root:
        site = Site(root, _ldap_toml(pair))
        site.dovecot("mailbox")
        dovecot = RenderedDovecot(site, "mailbox")
        conf = dovecot.conf.parent
        ldap_files = sorted(conf.glob("mailwarden-*db-*.conf.ext"))
        assert len(ldap_files) == 4 and all(f"uris = {pair.uris}\n" in f.read_text() for f in ldap_files)
        dovecot.start(site.ports["lmtp"], site.ports["pop3"])
        try:
            assert dovecot.userdb("taro@example.jp") is not None
            pair.provider.stop()
            fields = _settled(lambda: dovecot.doveadm("user", "taro@example.jp"),
                              lambda res: res.returncode == 0)
            assert fields.returncode == 0, fields.stderr + dovecot.log()[-2000:]
            assert "example.jp/taro" in fields.stdout
        finally:
            dovecot.stop()
