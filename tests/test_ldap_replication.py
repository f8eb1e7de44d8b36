"""The directory as a syncrepl provider and a read-only consumer (two real slapd).

Lookups list both servers and go on when either one stops. Changes from the CLI go to
the provider alone: with the provider down they fail with exit 75 and the consumer stays
as it was.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import ldap
from harness.slapd import ReplicatedSlapd
from mailwarden.config import ConfigError, parse_config
from mailwarden.ldapdir import LdapDirectory
from mailwarden.policy import PolicyResolver
from tests.conftest import ADMIN_DN

pytestmark = pytest.mark.slapd

MAILWARDEN = str(Path(sys.executable).with_name("mailwarden"))
TARO = "uid=taro,ou=users,mwDomainName=example.jp,ou=domains,dc=mailwarden,dc=test"


@pytest.fixture
def pair() -> Iterator[ReplicatedSlapd]:
    with ReplicatedSlapd() as running:
        yield running


def _ldap_toml(uri: str, write_uri: str = "") -> str:
    write = f'write_uri = "{write_uri}"\n' if write_uri else ""
    return (f'[ldap]\nuri = "{uri}"\n{write}bind_dn = "{ADMIN_DN}"\nbind_password = "secret"\n'
            "retry_max = 1\nretry_delay = 0.2\nnetwork_timeout = 1.0\ntimeout = 2.0\n")


def _user_set(tmp_path: Path, toml: str, value: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "admin.toml"
    config.write_text(toml)
    return subprocess.run([MAILWARDEN, "--config", str(config), "user", "set", "taro@example.jp",
                           "rate_limit_messages", value], capture_output=True, text=True, timeout=60,
                          check=False)


def _consumer_value(pair: ReplicatedSlapd) -> list[bytes]:
    assert pair.consumer is not None
    conn = ldap.initialize(pair.consumer.uri)
    conn.simple_bind_s(ADMIN_DN, "secret")
    try:
        [(_, attrs)] = conn.search_s(TARO, ldap.SCOPE_BASE, "(objectClass=*)", ["mwRateLimitMessages"])
    finally:
        conn.unbind_s()
    return list(attrs.get("mwRateLimitMessages", []))


def test_lookups_go_on_while_either_server_is_down(pair: ReplicatedSlapd) -> None:
    assert pair.consumer is not None
    cfg = parse_config(_ldap_toml(pair.uris))
    resolver = PolicyResolver(LdapDirectory(cfg.ldap), cfg)
    assert resolver.effective_policy("taro@example.jp").user_dn == TARO
    pair.provider.stop()
    resolver.invalidate()
    assert resolver.effective_policy("taro@example.jp").user_dn == TARO  # from the consumer
    pair.provider.start()
    pair.consumer.stop()
    resolver.invalidate()
    assert resolver.effective_policy("taro.yamada@example.jp").user_dn == TARO  # back on the provider


def test_cli_changes_go_to_the_provider_and_reach_the_consumer(pair: ReplicatedSlapd, tmp_path: Path) -> None:
    assert pair.consumer is not None
    # The consumer first in the lookup list: the change still goes to write_uri.
    toml = _ldap_toml(f"{pair.consumer.uri} {pair.provider.uri}", write_uri=pair.provider.uri)
    done = _user_set(tmp_path, toml, "7")
    assert done.returncode == 0, done.stderr
    pair.wait_replicated(TARO, "(mwRateLimitMessages=7)")


def test_cli_change_with_the_provider_down_fails_with_75(pair: ReplicatedSlapd, tmp_path: Path) -> None:
    pair.provider.stop()
    done = _user_set(tmp_path, _ldap_toml(pair.uris), "9")
    assert done.returncode == 75, done.stderr
    # The write path reads the values it replaces from the provider first (for the audit log).
    assert f"directory unavailable: LDAP {pair.provider.uri}: read {TARO}" in done.stderr
    assert _consumer_value(pair) == []  # not written to the consumer


def test_a_write_uri_naming_a_consumer_is_refused_clearly(pair: ReplicatedSlapd, tmp_path: Path) -> None:
    assert pair.consumer is not None
    done = _user_set(tmp_path, _ldap_toml(pair.consumer.uri), "9")
    assert done.returncode == 1, done.stderr
    assert "is a read-only replica and refers changes elsewhere (set ldap.write_uri" in done.stderr
    assert _consumer_value(pair) == []


def test_write_uri_is_one_uri() -> None:
    with pytest.raises(ConfigError, match=r"ldap\.write_uri: one URI only"):
        parse_config('[ldap]\nwrite_uri = "ldap://a/ ldap://b/"\n')
    assert parse_config('[ldap]\nuri = "ldap://a/ ldap://b/"\n').ldap.writer == "ldap://a/"
