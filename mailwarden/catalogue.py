"""The catalogue of services and per-subscriber settings mailwarden knows.

This table is the single description of the policy model: the effective-policy
resolver, the LDAP schema generator, the default attribute mapping, the CLI and
the documentation all read it.  Adding a setting means adding one entry here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from mailwarden.address import InvalidAddress, normalize_address
from mailwarden.saferegex import UnsafePattern, check_regex


class Service(StrEnum):
    """A service a domain or subscriber can have switched on."""

    VIRUS_SCAN = "virus_scan"
    SPAM_CHECK = "spam_check"
    KEYWORD_FILTER = "keyword_filter"
    EXTENSION_FILTER = "extension_filter"
    POP_BEFORE_SMTP = "pop_before_smtp"
    SMTP_AUTH = "smtp_auth"
    ARCHIVE = "archive"
    DKIM_SIGNING = "dkim_signing"
    GREYLISTING = "greylisting"
    RATE_LIMITS = "rate_limits"

    @classmethod
    def parse(cls, text: str) -> Service:
        """Accept ``virus_scan``, ``virus-scan`` or ``VIRUS-SCAN``; raise ValueError otherwise."""
        key = text.strip().lower().replace("-", "_")
        try:
            return cls(key)
        except ValueError:
            allowed = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown service {text!r} (known: {allowed})") from None


@dataclass(frozen=True)
class ServiceSpec:
    """How a service is described and stored."""

    service: Service
    ldap_value: str
    description: str
    paid: bool
    """A check a subscriber pays for: a dead backend means tempfail, never a silent pass."""


SERVICES: dict[Service, ServiceSpec] = {
    s.service: s
    for s in (
        ServiceSpec(Service.VIRUS_SCAN, "virus-scan", "scan mail with clamd", paid=True),
        ServiceSpec(Service.SPAM_CHECK, "spam-check", "score mail with spamd or rspamd (milter.spam_engine)",
                    paid=True),
        ServiceSpec(
            Service.KEYWORD_FILTER, "keyword-filter", "subscriber's own keyword rules", paid=True
        ),
        ServiceSpec(
            Service.EXTENSION_FILTER,
            "extension-filter",
            "block attachments by file extension, also inside archives",
            paid=True,
        ),
        ServiceSpec(
            Service.POP_BEFORE_SMTP,
            "pop-before-smtp",
            "a POP3/IMAP login lets the client IP relay for a while",
            paid=False,
        ),
        ServiceSpec(Service.SMTP_AUTH, "smtp-auth", "relay after SMTP AUTH", paid=False),
        ServiceSpec(Service.ARCHIVE, "archive", "keep a copy of all passing mail with its envelope",
                    paid=True),
        ServiceSpec(Service.DKIM_SIGNING, "dkim-signing",
                    "DKIM-sign mail subscribers submit (SMTP AUTH, POP-before-SMTP, internal hosts)",
                    paid=False),
        ServiceSpec(Service.GREYLISTING, "greylisting", "greylist unknown senders", paid=False),
        ServiceSpec(
            Service.RATE_LIMITS, "rate-limits", "limit messages/recipients/bytes", paid=False
        ),
    )
}


class InvalidValue(ValueError):
    """A setting value that does not parse; the message says why."""


# ---------------------------------------------------------------- value types

KEYWORD_SCOPES = ("subject", "from", "to", "headers", "body", "any")
KEYWORD_OPS = ("contains", "regex")
KEYWORD_ACTIONS = ("junk", "reject", "discard", "quarantine")
MAX_PATTERN_LENGTH = 512

JUNK_HEADER = "X-Mailwarden-Junk"
"""The header the milter sets on mail for a recipient's Junk folder (the ``junk`` spam and
keyword actions); the Dovecot Sieve script files mail that carries it into Junk."""


@dataclass(frozen=True)
class KeywordRule:
    """One subscriber keyword rule: ``SCOPE OP ACTION PATTERN``.

    SCOPE is one of KEYWORD_SCOPES or ``header:Name``; matching is case-insensitive.
    """

    scope: str
    op: str
    action: str
    pattern: str

    def __str__(self) -> str:
        return f"{self.scope} {self.op} {self.action} {self.pattern}"

    @classmethod
    def parse(cls, text: str) -> KeywordRule:
        """Parse the stored text form; raise InvalidValue with the reason."""
        parts = text.strip().split(None, 3)
        if len(parts) != 4:
            raise InvalidValue(f"keyword rule {text!r}: expected 'SCOPE OP ACTION PATTERN'")
        scope, op, action, pattern = parts
        scope = scope.lower()
        if not (scope in KEYWORD_SCOPES or re.fullmatch(r"header:[!-9;-~]{1,76}", scope)):
            raise InvalidValue(
                f"keyword rule scope {scope!r}: expected one of "
                f"{', '.join(KEYWORD_SCOPES)} or header:NAME"
            )
        op, action = op.lower(), action.lower()
        if op not in KEYWORD_OPS:
            raise InvalidValue(f"keyword rule op {op!r}: expected one of {', '.join(KEYWORD_OPS)}")
        if action not in KEYWORD_ACTIONS:
            raise InvalidValue(
                f"keyword rule action {action!r}: expected one of {', '.join(KEYWORD_ACTIONS)}"
            )
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise InvalidValue(f"keyword rule pattern longer than {MAX_PATTERN_LENGTH} characters")
        if op == "regex":
            try:
                check_regex(pattern)
            except UnsafePattern as exc:
                raise InvalidValue(f"keyword rule regex {pattern!r}: {exc}") from None
        return cls(scope, op, action, pattern)


Kind = Literal[
    "int", "float", "bool", "enum", "choices", "text", "address", "addresses", "extensions",
    "keyword_rules", "host", "result_actions", "domains",
]
MULTI_KINDS = frozenset({"choices", "addresses", "extensions", "keyword_rules", "result_actions", "domains"})
"""Kinds that hold several values (a multi-valued attribute)."""
Merge = Literal["override", "union"]
Scope = Literal["both", "domain", "user"]

TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})


@dataclass(frozen=True)
class SettingSpec:
    """One per-domain / per-subscriber setting."""

    name: str
    kind: Kind
    default: Any
    description: str
    ldap_attribute: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    merge: Merge = "override"
    scope: Scope = "both"
    max_length: int = 1024
    max_values: int = 200
    service: Service | None = None
    """The service this setting belongs to (for display), if any."""
    end_user: bool = False
    """A subscriber may change it on their own entry (within what their domain allows:
    ``self_service_settings``); the generated slapd ACLs let them write its attribute."""

    @property
    def multi(self) -> bool:
        """Whether the setting holds several values (a multi-valued attribute)."""
        return self.kind in MULTI_KINDS

    def parse(self, raw: Sequence[str]) -> Any:
        """Turn stored string values into the typed value; raise InvalidValue."""
        values = [v for v in raw if v.strip() != ""]
        for v in values:
            if len(v) > self.max_length:
                raise InvalidValue(f"{self.name}: value longer than {self.max_length} characters")
        if self.multi:
            if len(values) > self.max_values:
                raise InvalidValue(f"{self.name}: more than {self.max_values} values")
            return tuple(_ITEM_PARSERS[self.kind](self, v) for v in values)
        if not values:
            raise InvalidValue(f"{self.name}: empty value")
        if len(values) > 1:
            raise InvalidValue(f"{self.name}: single-valued, got {len(values)} values")
        return _ITEM_PARSERS[self.kind](self, values[0])

    def format(self, value: Any) -> list[str]:
        """The stored (LDAP) string form of a typed value."""
        if self.multi:
            return [str(v) for v in value]
        if self.kind == "bool":
            return ["TRUE" if value else "FALSE"]
        return [str(value)]


def _parse_number(spec: SettingSpec, text: str) -> float:
    try:
        number = int(text.strip()) if spec.kind == "int" else float(text.strip())
    except ValueError:
        what = "an integer" if spec.kind == "int" else "a number"
        raise InvalidValue(f"{spec.name}: {text!r} is not {what}") from None
    if not math.isfinite(number):
        raise InvalidValue(f"{spec.name}: {text!r} is not a finite number")
    if spec.minimum is not None and number < spec.minimum:
        raise InvalidValue(f"{spec.name}: {text} is below the minimum {spec.minimum:g}")
    if spec.maximum is not None and number > spec.maximum:
        raise InvalidValue(f"{spec.name}: {text} is above the maximum {spec.maximum:g}")
    return number


def _parse_bool(spec: SettingSpec, text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise InvalidValue(f"{spec.name}: {text!r} is not a boolean (TRUE or FALSE)")


def _parse_choice(spec: SettingSpec, text: str) -> str:
    word = text.strip().lower()
    if word not in spec.choices:
        raise InvalidValue(
            f"{spec.name}: {text!r} is not an allowed value (allowed: {', '.join(spec.choices)})"
        )
    return word


def _parse_text(spec: SettingSpec, text: str) -> str:
    if "\x00" in text:
        raise InvalidValue(f"{spec.name}: NUL byte in value")
    return text


def _parse_address(spec: SettingSpec, text: str) -> str:
    try:
        return normalize_address(text)
    except InvalidAddress as exc:
        raise InvalidValue(f"{spec.name}: {exc}") from None


def _parse_sender_pattern(spec: SettingSpec, text: str) -> str:
    value = text.strip()
    neg = value.startswith("!")
    body = value[1:] if neg else value
    if body.startswith("@"):
        try:
            domain = normalize_address("x" + body).split("@", 1)[1]
        except InvalidAddress as exc:
            raise InvalidValue(f"{spec.name}: {exc}") from None
        return ("!" if neg else "") + "@" + domain
    return ("!" if neg else "") + _parse_address(spec, body)


def _parse_extension(spec: SettingSpec, text: str) -> str:
    value = text.strip().lower()
    neg = value.startswith("!")
    ext = value[1:] if neg else value
    ext = ext.lstrip(".")
    if not re.fullmatch(r"[a-z0-9_~$-]{1,16}", ext):
        raise InvalidValue(f"{spec.name}: {text!r} is not a file extension")
    return ("!" if neg else "") + ext


HOSTS_WITHOUT_PORT: dict[str, str] = {
    "legacy_mailbox_host": "ports come from render.legacy_pop3_port / legacy_imap_port",
}
"""Host settings that name a host alone, and where their ports come from instead."""


def _parse_host(spec: SettingSpec, text: str) -> str:
    value = text.strip().lower()
    if not re.fullmatch(r"(\[[0-9a-f.:]+\]|[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?)(:[0-9]{1,5})?", value):
        raise InvalidValue(f"{spec.name}: {text!r} is not a host name")
    if spec.name in HOSTS_WITHOUT_PORT and (":" in value or value.startswith("[")):
        raise InvalidValue(f"{spec.name}: {text!r} has a port or brackets; give the host name or "
                           f"address alone ({HOSTS_WITHOUT_PORT[spec.name]})")
    return value


def _parse_domain(spec: SettingSpec, text: str) -> str:
    value = text.strip().lower().rstrip(".")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+", value):
        raise InvalidValue(f"{spec.name}: {text!r} is not a domain name")
    return value


def _parse_keyword(spec: SettingSpec, text: str) -> KeywordRule:
    return KeywordRule.parse(text)


SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror")
"""SPF results an action can be chosen for (temperror is a backend failure)."""
SPF_ACTIONS = ("reject", "tempfail", "tag", "dunno")


def _parse_result_action(spec: SettingSpec, text: str) -> str:
    """``result=action`` (``softfail=reject``), normalised to lower case."""
    result, sep, action = text.strip().lower().partition("=")
    result, action = result.strip(), action.strip()
    if not sep or result not in SPF_RESULTS or action not in SPF_ACTIONS:
        raise InvalidValue(
            f"{spec.name}: {text!r} is not RESULT=ACTION with RESULT one of {', '.join(SPF_RESULTS)} "
            f"and ACTION one of {', '.join(SPF_ACTIONS)}"
        )
    return f"{result}={action}"


_ITEM_PARSERS: dict[str, Callable[[SettingSpec, str], Any]] = {
    "int": lambda s, t: int(_parse_number(s, t)),
    "float": _parse_number,
    "bool": _parse_bool,
    "enum": _parse_choice,
    "choices": _parse_choice,
    "text": _parse_text,
    "address": _parse_address,
    "addresses": _parse_sender_pattern,
    "extensions": _parse_extension,
    "keyword_rules": _parse_keyword,
    "host": _parse_host,
    "result_actions": _parse_result_action,
    "domains": _parse_domain,
}

MIGRATION_STATES = ("legacy", "syncing", "migrated")
"""A domain's ``migration_state``: mail served by the legacy system, served there while its
mailboxes are copied, or served by the mailbox hosts."""
LEGACY_STATES = frozenset({"legacy", "syncing"})
"""The states in which the legacy system still receives and serves the domain's mail."""

DEFAULT_BANNED_EXTENSIONS = (
    "exe", "scr", "pif", "com", "bat", "cmd", "vbs", "vbe", "js", "jse", "wsf", "wsh", "hta",
    "cpl", "msi", "lnk", "jar", "ps1", "reg",
)

END_USER_SETTINGS = (
    "spam_threshold", "spam_action", "keyword_rules", "sender_allowlist", "sender_blocklist",
    "forward_addresses", "forward_keep_copy", "vacation_active", "vacation_subject",
    "vacation_text", "vacation_period_days",
)
"""The settings marked ``end_user`` below (checked by the catalogue tests)."""

_S = SettingSpec
SETTINGS: dict[str, SettingSpec] = {
    s.name: s
    for s in (
        _S("spam_threshold", "float", 5.0, "spam engine score at or above which mail is spam",
           "mwSpamThreshold", minimum=-100, maximum=1000, service=Service.SPAM_CHECK, end_user=True),
        _S("spam_action", "enum", "junk", "what happens to spam below the reject score",
           "mwSpamAction", choices=("tag", "subject", "junk", "reject"),
           service=Service.SPAM_CHECK, end_user=True),
        _S("spam_reject_score", "float", 15.0,
           "score at or above which spam is refused at SMTP (above 1000: never)",
           "mwSpamRejectScore", minimum=-100, maximum=1_000_000, service=Service.SPAM_CHECK),
        _S("spam_subject_tag", "text", "[SPAM]", "tag put before the Subject of spam",
           "mwSpamSubjectTag", max_length=64, service=Service.SPAM_CHECK),
        _S("spam_failure_action", "enum", "tempfail", "spam engine down or slow: tempfail or accept",
           "mwSpamFailureAction", choices=("tempfail", "accept"), service=Service.SPAM_CHECK),
        _S("virus_action", "enum", "reject", "what happens to infected mail",
           "mwVirusAction", choices=("reject", "discard", "quarantine"),
           service=Service.VIRUS_SCAN),
        _S("virus_failure_action", "enum", "tempfail", "clamd down or timing out: tempfail or accept",
           "mwVirusFailureAction", choices=("tempfail", "accept"), service=Service.VIRUS_SCAN),
        _S("unscannable_action", "enum", "auto",
           "mail that cannot be scanned (too big, archive bomb, encrypted archive); auto: reject "
           "what a retry cannot change, tempfail what may pass later (the clamd scan-time limit)",
           "mwUnscannableAction", choices=("auto", "tempfail", "reject", "accept"),
           service=Service.VIRUS_SCAN),
        _S("notice_recipients", "choices", ("recipient",),
           "who receives virus / banned-attachment notices", "mwNoticeRecipient",
           choices=("recipient", "sender", "admin", "none"), max_values=3, service=Service.VIRUS_SCAN),
        _S("notice_language", "enum", "en", "language of notices", "mwNoticeLanguage",
           choices=("en", "ja")),
        _S("notice_template", "text", "default", "template set used for notices",
           "mwNoticeTemplate", max_length=64),
        _S("admin_address", "address", "", "the domain administrator's address",
           "mwAdminAddress", scope="domain"),
        _S("banned_extensions", "extensions", DEFAULT_BANNED_EXTENSIONS,
           "attachment extensions refused; '!ext' removes an inherited one",
           "mwBannedExtension", merge="union", service=Service.EXTENSION_FILTER),
        _S("extension_action", "enum", "reject", "banned attachment: reject or strip the part",
           "mwExtensionAction", choices=("reject", "strip"), service=Service.EXTENSION_FILTER),
        _S("keyword_rules", "keyword_rules", (), "keyword rules 'SCOPE OP ACTION PATTERN'",
           "mwKeywordRule", merge="union", max_values=100, service=Service.KEYWORD_FILTER, end_user=True),
        _S("mail_host", "host", "", "mailbox host that stores this subscriber's mail",
           "mwMailHost", max_length=255),
        _S("quota", "int", 0, "mailbox quota in bytes (0 = unlimited)", "mwQuota",
           minimum=0, maximum=2**53),
        _S("forward_addresses", "addresses", (), "addresses mail is forwarded to",
           "mwForwardAddress", scope="user", max_values=20, end_user=True),
        _S("forward_keep_copy", "bool", True, "keep a copy in the mailbox when forwarding",
           "mwForwardKeepCopy", end_user=True),
        _S("vacation_active", "bool", False, "answer incoming mail with the vacation text",
           "mwVacationActive", scope="user", end_user=True),
        _S("vacation_subject", "text", "Out of office", "subject of the vacation reply",
           "mwVacationSubject", scope="user", max_length=200, end_user=True),
        _S("vacation_text", "text", "", "body of the vacation reply", "mwVacationText",
           scope="user", max_length=8000, end_user=True),
        _S("vacation_period_days", "int", 7, "answer one sender at most once per this many days",
           "mwVacationPeriod", minimum=1, maximum=365, end_user=True),
        _S("archive_address", "address", "",
           "the archive mailbox copies of passing mail go to: an account with mwAccountStatus "
           "archive (saved there by the milter, never reachable by SMTP)",
           "mwArchiveAddress", service=Service.ARCHIVE),
        _S("archive_direction", "enum", "both",
           "what is archived: inbound (mail to this address or domain), outbound (mail its "
           "subscribers submit) or both", "mwArchiveDirection", choices=("inbound", "outbound", "both"),
           service=Service.ARCHIVE),
        _S("archive_retention_days", "int", 2557,
           "days an archived message is kept (mailwarden archive expire removes older ones)",
           "mwArchiveRetention", minimum=1, maximum=36500, scope="domain", service=Service.ARCHIVE),
        _S("archive_failure_action", "enum", "tempfail",
           "the archive mailbox does not accept a copy: tempfail (451; nothing is delivered "
           "unarchived) or accept (delivered without the copy, logged)", "mwArchiveFailureAction",
           choices=("tempfail", "accept"), service=Service.ARCHIVE),
        _S("rate_limit_window", "int", 3600, "rate-limit window in seconds",
           "mwRateLimitWindow", minimum=1, maximum=86400 * 7, service=Service.RATE_LIMITS),
        _S("rate_limit_messages", "int", 300, "messages per window (0 = unlimited)",
           "mwRateLimitMessages", minimum=0, maximum=10**9, service=Service.RATE_LIMITS),
        _S("rate_limit_recipients", "int", 1000, "recipients per window (0 = unlimited)",
           "mwRateLimitRecipients", minimum=0, maximum=10**9, service=Service.RATE_LIMITS),
        _S("rate_limit_bytes", "int", 200 * 1024 * 1024, "bytes per window (0 = unlimited)",
           "mwRateLimitBytes", minimum=0, maximum=2**53, service=Service.RATE_LIMITS),
        _S("pop_before_smtp_ttl", "int", 1800, "seconds a POP/IMAP login lets its IP relay",
           "mwPopBeforeSmtpTtl", minimum=10, maximum=86400, service=Service.POP_BEFORE_SMTP),
        _S("allowed_senders", "addresses", (),
           "extra envelope senders ('user@dom' or '@dom') an SMTP-AUTH login may use",
           "mwAllowedSender", merge="union", service=Service.SMTP_AUTH),
        _S("sender_allowlist", "addresses", (),
           "senders ('user@dom' or '@dom') whose mail skips spam and keyword filtering (never virus "
           "scanning) and greylisting; matched on an authenticated envelope sender or From",
           "mwSenderAllow", merge="union", max_values=500, end_user=True),
        _S("sender_blocklist", "addresses", (),
           "envelope senders ('user@dom' or '@dom') refused at RCPT", "mwSenderBlock", merge="union",
           max_values=500, end_user=True),
        _S("greylist_delay", "int", 300, "seconds before a greylisted triplet is accepted",
           "mwGreylistDelay", minimum=0, maximum=86400, service=Service.GREYLISTING),
        _S("spf_actions", "result_actions", (),
           "what mail to this domain gets per SPF result of an unauthenticated sender, "
           "'RESULT=ACTION' (softfail=reject); unlisted results follow [policyd.spf]",
           "mwSpfAction", scope="domain", max_values=len(SPF_RESULTS)),
        _S("dmarc_action", "enum", "honour",
           "mail to this domain failing the sender domain's DMARC p=reject / p=quarantine: honour "
           "(refuse / file as junk), tag (delivered; Authentication-Results says dmarc=fail and "
           "the log notes it) or ignore",
           "mwDmarcAction", choices=("honour", "tag", "ignore"), scope="domain"),
        _S("dmarc_temperror_action", "enum", "auto",
           "mail to this domain whose sender's DNS could not answer for DMARC (temperror): tempfail "
           "(451, the sender retries), accept (delivered, recorded), or auto: tempfail when the "
           "sender domain publishes p=reject, accept otherwise",
           "mwDmarcTempErrorAction", choices=("auto", "tempfail", "accept"), scope="domain"),
        _S("arc_trusted_sealers", "domains", (),
           "ARC sealers (mailing lists, forwarders) whose valid chain and recorded dmarc=pass "
           "override a DMARC fail for mail to this domain",
           "mwArcTrustedSealer", scope="domain", max_values=100),
        _S("self_service_settings", "choices", END_USER_SETTINGS,
           "settings the domain's subscribers may change themselves (of those the catalogue "
           "allows them)", "mwSelfServiceSetting", choices=END_USER_SETTINGS, scope="domain",
           max_values=len(END_USER_SETTINGS)),
        _S("delegated_services", "choices", tuple(s.value for s in Service),
           "services the domain's administrators may switch on the domain and its subscribers "
           "(set by a system administrator)", "mwDelegatedService",
           choices=tuple(s.value for s in Service), scope="domain", max_values=len(Service)),
        _S("dkim_selector", "text", "",
           "DKIM selector used when signing for this domain (ed25519: SELECTOR-ed25519)",
           "mwDkimSelector", scope="domain", max_length=63, service=Service.DKIM_SIGNING),
        _S("arc_seal_forwards", "bool", False,
           "ARC-seal mail this domain's subscribers forward elsewhere (with the dkim_selector key)",
           "mwArcSealForwards", scope="domain", service=Service.DKIM_SIGNING),
        _S("migration_state", "enum", "migrated",
           "where the domain's mail lives while it moves from a legacy system: legacy or syncing "
           "(inbound mail relayed to legacy_mx, POP3/IMAP proxied to legacy_mailbox_host) or "
           "migrated (served by the mailbox hosts); changed by mailwarden migrate",
           "mwMigrationState", choices=MIGRATION_STATES, scope="domain"),
        _S("legacy_mx", "host", "",
           "the legacy system's MX for a legacy or syncing domain, as a Postfix next hop "
           "('[address]:port' or '[name]', or a name whose MX records are used)",
           "mwLegacyMx", scope="domain", max_length=255),
        _S("legacy_mailbox_host", "host", "",
           "the legacy POP3/IMAP server a legacy or syncing domain's logins are proxied to "
           "(ports: render.legacy_pop3_port / legacy_imap_port)",
           "mwLegacyMailboxHost", scope="domain", max_length=255),
    )
}


@dataclass(frozen=True)
class IdentitySpec:
    """A directory attribute that identifies or routes, rather than configures."""

    name: str
    ldap_attribute: str
    description: str
    on: Literal["domain", "user"]
    multi: bool = False
    syntax: Literal["ia5", "text"] = "ia5"
    extra: dict[str, str] = field(default_factory=dict)


IDENTITY: dict[str, IdentitySpec] = {
    s.name: s
    for s in (
        IdentitySpec("domain_name", "mwDomainName", "name of the domain", "domain"),
        IdentitySpec("domain_alias", "mwDomainAlias", "other names of the domain", "domain",
                     multi=True),
        IdentitySpec("mail", "mail", "the subscriber's primary address", "user"),
        IdentitySpec("alternate_address", "mwAlternateAddress",
                     "other addresses (aliases) of the subscriber", "user", multi=True),
        IdentitySpec("account_status", "mwAccountStatus",
                     "'active' or anything else (disabled, locked, ...)", "user",
                     syntax="text"),
        IdentitySpec("enabled_service", "mwEnabledService", "services switched on here",
                     "user", multi=True),
        IdentitySpec("disabled_service", "mwDisabledService",
                     "services switched off here, overriding the domain", "user", multi=True),
        IdentitySpec("legacy_password", "mwLegacyPassword",
                     "password hash taken over from a legacy system, '{SCHEME}hash' in a scheme "
                     "Dovecot verifies (CRYPT, MD5-CRYPT, SHA256-CRYPT, SHA512-CRYPT, SSHA)", "user"),
    )
}


def concept_names() -> list[str]:
    """All names that an attribute mapping may map to an LDAP attribute."""
    return [*IDENTITY, *SETTINGS]


def default_attribute_map() -> dict[str, str]:
    """The shipped schema's attribute for every concept."""
    mapping = {n: s.ldap_attribute for n, s in IDENTITY.items()}
    mapping.update({n: s.ldap_attribute for n, s in SETTINGS.items()})
    return mapping


def default_service_values() -> dict[str, str]:
    """The shipped schema's stored value for every service."""
    return {s.value: spec.ldap_value for s, spec in SERVICES.items()}
