"""Postfix and Dovecot configuration rendered from the mailwarden configuration.

``mailwarden render postfix`` writes one directory per Postfix instance (main.cf,
master.cf and the LDAP lookup tables it names); ``mailwarden render dovecot`` one
directory per Dovecot role (dovecot.conf, conf.d fragments, LDAP args files and
the Sieve before-script).  Whatever mailwarden already knows - the LDAP
connection and attribute mapping, the policy daemon's and the milter's endpoints
and timeouts, cache TTLs, the header the milter sets for Junk - is read from its
own section, so the fragments cannot drift from the daemons they talk to.
``[render]`` holds only the site facts Postfix and Dovecot need beyond that.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import importlib.resources
import ipaddress
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from mailwarden import catalogue
from mailwarden.address import normalize_address
from mailwarden.catalogue import LEGACY_STATES, Service
from mailwarden.config import Config, bind_password, site_defaults
from mailwarden.doveadm import DoveadmError, read_api_key
from mailwarden.renderconfig import MILTER_SECTION, POLICYD_SECTION, MilterWiring, PolicydWiring, RenderConfig

MIB = 1024 * 1024
INNER_SIZE_MARGIN = MIB
"""Inner stages accept this much more than the edges: every hop adds a Received header."""
MILTER_HEADROOM = 64 * 1024
"""What Postfix adds before the milter sees a message (its Received header and more)."""
POLICY_TIMEOUT_MARGIN = 10
FORWARD_DOMAIN = "forward.mailwarden.invalid"
LEGACY_TRANSPORT = "to-legacy"
"""The mailbox stage's master.cf transport that relays a legacy domain's mail to its legacy_mx."""
"""Where the Sieve script sends a subscriber's forwarded copy: ``LOCAL=DOMAIN@`` this
domain (``.invalid`` never resolves).  The route stage turns that one address into every
``forward_addresses`` value from LDAP (Dovecot reads only the first value of a
multi-valued attribute; Postfix reads all of them)."""
"""Seconds Postfix waits beyond the policy daemon's own deadline, so its answer arrives."""

POSTFIX_INSTANCES: dict[str, str] = {
    "submission": "SMTP-AUTH / TLS submission (587 STARTTLS, 465 implicit TLS), milter before queue",
    "pop-before-smtp": "POP-before-SMTP submission, milter before queue",
    "route": "route selection: aliases from LDAP, hosted domains to the mailbox stage, "
    "the rest to the Internet; also receives the milter's re-injections",
    "mailbox": "mailbox routing: each subscriber's mailbox host from LDAP, over LMTP",
    "mx": "standard MTA: inbound MX (milter before queue) and outbound delivery",
}
DOVECOT_ROLES: dict[str, str] = {
    "mailbox": "mailbox host: LDAP auth, Maildir on NFS, quota, LMTP, Sieve, quota-status",
    "proxy": "front node: POP3/IMAP proxy to each subscriber's mailbox host, SASL for Postfix, "
    "login reports for POP-before-SMTP",
}

_PLACEHOLDER = re.compile(r"\{(address|local|domain)\}")
_ENDPOINT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):([0-9]{1,5})$")


class RenderError(Exception):
    """The configuration cannot be rendered; ``problems`` names each ``key: problem``."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def template_root() -> Path:
    """The directory holding postfix-templates/ and dovecot-templates/.

    An installed wheel carries them as package data (``mailwarden/postfix-templates/``,
    built by setup.py from the repository's top-level directories); a checkout (an
    editable install) has them at the top of the repository, next to the package.
    """
    package = importlib.resources.files("mailwarden")
    checkout = Path(__file__).resolve().parent.parent
    candidates = [package, checkout] if isinstance(package, Path) else [checkout]
    for root in candidates:
        if (root / "postfix-templates").is_dir() and (root / "dovecot-templates").is_dir():
            return root
    raise RenderError([f"templates: postfix-templates/ and dovecot-templates/ not found in {package} "
                       f"(the installed package) or {checkout} (a checkout)"])


# ---------------------------------------------------------------- small parts


@dataclass(frozen=True)
class HostPort:
    """A TCP endpoint written ``host:port`` or ``[v6]:port``."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """Parse ``host:port``; raise ValueError."""
        match = _ENDPOINT.match(text.strip())
        if not match or not 0 < int(match.group(2)) < 65536:
            raise ValueError(f"{text!r} is not host:port")
        return cls(match.group(1).strip("[]"), int(match.group(2)))

    @property
    def service(self) -> str:
        """The master.cf service name."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def nexthop(self) -> str:
        """The transport next hop (brackets: no MX lookup)."""
        return f"[{self.host}]:{self.port}"


@dataclass(frozen=True)
class LdapLookup:
    """One LDAP query: a Postfix lookup table or a Dovecot passdb/userdb."""

    name: str
    purpose: str
    search_base: str
    query_filter: str
    result_attribute: str = ""
    result_format: str = "%s"
    single_value: bool = False


def _expand(template: str, values: Mapping[str, str], where: str) -> str:
    """A mapping filter with ``{address}``-style placeholders in a daemon's %-syntax."""
    text = template.replace("%", "%%")

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise RenderError([f"ldap.mapping.{where}: {{{name}}} cannot be used here"])
        return values[name]

    return _PLACEHOLDER.sub(sub, text)


POSTFIX_ADDRESS_KEY = {"address": "%s", "local": "%u", "domain": "%d"}
POSTFIX_DOMAIN_KEY = {"domain": "%s"}
DOVECOT_USER = {"address": "%u", "local": "%n", "domain": "%d"}


def _filter_value(value: str) -> str:
    """An assertion value escaped as RFC 4515 requires."""
    return re.sub(r"[\\*()\x00]", lambda m: f"\\{ord(m.group()):02x}", value)


def _and(*parts: str) -> str:
    return "(&" + "".join(parts) + ")"


class LdapQueries:
    """The LDAP side of the mapping, as lookups Postfix and Dovecot can make.

    A lookup table cannot first find a domain entry and then search below it,
    so subscribers are searched below all domains (``domain_base``) when the
    mapping's ``user_base`` is relative to ``{domain_dn}``; the subscriber
    filter still names the full address.
    """

    def __init__(self, cfg: Config) -> None:
        self.ldap = cfg.ldap
        mapping = cfg.ldap.mapping
        self.mapping = mapping
        self.attr = dict(mapping.attributes)
        self.domain_base = mapping.domain_base.format(base_dn=cfg.ldap.base_dn)
        if "{domain_dn}" in mapping.user_base:
            self.user_base = self.domain_base
        else:
            self.user_base = mapping.user_base.format(base_dn=cfg.ldap.base_dn)
        self.active_values = list(mapping.active_status_values)
        self.default_services = {Service.parse(s) for s in cfg.policy.default_services}
        self.roles = list(cfg.policy.role_addresses)

    # Postfix ----------------------------------------------------------------

    def postfix_user_filter(self) -> str:
        """The subscriber filter with Postfix's %s/%u/%d, archive mailboxes left out (only
        the milter delivers to them, over LMTP: SMTP cannot put anything in an archive)."""
        status = f"({self.attr['account_status']}={_filter_value(self.mapping.archive_status_value)})"
        return _and(_expand(self.mapping.user_filter, POSTFIX_ADDRESS_KEY, "user_filter"), f"(!{status})")

    def postfix_domain_filter(self, key: str) -> str:
        """The domain filter for a lookup keyed by a domain (%s) or an address (%d)."""
        values = POSTFIX_DOMAIN_KEY if key == "domain" else {"domain": "%d"}
        return _expand(self.mapping.domain_filter, values, "domain_filter")

    def not_a_role(self, attribute: str) -> str:
        """Matches entries whose ``attribute`` is no role address (``ROLE@anything``): such
        an admin_address would send role addresses round in a circle."""
        roles = "".join(f"({attribute}={_filter_value(r)}@*)" for r in self.roles)
        return f"(!(|{roles}))" if roles else f"({attribute}=*)"

    def postfix_tables(self, mailbox_nexthop: str) -> dict[str, LdapLookup]:
        """Every LDAP table the Postfix instances use, by name."""
        a = self.attr
        tables = [
            LdapLookup("ldap-domains", "hosted domains and their aliases (relay_domains)",
                       self.domain_base, self.postfix_domain_filter("domain"), a["domain_name"]),
            LdapLookup("ldap-recipients", "subscribers by primary or alternate address "
                       "(relay_recipient_maps)", self.user_base, self.postfix_user_filter(),
                       a["mail"]),
            LdapLookup("ldap-alias-domains", "domain alias -> canonical domain, local part kept "
                       "(virtual_alias_maps)", self.domain_base,
                       _and(self.postfix_domain_filter("address"), f"({a['domain_alias']}=%d)"),
                       a["domain_name"], "%U@%s", single_value=True),
            LdapLookup("ldap-alias-addresses", "alternate address -> primary address "
                       "(virtual_alias_maps)", self.user_base,
                       _and(self.postfix_user_filter(), f"({a['alternate_address']}=%s)"),
                       a["mail"], single_value=True),
            LdapLookup("ldap-role-admins", "role address -> its domain's admin_address, unless that "
                       "is a role address itself (virtual_alias_maps, keys filtered to "
                       "policy.role_addresses)", self.domain_base,
                       _and(self.postfix_domain_filter("address"), self.not_a_role(a["admin_address"])),
                       a["admin_address"], single_value=True),
            LdapLookup("ldap-role-domains", "role address -> its hosted domain, then policy.role_mailbox "
                       "(virtual_alias_maps, keys filtered to policy.role_addresses)", self.domain_base,
                       self.postfix_domain_filter("address"), a["domain_name"], single_value=True),
            LdapLookup("ldap-forwards", "subscriber -> every forward address (virtual_alias_maps, "
                       f"for LOCAL=DOMAIN@{FORWARD_DOMAIN})", self.user_base, self.postfix_user_filter(),
                       a["forward_addresses"]),
            LdapLookup("ldap-mailhost-users", "the subscriber's own mailbox host (transport_maps)",
                       self.user_base, self.postfix_user_filter(), a["mail_host"],
                       mailbox_nexthop, single_value=True),
            LdapLookup("ldap-mailhost-domains", "the domain's mailbox host, for subscribers "
                       "without their own (transport_maps)", self.domain_base,
                       self.postfix_domain_filter("domain"), a["mail_host"], mailbox_nexthop,
                       single_value=True),
            LdapLookup("ldap-legacy-domains", "a legacy or syncing domain's mail -> its legacy_mx "
                       "(transport_maps, before the mailbox hosts)", self.domain_base,
                       _and(self.postfix_domain_filter("address"), self.legacy_filter(),
                            f"({a['legacy_mx']}=*)"),
                       a["legacy_mx"], f"{LEGACY_TRANSPORT}:%s", single_value=True),
            LdapLookup("ldap-legacy-unrouted", "a legacy or syncing domain without legacy_mx: "
                       "deferred, never delivered to a mailbox host (transport_maps)",
                       self.domain_base,
                       _and(self.postfix_domain_filter("address"), self.legacy_filter(),
                            f"(!({a['legacy_mx']}=*))"),
                       a["domain_name"], "retry:4.3.5 legacy domain %s has no legacy_mx",
                       single_value=True),
        ]
        return {t.name: t for t in tables}

    def legacy_filter(self) -> str:
        """Matches domain entries whose mail the legacy system still serves
        (``migration_state`` legacy or syncing)."""
        attr = self.attr["migration_state"]
        return "(|" + "".join(f"({attr}={_filter_value(v)})" for v in sorted(LEGACY_STATES)) + ")"

    # Dovecot ----------------------------------------------------------------

    def dovecot_user_filter(self) -> str:
        """The subscriber filter with Dovecot's %u/%n/%d."""
        return _expand(self.mapping.user_filter, DOVECOT_USER, "user_filter")

    def dovecot_domain_filter(self) -> str:
        """The domain filter for the login's domain (%d)."""
        return _expand(self.mapping.domain_filter, {"domain": "%d"}, "domain_filter")

    def active_filter(self) -> str:
        """Matches accounts whose status means the account works (a missing status does)."""
        status = self.attr["account_status"]
        values = "".join(f"({status}={_filter_value(v)})" for v in self.active_values)
        return f"(|(!({status}=*)){values})"


def _unspecified(host: str) -> bool:
    """Whether ``host`` is a wildcard listen address (Dovecot must then use loopback)."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host == "*"


def _setting_default(cfg: Config, name: str) -> Any:
    """A setting's site-wide value: ``[policy.defaults]``, else the catalogue's default."""
    return site_defaults(cfg).get(name, catalogue.SETTINGS[name].default)


def default_mailbox_host(cfg: Config) -> str:
    """The mailbox host of subscribers whose entries and domains name none.

    ``[policy.defaults] mail_host`` is that value in the effective policy (what
    ``mailwarden explain`` shows); ``[render] default_mailbox_host`` says the same
    for sites that keep it out of the policy.  ``check`` refuses two different ones.
    """
    return str(_setting_default(cfg, "mail_host") or cfg.render.default_mailbox_host)


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


def milter_wiring(cfg: Config) -> MilterWiring:
    """The registered milter section, as the Postfix fragments read it."""
    section = cfg.sections.get(MILTER_SECTION)
    if not isinstance(section, MilterWiring):
        raise RenderError([f"{MILTER_SECTION}: no content milter section is registered"])
    return section


def policyd_wiring(cfg: Config) -> PolicydWiring:
    """The registered policy daemon section, as the Postfix and Dovecot fragments read it."""
    section = cfg.sections.get(POLICYD_SECTION)
    if not isinstance(section, PolicydWiring):
        raise RenderError([f"{POLICYD_SECTION}: no policy daemon section is registered"])
    return section


# ---------------------------------------------------------------- checks


def _endpoint_problems(r: Any, keys: Sequence[str]) -> list[str]:
    problems = []
    for key in keys:
        try:
            HostPort.parse(getattr(r, key))
        except ValueError as exc:
            problems.append(f"render.{key}: {exc}")
    return problems


def policy_endpoint(cfg: Config) -> str:
    """Where Postfix reaches the policy daemon (the first ``[policyd] listen`` entry)."""
    listen = policyd_wiring(cfg).listen
    if not listen:
        raise RenderError(["policyd.listen: empty, Postfix has no policy service to ask"])
    spec = listen[0]
    if spec.startswith("unix:/"):
        return spec
    if spec.startswith("inet:"):
        try:
            HostPort.parse(spec.removeprefix("inet:"))
        except ValueError as exc:
            raise RenderError([f"policyd.listen[0]: {exc}"]) from None
        return spec
    raise RenderError([f"policyd.listen[0]: {spec!r} is not unix:/path or inet:host:port"])


def check(cfg: Config) -> list[str]:
    """Problems that would make the rendered fragments wrong, as ``section.key: problem``."""
    r = cfg.render
    try:
        milter, policyd = milter_wiring(cfg), policyd_wiring(cfg)
    except RenderError as exc:
        return exc.problems
    problems = _endpoint_problems(
        r, ("route_listen", "mailbox_listen", "outbound_listen")
    )
    try:
        policy_endpoint(cfg)
    except RenderError as exc:
        problems += exc.problems
    if not (milter.socket.startswith(("unix:/", "inet:"))):
        problems.append(f"milter.socket: {milter.socket!r} is not unix:/path or inet:host:port")
    if not milter.reinject.startswith("inet:"):
        problems.append("milter.reinject: Postfix can only offer it as inet:host:port")
    else:
        try:
            HostPort.parse(milter.reinject.removeprefix("inet:"))
        except ValueError as exc:
            problems.append(f"milter.reinject: {exc}")
    listeners = [r.route_listen, r.mailbox_listen, r.outbound_listen]
    if len(set(listeners)) != len(listeners):
        problems.append("render: route_listen, mailbox_listen and outbound_listen must differ")
    if milter.reinject.removeprefix("inet:") in (r.mailbox_listen, r.outbound_listen):
        problems.append("milter.reinject: must not be the mailbox or outbound stage")
    # A message the edges accept must fit what the milter hands to clamd, or it
    # would be "unscannable" and tempfailed for ever for virus-scan subscribers.
    if r.message_size_limit + MILTER_HEADROOM > milter.clamd_max_size:
        problems.append(
            f"render.message_size_limit: {r.message_size_limit} bytes plus Postfix's headers "
            f"exceeds milter.clamd_max_size {milter.clamd_max_size}: such mail could never be scanned"
        )
    site_host = _setting_default(cfg, "mail_host")
    if site_host and r.default_mailbox_host and site_host != r.default_mailbox_host:
        problems.append(f"render.default_mailbox_host: {r.default_mailbox_host!r} differs from "
                        f"policy.defaults.mail_host {site_host!r}; set one of them")
    if policyd.idle_timeout <= 30:
        problems.append("policyd.idle_timeout: must exceed 30s (Postfix keeps idle connections)")
    for i, network in enumerate(r.balancer_networks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            problems.append(f"render.balancer_networks[{i}]: {network!r} is not an address or network")
    if "%" in r.sasl_path or " " in r.sasl_path:
        problems.append(f"render.sasl_path: {r.sasl_path!r} contains a space or %")
    for key in ("mailbox_concurrency", "recipient_limit", "message_size_limit",
                "quota_status_timeout"):
        if getattr(r, key) <= 0:
            problems.append(f"render.{key}: must be greater than 0")
    for key in ("dovecot_config_dir", "dovecot_base_dir", "dovecot_state_dir", "mail_root", "index_root"):
        if not getattr(r, key).startswith("/"):
            problems.append(f"render.{key}: must be an absolute path")
    return problems


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Rendered:
    """One written directory."""

    name: str
    directory: Path
    files: tuple[str, ...]


def _environment(subdir: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_root() / subdir)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # noqa: S701 - configuration files, not HTML
    )
    env.filters["yesno"] = lambda v: "yes" if v else "no"
    return env


def _write(path: Path, text: str, *, secret: bool = False, group: str = "") -> None:
    """Write a file; one holding a bind password is readable by its owner and ``group``
    only.  Run as root, the file is given to ``group`` (when it exists): the daemon's
    unprivileged processes (Postfix's proxymap, Dovecot's auth) read it as that group."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(0o640 if secret else 0o644)
    if secret and group and os.geteuid() == 0:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            return
        os.chown(path, -1, gid)


def _instance_paths(cfg: Config, role: str) -> dict[str, str]:
    name = f"postfix-{role}"
    r = cfg.render
    return {
        "name": name,
        "config_directory": r.config_directory.format(instance=name),
        "queue_directory": r.queue_directory.format(instance=name),
        "data_directory": r.data_directory.format(instance=name),
    }


def _policy_check(cfg: Config, context: str) -> str:
    """A check_policy_service restriction for the policy daemon, fail-safe (4xx) when it is down."""
    p = policyd_wiring(cfg)
    timeout = _seconds(p.request_timeout) + POLICY_TIMEOUT_MARGIN
    # Postfix closes idle connections before the daemon does, so it never writes
    # into a connection the daemon is closing.
    max_idle = max(1, min(300, math.floor(p.idle_timeout) - 30))
    return (
        f"check_policy_service {{ {policy_endpoint(cfg)}, timeout={timeout}s, max_idle={max_idle}s, "
        "{ default_action = 451 4.3.0 mailwarden policy service unavailable }, "
        f"policy_context={context} }}"
    )


def _quota_check(cfg: Config) -> str:
    r = cfg.render
    # Quota is checked again by Dovecot at delivery, so a silent quota-status
    # only costs an early reject: answer DUNNO and accept.
    return (
        f"check_policy_service {{ inet:{r.quota_status_host}:{r.quota_status_port}, "
        f"timeout={r.quota_status_timeout}s, try_limit=1, default_action=DUNNO, policy_context=quota }}"
    )


def _mailbox_nexthop(cfg: Config) -> str:
    r = cfg.render
    if r.mailbox_transport == "lmtp":
        return f"lmtp:inet:%s:{r.mailbox_port}"
    return f"smtp:[%s]:{r.mailbox_port}"


def _inline_regexp(pattern: str, result: str) -> str:
    """A one-rule inline ``regexp:`` table as main.cf must spell it (``$$``: a literal $)."""
    return f"regexp:{{{{/{pattern}/ {result}}}}}".replace("$", "$$")


def role_files(cfg: Config) -> dict[str, str]:
    """The regexp tables of the role addresses, as files: a ``$`` in main.cf would be
    expanded once more by proxymap (``proxy_read_maps`` names ``$virtual_alias_maps``)."""
    roles = cfg.policy.role_addresses
    if not roles:
        return {}
    names = "|".join(r.replace(".", "\\.") for r in roles)
    header = "# Rendered by `mailwarden render postfix` from [policy] role_addresses / role_mailbox.\n"
    files = {"role-addresses.regexp": f"{header}/^(({names})@.+)$/ ${{1}}\n"}
    if cfg.policy.role_mailbox:
        files["role-mailbox.regexp"] = f"{header}/./ {normalize_address(cfg.policy.role_mailbox)}\n"
    return files


def alias_maps(cfg: Config, config_directory: str) -> str:
    """The ``virtual_alias_maps`` entries that recognise (edges) and rewrite (route) aliases,
    in the resolver's order.

    * A domain alias maps LOCAL@ALIAS to LOCAL@CANONICAL only when a subscriber answers
      that address (``pipemap`` into ``ldap-recipients``), so an unknown local part at a
      domain alias is unlisted, and refused at RCPT, exactly as at the canonical domain.
    * An alternate address maps to the primary one.
    * A role address (``[policy] role_addresses``, the key passed on unchanged by
      ``role-addresses.regexp``) at any hosted domain or domain alias: a subscriber by
      that name wins (mapped to itself, which ends the expansion), else the domain's
      ``admin_address``, else ``[policy] role_mailbox`` (``role-mailbox.regexp``).

    Postfix retries each lookup without the address extension and keeps it in the
    result, as the resolver strips it.
    """
    table = f"proxy:ldap:{config_directory}/%s.cf"
    maps = [f"pipemap:{{ {table % 'ldap-alias-domains'}, {table % 'ldap-recipients'} }}",
            table % "ldap-alias-addresses"]
    files = role_files(cfg)
    if files:
        only_roles = f"regexp:{config_directory}/role-addresses.regexp"
        maps += [f"pipemap:{{ {only_roles}, {table % 'ldap-recipients'} }}",
                 f"pipemap:{{ {only_roles}, {table % 'ldap-role-admins'} }}"]
        if "role-mailbox.regexp" in files:
            site = f"regexp:{config_directory}/role-mailbox.regexp"
            maps.append(f"pipemap:{{ {only_roles}, {table % 'ldap-role-domains'}, {site} }}")
    return ",\n    ".join(maps)


def postfix_context(cfg: Config) -> dict[str, Any]:
    """Everything the Postfix templates use, derived once."""
    problems = check(cfg)
    if problems:
        raise RenderError(problems)
    r = cfg.render
    directory = LdapQueries(cfg)
    loopback = ["127.0.0.0/8"] + ([] if r.inet_protocols == "ipv4" else ["[::1]/128"])
    default_host = default_mailbox_host(cfg)
    missing_host = (
        _mailbox_nexthop(cfg).replace("%s", default_host) if default_host
        else "retry:4.3.5 no mailbox host for this recipient in the directory"
    )
    milter = milter_wiring(cfg)
    return {
        "cfg": cfg,
        "r": r,
        "roles": POSTFIX_INSTANCES,
        "tables": directory.postfix_tables(_mailbox_nexthop(cfg)),
        "ldap": cfg.ldap,
        "bind_password": bind_password(cfg.ldap) if cfg.ldap.bind_dn else "",
        "ldap_timeout": _seconds(cfg.ldap.timeout),
        "maillog_prefix": str(Path(r.maillog_file).parent) if r.maillog_file else "",
        "loopback": loopback,
        "route": HostPort.parse(r.route_listen),
        "mailbox": HostPort.parse(r.mailbox_listen),
        "outbound": HostPort.parse(r.outbound_listen),
        "reinject": HostPort.parse(milter.reinject.removeprefix("inet:")),
        "inner_size_limit": r.message_size_limit + INNER_SIZE_MARGIN,
        "policy_check": lambda context: _policy_check(cfg, context),
        "quota_check": _quota_check(cfg) if r.quota_status_host else "",
        "missing_mailbox_host": missing_host,
        "milter_socket": milter.socket,
        "milter_command_timeout": _seconds(milter.postfix_command_timeout),
        "milter_content_timeout": _seconds(milter.postfix_content_timeout),
        "recipient_delimiter": cfg.policy.recipient_delimiter,
        "instance": lambda role: _instance_paths(cfg, role),
        "alias_maps": lambda config_directory: alias_maps(cfg, config_directory),
        "forward_domain": FORWARD_DOMAIN,
        "legacy_transport": LEGACY_TRANSPORT,
        # LOCAL=DOMAIN@forward domain -> LOCAL@DOMAIN, the key of ldap-forwards.cf ($$: a
        # literal $ in main.cf)
        "forward_key": _inline_regexp("^(.+)=([^=@]+)@" + re.escape(FORWARD_DOMAIN) + "$", "${1}@${2}"),
    }


def render_postfix(cfg: Config, roles: Sequence[str], out: Path) -> list[Rendered]:
    """Write each role's instance directory below ``out``; return what was written."""
    unknown = [r for r in roles if r not in POSTFIX_INSTANCES]
    if unknown:
        raise RenderError([f"--role {', '.join(unknown)}: not one of {', '.join(POSTFIX_INSTANCES)}"])
    context = postfix_context(cfg)
    env = _environment("postfix-templates")
    secret = bool(cfg.ldap.bind_dn)
    written: list[Rendered] = []
    for role in roles or list(POSTFIX_INSTANCES):
        paths = _instance_paths(cfg, role)
        target = out / Path(paths["config_directory"]).name
        local = {**context, "role": role, **paths}
        files = {
            "main.cf": env.get_template(f"{role}.main.cf.j2").render(local),
            "master.cf": env.get_template(f"{role}.master.cf.j2").render(local),
        }
        for name in _tables_named(files["main.cf"], context["tables"]):
            table = context["tables"][name]
            files[f"{name}.cf"] = env.get_template("ldap.cf.j2").render({**local, "table": table})
        files.update({name: text for name, text in role_files(cfg).items() if f"/{name}" in files["main.cf"]})
        for name, text in files.items():
            _write(target / name, text, secret=secret and name.startswith("ldap-"), group="postfix")
        written.append(Rendered(paths["name"], target, tuple(files)))
    return written


def _tables_named(main_cf: str, tables: Mapping[str, LdapLookup]) -> list[str]:
    """The tables an instance's main.cf names (only those are written next to it)."""
    return [name for name in tables if f"/{name}.cf" in main_cf]


# ---------------------------------------------------------------- Dovecot


@dataclass(frozen=True)
class AuthStep:
    """One Dovecot passdb or userdb: an LDAP query (args file) or a static entry, and its place
    in the chain (``skip`` / ``result_*`` settings)."""

    kind: str
    name: str
    purpose: str
    driver: str = "ldap"
    base: str = ""
    query_filter: str = ""
    fields: tuple[str, ...] = ()
    auth_bind: bool = False
    default_pass_scheme: str = ""
    chain: tuple[tuple[str, str], ...] = ()

    @property
    def args_file(self) -> str:
        """The args file's name (LDAP steps)."""
        return f"mailwarden-{self.kind}-{self.name}.conf.ext"


# An LDAP outage in any step must fail the whole lookup (a tempfail for the
# client or for LMTP), never succeed with some fields missing.
_STOP_ON_ERROR = ("result_internalfail", "return-fail")


def auth_chain(cfg: Config, role: str) -> list[AuthStep]:
    """The passdbs and userdbs of a Dovecot role, in order.

    Later steps override the fields of earlier ones, which is how the
    directory's layers are merged here as in mailwarden: site default (the
    plugin settings), then the domain entry, then the subscriber's entry.  The
    domain step also maps a domain alias to its canonical domain, so a login or
    a delivery for ``taro@example.ne.jp`` becomes ``taro@example.jp``.
    """
    d = LdapQueries(cfg)
    a = d.attr
    r = cfg.render
    proxy = role == "proxy"
    canonical = f"=user=%n@%{{ldap:{a['domain_name']}}}"
    host = [f"{a['mail_host']}=host=%{{ldap:{a['mail_host']}}}"] if proxy else []
    steps: list[AuthStep] = []
    if proxy:
        default_host = default_mailbox_host(cfg)
        steps.append(AuthStep(
            "passdb", "defaults", "proxy to the mailbox host; the directory names which",
            driver="static",
            fields=("noauthenticate", "proxy=y", *((f"host={default_host}",) if default_host else ())),
            chain=(("result_success", "continue"),),
        ))
    steps.append(AuthStep(
        "passdb", "domain", "the login's domain: canonical name (aliases), domain-wide defaults",
        base=d.domain_base, query_filter=d.dovecot_domain_filter(),
        fields=("=noauthenticate=y", canonical, *host),
        chain=(("result_success", "continue"), ("result_failure", "return-fail"), _STOP_ON_ERROR),
    ))
    port = (f"=port=%{{if;%s;eq;pop3;{r.backend_pop3_port};{r.backend_imap_port}}}",) if proxy else ()
    steps.append(AuthStep(
        "passdb", "legacy-password", "a subscriber whose password hash was taken over from a "
        "legacy system (legacy_password): Dovecot checks it in the hash's own scheme; only "
        "active accounts",
        base=d.user_base,
        query_filter=_and(d.dovecot_user_filter(), d.active_filter(), f"({a['legacy_password']}=*)"),
        fields=(f"{a['legacy_password']}=password", f"=user=%{{ldap:{a['mail']}}}", *host, *port),
        default_pass_scheme="CRYPT",
        # Found and matching: authenticated, the bind below is skipped.  Not found or
        # not matching: the bind decides.
        chain=(("result_success", "continue-ok"), ("result_failure", "continue"), _STOP_ON_ERROR),
    ))
    steps.append(AuthStep(
        "passdb", "user", "the subscriber, by primary or alternate address; password checked by "
        "binding as the entry; only active accounts",
        base=d.user_base, query_filter=_and(d.dovecot_user_filter(), d.active_filter()),
        fields=(f"=user=%{{ldap:{a['mail']}}}", *host, *port), auth_bind=True,
        chain=(("skip", "authenticated"), *((("result_success", "continue-ok"),) if proxy else ()),
               _STOP_ON_ERROR),
    ))
    if proxy:
        legacy_port = f"%{{if;%s;eq;pop3;{r.legacy_pop3_port};{r.legacy_imap_port}}}"
        steps.append(AuthStep(
            "passdb", "legacy-domain", "a domain the legacy system still serves (migration_state "
            "legacy or syncing): the login is proxied to its legacy_mailbox_host",
            base=d.domain_base,
            query_filter=_and(d.dovecot_domain_filter(), d.legacy_filter(),
                              f"({a['legacy_mailbox_host']}=*)"),
            # It runs only once a step above has checked the password (skip unauthenticated),
            # so it checks none itself; the last step may not be a noauthenticate one.
            fields=("=nopassword=y",
                    f"{a['legacy_mailbox_host']}=host=%{{ldap:{a['legacy_mailbox_host']}}}",
                    f"=port={legacy_port}"),
            chain=(("skip", "unauthenticated"), ("result_success", "continue-ok"),
                   ("result_failure", "continue"), _STOP_ON_ERROR),
        ))
        return steps

    def env(name: str, attribute: str) -> str:
        return f"{a[attribute]}=sieve_env_mailwarden_{name}=%{{ldap:{a[attribute]}}}"

    layered = (
        f"{a['quota']}=quota_rule=*:bytes=%{{ldap:{a['quota']}}}",
        env("forward_keep_copy", "forward_keep_copy"),
        f"{a['vacation_period_days']}=sieve_vacation_default_period=%{{ldap:{a['vacation_period_days']}}}d",
    )
    steps.append(AuthStep(
        "userdb", "domain", "the domain: canonical name, and its quota, forwarding and vacation defaults",
        base=d.domain_base, query_filter=d.dovecot_domain_filter(), fields=(canonical, *layered),
        chain=(("result_success", "continue"), ("result_failure", "return-fail"), _STOP_ON_ERROR),
    ))
    archive = d.mapping.archive_status_value
    status = a["account_status"]

    def archive_or(archive_value: str, value: str) -> str:
        # Dovecot's %{if} ends a value at ':', so each ':'-separated part is chosen apart.
        return ":".join(
            mine if mine == other else f"%{{if;%{{ldap:{status}}};eq;{archive};{mine};{other}}}"
            for mine, other in zip(archive_value.split(":"), value.split(":"), strict=True)
        )

    for_archive = tuple(f"{status}={field}={archive_or(*values)}"
                        for field, values in archive_account_settings(r).items())
    steps.append(AuthStep(
        "userdb", "user", "the subscriber: primary address, home, and their own settings",
        base=d.user_base, query_filter=d.dovecot_user_filter(),
        fields=(f"=user=%{{ldap:{a['mail']}}}", *layered, *for_archive,
                env("forward", "forward_addresses"),
                env("vacation", "vacation_active"), env("vacation_subject", "vacation_subject"),
                env("vacation_text", "vacation_text")),
        chain=(("result_success", "continue-ok"), ("result_failure", "return-fail"), _STOP_ON_ERROR),
    ))
    steps.append(AuthStep(
        "userdb", "home", "home below mail_root, named after the primary address",
        driver="static", fields=("allow_all_users=yes", f"home={r.mail_root}/%d/%n",
                                 f"sieve_env_mailwarden_forward_via=%n=%d@{FORWARD_DOMAIN}"),
        chain=(("skip", "notfound"), ("result_success", "continue-ok")),
    ))
    return steps


def _bool_words(words: frozenset[str]) -> str:
    return ", ".join(f'"{w}"' for w in sorted(words))




def dovecot_context(cfg: Config, role: str) -> dict[str, Any]:
    """Everything the Dovecot templates use for ``role``."""
    problems = check(cfg)
    if problems:
        raise RenderError(problems)
    r = cfg.render
    directory = LdapQueries(cfg)
    config_dir = r.dovecot_config_dir.format(role=role)
    policyd = policyd_wiring(cfg)
    report_url = ""
    if policyd.login_report_listen:
        spec = policyd.login_report_listen[0]
        try:
            endpoint = HostPort.parse(spec.removeprefix("inet:"))
        except ValueError as exc:
            raise RenderError([f"policyd.login_report_listen[0]: {exc}"]) from None
        host = "127.0.0.1" if _unspecified(endpoint.host) else endpoint.host
        report_url = f"http://{HostPort(host, endpoint.port).service}/"
    # The login that opens a POP-before-SMTP window must be seen where the
    # client's address is: on the proxy, or on mailbox hosts clients reach directly.
    clients_here = role == "proxy" or not r.proxy_networks
    reports = bool(report_url) and clients_here
    submission_queue = _instance_paths(cfg, "submission")["queue_directory"]
    sasl_socket = "" if r.sasl_path.startswith("inet:") else str(Path(submission_queue) / r.sasl_path)
    quota = int(_setting_default(cfg, "quota"))
    return {
        "cfg": cfg,
        "r": r,
        "role": role,
        "roles": DOVECOT_ROLES,
        # The balancer is in front of the listeners clients reach.
        "haproxy": bool(r.balancer_networks) and clients_here,
        "config_dir": config_dir,
        "base_dir": r.dovecot_base_dir.format(role=role),
        "state_dir": r.dovecot_state_dir.format(role=role),
        "log_path": r.dovecot_log_path.format(role=role),
        "ldap": cfg.ldap,
        "bind_password": bind_password(cfg.ldap) if cfg.ldap.bind_dn else "",
        "attr": directory.attr,
        "auth_steps": auth_chain(cfg, role),
        "default_host": default_mailbox_host(cfg),
        "junk_header": catalogue.JUNK_HEADER,
        "forward_domain": FORWARD_DOMAIN,
        "true_words": _bool_words(catalogue.TRUE_WORDS),
        "false_words": _bool_words(catalogue.FALSE_WORDS),
        "site_quota": quota,
        "site_keep_copy": bool(_setting_default(cfg, "forward_keep_copy")),
        "site_vacation_days": int(_setting_default(cfg, "vacation_period_days")),
        "site_vacation_subject": str(_setting_default(cfg, "vacation_subject")),
        "auth_cache_ttl": _seconds(cfg.policy.cache_ttl),
        "auth_cache_negative_ttl": _seconds(cfg.policy.negative_cache_ttl),
        "report_url": report_url if reports else "",
        "report_protocols": policyd.login_report_protocols,
        "report_header": policyd.login_report_header,
        "login_domain": policyd.login_domain,
        "sasl_socket": sasl_socket,
        "sasl_inet": HostPort.parse(r.sasl_path.removeprefix("inet:")) if not sasl_socket else None,
        "recipient_delimiter": cfg.policy.recipient_delimiter,
        "doveadm_api_key": _doveadm_key(r) if role == "mailbox" and r.doveadm_http_port else "",
        "archive_master_entry": _archive_master_entry(r) if role == "mailbox" and r.archive_imap_port else "",
        "mail_location": mail_location(r),
        "maildir_quota": MAILDIR_QUOTA,
    }


def _secret(r: RenderConfig, setting: str, what: str) -> str:
    """The secret in the file ``[render] setting`` names; RenderError naming the setting."""
    try:
        return read_api_key(getattr(r, setting), what)
    except DoveadmError as exc:
        raise RenderError([f"render.{setting}: {exc}"]) from None


def mail_location(r: RenderConfig) -> str:
    """Where a subscriber's mail is: a Maildir on NFS, its indexes on the host's disk."""
    return f"maildir:~/Maildir:INDEX={r.index_root}/%d/%n"


MAILDIR_QUOTA = "maildir:User quota"
"""The subscribers' quota backend: Maildir++ (``maildirsize``, read by every host)."""


def archive_account_settings(r: RenderConfig) -> dict[str, tuple[str, str]]:
    """The userdb fields an archive mailbox sets differently: field -> (archive, others).

    An archive mailbox only grows, is written by its mailbox host alone and is read only
    by ``doveadm``.  As sdbox (the default), each copy is one file named by its UID and the
    index sits beside the files on NFS (it is the mailbox's record of UIDs; ``doveadm
    force-resync`` rebuilds it from the files), so a save costs the same however large the
    archive is, where a Maildir rereads its ``dovecot-uidlist`` (one line per message) for
    every save.  Its quota is counted in the index (``count``): Maildir++ works only on a
    Maildir.  Either format syncs each copy before Dovecot answers but not its indexes
    (``mail_fsync = optimized``)."""
    fields = {"mail_fsync": ("optimized", "always")}
    if r.archive_mailbox_format == "sdbox":
        fields["mail"] = ("sdbox:~/sdbox:INDEX=~/sdbox", mail_location(r))
        fields["quota"] = ("count:User quota", MAILDIR_QUOTA)
        fields["quota_vsizes"] = ("yes", "no")
    return fields


def archive_master_password(r: RenderConfig) -> str:
    """The archive master user's password (read by the milter and for the passwd file).
    Raises RenderError."""
    return _secret(r, "archive_master_password_file", "archive master password")


def _archive_master_entry(r: RenderConfig) -> str:
    """The archive master user's passwd-file line: a salted SHA-256 of its password, and the
    networks it may log in from (the front nodes', and loopback)."""
    salt = os.urandom(8)
    digest = base64.b64encode(hashlib.sha256(archive_master_password(r).encode() + salt).digest() + salt)
    nets = ",".join([*r.proxy_networks, "127.0.0.0/8", "::1"])
    return f"{r.archive_master_user}:{{SSHA256}}{digest.decode()}::::::allow_nets={nets}"


def _doveadm_key(r: RenderConfig) -> str:
    """The doveadm API key from its file (a rendered file must not depend on a newline)."""
    return _secret(r, "doveadm_api_key_file", "doveadm API key")


def render_dovecot(cfg: Config, roles: Sequence[str], out: Path) -> list[Rendered]:
    """Write each Dovecot role's directory below ``out``; return what was written."""
    unknown = [r for r in roles if r not in DOVECOT_ROLES]
    if unknown:
        raise RenderError([f"--role {', '.join(unknown)}: not one of {', '.join(DOVECOT_ROLES)}"])
    chosen = list(roles or DOVECOT_ROLES)
    targets = {role: out / Path(cfg.render.dovecot_config_dir.format(role=role)).name for role in chosen}
    if len(set(targets.values())) != len(targets):
        raise RenderError(["render.dovecot_config_dir: every role would be written to the same "
                           "directory; render one --role at a time or put {role} in it"])
    env = _environment("dovecot-templates")
    secret = bool(cfg.ldap.bind_dn)
    written: list[Rendered] = []
    for role in chosen:
        context = dovecot_context(cfg, role)
        files: dict[str, str] = {}
        for template in sorted(env.list_templates(filter_func=lambda n: n.endswith(".j2"))):
            top, _, rest = template.partition("/")
            if top in ("common", role):
                text = env.get_template(template).render(context)
                if text.strip():
                    files[rest.removesuffix(".j2")] = text
        args = env.get_template("ldap.conf.ext.j2")
        for step in context["auth_steps"]:
            if step.driver == "ldap":
                files[step.args_file] = args.render({**context, "step": step})
        for name, text in files.items():
            keyed = name.endswith("mailwarden-doveadm.conf.ext")
            passwd = name.endswith(".passwd")
            _write(targets[role] / name, text,
                   secret=keyed or passwd or (secret and name.endswith(".conf.ext")),
                   group="" if keyed else "dovecot")
        written.append(Rendered(f"dovecot-{role}", targets[role], tuple(sorted(files))))
    return written
