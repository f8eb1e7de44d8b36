"""The effective policy over a fake directory: layers, sources, aliases, cache, failures."""

from __future__ import annotations

import pytest

from harness.fakes import FakeDirectory
from mailwarden.address import InvalidAddress
from mailwarden.catalogue import KeywordRule, Service
from mailwarden.config import parse_config
from mailwarden.directory import DirectoryUnavailable, Entry
from mailwarden.policy import AddressKind, Layer, PolicyResolver


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def directory() -> FakeDirectory:
    d = FakeDirectory()
    d.add_domain(
        "example.jp", domain_alias=["example.ne.jp"],
        enabled_service=["virus-scan", "smtp-auth", "extension-filter"],
        spam_threshold="6.0", banned_extensions=["iso"], notice_language="ja",
    )
    d.add_user(
        "taro@example.jp", alternate_address=["taro.yamada@example.jp"],
        enabled_service=["spam-check"], disabled_service=["virus-scan"],
        spam_threshold="3.5", banned_extensions=["!exe", "img"],
        keyword_rules=["subject contains junk 未承諾広告"],
    )
    d.add_user("jiro@example.jp", account_status="disabled")
    d.add_user("hana@example.jp", spam_threshold="lots", quota="-5", forward_addresses="x@y.example")
    return d


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(directory: FakeDirectory, clock: Clock, extra: str = "") -> PolicyResolver:
    return PolicyResolver(directory, parse_config(extra, "t.toml"), clock=clock)


def test_user_overrides_domain_which_overrides_default(directory: FakeDirectory, clock: Clock) -> None:
    p = make(directory, clock).effective_policy("taro@example.jp")
    assert p.kind is AddressKind.SUBSCRIBER and p.active
    assert p.services[Service.SPAM_CHECK].value is True
    assert p.services[Service.SPAM_CHECK].source == (Layer.USER,)
    assert p.services[Service.VIRUS_SCAN].value is False  # domain on, user off
    assert p.services[Service.VIRUS_SCAN].source == (Layer.USER,)
    assert p.services[Service.SMTP_AUTH].value is True
    assert p.services[Service.SMTP_AUTH].source == (Layer.DOMAIN,)
    assert p.services[Service.GREYLISTING].source == (Layer.DEFAULT,)
    assert p.settings["spam_threshold"].value == 3.5
    assert p.settings["spam_threshold"].source == (Layer.USER,)
    assert p.settings["notice_language"].value == "ja"
    assert p.settings["notice_language"].source == (Layer.DOMAIN,)
    assert p.settings["spam_action"].source == (Layer.DEFAULT,)


def test_list_settings_union_layers_and_bang_removes(directory: FakeDirectory, clock: Clock) -> None:
    p = make(directory, clock).effective_policy("taro@example.jp")
    banned = p.settings["banned_extensions"]
    assert "exe" not in banned.value
    assert {"iso", "img", "scr"} <= set(banned.value)
    assert banned.source == (Layer.DEFAULT, Layer.DOMAIN, Layer.USER)
    assert banned.source_text == "default+domain+user"
    assert p.get("keyword_rules") == (KeywordRule("subject", "contains", "junk", "未承諾広告"),)


def test_alternate_address_and_domain_alias_resolve_to_the_subscriber(
    directory: FakeDirectory, clock: Clock
) -> None:
    r = make(directory, clock)
    p = r.effective_policy("Taro.Yamada@EXAMPLE.NE.JP")
    assert p.kind is AddressKind.SUBSCRIBER
    assert p.canonical == "taro@example.jp"
    assert p.domain == "example.jp"
    assert p.resolved_via == (
        "domain alias example.ne.jp -> example.jp", "alternate address of taro@example.jp",
    )
    assert p.settings["spam_threshold"].value == 3.5


def test_address_extension_is_stripped(directory: FakeDirectory, clock: Clock) -> None:
    p = make(directory, clock).effective_policy("taro+lists@example.jp")
    assert p.canonical == "taro@example.jp"
    assert "address extension stripped: taro@example.jp" in p.resolved_via
    no_delim = make(directory, clock, "[policy]\nrecipient_delimiter = ''\n")
    assert no_delim.effective_policy("taro+lists@example.jp").kind is AddressKind.UNKNOWN_USER


def test_unknown_user_gets_domain_layer_and_foreign_domain_nothing(
    directory: FakeDirectory, clock: Clock
) -> None:
    r = make(directory, clock)
    unknown = r.effective_policy("ghost@example.jp")
    assert unknown.kind is AddressKind.UNKNOWN_USER and unknown.is_local
    assert unknown.enabled(Service.VIRUS_SCAN)
    assert unknown.user_dn is None
    foreign = r.effective_policy("someone@elsewhere.example")
    assert foreign.kind is AddressKind.NOT_LOCAL and not foreign.is_local
    assert not foreign.services and not foreign.enabled(Service.VIRUS_SCAN)


def test_non_ascii_local_part_is_unknown_without_a_lookup(
    directory: FakeDirectory, clock: Clock
) -> None:
    r = make(directory, clock)
    calls = directory.calls
    p = r.effective_policy("たろう@example.jp")
    assert p.kind is AddressKind.UNKNOWN_USER
    assert directory.calls == calls + 1  # the domain only


def test_disabled_account_is_found_but_inactive(directory: FakeDirectory, clock: Clock) -> None:
    p = make(directory, clock).effective_policy("jiro@example.jp")
    assert p.kind is AddressKind.SUBSCRIBER and not p.active


def test_invalid_directory_values_fall_back_and_are_reported(
    directory: FakeDirectory, clock: Clock
) -> None:
    p = make(directory, clock).effective_policy("hana@example.jp")
    assert p.settings["spam_threshold"].value == 6.0  # the domain's, not a silent default
    assert p.settings["spam_threshold"].source == (Layer.DOMAIN,)
    assert p.settings["quota"].value == 0
    assert any("spam_threshold: 'lots' is not a number" in x for x in p.problems)
    assert any("quota: -5 is below the minimum" in x for x in p.problems)
    assert p.settings["forward_addresses"].value == ("x@y.example",)


def test_user_only_setting_on_domain_is_ignored(directory: FakeDirectory, clock: Clock) -> None:
    directory.add_domain("odd.example", forward_addresses=["all@x.example"])
    p = make(directory, clock).effective_policy("a@odd.example")
    assert p.get("forward_addresses") == ()
    assert any("forward_addresses is not a domain setting" in x for x in p.problems)


def test_site_config_layer_sits_between_default_and_domain(
    directory: FakeDirectory, clock: Clock
) -> None:
    r = make(directory, clock, "[policy]\ndefault_services = ['greylisting']\n"
             "[policy.defaults]\nspam_action = 'tag'\nspam_threshold = 4.0\n")
    p = r.effective_policy("jiro@example.jp")
    assert p.settings["spam_action"].value == "tag"
    assert p.settings["spam_action"].source == (Layer.CONFIG,)
    assert p.settings["spam_threshold"].source == (Layer.DOMAIN,)
    assert p.services[Service.GREYLISTING].value is True
    assert p.services[Service.GREYLISTING].source == (Layer.CONFIG,)


def test_replace_mode_makes_user_list_authoritative(clock: Clock) -> None:
    d = FakeDirectory()
    d.add_domain("legacy.example", enabled_service=["virusscan", "smtp"])
    d.add_user("a@legacy.example", enabled_service=["mail", "spamcheck"])
    d.add_user("b@legacy.example")
    cfg = parse_config(
        "[ldap.mapping]\nservice_merge = 'replace'\n[ldap.mapping.service_values]\n"
        "virus_scan = 'virusscan'\nspam_check = 'spamcheck'\nsmtp_auth = 'smtp'\n", "t.toml",
    )
    r = PolicyResolver(d, cfg, clock=clock)
    a = r.effective_policy("a@legacy.example")
    assert {s for s, v in a.services.items() if v.value} == {Service.SPAM_CHECK}
    b = r.effective_policy("b@legacy.example")
    assert {s for s, v in b.services.items() if v.value} == {Service.VIRUS_SCAN, Service.SMTP_AUTH}


def test_sender_ownership(directory: FakeDirectory, clock: Clock) -> None:
    directory.add_domain("corp.example", allowed_senders=["@news.corp.example"])
    directory.add_user("boss@corp.example", allowed_senders=["ceo@corp.example"])
    r = make(directory, clock)
    taro = r.effective_policy("taro@example.jp")
    assert taro.owns_sender("taro@example.jp")
    assert taro.owns_sender("<TARO.YAMADA@example.jp>")
    assert taro.owns_sender("taro@example.ne.jp")  # same mailbox in a domain alias
    assert not taro.owns_sender("hana@example.jp")
    assert not taro.owns_sender("taro@elsewhere.example")
    assert not taro.owns_sender("not an address")
    boss = r.effective_policy("boss@corp.example")
    assert boss.owns_sender("ceo@corp.example")
    assert boss.owns_sender("weekly@news.corp.example")
    assert not boss.owns_sender("weekly@corp.example")


def test_positive_and_negative_answers_are_cached_for_their_ttl(
    directory: FakeDirectory, clock: Clock
) -> None:
    r = make(directory, clock, "[policy]\ncache_ttl = 60\nnegative_cache_ttl = 10\n"
             "domain_cache_ttl = 300\n")
    r.effective_policy("taro@example.jp")
    r.effective_policy("ghost@example.jp")
    calls = directory.calls
    for _ in range(100):
        r.effective_policy("taro@example.jp")
        r.effective_policy("Ghost@Example.jp")
    assert directory.calls == calls
    assert r.hits == 200
    clock.now += 11  # negative entry expired, positive not
    r.effective_policy("ghost@example.jp")
    r.effective_policy("taro@example.jp")
    assert directory.calls == calls + 1  # one user lookup; the domain is still cached
    clock.now += 60
    r.effective_policy("taro@example.jp")
    assert directory.calls == calls + 2


def test_cache_is_bounded_lru(directory: FakeDirectory, clock: Clock) -> None:
    r = make(directory, clock, "[policy]\ncache_size = 2\n")
    for addr in ("taro@example.jp", "jiro@example.jp", "hana@example.jp"):
        r.effective_policy(addr)
    calls = directory.calls
    r.effective_policy("hana@example.jp")
    r.effective_policy("jiro@example.jp")
    assert directory.calls == calls
    r.effective_policy("taro@example.jp")  # evicted first
    assert directory.calls == calls + 1


class DomainCounting(FakeDirectory):
    """Records every domain lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.domain_lookups: list[str] = []

    def find_domain(self, domain: str) -> Entry | None:
        self.domain_lookups.append(domain)
        return super().find_domain(domain)


def test_domain_cache_is_bounded_lru(clock: Clock) -> None:
    d = DomainCounting()
    for name in ("a.example", "b.example", "c.example"):
        d.add_domain(name)
    r = make(d, clock, "[policy]\ncache_size = 2\n")
    users = iter(range(100))

    def resolve(domain: str) -> None:
        r.effective_policy(f"user{next(users)}@{domain}")  # a new address: the domain is needed

    for name in ("a.example", "b.example", "a.example", "nowhere.example"):
        resolve(name)
    assert d.domain_lookups == ["a.example", "b.example", "nowhere.example"]
    resolve("a.example")
    assert len(d.domain_lookups) == 3, "a.example stayed: used more recently than b.example"
    resolve("b.example")
    assert d.domain_lookups[3:] == ["b.example"], "b.example was dropped for nowhere.example"
    resolve("c.example")
    resolve("b.example")
    resolve("nowhere.example")
    assert d.domain_lookups[4:] == ["c.example", "nowhere.example"]


def test_cached_answers_from_the_cache_only(directory: FakeDirectory, clock: Clock) -> None:
    r = make(directory, clock)
    calls = directory.calls
    assert r.cached("taro@example.jp") is None
    assert directory.calls == calls, "cached() never asks the directory"
    found = r.effective_policy("Taro@Example.JP")
    assert r.cached("<taro@example.jp>") is found
    clock.now += 10**6
    assert r.cached("taro@example.jp") is None, "an expired entry is not an answer"
    with pytest.raises(InvalidAddress):
        r.cached("no at sign")


def test_directory_down_is_unavailable_never_a_default(
    directory: FakeDirectory, clock: Clock
) -> None:
    r = make(directory, clock)
    r.effective_policy("taro@example.jp")
    directory.down = True
    # Cached answers keep serving; an uncached address fails loudly.
    assert r.effective_policy("taro@example.jp").enabled(Service.SPAM_CHECK)
    with pytest.raises(DirectoryUnavailable):
        r.effective_policy("jiro@example.jp")
    with pytest.raises(DirectoryUnavailable):
        r.effective_policy("jiro@example.jp")  # the failure was not cached
    directory.down = False
    assert r.effective_policy("jiro@example.jp").kind is AddressKind.SUBSCRIBER


def test_ambiguous_address_is_unavailable(directory: FakeDirectory, clock: Clock) -> None:
    directory.add_user("other@example.jp", alternate_address=["taro@example.jp"])
    with pytest.raises(DirectoryUnavailable, match="more than one entry"):
        make(directory, clock).effective_policy("taro@example.jp")


def test_invalidate_forgets(directory: FakeDirectory, clock: Clock) -> None:
    r = make(directory, clock)
    assert r.effective_policy("taro@example.jp").get("spam_threshold") == 3.5
    directory.modify("uid=taro,mwDomainName=example.jp,ou=domains", {"spam_threshold": ["2"]})
    assert r.effective_policy("taro@example.jp").get("spam_threshold") == 3.5
    r.invalidate("taro@example.jp")
    assert r.effective_policy("taro@example.jp").get("spam_threshold") == 2.0


@pytest.mark.parametrize("bad", ["", "no-at", "x@", "a b@example.jp"])
def test_malformed_addresses_raise_invalid_address(
    directory: FakeDirectory, clock: Clock, bad: str
) -> None:
    with pytest.raises(InvalidAddress):
        make(directory, clock).effective_policy(bad)



def test_lookup_on_a_loop_asks_the_directory_in_the_executor_only_on_a_miss(
        directory: FakeDirectory, clock: Clock) -> None:
    import asyncio
    import threading

    resolver = make(directory, clock)
    threads: list[bool] = []
    search = directory.find_domain

    def spy(*args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread() is threading.main_thread())
        return search(*args, **kwargs)  # type: ignore[arg-type]

    directory.find_domain = spy  # type: ignore[method-assign]

    async def twice() -> tuple[object, object]:
        return await resolver.lookup("taro@example.jp"), await resolver.lookup("taro@example.jp")

    first, second = asyncio.run(twice())
    assert first is second, "the second answer comes from the cache"
    assert threads and not any(threads), "the directory is asked off the loop's thread, once"
    asked = len(threads)
    asyncio.run(twice())
    assert len(threads) == asked


def test_role_addresses_go_to_the_domain_admin_else_the_site_role_mailbox(
    directory: FakeDirectory, clock: Clock
) -> None:
    directory.add_domain("example.com", admin_address="it@example.com", enabled_service=["spam-check"])
    r = make(directory, clock, '[policy]\nrole_mailbox = "Roles@ISP.example"\n')
    admin = r.effective_policy("postmaster@example.com")
    assert admin.kind is AddressKind.ROLE and admin.canonical == "it@example.com"
    assert admin.resolved_via == ("role address postmaster@ -> admin_address of example.com",)
    # Malware is kept out, nothing refuses or files away a complaint or holds it up.
    assert admin.enabled(Service.VIRUS_SCAN) and admin.enabled(Service.EXTENSION_FILTER)
    assert not admin.enabled(Service.SPAM_CHECK) and not admin.enabled(Service.GREYLISTING)
    assert admin.services[Service.SPAM_CHECK].source == (Layer.ROLE,)
    # No admin_address: the site's role mailbox; through a domain alias, with an extension.
    site = r.effective_policy("Abuse+report@example.ne.jp")
    assert site.kind is AddressKind.ROLE and site.canonical == "roles@isp.example"
    assert site.domain == "example.jp"
    assert site.resolved_via == ("domain alias example.ne.jp -> example.jp",
                                 "role address abuse@ -> [policy] role_mailbox")
    assert site.get("notice_language") == "ja"  # the domain's settings apply
    # Not a role name, or a domain not hosted here: nothing changes.
    assert r.effective_policy("hostmaster@example.jp").kind is AddressKind.UNKNOWN_USER
    assert r.effective_policy("postmaster@elsewhere.example").kind is AddressKind.NOT_LOCAL


def test_a_directory_entry_with_a_role_name_wins(directory: FakeDirectory, clock: Clock) -> None:
    directory.add_user("abuse@example.jp", enabled_service=["spam-check"])
    directory.add_user("noc@example.jp", alternate_address=["postmaster@example.jp"])
    r = make(directory, clock, '[policy]\nrole_mailbox = "roles@isp.example"\n'
             'role_addresses = ["postmaster", "abuse", "hostmaster"]\n')
    assert r.effective_policy("abuse@example.jp").kind is AddressKind.SUBSCRIBER
    alias = r.effective_policy("postmaster@example.ne.jp")
    assert alias.kind is AddressKind.SUBSCRIBER and alias.canonical == "noc@example.jp"
    assert r.effective_policy("hostmaster@example.jp").kind is AddressKind.ROLE


def test_an_admin_address_that_is_a_role_address_is_no_target(
    directory: FakeDirectory, clock: Clock
) -> None:
    directory.add_domain("example.com", admin_address="postmaster@example.com")
    assert make(directory, clock).effective_policy("abuse@example.com").kind is AddressKind.UNKNOWN_USER
    site = make(directory, clock, '[policy]\nrole_mailbox = "roles@isp.example"\n')
    assert site.effective_policy("postmaster@example.com").canonical == "roles@isp.example"


def test_a_role_address_with_nowhere_to_go_is_an_unknown_user(
    directory: FakeDirectory, clock: Clock
) -> None:
    r = make(directory, clock, '[policy.defaults]\nadmin_address = "boss@example.org"\n')
    # A site-wide admin_address is no domain's own: role addresses need role_mailbox then.
    assert r.effective_policy("postmaster@example.jp").kind is AddressKind.UNKNOWN_USER


def test_role_configuration_is_checked() -> None:
    from mailwarden.config import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config('[policy]\nrole_addresses = ["Post Master"]\nrole_mailbox = "nobody"\n', "t.toml")
    assert "policy.role_addresses[0]" in str(err.value) and "policy.role_mailbox" in str(err.value)


def test_resolves_nowhere_follows_role_addresses(directory: FakeDirectory, clock: Clock) -> None:
    directory.add_domain("example.com", admin_address="it@example.com")
    r = make(directory, clock, '[policy]\nrole_mailbox = "abuse@example.jp"\n')
    assert r.resolves_nowhere("taro@example.jp") is None
    assert r.resolves_nowhere("someone@elsewhere.example") is None  # not ours to judge
    unknown = "example.com has no subscriber, alias or role address it@example.com"
    assert r.resolves_nowhere("it@example.com") == unknown
    assert r.resolves_nowhere("postmaster@example.com") == unknown
    assert r.resolves_nowhere("postmaster@example.jp") == ("role addresses going round in a circle: "
                                                           "postmaster@example.jp -> abuse@example.jp "
                                                           "-> abuse@example.jp")
