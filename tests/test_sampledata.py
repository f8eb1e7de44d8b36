"""The synthetic subscriber generator: loads into slapd and covers every service combination."""

from __future__ import annotations

from pathlib import Path

from harness.slapd import Database, SlapdServer
from mailwarden.catalogue import SERVICES, Service
from mailwarden.config import parse_config
from mailwarden.ldapdir import LdapDirectory
from mailwarden.policy import AddressKind, Layer, PolicyResolver
from mailwarden.sampledata import synthetic_ldif, user_address


def test_generated_subscribers_cover_every_combination(tmp_path: Path) -> None:
    ldif = tmp_path / "synthetic.ldif"
    ldif.write_text("".join(synthetic_ldif(1024, 8, seed=7)), encoding="utf-8")
    with SlapdServer([Database("dc=mailwarden,dc=test", [ldif])]) as server:
        cfg = parse_config(f'[ldap]\nuri = "{server.uri}"\n', "t.toml")
        resolver = PolicyResolver(LdapDirectory(cfg.ldap), cfg)
        combos = set()
        for i in range(1024):
            p = resolver.effective_policy(user_address(i, 8))
            assert p.kind is AddressKind.SUBSCRIBER
            on = frozenset(s for s, v in p.services.items() if v.value)
            assert all(v.source == (Layer.USER,) for v in p.services.values())
            combos.add(on)
        assert len(combos) == 2 ** len(SERVICES)
        alt = resolver.effective_policy("alt-u0000003@alias-d00003.example")
        assert alt.canonical == "u0000003@d00003.example"
        assert alt.enabled(Service.VIRUS_SCAN) and alt.enabled(Service.SPAM_CHECK)


def test_generator_is_deterministic() -> None:
    a = "".join(synthetic_ldif(50, 5, seed=3))
    assert a == "".join(synthetic_ldif(50, 5, seed=3))
    assert a != "".join(synthetic_ldif(50, 5, seed=4))
