"""mailwarden's configuration: one TOML file, every setting typed, defaulted and described.

Sections are dataclasses; each field carries its one-line description in its
metadata, so ``mailwarden config show`` and the README reference come from the
same place as the loader.  Unknown keys are errors.

The core's own sections are fields of :class:`Config`.  A daemon adds its section
by registering a :class:`Section` in the ``mailwarden.sections`` entry-point group
of its distribution; the core loads whatever is registered without naming it, and
the daemon reads its typed section back with ``Config.section(ItsConfig)``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import socket
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar

from mailwarden import catalogue
from mailwarden.address import InvalidAddress, normalize_address
from mailwarden.configfields import setting
from mailwarden.renderconfig import RenderConfig

DEFAULT_CONFIG_PATH = Path("/etc/mailwarden/mailwarden.toml")
CONFIG_ENV = "MAILWARDEN_CONFIG"
SECTIONS_GROUP = "mailwarden.sections"
"""The entry-point group in which daemons register their configuration sections."""

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem, formatted ``file:key: problem``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class GeneralConfig:
    """Process-wide settings."""

    node_name: str = setting(socket.gethostname(), "name of this node in logs and metrics")
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", "log level")
    log_target: Literal["stderr", "syslog"] = setting(
        "stderr", "where logs go (syslog uses /dev/log, facility mail)"
    )
    selftest_address: str = setting(
        "", "a subscriber's address mailwarden selftest looks up in the directory (empty: bind only)"
    )
    log_format: Literal["text", "json"] = setting(
        "text", "text: mail-log lines like Postfix's; json: one JSON object per line (for log shippers)"
    )


@dataclass(frozen=True)
class LdapMappingConfig:
    """Where subscribers and domains live in the directory, and how they are spelled."""

    domain_base: str = setting("ou=domains,{base_dn}", "search base for domain entries")
    domain_filter: str = setting(
        "(&(objectClass=mwDomain)(|(mwDomainName={domain})(mwDomainAlias={domain})))",
        "filter finding a domain by name or alias; {domain} is escaped",
    )
    user_base: str = setting(
        "{domain_dn}", "search base for subscribers; {domain_dn} and {base_dn} are substituted"
    )
    user_filter: str = setting(
        "(&(objectClass=mwSubscriber)(|(mail={address})(mwAlternateAddress={address})))",
        "filter finding a subscriber; {address}, {local} and {domain} are escaped",
    )
    service_merge: Literal["override", "replace"] = setting(
        "override",
        "override: user enabled/disabled lists adjust the domain's; "
        "replace: a user's enabled list, when present, is the whole truth",
    )
    attributes: dict[str, str] = setting(
        None, "concept -> LDAP attribute name", factory=catalogue.default_attribute_map
    )
    service_values: dict[str, str] = setting(
        None, "service -> value stored in the enabled-service attribute",
        factory=catalogue.default_service_values,
    )
    active_status_values: list[str] = setting(
        None, "account status values that mean the account works (missing = active)",
        factory=lambda: ["active"],
    )
    archive_status_value: str = setting(
        "archive", "account status of archive mailboxes: the milter saves copies in them (IMAP as "
        "the archive master user, or LMTP), Postfix never routes to them and nobody logs in"
    )


@dataclass(frozen=True)
class LdapConfig:
    """The directory connection."""

    uri: str = setting(
        "ldap://127.0.0.1/",
        "LDAP URI(s) lookups use, space separated, tried in order (provider and consumers)",
    )
    write_uri: str = setting(
        "", "the one LDAP URI changes (mailwarden domain/user ...) go to: the provider "
        "(empty: the first of uri)",
    )
    base_dn: str = setting("dc=mailwarden,dc=test", "base DN of the mail tree")
    bind_dn: str = setting("", "DN to bind as (empty: anonymous)")
    bind_password: str = setting("", "bind password (prefer bind_password_file)")
    bind_password_file: str = setting("", "file holding the bind password")
    start_tls: bool = setting(False, "issue StartTLS before binding")
    ca_cert_file: str = setting("", "CA certificate file for TLS")
    network_timeout: float = setting(2.0, "seconds to wait for a TCP connect")
    timeout: float = setting(3.0, "seconds to wait for one LDAP operation")
    retry_max: int = setting(2, "reconnect attempts when the server goes away")
    retry_delay: float = setting(0.5, "seconds between reconnect attempts")
    max_value_length: int = setting(16384, "longest attribute value accepted (longer is ignored)")
    mapping: LdapMappingConfig = setting(None, "attribute mapping", factory=LdapMappingConfig)

    @property
    def worst_case(self) -> float:
        """Seconds one directory lookup may take at worst.

        Every attempt (the first and ``retry_max`` reconnects) runs into both
        timeouts, with ``retry_delay`` between attempts.  Callers that ask the
        directory inside someone else's deadline (Postfix's milter and policy
        timeouts) compare it with that deadline.
        """
        attempts = self.retry_max + 1
        return attempts * (self.network_timeout + self.timeout) + self.retry_max * self.retry_delay

    @property
    def writer(self) -> str:
        """The URI changes go to: ``write_uri``, else the first of ``uri``."""
        return self.write_uri or (self.uri.split() or [""])[0]


@dataclass(frozen=True)
class PolicyConfig:
    """The effective-policy lookup and its cache."""

    cache_ttl: float = setting(60.0, "seconds a found subscriber's policy is cached")
    negative_cache_ttl: float = setting(30.0, "seconds an unknown address is cached")
    domain_cache_ttl: float = setting(300.0, "seconds a domain entry is cached")
    cache_size: int = setting(200_000, "most addresses kept in the cache (LRU)")
    recipient_delimiter: str = setting(
        "+", "characters that start an address extension (user+ext@dom), empty for none"
    )
    defaults: dict[str, Any] = setting(
        None, "site-wide setting defaults over the built-in ones (source 'config')", factory=dict
    )
    default_services: list[str] = setting(
        None, "services on for every domain unless it says otherwise", factory=list
    )
    role_addresses: list[str] = setting(
        None, "local parts that exist at every hosted domain and domain alias without a directory "
        "entry (RFC 2142); routed to the domain's admin_address, else to role_mailbox",
        factory=lambda: ["postmaster", "abuse"],
    )
    role_mailbox: str = setting(
        "", "where role addresses of a domain without admin_address go (empty: nowhere, so they "
        "are unknown there like any other address)"
    )


@dataclass(frozen=True)
class StoreConfig:
    """Short-lived shared state (POP-before-SMTP, counters, greylisting, quarantine index)."""

    backend: Literal["sqlite", "redis"] = setting(
        "sqlite", "sqlite for a single node, redis for a cluster"
    )
    sqlite_path: str = setting("/var/lib/mailwarden/state.sqlite3", "SQLite database file")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis URL (redis:// or unix://)")
    key_prefix: str = setting("mw:", "prefix of every Redis key")
    timeout: float = setting(1.0, "seconds to wait for the store")
    sentinels: list[str] = setting(
        None, "Redis Sentinels (host:port); when set, the store uses the primary they name and follows "
        "a failover, and redis_url gives only the password and database", factory=list,
    )
    sentinel_service: str = setting("mymaster", "the primary's name in the Sentinels (sentinel monitor NAME)")
    sentinel_password_file: str = setting("", "file holding the Sentinels' own password (empty: none)")


@dataclass(frozen=True)
class DnsConfig:
    """The resolver every DNS user (SPF, DKIM, DNSBL) gets; /etc/resolv.conf is never read."""

    nameservers: list[str] = setting(
        None, "resolver addresses (IP literals)", factory=lambda: ["127.0.0.1"]
    )
    port: int = setting(53, "resolver port")
    timeout: float = setting(2.0, "seconds to wait for one server to answer")
    lifetime: float = setting(4.0, "seconds a whole lookup may take, retries included")
    cache_size: int = setting(
        10_000, "answers kept in memory, each for its TTL, shared by a process's lookups (0: none)"
    )


@dataclass(frozen=True)
class Section:
    """A configuration section a daemon registers with the core.

    The daemon's distribution names it in the ``mailwarden.sections`` entry-point
    group, the entry point's name being the TOML table::

        [project.entry-points."mailwarden.sections"]
        milter = "milters.config:SECTION"

    ``cls`` is a frozen dataclass declared like the core's sections (every field
    through ``setting()``), so loading, unknown-key errors, ``config show`` and the
    reference work for it unchanged.  ``check`` returns its problems as
    ``table.key: problem``; it gets the whole configuration, so a section can be
    weighed against the core's (the LDAP worst case, for instance).  ``selftest``
    returns the daemon's probes for ``mailwarden selftest`` as (name, probe) pairs
    (:mod:`mailwarden.selftest`); it is called only by that command, so it may import
    the daemon's backends.
    """

    name: str
    cls: type[Any]
    doc: str
    check: Callable[[Config], list[str]] | None = None
    selftest: Callable[[], Sequence[tuple[str, Callable[[Config], str]]]] | None = None


@functools.cache
def registered_sections() -> Mapping[str, Section]:
    """The sections registered in the ``mailwarden.sections`` entry-point group, by table name."""
    core = {f.name for f in dataclasses.fields(Config)}
    found: dict[str, Section] = {}
    for ep in sorted(entry_points(group=SECTIONS_GROUP), key=lambda e: e.name):
        section = ep.load()
        if not isinstance(section, Section) or section.name != ep.name or section.name in core:
            raise TypeError(f"entry point {SECTIONS_GROUP}: {ep.name} = {ep.value} is not a "
                            f"Section named {ep.name!r} beside the core's sections")
        found[section.name] = section
    return MappingProxyType(found)


def _registered_defaults() -> Mapping[str, Any]:
    return {name: section.cls() for name, section in registered_sections().items()}


@dataclass(frozen=True)
class Config:
    """The whole configuration: the core's sections, then the registered ones in ``sections``."""

    general: GeneralConfig = setting(None, "process-wide settings", factory=GeneralConfig)
    ldap: LdapConfig = setting(None, "directory connection", factory=LdapConfig)
    policy: PolicyConfig = setting(None, "effective policy", factory=PolicyConfig)
    store: StoreConfig = setting(None, "shared state", factory=StoreConfig)
    dns: DnsConfig = setting(None, "DNS resolver for SPF, DKIM and DNSBL", factory=DnsConfig)
    render: RenderConfig = setting(None, "Postfix / Dovecot fragments", factory=RenderConfig)
    sections: Mapping[str, Any] = field(
        default_factory=_registered_defaults, metadata={"internal": True}
    )
    """The registered sections by table name (``milter``, ``policyd``)."""
    source: str = field(default="<defaults>", compare=False, metadata={"internal": True})

    def section(self, cls: type[T]) -> T:
        """The registered section of type ``cls`` (``config.section(MilterConfig)``)."""
        for value in self.sections.values():
            if isinstance(value, cls):
                return value
        raise LookupError(f"no configuration section of type {cls.__name__} is registered "
                          f"(entry-point group {SECTIONS_GROUP})")

    def with_section(self, value: object) -> Config:
        """A copy whose registered section of ``value``'s type is ``value``."""
        for name, current in self.sections.items():
            if type(current) is type(value):
                return dataclasses.replace(self, sections={**self.sections, name: value})
        raise LookupError(f"no configuration section of type {type(value).__name__} is registered")


# ---------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(f"{where}: {value!r} is not one of {_type_name(tp)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{where}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        return [_convert(v, item, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a table, got {value!r}")
            return value
        if item is Any:
            return dict(value)
        return {k: _convert(v, item, f"{where}.{k}", problems) for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp!r}")  # pragma: no cover


def _build(cls: type[Any], table: Mapping[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{prefix}{key}"
        if key not in fields:
            problems.append(f"{where}: unknown setting")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a table, got {value!r}")
                continue
            kwargs[key] = _build(typing.cast(type, tp), value, f"{where}.", problems)
        else:
            kwargs[key] = _convert(value, tp, where, problems)
    return cls(**kwargs)


def _build_config(data: Mapping[str, Any], problems: list[str]) -> Config:
    """The core's tables into Config's fields, each registered table into its section."""
    registered = registered_sections()
    cfg: Config = _build(Config, {k: v for k, v in data.items() if k not in registered}, "", problems)
    sections = dict(cfg.sections)
    for name, table in data.items():
        if name not in registered:
            continue
        if not isinstance(table, dict):
            problems.append(f"{name}: expected a table, got {table!r}")
            continue
        sections[name] = _build(registered[name].cls, table, f"{name}.", problems)
    return dataclasses.replace(cfg, sections=sections)


def section_problems(cfg: Config) -> list[str]:
    """What the registered sections' own checks find, as ``table.key: problem``."""
    problems: list[str] = []
    for section in registered_sections().values():
        if section.check is not None:
            problems += section.check(cfg)
    return problems


ROLE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
"""A role address's local part: plain enough for every table that names it."""


def _validate(cfg: Config, problems: list[str]) -> None:
    mapping = cfg.ldap.mapping
    known = set(catalogue.concept_names())
    for concept in mapping.attributes:
        if concept not in known:
            problems.append(f"ldap.mapping.attributes.{concept}: unknown concept")
    # A partial attribute table keeps the shipped names for concepts it does not mention.
    merged = {**catalogue.default_attribute_map(), **mapping.attributes}
    services = {s.value for s in catalogue.Service}
    for service in mapping.service_values:
        if service not in services:
            problems.append(f"ldap.mapping.service_values.{service}: unknown service")
    merged_values = {**catalogue.default_service_values(), **mapping.service_values}
    object.__setattr__(mapping, "attributes", merged)
    object.__setattr__(mapping, "service_values", merged_values)
    for key in ("domain_filter", "user_filter"):
        text = getattr(mapping, key)
        if not (text.startswith("(") and text.endswith(")")):
            problems.append(f"ldap.mapping.{key}: an LDAP filter must be in parentheses")
    for name, value in cfg.policy.defaults.items():
        spec = catalogue.SETTINGS.get(name)
        if spec is None:
            problems.append(f"policy.defaults.{name}: unknown setting")
            continue
        raw = value if isinstance(value, list) else [value]
        try:
            spec.parse([_toml_scalar(v) for v in raw])
        except catalogue.InvalidValue as exc:
            problems.append(f"policy.defaults.{name}: {exc}")
    for i, name in enumerate(cfg.policy.default_services):
        try:
            catalogue.Service.parse(name)
        except ValueError as exc:
            problems.append(f"policy.default_services[{i}]: {exc}")
    for i, role in enumerate(cfg.policy.role_addresses):
        if not ROLE_NAME.fullmatch(role):
            problems.append(f"policy.role_addresses[{i}]: {role!r} is not a lower-case local part "
                            "(letters, digits, '.', '_', '-')")
    if cfg.policy.role_mailbox:
        try:
            normalize_address(cfg.policy.role_mailbox)
        except InvalidAddress as exc:
            problems.append(f"policy.role_mailbox: {exc}")
    for key in ("network_timeout", "timeout", "retry_delay"):
        if getattr(cfg.ldap, key) <= 0:
            problems.append(f"ldap.{key}: must be greater than 0")
    if cfg.ldap.retry_max < 0:
        problems.append("ldap.retry_max: must not be negative")
    for key in ("cache_ttl", "negative_cache_ttl", "domain_cache_ttl"):
        if getattr(cfg.policy, key) < 0:
            problems.append(f"policy.{key}: must not be negative")
    if cfg.policy.cache_size < 0:
        problems.append("policy.cache_size: must not be negative")
    if cfg.dns.cache_size < 0:
        problems.append("dns.cache_size: must not be negative")
    for key in ("timeout", "lifetime"):
        if getattr(cfg.dns, key) <= 0:
            problems.append(f"dns.{key}: must be greater than 0")
    if cfg.ldap.bind_password_file and not Path(cfg.ldap.bind_password_file).is_file():
        problems.append(f"ldap.bind_password_file: {cfg.ldap.bind_password_file} is not a file")
    _validate_cluster(cfg, problems)


def _validate_cluster(cfg: Config, problems: list[str]) -> None:
    """The settings of a cluster: the LDAP provider, the Redis Sentinels."""
    if len(cfg.ldap.write_uri.split()) > 1:
        problems.append("ldap.write_uri: one URI only (the provider)")
    store = cfg.store
    if not store.sentinels:
        return
    from mailwarden.store.redis import SentinelSettings, parse_sentinel

    if store.backend != "redis":
        problems.append("store.sentinels: only with backend = \"redis\"")
    for i, entry in enumerate(store.sentinels):
        try:
            parse_sentinel(entry)
        except ValueError as exc:
            problems.append(f"store.sentinels[{i}]: {exc}")
    if not store.sentinel_service:
        problems.append("store.sentinel_service: must not be empty")
    if store.backend == "redis":
        try:
            SentinelSettings(tuple(store.sentinels)).primary_options(store.redis_url)
        except ValueError as exc:
            problems.append(f"store.redis_url: {exc}")
    if store.sentinel_password_file and not Path(store.sentinel_password_file).is_file():
        problems.append(f"store.sentinel_password_file: {store.sentinel_password_file} is not a file")


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    return str(value)


def site_defaults(cfg: Config) -> dict[str, Any]:
    """The parsed ``[policy.defaults]`` table."""
    result = {}
    for name, value in cfg.policy.defaults.items():
        raw = value if isinstance(value, list) else [value]
        result[name] = catalogue.SETTINGS[name].parse([_toml_scalar(v) for v in raw])
    return result


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse and validate TOML text; raise ConfigError naming ``source:key: problem``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: {exc}"]) from None
    problems: list[str] = []
    cfg = _build_config(data, problems)
    if not problems:
        _validate(cfg, problems)
    if problems:
        raise ConfigError([f"{source}:{p}" for p in problems])
    result: Config = dataclasses.replace(cfg, source=source)
    return result


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The file to read: ``--config``, else $MAILWARDEN_CONFIG, else the default if it exists."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Load the configuration file (or the defaults when none exists)."""
    path = config_path(explicit)
    if path is None:
        cfg = Config()
        problems: list[str] = []
        _validate(cfg, problems)
        return cfg
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})"]) from None
    return parse_config(text, str(path))


def bind_password(cfg: LdapConfig) -> str:
    """The bind password, read from ``bind_password_file`` when set."""
    if cfg.bind_password_file:
        return Path(cfg.bind_password_file).read_text(encoding="utf-8").strip()
    return cfg.bind_password


# ---------------------------------------------------------------- describing


@dataclass(frozen=True)
class Described:
    """One effective setting for ``config show``."""

    key: str
    value: Any
    default: Any
    doc: str

    @property
    def is_default(self) -> bool:
        """Whether the value equals the built-in default."""
        return bool(self.value == self.default)


def describe(cfg: Config) -> list[Described]:
    """Every setting with its effective value, default and description, in file order."""
    out: list[Described] = []

    def walk(obj: Any, default_obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            if f.metadata.get("internal"):
                continue
            value, default = getattr(obj, f.name), getattr(default_obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, default, f"{prefix}{f.name}.")
            else:
                out.append(Described(f"{prefix}{f.name}", value, default, f.metadata["doc"]))

    defaults = Config()
    _validate(defaults, [])
    walk(cfg, defaults, "")
    for name, section in cfg.sections.items():
        walk(section, defaults.sections[name], f"{name}.")
    return out


def toml_value(value: Any) -> str:
    """Render a value as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))  # pragma: no cover



def reference_markdown() -> str:
    """The configuration reference as Markdown, one table per section."""
    defaults = Config()
    _validate(defaults, [])
    lines = [
        "# Configuration reference",
        "",
        "Generated by `mailwarden config reference` from the declarations in the code;",
        "a test keeps this file in step.  File: `/etc/mailwarden/mailwarden.toml`",
        "(or `--config` / `MAILWARDEN_CONFIG`).  Unknown keys are errors.",
    ]
    section = None
    for item in describe(defaults):
        sec, _, key = item.key.rpartition(".")
        if sec != section:
            lines += ["", f"## [{sec}]", "", "| key | default | description |", "|---|---|---|"]
            section = sec
        value = toml_value(item.default)
        if item.key == "general.node_name":
            value = '"<host name>"'
        if len(value) > 60:
            value = "(see `mailwarden config show`)"
        lines.append(f"| `{key}` | `{value}` | {item.doc} |")
    return "\n".join(lines) + "\n"
