"""Generate mailwarden's LDAP schema (OpenLDAP cn=config LDIF) from the catalogue.

OIDs live under a UUID-derived arc, ``2.25.<uuid>`` (ITU-T X.667), which needs
no registration: ``.1.N`` are attribute types, ``.2.N`` object classes.
Numbers are fixed here once and never reused.
"""

from __future__ import annotations

from mailwarden.catalogue import IDENTITY, SETTINGS, SettingSpec

OID_ROOT = "2.25.268388836476488653415019509139712676931"

ATTRIBUTE_NUMBERS: dict[str, int] = {
    "mwDomainName": 1,
    "mwDomainAlias": 2,
    "mwAlternateAddress": 3,
    "mwAccountStatus": 4,
    "mwEnabledService": 5,
    "mwDisabledService": 6,
    "mwSpamThreshold": 10,
    "mwSpamAction": 11,
    "mwSpamRejectScore": 12,
    "mwSpamSubjectTag": 13,
    "mwSpamFailureAction": 14,
    "mwVirusAction": 20,
    "mwVirusFailureAction": 21,
    "mwUnscannableAction": 22,
    "mwNoticeRecipient": 23,
    "mwNoticeLanguage": 24,
    "mwNoticeTemplate": 25,
    "mwAdminAddress": 26,
    "mwBannedExtension": 30,
    "mwExtensionAction": 31,
    "mwKeywordRule": 32,
    "mwMailHost": 40,
    "mwQuota": 41,
    "mwForwardAddress": 42,
    "mwForwardKeepCopy": 43,
    "mwVacationActive": 44,
    "mwVacationSubject": 45,
    "mwVacationText": 46,
    "mwVacationPeriod": 47,
    "mwArchiveAddress": 48,
    "mwRateLimitWindow": 50,
    "mwRateLimitMessages": 51,
    "mwRateLimitRecipients": 52,
    "mwRateLimitBytes": 53,
    "mwPopBeforeSmtpTtl": 54,
    "mwAllowedSender": 55,
    "mwGreylistDelay": 56,
    "mwDkimSelector": 57,
    "mwSpfAction": 58,
    "mwDmarcAction": 59,
    "mwDmarcTempErrorAction": 60,
    "mwArcTrustedSealer": 61,
    "mwArcSealForwards": 62,
    "mwArchiveDirection": 63,
    "mwArchiveRetention": 64,
    "mwArchiveFailureAction": 65,
    "mwSenderAllow": 66,
    "mwSenderBlock": 67,
    "mwSelfServiceSetting": 68,
    "mwDelegatedService": 69,
    "mwAuditId": 80,
    "mwAuditActor": 81,
    "mwAuditOrigin": 82,
    "mwAuditTarget": 83,
    "mwAuditDomain": 84,
    "mwAuditChange": 85,
    "mwAuditTime": 86,
    "mwMigrationState": 70,
    "mwLegacyMx": 71,
    "mwLegacyMailboxHost": 72,
    "mwLegacyPassword": 73,
}
CLASS_NUMBERS = {"mwDomain": 1, "mwSubscriber": 2, "mwAuditRecord": 3}

AUDIT_ATTRIBUTES: dict[str, tuple[str, str, bool]] = {
    # name: (description, syntax key, single-valued)
    "mwAuditId": ("unique name of an audit record", "ia5", True),
    "mwAuditActor": ("login of the person who made the change", "text", True),
    "mwAuditOrigin": ("where the change came from: cli USER@HOST or web ADDRESS", "text", True),
    "mwAuditTarget": ("DN of the changed entry", "dn", True),
    "mwAuditDomain": ("domain of the changed entry", "ia5", True),
    "mwAuditChange": ("one changed attribute as JSON: name, old and new values", "exact", False),
    "mwAuditTime": ("when the change was made", "time", True),
}
"""The audit record's attributes (mailwarden.audit); not settings, so not in the catalogue."""

_IA5 = "EQUALITY caseIgnoreIA5Match SUBSTR caseIgnoreIA5SubstringsMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.26"
_TEXT = "EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15"
_EXACT_TEXT = "EQUALITY caseExactMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15"
_INT = "EQUALITY integerMatch ORDERING integerOrderingMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27"
_BOOL = "EQUALITY booleanMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.7"
_DN = "EQUALITY distinguishedNameMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.12"
_TIME = ("EQUALITY generalizedTimeMatch ORDERING generalizedTimeOrderingMatch "
         "SYNTAX 1.3.6.1.4.1.1466.115.121.1.24")
_AUDIT_SYNTAX = {"ia5": "", "text": "", "dn": _DN, "exact": _EXACT_TEXT, "time": _TIME}


def _syntax(spec: SettingSpec) -> str:
    if spec.kind == "int":
        return _INT
    if spec.kind == "bool":
        return _BOOL
    if spec.kind in ("address", "addresses", "host", "extensions", "enum", "choices", "result_actions",
                     "domains"):
        return _IA5
    if spec.kind == "keyword_rules":
        return _EXACT_TEXT
    return _TEXT


def _attribute(name: str, desc: str, syntax: str, single: bool) -> str:
    oid = f"{OID_ROOT}.1.{ATTRIBUTE_NUMBERS[name]}"
    desc = desc.replace("'", "").replace("\\", "")
    return f"( {oid} NAME '{name}' DESC '{desc}' {syntax}{' SINGLE-VALUE' if single else ''} )"


def attribute_types() -> list[str]:
    """The attribute type definitions, in OID order."""
    defs: dict[str, str] = {}
    for ident in IDENTITY.values():
        if ident.ldap_attribute == "mail":
            continue  # the standard cosine attribute
        syntax = _IA5 if ident.syntax == "ia5" else _TEXT
        defs[ident.ldap_attribute] = _attribute(
            ident.ldap_attribute, ident.description, syntax, not ident.multi
        )
    for spec in SETTINGS.values():
        defs[spec.ldap_attribute] = _attribute(
            spec.ldap_attribute, spec.description, _syntax(spec), not spec.multi
        )
    for name, (desc, key, single) in AUDIT_ATTRIBUTES.items():
        syntax = _AUDIT_SYNTAX[key] or (_IA5 if key == "ia5" else _TEXT)
        defs[name] = _attribute(name, desc, syntax, single)
    return [defs[n] for n in sorted(defs, key=ATTRIBUTE_NUMBERS.__getitem__)]


def object_classes() -> list[str]:
    """The mwDomain (structural) and mwSubscriber (auxiliary) classes."""
    domain_may = ["mwDomainAlias", "mwEnabledService", "mwDisabledService", "description"]
    user_may = ["mwAlternateAddress", "mwAccountStatus", "mwEnabledService", "mwDisabledService",
                "mwLegacyPassword"]
    for spec in SETTINGS.values():
        if spec.scope in ("both", "domain"):
            domain_may.append(spec.ldap_attribute)
        if spec.scope in ("both", "user"):
            user_may.append(spec.ldap_attribute)
    root = f"{OID_ROOT}.2"
    return [
        f"( {root}.{CLASS_NUMBERS['mwDomain']} NAME 'mwDomain' DESC 'a hosted mail domain "
        f"and its defaults' SUP top STRUCTURAL MUST mwDomainName MAY ( {' $ '.join(domain_may)} ) )",
        f"( {root}.{CLASS_NUMBERS['mwSubscriber']} NAME 'mwSubscriber' DESC 'mailwarden "
        f"settings of a subscriber' SUP top AUXILIARY MAY ( mail $ {' $ '.join(user_may)} ) )",
        f"( {root}.{CLASS_NUMBERS['mwAuditRecord']} NAME 'mwAuditRecord' DESC 'one change made "
        "through mailwarden' SUP top STRUCTURAL MUST ( mwAuditId $ mwAuditActor $ mwAuditTarget $ "
        "mwAuditTime ) MAY ( mwAuditOrigin $ mwAuditDomain $ mwAuditChange ) )",
    ]


def fold_ldif(line: str) -> str:
    """Fold an LDIF line at 76 columns (continuation lines start with one space)."""
    out, rest = [line[:76]], line[76:]
    while rest:
        out.append(" " + rest[:75])
        rest = rest[75:]
    return "\n".join(out)


def schema_ldif() -> str:
    """The cn=config schema entry, ready for ``ldapadd -Y EXTERNAL -H ldapi:///``."""
    lines = [
        "# mailwarden LDAP schema (generated by `mailwarden ldap schema`; do not edit)",
        f"# OID arc {OID_ROOT} (ITU-T X.667 UUID arc): .1.N attributes, .2.N classes",
        "dn: cn=mailwarden,cn=schema,cn=config",
        "objectClass: olcSchemaConfig",
        "cn: mailwarden",
    ]
    lines += [fold_ldif(f"olcAttributeTypes: {a}") for a in attribute_types()]
    lines += [fold_ldif(f"olcObjectClasses: {c}") for c in object_classes()]
    return "\n".join(lines) + "\n"
