"""The ``[policyd]`` configuration section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mailwarden import catalogue
from mailwarden.config import Config
from mailwarden.configfields import setting

if TYPE_CHECKING:
    from mailwarden.renderconfig import PolicydWiring
    from mailwarden.reputation import ReputationSettings

FailureAction = Literal["tempfail", "dunno"]


@dataclass(frozen=True)
class RelayConfig:
    """Relay gate: who may send to domains not hosted here."""

    failure_action: FailureAction = setting(
        "tempfail", "directory or store down: tempfail (451 4.3.0) or dunno"
    )
    pop_before_smtp: bool = setting(True, "a live POP-before-SMTP window lets its client IP relay")


@dataclass(frozen=True)
class SenderLoginConfig:
    """SMTP-AUTH: the envelope sender must belong to the login."""

    failure_action: FailureAction = setting(
        "tempfail", "directory down: tempfail (451 4.3.0) or dunno"
    )
    exempt_login_domains: list[str] = setting(
        None, "logins of these domains may use any envelope sender", factory=list
    )
    allow_null_sender: bool = setting(True, "an authenticated client may send with MAIL FROM:<>")


@dataclass(frozen=True)
class RateScopeConfig:
    """Limits for one counting scope (0 = unlimited)."""

    window: int = setting(3600, "window in seconds (fixed, starting at the first message)")
    messages: int = setting(0, "messages per window")
    recipients: int = setting(0, "recipients per window")
    bytes: int = setting(0, "bytes per window")


@dataclass(frozen=True)
class RateLimitConfig:
    """Flow control per SASL / POP-before-SMTP user, sender domain and client IP."""

    failure_action: FailureAction = setting("dunno", "store or directory down: tempfail or dunno")
    client: RateScopeConfig = setting(
        None,
        "per client IP, for clients that are not trusted and not authenticated",
        factory=lambda: RateScopeConfig(window=3600, messages=5000, recipients=20000, bytes=0),
    )
    sender_domain: RateScopeConfig = setting(
        None,
        "per hosted sender domain, all its authenticated users together",
        factory=RateScopeConfig,
    )


SPF_RESULTS = (*catalogue.SPF_RESULTS, "temperror")
SPF_ACTIONS = catalogue.SPF_ACTIONS


@dataclass(frozen=True)
class SpfConfig:
    """SPF of the envelope sender for mail from unauthenticated clients."""

    failure_action: FailureAction = setting(
        "tempfail", "DNS temporary error (SPF temperror): tempfail (451 4.4.3) or dunno"
    )
    actions: dict[str, str] = setting(
        None,
        "SPF result -> reject, tempfail, tag (PREPEND Received-SPF) or dunno",
        factory=lambda: {
            "pass": "tag", "fail": "reject", "softfail": "tag", "neutral": "tag",
            "none": "tag", "permerror": "tag",
        },
    )
    domains: dict[str, dict[str, str]] = setting(
        None,
        "per recipient domain: SPF result -> action, overriding actions "
        "(a table per domain: softfail = 'reject')",
        factory=dict,
    )
    lookup_timeout: float = setting(8.0, "seconds one SPF evaluation may take in all")


@dataclass(frozen=True)
class ReputationConfig:
    """DNSBL zones and mailwarden's own per-IP reputation."""

    failure_action: FailureAction = setting("dunno", "DNS or store down: tempfail or dunno")
    dnsbl_zones: list[str] = setting(None, "DNSBL zones to query (A records)", factory=list)
    dnsbl_hits_to_reject: int = setting(1, "zones that must list the client to reject it")
    tempfail_score: float = setting(10.0, "own reputation score at which clients get 450 4.7.1")
    reject_score: float = setting(25.0, "own reputation score at which clients get 554 5.7.1")
    network_reject_score: float = setting(
        80.0, "score of the client's network (/24, /64) at which it gets 554 5.7.1"
    )
    half_life: float = setting(86400.0, "seconds after which a recorded outcome counts half")
    weights: dict[str, float] = setting(
        None,
        "score added per outcome (rejected, spam, virus, clean)",
        factory=lambda: {"rejected": 1.0, "spam": 3.0, "virus": 5.0, "clean": -0.5},
    )
    ipv4_prefix: int = setting(24, "IPv4 network size for the network score")
    ipv6_prefix: int = setting(64, "IPv6 network size for the network score")
    allow_networks: list[str] = setting(
        None, "clients (IPs or CIDRs) the reputation check never refuses (besides the store's "
        "list: mailwarden reputation allow)", factory=list,
    )
    deny_networks: list[str] = setting(
        None, "clients (IPs or CIDRs) always refused with 554 5.7.1 (besides mailwarden reputation deny)",
        factory=list,
    )
    dnswl_zones: list[str] = setting(
        None, "DNS allow lists (DNSWL-style, A 127.0.X.TRUST): a listed client is not refused for "
        "its network's score or DNSBL listings", factory=list,
    )
    dnswl_min_trust: int = setting(1, "lowest DNSWL trust level (0 none .. 3 high) that counts")
    provider_domains: list[str] = setting(
        None, "large mailbox providers: a client passing SPF for one of them as envelope sender is "
        "not refused for its network's score",
        factory=lambda: ["gmail.com", "googlemail.com", "outlook.com", "hotmail.com", "live.com",
                         "yahoo.com", "yahoo.co.jp", "icloud.com", "me.com", "aol.com", "gmx.net",
                         "gmx.de", "web.de", "mail.ru", "yandex.ru", "qq.com", "163.com",
                         "docomo.ne.jp", "ezweb.ne.jp", "au.com", "softbank.ne.jp", "i.softbank.jp"],
    )


@dataclass(frozen=True)
class GreylistConfig:
    """Greylisting (postgrey's model) for recipients with the greylisting service."""

    failure_action: FailureAction = setting("dunno", "store or directory down: tempfail or dunno")
    retry_window: int = setting(
        2 * 86400, "seconds after the first attempt in which a retry is accepted"
    )
    max_age: int = setting(35 * 86400, "seconds a passed triplet is remembered (since last seen)")
    auto_whitelist_clients: int = setting(
        5, "passed triplets after which a client IP skips greylisting (0 = never)"
    )
    ipv4_prefix: int = setting(24, "IPv4 network in the triplet (32 = exact address)")
    whitelist_clients: list[str] = setting(
        None, "client networks (CIDR) or host name suffixes (.example.net) never greylisted",
        factory=list,
    )
    whitelist_recipients: list[str] = setting(
        None, "recipients (user@dom or @dom) never greylisted", factory=list
    )
    whitelist_senders: list[str] = setting(
        None, "envelope senders (user@dom or @dom) never greylisted", factory=list
    )


@dataclass(frozen=True)
class PolicydConfig:
    """The Postfix policy daemon."""

    listen: list[str] = setting(
        None, "where to listen: unix:/path or inet:host:port", factory=lambda: ["inet:127.0.0.1:10031"]
    )
    socket_mode: str = setting("0660", "permissions of unix sockets (octal)")
    socket_group: str = setting("", "group owning unix sockets (e.g. postfix); empty: unchanged")
    user: str = setting(
        "", "started as root: switch to this user after binding; empty: keep the starting user"
    )
    group: str = setting("", "group to switch to (default: the user's primary group)")
    workers: int = setting(1, "processes sharing the sockets (one or two per core)")
    threads: int = setting(8, "threads per process for directory misses, DNS and the store")
    event_loop: str = setting("uvloop", "event loop: uvloop (libuv, faster) or asyncio (the standard one)")
    metrics_listen: str = setting(
        "", "host:port where the node's Prometheus /metrics is served (all workers added up), "
        "bound exactly as given (e.g. 127.0.0.1:9102); empty: off"
    )
    request_timeout: float = setting(
        10.0, "seconds to answer a request (keep below smtpd_policy_service_timeout)"
    )
    idle_timeout: float = setting(
        330.0, "seconds an idle connection is kept (above smtpd_policy_service_max_idle)"
    )
    max_connections: int = setting(4000, "connections per process; more are closed at once")
    max_line_length: int = setting(4096, "longest attribute line accepted, in bytes")
    max_request_size: int = setting(65536, "largest request accepted, in bytes")
    max_attributes: int = setting(128, "most attributes in one request")
    trusted_networks: list[str] = setting(
        None, "client networks that may relay and skip SPF, reputation, greylisting, rate limits",
        factory=lambda: ["127.0.0.0/8", "::1/128"],
    )
    checks: list[str] = setting(
        None,
        "checks to run, in this order",
        factory=lambda: ["relay", "sender_login", "sender_lists", "reputation", "rate_limit", "spf",
                         "greylist"],
    )
    log_decisions: Literal["all", "actions"] = setting(
        "all", "log one line per request (all) or only for non-DUNNO answers (actions)"
    )
    login_report_listen: list[str] = setting(
        None,
        "where the Dovecot login-report endpoint listens (inet:host:port); [] = off",
        factory=lambda: ["inet:127.0.0.1:10032"],
    )
    login_report_protocols: list[str] = setting(
        None, "Dovecot protocols whose logins open a POP-before-SMTP window",
        factory=lambda: ["pop3", "imap"],
    )
    login_report_header: str = setting(
        "", "'Name: value' header each login report must carry; empty: none required"
    )
    login_domain: str = setting("", "domain appended to SASL and Dovecot logins without @")
    relay: RelayConfig = setting(None, "relay gate", factory=RelayConfig)
    sender_login: SenderLoginConfig = setting(
        None, "SMTP-AUTH sender ownership", factory=SenderLoginConfig
    )
    rate_limit: RateLimitConfig = setting(None, "rate limits", factory=RateLimitConfig)
    spf: SpfConfig = setting(None, "SPF", factory=SpfConfig)
    reputation: ReputationConfig = setting(None, "IP reputation", factory=ReputationConfig)
    greylist: GreylistConfig = setting(None, "greylisting", factory=GreylistConfig)

    @classmethod
    def of(cls, config: Config) -> PolicydConfig:
        """The ``[policyd]`` section of ``config``."""
        return config.section(cls)


if TYPE_CHECKING:
    # `mailwarden render` and the reputation read the section through these
    # protocols: mypy keeps them in step.
    _RENDERED: PolicydWiring = PolicydConfig()
    _REPUTATION: ReputationSettings = ReputationConfig()
