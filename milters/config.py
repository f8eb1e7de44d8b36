"""The ``[milter]`` configuration section."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailwarden.config import Config, Section
from mailwarden.configfields import setting

if TYPE_CHECKING:
    from mailwarden.renderconfig import MilterWiring
from mailwarden.daemon import EVENT_LOOPS
from mailwarden.endpoint import Endpoint, EndpointError
from mailwarden.metrics import check_listen

KIB = 1024
MIB = 1024 * 1024

SPAM_ENGINES = ("spamd", "rspamd")
"""What ``milter.spam_engine`` may name."""


@dataclass(frozen=True)
class MilterConfig:
    """The content milter."""

    socket: str = setting(
        "unix:/var/spool/postfix/mailwarden/milter.sock",
        "milter socket (unix:/path or inet:host:port; a unix socket costs less per message)",
    )
    socket_mode: str = setting("0660", "permissions of the unix milter socket (octal)")
    socket_group: str = setting("", "group of the unix milter socket (e.g. postfix; empty: unchanged)")
    user: str = setting("", "user to run as after binding the socket (when started as root)")
    group: str = setting("", "group to run as (empty: the user's primary group)")
    workers: int = setting(
        1, "processes sharing the milter socket (each with its own event loop); up to one per core"
    )
    threads: int = setting(
        16, "threads per process for blocking work: directory lookups, quarantine, re-injection"
    )
    event_loop: str = setting("uvloop", "event loop: uvloop or asyncio")
    metrics_listen: str = setting(
        "", "host:port where the node's Prometheus /metrics is served (all workers added up), "
        "bound exactly as given (e.g. 127.0.0.1:9101); empty: off"
    )
    spool_dir: str = setting(
        "/var/lib/mailwarden/spool", "where messages larger than memory_limit are spooled"
    )
    memory_limit: int = setting(
        1 * MIB, "bytes of one message kept in memory; the rest is spooled to spool_dir"
    )
    max_parts: int = setting(1000, "MIME parts looked at; a message with more is unscannable")
    max_depth: int = setting(20, "MIME nesting depth; deeper is unscannable")
    archive_max_depth: int = setting(
        4, "archives inside archives the extension filter lists; deeper is unscannable for it "
        "(clamd unpacks within its own limits)"
    )
    archive_max_members: int = setting(
        2000, "archive members listed per message; more is unscannable for the extension filter"
    )
    archive_max_size: int = setting(
        100 * MIB, "uncompressed bytes unpacked per message; more is unscannable for the extension filter "
        "(archive bomb)"
    )
    archive_max_ratio: int = setting(
        100, "uncompressed/compressed ratio above which a member over 1 MiB is an archive bomb"
    )
    clamd: list[str] = setting(
        None,
        "clamd upstreams (unix:/path or inet:host:port), tried in order",
        factory=lambda: ["unix:/run/clamav/clamd.ctl"],
    )
    clamd_timeout: float = setting(60.0, "seconds one clamd INSTREAM scan may take")
    clamd_max_size: int = setting(
        25 * MIB, "largest message sent to clamd (keep <= clamd StreamMaxLength); larger is unscannable"
    )
    scan_cache_ttl: float = setting(
        3600.0, "seconds a scan result is kept by body digest (Redis: shared; SQLite: in the milter; 0: off)"
    )
    spamd: list[str] = setting(
        None,
        "spamd upstreams (unix:/path or inet:host:port), tried in order",
        factory=lambda: ["inet:127.0.0.1:783"],
    )
    spamd_timeout: float = setting(30.0, "seconds one spamd check may take")
    spamd_max_size: int = setting(
        512 * KIB, "larger messages are not sent to spamd (like spamc -s); logged as skipped"
    )
    spamd_user: str = setting("", "User: sent to spamd (empty: none)")
    spam_engine: str = setting(
        "spamd", "what scores mail for spam_check recipients: spamd or rspamd (one request per message "
        "either way; each recipient's threshold, action and reject score apply to its score)"
    )
    rspamd: list[str] = setting(
        None,
        "rspamd upstreams (inet:host:port or unix:/path of a normal or proxy worker, HTTP /checkv2), "
        "tried in order; used with spam_engine = rspamd",
        factory=lambda: ["inet:127.0.0.1:11333"],
    )
    rspamd_timeout: float = setting(20.0, "seconds one rspamd check may take")
    rspamd_max_size: int = setting(
        512 * KIB, "larger messages are not sent to rspamd; logged as skipped"
    )
    rspamd_skip_auth: bool = setting(
        True, "when sender_auth checked a message, rspamd's own SPF, DKIM, DMARC and ARC checks "
        "(its policies group) are switched off for it; false: rspamd runs them too"
    )
    spam_headers_on_ham: bool = setting(
        False, "add X-Spam-Status/Score under the threshold too (a separate copy when recipients differ)"
    )
    sender_auth: bool = setting(
        True, "verify DKIM, SPF, DMARC and ARC of mail to hosted recipients and add one "
        "Authentication-Results header (DNS through [dns])"
    )
    authserv_id: str = setting(
        "", "authserv-id of the Authentication-Results header (empty: general.node_name)"
    )
    internal_networks: list[str] = setting(
        None, "clients whose mail counts as a subscriber's without SMTP AUTH (OpenDKIM's InternalHosts, "
        "e.g. Postfix's mynetworks): signed for dkim_signing domains, not held to SPF or DMARC",
        factory=list,
    )
    pop_before_smtp: bool = setting(
        True, "a client with an open POP-before-SMTP window (shared store) sends as that subscriber: "
        "signed for a dkim_signing domain the subscriber may send for, not held to SPF or DMARC"
    )
    dkim_key_path: str = setting(
        "/etc/mailwarden/dkim/{domain}.{selector}.key",
        "DKIM private key of a domain and selector (RSA PEM; the ed25519 key is the one of "
        "selector SELECTOR-ed25519)"
    )
    upstream_retry: float = setting(
        30.0, "seconds a clamd/spamd/rspamd upstream that failed is skipped while others remain"
    )
    keyword_text_limit: int = setting(
        1 * MIB, "decoded characters of headers and text parts that keyword rules look at"
    )
    keyword_regex_budget: float = setting(
        0.5, "seconds of regex matching per message; rules not finished by then do not match (logged)"
    )
    reinject: str = setting(
        "inet:127.0.0.1:10026",
        "Postfix smtpd (without milters) that receives content variants, notices and releases",
    )
    reinject_timeout: float = setting(30.0, "seconds one re-injection or notice may take")
    archive_timeout: float = setting(
        30.0, "seconds saving one archive copy on its mailbox host may take (over IMAP or LMTP)"
    )
    archive_imap_sessions: int = setting(
        1, "IMAP sessions per archive mailbox with a command out at once ([render] archive_imap_port): "
        "more overlap Dovecot's waits for the disk, fewer put more copies in each command"
    )
    notice_from: str = setting(
        "postmaster@{domain}", "From: of notices; {domain} is the affected recipient's domain"
    )
    notice_limit: int = setting(10, "notices one address receives per notice_window at most")
    notice_window: int = setting(3600, "seconds of the notice rate limit window")
    template_dir: str = setting(
        "/etc/mailwarden/templates", "site notice templates, searched before the shipped ones"
    )
    quarantine_dir: str = setting(
        "/var/lib/mailwarden/quarantine",
        "where quarantined mail is kept (in a cluster: on the volume every node shares)",
    )
    quarantine_days: int = setting(30, "days quarantined mail is kept before it expires")
    mta_timeout: float = setting(600.0, "seconds the milter waits for the MTA before dropping it")
    postfix_command_timeout: float = setting(
        30.0, "Postfix's milter_command_timeout (RCPT-time work must finish well before it)"
    )
    postfix_content_timeout: float = setting(
        300.0, "Postfix's milter_content_timeout (end-of-message work must finish before it)"
    )

    @classmethod
    def of(cls, config: Config) -> MilterConfig:
        """The ``[milter]`` section of ``config``."""
        return config.section(cls)

    @property
    def eom_budget(self) -> float:
        """Seconds end-of-message work may take: Postfix's content timeout minus a margin."""
        return max(1.0, self.postfix_content_timeout - max(5.0, self.postfix_content_timeout * 0.1))


def check_milter_config(cfg: MilterConfig, ldap_worst_case: float) -> list[str]:
    """Problems with the ``[milter]`` section, each as ``milter.key: problem``."""
    problems: list[str] = []
    for key, addr in [("socket", cfg.socket), ("reinject", cfg.reinject),
                      *((f"clamd[{i}]", a) for i, a in enumerate(cfg.clamd)),
                      *((f"spamd[{i}]", a) for i, a in enumerate(cfg.spamd)),
                      *((f"rspamd[{i}]", a) for i, a in enumerate(cfg.rspamd))]:
        try:
            Endpoint.parse(addr)
        except EndpointError as exc:
            problems.append(f"milter.{key}: {exc}")
    problems += check_listen("milter", cfg.metrics_listen)
    if cfg.event_loop not in EVENT_LOOPS:
        problems.append(f"milter.event_loop: {cfg.event_loop!r} must be one of {', '.join(EVENT_LOOPS)}")
    try:
        mode = int(cfg.socket_mode, 8)
        if not 0 <= mode <= 0o777:
            raise ValueError
    except ValueError:
        problems.append(f"milter.socket_mode: {cfg.socket_mode!r} is not an octal mode")
    if cfg.reinject.startswith("unix:"):
        problems.append("milter.reinject: the re-injection smtpd is reached as inet:host:port")
    if cfg.spam_engine not in SPAM_ENGINES:
        problems.append(f"milter.spam_engine: {cfg.spam_engine!r} must be one of {', '.join(SPAM_ENGINES)}")
    for key in ("clamd", "spamd", *(("rspamd",) if cfg.spam_engine == "rspamd" else ())):
        if not getattr(cfg, key):
            problems.append(f"milter.{key}: at least one upstream is needed")
    positive = (
        "memory_limit", "max_parts", "max_depth", "archive_max_members", "archive_max_size",
        "archive_max_ratio", "clamd_timeout", "clamd_max_size", "spamd_timeout", "spamd_max_size",
        "rspamd_timeout", "rspamd_max_size",
        "keyword_text_limit", "keyword_regex_budget", "reinject_timeout", "notice_window", "quarantine_days",
        "archive_timeout", "archive_imap_sessions",
        "mta_timeout", "postfix_command_timeout", "threads", "workers", "postfix_content_timeout",
    )
    for key in positive:
        if getattr(cfg, key) <= 0:
            problems.append(f"milter.{key}: must be greater than 0")
    for key in ("archive_max_depth", "scan_cache_ttl", "upstream_retry", "notice_limit"):
        if getattr(cfg, key) < 0:
            problems.append(f"milter.{key}: must not be negative")
    if "{" in cfg.notice_from.replace("{domain}", ""):
        problems.append("milter.notice_from: only {domain} may be substituted")
    key_path = cfg.dkim_key_path.replace("{domain}", "").replace("{selector}", "")
    if "{" in key_path or "}" in key_path or "{domain}" not in cfg.dkim_key_path:
        problems.append("milter.dkim_key_path: {domain} is needed, and only {domain} and {selector} "
                        "may be substituted")
    for i, net in enumerate(cfg.internal_networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            problems.append(f"milter.internal_networks[{i}]: {net!r} is not a network")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", cfg.authserv_id or "x"):
        problems.append(f"milter.authserv_id: {cfg.authserv_id!r} is not a host name")
    # The directory is asked at RCPT time, inside Postfix's milter_command_timeout.
    if ldap_worst_case >= cfg.postfix_command_timeout:
        problems.append(
            f"milter.postfix_command_timeout: the directory may take {ldap_worst_case:g}s "
            f"(ldap timeouts and retries), not below {cfg.postfix_command_timeout:g}s"
        )
    # One scan per upstream in the worst case, then spamd, then one re-injection:
    # each call is also cut to what is left of eom_budget, this only flags a config
    # whose single steps could never fit.
    for key in ("clamd_timeout", "spamd_timeout", "rspamd_timeout", "reinject_timeout", "archive_timeout"):
        if getattr(cfg, key) >= cfg.eom_budget:
            problems.append(
                f"milter.{key}: {getattr(cfg, key):g}s does not fit in the end-of-message "
                f"budget of {cfg.eom_budget:g}s (postfix_content_timeout minus a margin)"
            )
    return problems


def check_section(config: Config) -> list[str]:
    """Problems in the section, weighed against the rest of ``config``."""
    problems = check_milter_config(MilterConfig.of(config), config.ldap.worst_case)
    if config.render.archive_imap_port:
        from mailwarden.render import RenderError, archive_master_password  # jinja2: only when needed

        try:
            archive_master_password(config.render)
        except RenderError as exc:
            problems += [f"{problem} (archive_imap_port is set)" for problem in exc.problems]
    return problems


def _selftest() -> list[tuple[str, Callable[[Config], str]]]:
    from milters.selftest import probes

    return probes()


SECTION = Section("milter", MilterConfig, "content milter", check=check_section, selftest=_selftest)
"""Registered in the ``mailwarden.sections`` entry-point group (pyproject.toml)."""

if TYPE_CHECKING:
    _RENDERED: MilterWiring = MilterConfig()
    """``mailwarden render`` reads the section through this protocol: mypy keeps the two in step."""
