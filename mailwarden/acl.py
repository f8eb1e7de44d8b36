"""Generate the slapd access rules (``olcAccess``) of the mail tree from the catalogue.

Together with :mod:`mailwarden.schema` this is the one source of who may read and
write what in the directory (``mailwarden ldap acl`` prints them; ``ldap/acl.ldif`` is
the shipped copy for ``dc=mailwarden,dc=test``).  The tiers (see :mod:`mailwarden.access`
for the layout):

- system administrators (``cn=system-admins,ou=groups``): everything;
- helpdesk (``cn=helpdesk,ou=groups``): read everything except passwords; write the
  per-user services and settings of every subscriber; not domain entries, not admins;
- a domain's administrators (``cn=admins`` below the domain): read and write their own
  domain's subtree — users, aliases, passwords, settings, the domain's own entry except
  its name, ``delegated_services`` and the migration settings; write (not read) a
  subscriber's legacy password hash; read (not change) the domain's admin group;
- an end user (``self``): read their own entry and domain entry, write the attributes of
  the settings the catalogue marks ``end_user`` and their password;
- the daemons' service account (``cn=mailwarden,ou=services``): read everything except
  passwords and the audit log;
- anonymous: nothing but authentication (a bind).

The daemons' account is answered by the third and fourth rules, before any rule that
names a group: slapd evaluates group membership per returned attribute, which made
lookups about three times as expensive when those rules came first (bench/bench_acl.py).

Audit records (``ou=audit`` below a domain) can be added by whoever may change the
domain's entries, read by the domain's administrators, helpdesk and system
administrators, and changed or removed by system administrators only.
"""

from __future__ import annotations

from mailwarden.access import (
    DOMAIN_ADMIN_GROUP,
    HELPDESK_GROUP,
    SERVICE_ACCOUNT,
    SYSTEM_ADMIN_GROUP,
    SYSTEM_ADMIN_ONLY,
)
from mailwarden.catalogue import IDENTITY, SETTINGS
from mailwarden.schema import fold_ldif

_ERE_SPECIAL = set(".[]()*+?{}|^$\\")


def _ere(text: str) -> str:
    """``text`` as a literal in a POSIX extended regular expression (slapd's ``dn.regex``)."""
    return "".join("\\" + c if c in _ERE_SPECIAL else c for c in text)


def end_user_attributes() -> list[str]:
    """The attributes of the settings subscribers may change themselves."""
    return [s.ldap_attribute for s in SETTINGS.values() if s.end_user]


LEGACY_PASSWORD = IDENTITY["legacy_password"].ldap_attribute
"""A password hash taken over from a legacy system: only Dovecot (the daemons' account)
reads it, as slapd never shows ``userPassword``; administrators of the domain write it."""


def subscriber_attributes() -> list[str]:
    """The per-user services and settings (what helpdesk may change), end-user ones excluded."""
    own = [IDENTITY["enabled_service"].ldap_attribute, IDENTITY["disabled_service"].ldap_attribute]
    return own + [s.ldap_attribute for s in SETTINGS.values()
                  if s.scope in ("both", "user") and not s.end_user]


def system_admin_domain_attributes() -> list[str]:
    """Attributes of a domain entry only a system administrator writes: its name, what its
    administrators may switch, and where its mail is routed while it migrates."""
    return [IDENTITY["domain_name"].ldap_attribute,
            *(SETTINGS[name].ldap_attribute for name in sorted(SYSTEM_ADMIN_ONLY))]


def acl_rules(base_dn: str) -> list[str]:
    """The ``olcAccess`` values (without the ``{N}`` ordering prefix), first match wins."""
    base = base_dn
    rb = _ere(base)
    sysadm = f'group.exact="{SYSTEM_ADMIN_GROUP.format(base_dn=base)}"'
    desk = f'group.exact="{HELPDESK_GROUP.format(base_dn=base)}"'
    svc = f'dn.exact="{SERVICE_ACCOUNT.format(base_dn=base)}"'

    def dadm(n: int) -> str:
        return f'group.expand="{DOMAIN_ADMIN_GROUP.format(domain_dn=f"mwDomainName=${n},ou=domains,{base}")}"'

    def members(n: int) -> str:
        return f'dn.subtree,expand="ou=users,mwDomainName=${n},ou=domains,{base}"'

    domain = f"mwDomainName=([^,]+),ou=domains,{rb}"
    user = f"[^,]+,ou=users,{domain}"
    return [
        f'to dn.subtree="ou=audit,{base}" by {sysadm} manage by {desk} read by * none',
        f'to dn.regex="^(.+,)?ou=audit,{domain}$" by {sysadm} manage by {desk} =rsca '
        f"by {dadm(2)} =rsca by {members(2)} =a by * none",
        # The daemons' lookups stop here, before any group membership is evaluated: their
        # cost is that of a plain "read" rule.
        f"to attrs=userPassword by {svc} none by * break",
        f'to dn.subtree="ou=domains,{base}" by {svc} read by * break',
        f'to dn.regex="^{user}$" attrs=userPassword by {sysadm} write by {dadm(1)} write '
        "by self write by anonymous auth by * none",
        f"to attrs=userPassword by {sysadm} write by self write by anonymous auth by * none",
        f'to dn.regex="^{_ere(DOMAIN_ADMIN_GROUP.format(domain_dn=""))}{domain}$" '
        f"by {sysadm} write by {desk} read by {dadm(1)} read by {svc} read by * none",
        f'to dn.regex="^{domain}$" attrs={",".join(system_admin_domain_attributes())} '
        f"by {sysadm} write by {desk} read by {dadm(1)} read by {svc} read by {members(1)} read "
        "by * none",
        f'to dn.regex="^{domain}$" by {sysadm} write by {desk} read by {dadm(1)} write '
        f"by {svc} read by {members(1)} read by * none",
        # Written (=w), never read, by the domain's administrators.
        f'to dn.regex="^{user}$" attrs={LEGACY_PASSWORD} by {sysadm} write by {dadm(1)} =w '
        "by * none",
        f'to dn.regex="^{user}$" attrs={",".join(end_user_attributes())} by {sysadm} write '
        f"by {desk} write by {dadm(1)} write by self write by {svc} read by * none",
        f'to dn.regex="^{user}$" attrs={",".join(subscriber_attributes())} by {sysadm} write '
        f"by {desk} write by {dadm(1)} write by self read by {svc} read by * none",
        f'to dn.regex="^(.+,)?{domain}$" by {sysadm} write by {desk} read by {dadm(2)} write '
        f"by self read by {svc} read by * none",
        f'to dn.base="ou=domains,{base}" by {sysadm} write by users read by * none',
        f'to dn.base="{base}" by {sysadm} write by users read by * none',
        f"to * by {sysadm} write by {desk} read by {svc} read by self read by * none",
    ]


def acl_ldif(base_dn: str, database_dn: str = "olcDatabase={1}mdb,cn=config") -> str:
    """An LDIF change replacing the database's ``olcAccess`` with :func:`acl_rules`, ready
    for ``ldapmodify -Y EXTERNAL -H ldapi:///``."""
    lines = [
        "# mailwarden slapd access rules (generated by `mailwarden ldap acl`; do not edit)",
        f"# for base DN {base_dn}; regenerate with --base-dn and --database for another tree",
        f"dn: {database_dn}",
        "changetype: modify",
        "replace: olcAccess",
    ]
    lines += [fold_ldif(f"olcAccess: {{{i}}}{rule}") for i, rule in enumerate(acl_rules(base_dn))]
    return "\n".join(lines) + "\n"
