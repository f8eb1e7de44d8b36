"""Rendered Postfix instances: `postfix check`, Postfix's own reading of them, their LDAP
tables against the real slapd, and a live edge instance with the real policy daemon,
milter and Dovecot."""

from __future__ import annotations

import re
import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.postfix import send_mail
from harness.slapd import SlapdServer
from mailwarden.ldapdir import LdapDirectory
from mailwarden.policy import AddressKind, PolicyResolver
from mailwarden.render import POSTFIX_INSTANCES
from milters.config import MilterConfig
from policyd.config import PolicydConfig
from tests.render.conftest import (
    Daemon,
    RenderedDovecot,
    RenderedPostfix,
    Site,
    compat_ldap_toml,
    ldap_toml,
    need_dovecot,
    need_postfix,
    pop3_login,
    self_signed,
    site_root,
    start_milter,
)

pytestmark = pytest.mark.usefixtures("slapd")

EDGES = ("submission", "pop-before-smtp", "mx")


@pytest.fixture(scope="module")
def rendered(slapd: SlapdServer) -> Iterator[dict[str, RenderedPostfix]]:
    """All five instances of one site, rendered once for the module."""
    need_postfix()
    with site_root() as root:
        site = Site(root, ldap_toml(slapd) + ROLES)
        site.postfix()
        yield {role: RenderedPostfix(site, role) for role in POSTFIX_INSTANCES}


# [policy] role addresses (before the [render] table, which Site.as_proxy extends).
# pbs@example.jp is a subscriber: a role name with a directory entry of its own wins.
ROLES = '[policy]\nrole_addresses = ["postmaster", "abuse", "hostmaster", "pbs"]\n' \
        'role_mailbox = "roles@isp.example"\n'


def test_every_instance_passes_postfix_check(rendered: dict[str, RenderedPostfix]) -> None:
    for instance in rendered.values():
        output = instance.check()
        assert "warning" not in output and "fatal" not in output, output
        # postconf reads main.cf and master.cf without complaint (stderr checked).
        instance.settings()
        instance.services()


def test_edges_ask_the_policy_daemon_and_fail_safe(rendered: dict[str, RenderedPostfix]) -> None:
    config = rendered["mx"].site.config
    endpoint = PolicydConfig.of(config).listen[0]
    for role in EDGES:
        s = rendered[role].settings()
        relay = s["smtpd_relay_restrictions"]
        assert relay.startswith(f"check_policy_service {{ {endpoint}, timeout=20s,")
        assert relay.endswith("reject_unauth_destination")
        assert "{ default_action = 451 4.3.0 mailwarden policy service unavailable }" in relay
        assert f"policy_context={role} }}" in relay
        found = re.search(r"timeout=(\d+)s", relay)
        assert found and int(found.group(1)) > PolicydConfig.of(config).request_timeout
        # Rate limits count bytes at the end of DATA: the same service, the same fail-safe.
        assert s["smtpd_end_of_data_restrictions"] == relay.removesuffix(", reject_unauth_destination")


def test_edges_run_the_milter_before_the_queue_and_tempfail_without_it(
    rendered: dict[str, RenderedPostfix],
) -> None:
    milter = MilterConfig.of(rendered["mx"].site.config)
    for role in EDGES:
        s = rendered[role].settings()
        assert s["smtpd_milters"] == milter.socket
        assert s["milter_default_action"] == "tempfail"
        assert s["milter_protocol"] == "6"
        assert s["milter_command_timeout"] == f"{milter.postfix_command_timeout:g}s"
        assert s["milter_content_timeout"] == f"{milter.postfix_content_timeout:g}s"
        assert s.get("non_smtpd_milters", "") == ""
        # Hosted domains and subscribers come from LDAP; nothing is rewritten at the edge.
        assert s["relay_domains"] == f"proxy:ldap:{rendered[role].etc}/ldap-domains.cf"
        assert s["relay_recipient_maps"].endswith("/ldap-recipients.cf")
        assert s["receive_override_options"] == "no_address_mappings"
    for role in ("route", "mailbox"):
        assert "smtpd_milters" not in rendered[role].settings()


def test_submission_wants_tls_and_a_login(rendered: dict[str, RenderedPostfix]) -> None:
    instance = rendered["submission"]
    s = instance.settings()
    assert s["smtpd_tls_security_level"] == "encrypt" and s["smtpd_tls_auth_only"] == "yes"
    assert s["smtpd_sasl_type"] == "dovecot" and s["smtpd_sasl_path"] == "private/auth"
    assert s["smtpd_client_restrictions"] == "permit_sasl_authenticated, reject"
    route = instance.site.config.render.route_listen
    assert s["default_transport"] == s["relay_transport"] == f"to-route:[{route.replace(':', ']:')}"
    services = instance.services()
    port = instance.site.ports["submission"]
    assert f"127.0.0.1:{port}/inet" in services
    assert "smtp_send_xforward_command=yes" in services["to-route/unix"]
    pbs = rendered["pop-before-smtp"].settings()
    assert pbs["smtpd_sasl_auth_enable"] == "no" and pbs["smtpd_tls_security_level"] == "may"


def test_route_stage_rewrites_aliases_and_picks_the_path(rendered: dict[str, RenderedPostfix]) -> None:
    instance = rendered["route"]
    s = instance.settings()
    r = instance.site.config.render
    # Domain aliases (of known subscribers), alternate addresses, role addresses (a
    # subscriber, the domain's admin, the site's mailbox), and the forwarding address
    # -> every forward address.
    assert s["virtual_alias_maps"].count("proxy:ldap:") == 7
    assert s["virtual_alias_maps"].startswith("pipemap:{ proxy:ldap:")
    assert "pipemap:{ regexp:" in s["virtual_alias_maps"]
    assert s["virtual_alias_domains"] == "forward.mailwarden.invalid"
    assert s["relay_transport"] == f"to-mailbox:[127.0.0.1]:{r.mailbox_listen.split(':')[1]}"
    assert s["default_transport"] == f"to-outbound:[127.0.0.1]:{r.outbound_listen.split(':')[1]}"
    assert s["smtpd_client_restrictions"] == "permit_mynetworks, reject"
    assert s["mynetworks"] == "127.0.0.0/8"
    assert int(s["message_size_limit"]) > r.message_size_limit
    services = instance.services()
    # The milter's re-injection port ([milter] reinject) joins the route stage.
    reinject = MilterConfig.of(instance.site.config).reinject.removeprefix("inet:")
    assert "syslog_name=postfix-route/reinject" in services[f"{reinject}/inet"]


def test_mailbox_stage_routes_by_mailbox_host(rendered: dict[str, RenderedPostfix]) -> None:
    s = rendered["mailbox"].settings()
    legacy, unrouted, users, domains = s["transport_maps"].split(", ")
    # A domain still on its legacy system is routed there first (docs/migration.md).
    assert legacy.endswith("/ldap-legacy-domains.cf") and unrouted.endswith("/ldap-legacy-unrouted.cf")
    assert users.endswith("/ldap-mailhost-users.cf") and domains.endswith("/ldap-mailhost-domains.cf")
    assert s["relay_transport"] == "retry:4.3.5 no mailbox host for this recipient in the directory"
    assert s["lmtp_destination_concurrency_limit"] == "20"


def test_mx_hands_inbound_mail_to_the_route_stage(rendered: dict[str, RenderedPostfix]) -> None:
    instance = rendered["mx"]
    s = instance.settings()
    ports = instance.site.ports
    assert s["default_transport"] == "smtp"
    assert f"check_policy_service {{ inet:127.0.0.1:{ports['quota']}, timeout=5s" in s[
        "smtpd_recipient_restrictions"]
    services = instance.services()
    public = services[f"127.0.0.1:{ports['mx']}/inet"]
    assert f"content_filter=to-route:[127.0.0.1]:{ports['route']}" in public
    outbound = services[f"127.0.0.1:{ports['outbound']}/inet"]
    assert "smtpd_milters= " in outbound + " " and "smtpd_end_of_data_restrictions= " in outbound + " "


def test_ldap_tables_answer_from_the_directory(rendered: dict[str, RenderedPostfix]) -> None:
    route, mailbox = rendered["route"], rendered["mailbox"]
    assert route.lookup("ldap-domains", "example.ne.jp") == "example.jp"
    assert route.lookup("ldap-domains", "elsewhere.example") is None
    assert route.lookup("ldap-recipients", "sales@example.com") == "alice@example.com"
    assert route.lookup("ldap-recipients", "nobody-here@example.com") is None
    assert route.lookup("ldap-alias-domains", "taro+news@example.ne.jp") == "taro+news@example.jp"
    assert route.lookup("ldap-alias-domains", "taro@example.jp") is None
    assert route.lookup("ldap-alias-addresses", "taro.yamada@example.jp") == "taro@example.jp"
    assert route.lookup("ldap-alias-addresses", "taro@example.jp") is None
    # A domain alias answers only for a subscriber of the canonical domain (pipemap into
    # ldap-recipients): an unknown local part there is unlisted, as at the canonical domain.
    for instance in (route, rendered["mx"]):
        assert instance.alias("taro@example.ne.jp") == "taro@example.jp"
        assert instance.alias("taro.yamada@example.ne.jp") == "taro@example.jp"
        assert instance.alias("nosuchuser@example.ne.jp") is None
        assert instance.alias("taro+news@example.ne.jp") is None  # Postfix retries as taro@
    assert route.lookup("ldap-forwards", "hanako@example.jp") == "hanako@example.com"
    assert route.lookup("ldap-forwards", "taro@example.jp") is None
    # The subscriber's own mailbox host, else the domain's.
    lmtp = route.site.ports["lmtp"]
    assert mailbox.lookup("ldap-mailhost-users", "hanako@example.jp") == f"lmtp:inet:mbox2.example.jp:{lmtp}"
    assert mailbox.lookup("ldap-mailhost-users", "taro@example.jp") is None
    assert mailbox.lookup("ldap-mailhost-domains", "example.jp") == f"lmtp:inet:mbox1.example.jp:{lmtp}"


def test_role_addresses_route_as_the_resolver_says(rendered: dict[str, RenderedPostfix]) -> None:
    """Postfix's alias tables and the effective-policy core agree on every role address:
    the domain's admin_address, else the site's role mailbox, and a directory entry wins."""
    route = rendered["route"]
    config = route.site.config
    resolver = PolicyResolver(LdapDirectory(config.ldap), config)
    expected = {
        "postmaster@lab.example.org": "prof@lab.example.org",   # the domain's admin_address
        "abuse@example.ne.jp": "hanako@example.jp",             # through a domain alias
        "hostmaster@bare.example.net": "roles@isp.example",     # no admin_address: the site's
        "pbs@example.jp": "pbs@example.jp",                     # a subscriber: itself, expansion ends
        "webmaster@example.jp": None,                           # not a role address
        "postmaster@elsewhere.example": None,                   # not hosted here
    }
    for address, target in expected.items():
        assert route.alias(address) == target, address
        policy = resolver.effective_policy(address)
        if target is None:
            assert policy.kind in (AddressKind.UNKNOWN_USER, AddressKind.NOT_LOCAL), address
        else:
            assert policy.canonical == target, address
    assert resolver.effective_policy("abuse@example.ne.jp").kind is AddressKind.ROLE
    assert resolver.effective_policy("pbs@example.jp").kind is AddressKind.SUBSCRIBER
    assert rendered["mx"].alias("abuse+x@bare.example.net") is None  # Postfix retries as abuse@
    assert rendered["mx"].alias("abuse@bare.example.net") == "roles@isp.example"


def test_ldap_tables_follow_the_alternative_mapping(tmp_path: Path, slapd: SlapdServer) -> None:
    need_postfix()
    site = Site(tmp_path, compat_ldap_toml(slapd))
    site.postfix("route", "mailbox")  # postmap only: no daemon needs to enter tmp_path
    route, mailbox = RenderedPostfix(site, "route"), RenderedPostfix(site, "mailbox")
    assert route.lookup("ldap-domains", "old-legacy.example") == "legacy.example"
    assert route.lookup("ldap-alias-domains", "ken@old-legacy.example") == "ken@legacy.example"
    assert route.lookup("ldap-alias-addresses", "k.tanaka@legacy.example") == "ken@legacy.example"
    assert route.lookup("ldap-recipients", "mika@legacy.example") == "mika@legacy.example"
    assert route.alias("ken@old-legacy.example") == "ken@legacy.example"
    assert route.alias("nobody@old-legacy.example") is None
    lmtp = f"lmtp:inet:%s:{site.ports['lmtp']}"
    assert mailbox.lookup("ldap-mailhost-users", "ken@legacy.example") == lmtp % "store2.legacy.example"
    assert mailbox.lookup("ldap-mailhost-domains", "legacy.example") == lmtp % "store1.legacy.example"


# ---------------------------------------------------------------- live


def _edge(site: Site, role: str) -> RenderedPostfix:
    """A rendered edge instance, kept off DNS for the test."""
    self_signed(site)
    site.postfix(role)
    instance = RenderedPostfix(site, role)
    instance.set(smtp_dns_support_level="disabled", smtpd_peername_lookup="no",
                 smtpd_error_sleep_time="0", smtpd_soft_error_limit="100")
    return instance


def _submit(port: int, login: tuple[str, str] | None, rcpt: str) -> dict[str, tuple[int, str]]:
    """A submission client: STARTTLS (the test certificate is not verified), AUTH, MAIL, RCPT."""
    replies: dict[str, tuple[int, str]] = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=("127.0.0.2", 0)) as smtp:
        smtp.ehlo("client.outside.test")
        replies["auth-offered-before-tls"] = (int(smtp.has_extn("auth")), "")
        smtp.starttls(context=ssl._create_unverified_context())  # a throw-away test certificate
        smtp.ehlo("client.outside.test")
        if login is not None:
            smtp.user, smtp.password = login
            try:  # one AUTH PLAIN: every failure costs Dovecot's auth delay
                code, text = smtp.auth("PLAIN", smtp.auth_plain)
            except smtplib.SMTPAuthenticationError as exc:
                code, text = exc.smtp_code, exc.smtp_error
            replies["auth"] = (code, text.decode() if isinstance(text, bytes) else text)
        code, text = smtp.mail(login[0] if login else "someone@outside.test")
        replies["mail"] = (code, text.decode())
        code, text = smtp.rcpt(rcpt)
        replies["rcpt"] = (code, text.decode())
    return replies


def test_edges_fail_safe_and_grant_relay_rights(rendered: dict[str, RenderedPostfix], running: list) -> None:
    """Live, with the real daemons:

    * fail-safe: while the milter or the policy daemon is missing, the rendered edge
      answers 4xx and accepts nothing;
    * POP-before-SMTP: a POP3 login at the rendered Dovecot lets that client address
      relay through the rendered POP-before-SMTP instance, and no other address;
    * SMTP-AUTH: the rendered submission instance takes logins (only after STARTTLS)
      from the rendered Dovecot proxy's SASL service; the policy daemon decides who
      may relay.
    """
    need_dovecot()
    # The module's site: its instances' queues exist already (postfix check ran above).
    site = rendered["mx"].site.copy()
    # 127.0.0.1 stays trusted (the stages); the test's clients come from 127.0.0.2 and .3.
    site.text = site.text.replace("[policyd]\n", '[policyd]\ntrusted_networks = ["127.0.0.1/32"]\n'
                                  'checks = ["relay", "sender_login"]\n', 1)
    edge = _edge(site, "pop-before-smtp")
    edge.start()
    running.append(edge)
    port = site.ports["pop_before_smtp"]

    # No milter: milter_default_action = tempfail refuses the transaction, never accepts it.
    no_milter = send_mail("127.0.0.1", port, "someone@outside.test", ["taro@example.jp"],
                          source_address="127.0.0.2")
    assert no_milter.mail[0] == 451 and not no_milter.accepted, no_milter
    running.append(start_milter(site))
    # Milter up, policy daemon down: 451 at RCPT (the rendered default_action).
    no_policy = send_mail("127.0.0.1", port, "someone@outside.test", ["taro@example.jp"],
                          source_address="127.0.0.2")
    assert no_policy.mail[0] == 250, edge.log()[-3000:]
    assert no_policy.rcpt["taro@example.jp"] == (
        451, "4.3.0 <taro@example.jp>: Recipient address rejected: mailwarden policy service unavailable")

    policyd = Daemon(site, "policyd", "run")
    policyd.start(port=site.ports["policyd"])
    running.append(policyd)
    site.dovecot("mailbox")
    dovecot = RenderedDovecot(site, "mailbox")
    dovecot.start(site.ports["pop3"])
    running.append(dovecot)

    before = send_mail("127.0.0.1", port, "pbs@example.jp", ["friend@elsewhere.test"],
                       source_address="127.0.0.2")
    assert before.rcpt["friend@elsewhere.test"][0] == 554, before

    assert pop3_login(site.ports["pop3"], "pbs@example.jp", source="127.0.0.2").startswith(b"+OK")

    after = send_mail("127.0.0.1", port, "pbs@example.jp", ["friend@elsewhere.test"],
                      source_address="127.0.0.2")
    assert after.rcpt["friend@elsewhere.test"][0] == 250, (after, policyd.log()[-2000:])
    other = send_mail("127.0.0.1", port, "pbs@example.jp", ["friend@elsewhere.test"],
                      source_address="127.0.0.3")
    assert other.rcpt["friend@elsewhere.test"][0] == 554
    # Local recipients are validated against LDAP at RCPT.
    unknown = send_mail("127.0.0.1", port, "pbs@example.jp", ["no-such-user@example.jp"],
                        source_address="127.0.0.2")
    assert unknown.rcpt["no-such-user@example.jp"][0] == 550
    # The same at a domain alias: refused at RCPT, never accepted and bounced later.
    at_alias = send_mail("127.0.0.1", port, "pbs@example.jp",
                         ["nosuchuser@example.ne.jp", "taro+news@example.ne.jp", "taro.yamada@example.ne.jp"],
                         source_address="127.0.0.2")
    assert at_alias.rcpt["nosuchuser@example.ne.jp"][:1] == (550,), at_alias
    assert at_alias.rcpt["nosuchuser@example.ne.jp"][1].startswith("5.1.1 "), at_alias
    assert at_alias.rcpt["taro+news@example.ne.jp"][0] == 250, at_alias
    assert at_alias.rcpt["taro.yamada@example.ne.jp"][0] == 250, at_alias
    # Role addresses exist at every hosted domain and domain alias.
    roles = send_mail("127.0.0.1", port, "someone@outside.test", ["postmaster@example.ne.jp",
                      "abuse@bare.example.net", "webmaster@bare.example.net"], source_address="127.0.0.3")
    assert roles.rcpt["postmaster@example.ne.jp"][0] == 250, roles
    assert roles.rcpt["abuse@bare.example.net"][0] == 250, roles
    assert roles.rcpt["webmaster@bare.example.net"][0] == 550, roles

    front = site.as_proxy()
    front.dovecot("proxy")
    proxy = RenderedDovecot(front, "proxy")
    proxy.start(site.ports["sasl"])
    running.append(proxy)
    submission = _edge(front, "submission")
    submission.start()
    running.append(submission)
    sub_port = site.ports["submission"]
    taro = _submit(sub_port, ("taro.yamada@example.ne.jp", "secret"), "friend@elsewhere.test")
    assert taro["auth-offered-before-tls"] == (0, "")  # no AUTH before STARTTLS
    assert taro["auth"][0] == 235 and taro["rcpt"][0] == 250, (taro, submission.log()[-2000:])
    # pbs@example.jp may log in, but the smtp_auth service is off: no relaying.
    pbs = _submit(sub_port, ("pbs@example.jp", "secret"), "friend@elsewhere.test")
    assert pbs["auth"][0] == 235 and pbs["rcpt"][0] == 554
    # Without a login this port takes nothing.
    anonymous = _submit(sub_port, None, "taro@example.jp")
    assert anonymous["rcpt"][0] == 554
