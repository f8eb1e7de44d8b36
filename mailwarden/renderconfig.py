"""The ``[render]`` configuration section: facts about the site the Postfix/Dovecot fragments need.

Everything mailwarden itself already knows (LDAP connection and mapping, the
policy daemon's and the milter's sockets and timeouts, cache TTLs) is read from
its own section when rendering; this section holds only what Postfix and
Dovecot need beyond that.  What rendering reads from the daemons' registered
sections is spelled out here as :class:`MilterWiring` and :class:`PolicydWiring`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from mailwarden.configfields import setting

MIB = 1024 * 1024

MILTER_SECTION = "milter"
"""The registered section Postfix's milter settings come from."""
POLICYD_SECTION = "policyd"
"""The registered section Postfix's policy service and Dovecot's login reports come from."""


@runtime_checkable
class MilterWiring(Protocol):
    """What the Postfix fragments need from the content milter's section."""

    @property
    def socket(self) -> str:
        """Where the milter listens (``unix:/path`` or ``inet:host:port``)."""

    @property
    def reinject(self) -> str:
        """The smtpd (``inet:host:port``) that receives the milter's re-injections."""

    @property
    def clamd_max_size(self) -> int:
        """The largest message the milter scans, in bytes."""

    @property
    def postfix_command_timeout(self) -> float:
        """Postfix's milter_command_timeout, in seconds."""

    @property
    def postfix_content_timeout(self) -> float:
        """Postfix's milter_content_timeout, in seconds."""


@runtime_checkable
class PolicydWiring(Protocol):
    """What the Postfix and Dovecot fragments need from the policy daemon's section."""

    @property
    def listen(self) -> list[str]:
        """Where the daemon listens; Postfix asks the first entry."""

    @property
    def request_timeout(self) -> float:
        """Seconds the daemon takes at most to answer."""

    @property
    def idle_timeout(self) -> float:
        """Seconds the daemon keeps an idle connection."""

    @property
    def login_report_listen(self) -> list[str]:
        """Where the Dovecot login-report endpoint listens (``inet:host:port``); empty: off."""

    @property
    def login_report_protocols(self) -> list[str]:
        """The protocols whose logins Dovecot reports."""

    @property
    def login_report_header(self) -> str:
        """The ``Name: value`` header each login report carries (empty: none)."""

    @property
    def login_domain(self) -> str:
        """The domain appended to logins without @ (Dovecot's auth_default_realm)."""


@dataclass(frozen=True)
class RenderConfig:
    """Inputs for ``mailwarden render postfix|dovecot``."""

    # ---------------------------------------------------------------- Postfix
    myhostname: str = setting("mx.example.net", "this node's host name in SMTP greetings")
    config_directory: str = setting(
        "/etc/{instance}", "configuration directory of each Postfix instance ({instance} = postfix-ROLE)"
    )
    queue_directory: str = setting("/var/spool/{instance}", "queue directory of each Postfix instance")
    data_directory: str = setting("/var/lib/{instance}", "data directory of each Postfix instance")
    maillog_file: str = setting(
        "", "Postfix maillog_file (empty: syslog; /dev/stdout in a container)"
    )
    inet_protocols: Literal["all", "ipv4", "ipv6"] = setting("all", "Postfix inet_protocols")
    message_size_limit: int = setting(
        20 * MIB, "largest message accepted from clients, in bytes (inner stages allow 1 MiB more)"
    )
    recipient_limit: int = setting(1000, "recipients per message accepted from clients")
    tls_cert_file: str = setting(
        "/etc/ssl/certs/ssl-cert-snakeoil.pem", "TLS certificate (PEM) for Postfix and Dovecot"
    )
    tls_key_file: str = setting("/etc/ssl/private/ssl-cert-snakeoil.key", "TLS private key (PEM)")
    submission_listen: list[str] = setting(
        None, "SMTP-AUTH submission with STARTTLS (master.cf service: port or addr:port)",
        factory=lambda: ["submission"],
    )
    submissions_listen: list[str] = setting(
        None, "SMTP-AUTH submission with implicit TLS", factory=lambda: ["submissions"]
    )
    pop_before_smtp_listen: list[str] = setting(
        None, "POP-before-SMTP submission (give it the subscriber-facing address, e.g. 192.0.2.25:smtp)",
        factory=lambda: ["2525"],
    )
    mx_listen: list[str] = setting(None, "inbound MX", factory=lambda: ["smtp"])
    route_listen: str = setting("127.0.0.1:10021", "route-selection stage (loopback host:port)")
    mailbox_listen: str = setting("127.0.0.1:10022", "mailbox-routing stage")
    outbound_listen: str = setting("127.0.0.1:10023", "outbound delivery to the Internet (in the MX)")
    sasl_path: str = setting(
        "private/auth",
        "Dovecot auth socket for SMTP AUTH: relative to the submission instance's queue "
        "directory, or inet:host:port",
    )
    mailbox_transport: Literal["lmtp", "smtp"] = setting(
        "lmtp", "how the mailbox stage reaches a subscriber's mailbox host"
    )
    mailbox_port: int = setting(24, "port of LMTP (or SMTP) on the mailbox hosts")
    mailbox_concurrency: int = setting(20, "parallel deliveries per mailbox host")
    default_mailbox_host: str = setting(
        "", "mailbox host when neither the subscriber nor the domain names one (empty: defer); "
        "[policy.defaults] mail_host does the same"
    )
    quota_status_host: str = setting(
        "mailbox.example.net",
        "where the MX asks Dovecot's quota-status at RCPT (the mailbox hosts); empty: no check",
    )
    quota_status_port: int = setting(12340, "port of Dovecot's quota-status service")
    quota_status_timeout: int = setting(
        5, "seconds the MX waits for quota-status (then it accepts: quota is checked again at delivery)"
    )
    balancer_networks: list[str] = setting(
        None,
        "networks of the load balancers (HAProxy send-proxy/send-proxy-v2) in front of this node; "
        "set: the client-facing smtpd services and the proxy role's POP3/IMAP listeners expect "
        "a PROXY protocol header with the client's address (empty: no balancer)",
        factory=list,
    )
    # ---------------------------------------------------------------- Dovecot
    dovecot_config_dir: str = setting(
        "/etc/dovecot", "where the Dovecot files are installed ({role} = mailbox or proxy)"
    )
    dovecot_base_dir: str = setting(
        "/run/dovecot", "Dovecot base_dir (runtime sockets; {role} allowed, as below)"
    )
    dovecot_state_dir: str = setting("/var/lib/dovecot", "Dovecot state_dir")
    dovecot_log_path: str = setting("", "Dovecot log_path (empty: syslog)")
    dovecot_listen: str = setting("*, ::", "addresses Dovecot listens on")
    imap_port: int = setting(143, "IMAP port (STARTTLS)")
    imaps_port: int = setting(993, "IMAPS port (0: off)")
    pop3_port: int = setting(110, "POP3 port (STARTTLS)")
    pop3s_port: int = setting(995, "POP3S port (0: off)")
    doveadm_http_port: int = setting(
        0, "port of Dovecot's doveadm HTTP API on the mailbox hosts (mailwarden archive search, "
        "export and expire use it; 0: off)"
    )
    doveadm_api_key_file: str = setting(
        "/etc/dovecot/mailwarden-doveadm.key",
        "file holding the doveadm API key (read by Dovecot and by the mailwarden CLI; keep it secret)",
    )
    archive_imap_port: int = setting(
        0, "port of the mailbox hosts' IMAP listener for archive copies: the milter saves them "
        "there with MULTIAPPEND, logged in as archive_master_user (a fifth or less of Dovecot's CPU "
        "per copy over LMTP); 0: copies are delivered over LMTP (mailbox_port)"
    )
    archive_master_user: str = setting(
        "mailwarden-archive", "the Dovecot master user the milter saves archive copies as; it may "
        "log in only from the front nodes (proxy_networks, else loopback)"
    )
    archive_master_password_file: str = setting(
        "/etc/mailwarden/archive-master.key",
        "file holding archive_master_user's password (read by the milter and by mailwarden render; "
        "a master user can open every mailbox: keep it as secret as the doveadm API key)",
    )
    archive_mailbox_format: Literal["sdbox", "maildir"] = setting(
        "sdbox", "mailbox format of the archive mailboxes (sdbox: a save costs the same however "
        "large the archive grows; maildir: like the subscribers', each save rereads a list of "
        "every message)"
    )
    backend_imap_port: int = setting(143, "IMAP port of the mailbox hosts the proxy forwards to")
    backend_pop3_port: int = setting(110, "POP3 port of the mailbox hosts the proxy forwards to")
    legacy_imap_port: int = setting(
        143, "IMAP port of a legacy system's mailbox server (a domain's legacy_mailbox_host)"
    )
    legacy_pop3_port: int = setting(
        110, "POP3 port of a legacy system's mailbox server (a domain's legacy_mailbox_host)"
    )
    dovecot_ssl: Literal["required", "yes", "no"] = setting(
        "required", "Dovecot ssl (no: plaintext logins allowed; for tests and TLS-offloading balancers)"
    )
    mail_root: str = setting(
        "/srv/mail", "NFS mount holding every Maildir (home = mail_root/DOMAIN/USER)"
    )
    index_root: str = setting(
        "/var/lib/dovecot/index", "local disk for Dovecot index files (rebuilt if a user moves host)"
    )
    mail_uid: str = setting("vmail", "user owning the mailboxes")
    mail_gid: str = setting("vmail", "group owning the mailboxes")
    first_valid_uid: int = setting(500, "lowest uid Dovecot accepts for mail_uid")
    proxy_networks: list[str] = setting(
        None, "networks of the front (proxy) nodes; mailbox hosts trust the client IPs they forward",
        factory=list,
    )
    sieve_relay: str = setting(
        "mx.example.net:25",
        "SMTP server mailbox hosts send Sieve forwards and vacation replies to "
        "(its policy daemon must trust them: [policyd] trusted_networks)",
    )
    postmaster_address: str = setting(
        "postmaster@example.net", "sender of Dovecot's rejects and the address they name"
    )
