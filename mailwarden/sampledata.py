"""Synthetic directory data: N subscribers over M domains, for benchmarks and load tests.

Subscriber ``i`` switches on exactly the services whose bit is set in ``i mod 2**10``
and off the others, so any 1,024 consecutive subscribers cover every combination.
Output is deterministic for a seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from mailwarden.catalogue import SERVICES

SERVICE_VALUES = [spec.ldap_value for spec in SERVICES.values()]


def domain_name(index: int) -> str:
    """The name of synthetic domain ``index``."""
    return f"d{index:05d}.example"


def user_address(index: int, domains: int) -> str:
    """The primary address of synthetic subscriber ``index``."""
    return f"u{index:07d}@{domain_name(index % domains)}"


def synthetic_ldif(
    subscribers: int, domains: int, *, seed: int = 1, base_dn: str = "dc=mailwarden,dc=test",
    with_base: bool = True,
) -> Iterator[str]:
    """Yield LDIF text for the base, ``domains`` domains and ``subscribers`` users."""
    rng = random.Random(seed)
    domains = max(1, domains)
    if with_base:
        yield (
            f"dn: {base_dn}\nobjectClass: dcObject\nobjectClass: organization\n"
            f"dc: {base_dn.split(',', maxsplit=1)[0].split('=')[1]}\no: synthetic\n\n"
            f"dn: ou=domains,{base_dn}\nobjectClass: organizationalUnit\nou: domains\n\n"
        )
    for d in range(domains):
        name = domain_name(d)
        dn = f"mwDomainName={name},ou=domains,{base_dn}"
        services = "".join(
            f"mwEnabledService: {v}\n" for v in SERVICE_VALUES if rng.random() < 0.5
        )
        yield (
            f"dn: {dn}\nobjectClass: mwDomain\nmwDomainName: {name}\n"
            f"mwDomainAlias: alias-{name}\n{services}"
            f"mwNoticeLanguage: {rng.choice(['en', 'ja'])}\n\n"
            f"dn: ou=users,{dn}\nobjectClass: organizationalUnit\nou: users\n\n"
        )
    for i in range(subscribers):
        address = user_address(i, domains)
        local, dom = address.split("@")
        mask = i % (1 << len(SERVICE_VALUES))
        lines = [
            f"dn: uid={local},ou=users,mwDomainName={dom},ou=domains,{base_dn}",
            "objectClass: inetOrgPerson",
            "objectClass: mwSubscriber",
            f"uid: {local}",
            f"cn: {local}",
            f"sn: {local}",
            f"mail: {address}",
            "userPassword: secret",
        ]
        # Keep the values of one attribute together: slapadd drops a second, separate run.
        on = [v for bit, v in enumerate(SERVICE_VALUES) if mask >> bit & 1]
        lines += [f"mwEnabledService: {v}" for v in on]
        lines += [f"mwDisabledService: {v}" for v in SERVICE_VALUES if v not in on]
        if i % 3 == 0:
            lines.append(f"mwAlternateAddress: alt-{local}@{dom}")
        if i % 5 == 0:
            lines.append(f"mwSpamThreshold: {rng.choice(['3.0', '4.5', '6.0'])}")
        if i % 7 == 0:
            lines.append(f"mwMailHost: mbox{i % 4 + 1}.example")
        yield "\n".join(lines) + "\n\n"
