"""Shared fixtures: real slapd and redis-server on loopback, configs pointing at them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.redisserver import RedisServer
from harness.slapd import SERVICE_BIND, Database, SlapdServer, mailwarden_database
from mailwarden.config import Config, parse_config
from mailwarden.ldapdir import LdapDirectory
from mailwarden.policy import PolicyResolver

DATA = Path(__file__).parent / "data"
ADMIN_DN = "cn=admin,dc=mailwarden,dc=test"


def compat_database() -> Database:
    """The stand-in for an existing iRedMail / qmail-ldap style directory."""
    return Database("dc=legacy,dc=test", [DATA / "compat.ldif"], indexes=("objectClass eq",))


def new_slapd() -> SlapdServer:
    """A started slapd with the sample tree and the compat tree."""
    return SlapdServer(
        [mailwarden_database(), compat_database()], schemas=[DATA / "compat-schema.ldif"]
    ).start()


@pytest.fixture(scope="session")
def slapd() -> Iterator[SlapdServer]:
    """One read-only slapd for the session (tests must not write to it)."""
    server = new_slapd()
    yield server
    server.cleanup()


@pytest.fixture
def slapd_rw() -> Iterator[SlapdServer]:
    """A fresh slapd for a test that writes or stops the server."""
    server = new_slapd()
    yield server
    server.cleanup()


def config_for(server: SlapdServer, extra: str = "", *, admin: bool = False) -> Config:
    """A Config pointing at ``server``, bound as the admin when ``admin``, else as the
    daemons' read-only account."""
    bind = f'bind_dn = "{ADMIN_DN}"\nbind_password = "secret"\n' if admin else SERVICE_BIND
    text = (
        f'[ldap]\nuri = "{server.uri}"\n{bind}retry_max = 1\nretry_delay = 0.2\n'
        f"network_timeout = 1.0\ntimeout = 2.0\n{extra}"
    )
    return parse_config(text, "test.toml")


def compat_config(server: SlapdServer) -> Config:
    """The alternative mapping (tests/data/compat.toml) pointing at ``server``."""
    text = (DATA / "compat.toml").read_text()
    text = text.replace("[ldap]\n", f'[ldap]\nuri = "{server.uri}"\n', 1)
    return parse_config(text, "compat.toml")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session (tests that restart it use their own)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def resolver_for() -> Callable[[Config], PolicyResolver]:
    """Build a resolver with a real LDAP adapter for a config."""

    def make(cfg: Config) -> PolicyResolver:
        return PolicyResolver(LdapDirectory(cfg.ldap), cfg)

    return make


@pytest.fixture
def sample(slapd: SlapdServer) -> PolicyResolver:
    """A resolver over the shipped sample directory."""
    cfg = config_for(slapd)
    return PolicyResolver(LdapDirectory(cfg.ldap), cfg)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the real daemons they use, so `-m "not slapd"` runs the fast ones."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & {"slapd", "slapd_rw", "sample"}:
            item.add_marker(pytest.mark.slapd)
        if names & {"redis_server"}:
            item.add_marker(pytest.mark.redis)
