"""The effective policy from a real slapd: shipped schema, sample data, alternative mapping,
failures (server down mid-run, bad credentials, missing base), hostile input."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

import ldap
from harness.slapd import SlapdServer
from mailwarden.catalogue import Service
from mailwarden.config import Config
from mailwarden.directory import DirectoryUnavailable
from mailwarden.ldapdir import LdapDirectory
from mailwarden.policy import AddressKind, Layer, PolicyResolver
from tests.conftest import ADMIN_DN, compat_config, config_for

Make = Callable[[Config], PolicyResolver]


def on(policy_services: dict[Service, object] | object) -> set[str]:
    services = policy_services  # type: ignore[assignment]
    return {s.value for s, v in services.items() if v.value}  # type: ignore[attr-defined]


def test_sample_subscriber_merges_domain_and_user(sample: PolicyResolver) -> None:
    p = sample.effective_policy("taro@example.jp")
    assert p.kind is AddressKind.SUBSCRIBER
    assert p.user_dn == "uid=taro,ou=users,mwDomainName=example.jp,ou=domains,dc=mailwarden,dc=test"
    assert on(p.services) == {
        "virus_scan", "extension_filter", "smtp_auth", "pop_before_smtp", "rate_limits",
        "spam_check", "keyword_filter",
    }
    assert p.services[Service.KEYWORD_FILTER].source == (Layer.USER,)
    assert p.services[Service.VIRUS_SCAN].source == (Layer.DOMAIN,)
    assert [str(r) for r in p.get("keyword_rules")] == [
        "subject contains junk 未承諾広告", r"body regex reject (?i)cheap\s+pills",
    ]
    assert p.get("mail_host") == "mbox1.example.jp"
    assert p.settings["mail_host"].source == (Layer.DOMAIN,)
    assert p.get("quota") == 1073741824
    assert p.get("notice_recipients") == ("recipient", "admin")
    assert p.problems == ()


def test_sample_covers_every_service_on_and_off(sample: PolicyResolver) -> None:
    users = ["taro@example.jp", "hanako@example.jp", "jiro@example.jp", "pbs@example.jp",
             "alice@example.com", "bob@example.com", "carol@example.com",
             "prof@lab.example.org", "nobody@bare.example.net"]
    seen: dict[tuple[str, bool], set[Layer]] = {}
    for user in users:
        for service, value in sample.effective_policy(user).services.items():
            seen.setdefault((service.value, value.value), set()).update(value.source)
    for service in Service:
        assert seen[(service.value, True)], f"{service} never on"
        assert seen[(service.value, False)], f"{service} never off"
    assert on(sample.effective_policy("carol@example.com").services) == {s.value for s in Service}
    assert on(sample.effective_policy("nobody@bare.example.net").services) == set()


def test_user_switches_off_what_the_domain_switches_on(sample: PolicyResolver) -> None:
    hanako = sample.effective_policy("hanako@example.jp")
    assert not hanako.enabled(Service.VIRUS_SCAN)
    assert hanako.services[Service.VIRUS_SCAN].source == (Layer.USER,)
    assert hanako.get("spam_threshold") == 3.5
    assert hanako.get("forward_addresses") == ("hanako@example.com",)
    bob = sample.effective_policy("bob@example.com")
    assert not bob.enabled(Service.SPAM_CHECK)
    assert sample.effective_policy("alice@example.com").enabled(Service.SPAM_CHECK)


def test_aliases_domain_aliases_and_extensions_from_ldap(sample: PolicyResolver) -> None:
    p = sample.effective_policy("Taro.Yamada+news@Example.NE.JP")
    assert p.canonical == "taro@example.jp"
    assert p.domain == "example.jp"
    assert p.resolved_via[0] == "domain alias example.ne.jp -> example.jp"
    assert p.owns_sender("taro@example.ne.jp")
    sales = sample.effective_policy("sales@example.com")
    assert sales.canonical == "alice@example.com"
    assert "js" not in sales.get("banned_extensions")
    assert {"iso", "img", "exe"} <= set(sales.get("banned_extensions"))


def test_unknown_and_foreign_and_disabled(sample: PolicyResolver) -> None:
    assert sample.effective_policy("ghost@example.jp").kind is AddressKind.UNKNOWN_USER
    assert sample.effective_policy("ghost@nowhere.example").kind is AddressKind.NOT_LOCAL
    jiro = sample.effective_policy("jiro@example.jp")
    assert jiro.kind is AddressKind.SUBSCRIBER and not jiro.active


@pytest.mark.parametrize(
    "hostile",
    ["*@example.jp", "taro)(mail=*@example.jp", "\\2a@example.jp", "ｔａｒｏ@example.jp",
     "taro@例え.jp", "たろう@example.jp"],
)
def test_filter_injection_and_non_ascii_find_nothing(sample: PolicyResolver, hostile: str) -> None:
    p = sample.effective_policy(hostile)
    assert p.kind in (AddressKind.UNKNOWN_USER, AddressKind.NOT_LOCAL)
    assert p.user_dn is None


def test_alternative_mapping_reads_an_existing_directory(
    slapd: SlapdServer, resolver_for: Make
) -> None:
    r = resolver_for(compat_config(slapd))
    ken = r.effective_policy("k.tanaka@old-legacy.example")
    assert ken.kind is AddressKind.SUBSCRIBER
    assert ken.canonical == "ken@legacy.example"
    assert ken.user_dn == (
        "mail=ken@legacy.example,ou=Users,domainName=legacy.example,o=domains,dc=legacy,dc=test"
    )
    # replace mode: the user's enabledService list is the whole truth ("mail", "pop3" ignored)
    assert on(ken.services) == {"smtp_auth", "spam_check"}
    assert ken.get("quota") == 524288000
    assert ken.get("mail_host") == "store2.legacy.example"
    assert ken.get("forward_addresses") == ("ken@elsewhere.example",)
    assert ken.get("spam_threshold") == 4.0
    assert ken.settings["spam_threshold"].source == (Layer.USER,)
    yui = r.effective_policy("yui@legacy.example")
    assert on(yui.services) == {"virus_scan", "smtp_auth"}  # the domain's list
    assert yui.get("mail_host") == "store1.legacy.example"
    assert not r.effective_policy("mika@legacy.example").active
    # the shipped mapping does not see this tree at all
    assert PolicyResolver(LdapDirectory(config_for(slapd).ldap), config_for(slapd)) \
        .effective_policy("ken@legacy.example").kind is AddressKind.NOT_LOCAL


def test_ldap_down_mid_run_is_unavailable_then_recovers(slapd_rw: SlapdServer, resolver_for: Make) -> None:
    r = resolver_for(config_for(slapd_rw, "[policy]\ncache_ttl = 0\nnegative_cache_ttl = 0\n"
                                          "domain_cache_ttl = 0\n"))
    assert r.effective_policy("taro@example.jp").enabled(Service.VIRUS_SCAN)
    slapd_rw.stop()
    started = time.monotonic()
    with pytest.raises(DirectoryUnavailable, match="Can't contact LDAP server"):
        r.effective_policy("taro@example.jp")
    assert time.monotonic() - started < 10
    slapd_rw.start()
    assert r.effective_policy("taro@example.jp").enabled(Service.VIRUS_SCAN)


def test_slapd_restart_between_lookups_is_transparent(slapd_rw: SlapdServer, resolver_for: Make) -> None:
    r = resolver_for(config_for(slapd_rw, "[policy]\ncache_ttl = 0\ndomain_cache_ttl = 0\n"))
    assert r.effective_policy("alice@example.com").kind is AddressKind.SUBSCRIBER
    slapd_rw.restart()
    assert r.effective_policy("alice@example.com").kind is AddressKind.SUBSCRIBER


def test_wrong_credentials_and_missing_base_are_unavailable(slapd: SlapdServer) -> None:
    bad_pw = config_for(slapd, "").ldap
    bad_pw = type(bad_pw)(**{**bad_pw.__dict__, "bind_dn": ADMIN_DN, "bind_password": "wrong"})
    with pytest.raises(DirectoryUnavailable, match="Invalid credentials"):
        LdapDirectory(bad_pw).ping()
    cfg = config_for(slapd, "")
    missing = type(cfg.ldap)(**{**cfg.ldap.__dict__, "base_dn": "dc=absent,dc=test"})
    with pytest.raises(DirectoryUnavailable, match="does not exist"):
        PolicyResolver(LdapDirectory(missing), cfg).directory.find_domain("example.jp")


def test_nothing_listening_fails_fast() -> None:
    from harness.ports import free_port

    cfg = Config().ldap
    cfg = type(cfg)(**{**cfg.__dict__, "uri": f"ldap://127.0.0.1:{free_port()}/",
                       "retry_max": 1, "retry_delay": 0.1})
    started = time.monotonic()
    with pytest.raises(DirectoryUnavailable):
        LdapDirectory(cfg).ping()
    assert time.monotonic() - started < 5


def _admin(server: SlapdServer) -> ldap.ldapobject.LDAPObject:
    conn = ldap.initialize(server.uri)
    conn.simple_bind_s(ADMIN_DN, "secret")
    return conn


def test_huge_and_undecodable_values_are_ignored_with_a_problem(
    slapd_rw: SlapdServer, resolver_for: Make
) -> None:
    dn = "uid=bob,ou=users,mwDomainName=example.com,ou=domains,dc=mailwarden,dc=test"
    conn = _admin(slapd_rw)
    conn.modify_s(dn, [
        (ldap.MOD_REPLACE, "mwVacationText", [b"x" * 100_000]),
        (ldap.MOD_REPLACE, "mwSpamSubjectTag", ["[迷惑]".encode()]),
        (ldap.MOD_ADD, "mwKeywordRule", [f"body contains junk {'y' * 5000}".encode()]),
    ])
    p = resolver_for(config_for(slapd_rw)).effective_policy("bob@example.com")
    assert p.get("vacation_text") == ""  # 100 kB value dropped by the adapter
    assert p.get("spam_subject_tag") == "[迷惑]"
    assert p.get("keyword_rules") == ()
    assert any("mwVacationText value of 100000 bytes ignored" in x for x in p.problems)
    assert any("longer than" in x for x in p.problems)


def test_ambiguous_alternate_address_in_ldap_is_unavailable(
    slapd_rw: SlapdServer, resolver_for: Make
) -> None:
    conn = _admin(slapd_rw)
    conn.modify_s(
        "uid=bob,ou=users,mwDomainName=example.com,ou=domains,dc=mailwarden,dc=test",
        [(ldap.MOD_ADD, "mwAlternateAddress", [b"sales@example.com"])],
    )
    with pytest.raises(DirectoryUnavailable, match="more than one entry"):
        resolver_for(config_for(slapd_rw)).effective_policy("sales@example.com")
