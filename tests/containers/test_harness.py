"""The container harness's own parts that need no Docker: they run in every test run."""

from __future__ import annotations

import importlib.metadata
import ipaddress
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import dkim
import dns.message
import dns.query
import pytest
from click.testing import CliRunner

from harness import containers
from harness.containers import (
    COMPOSE_FILE,
    DEPLOY,
    TOPOLOGY,
    ZoneFiles,
    compose_file,
    dns_servers,
    docker_leftovers,
    pick_network,
    read_zone,
    runtime_requirements,
)
from harness.ports import free_port
from mailwarden.cli.common import App
from mailwarden.config import parse_config
from mailwarden.render import render_dovecot, render_postfix
from milters.cli import dkim_group

STACK_ETC = DEPLOY / "rootfs" / "etc" / "mailwarden-stack"
NET = "10.231.7"


def stack_config(role: str) -> str:
    """mailwarden.toml as mw-init writes it for ``role``."""
    text = (STACK_ETC / "common.toml").read_text() + (STACK_ETC / f"{role}.toml").read_text()
    # mw-init puts in the host's name and address (the first front node's here).
    return (text.replace("@NET@", NET).replace("@HOSTNAME@", "mx1.mailwarden.test")
            .replace("@ADDR@", f"{NET}.10"))


def test_shipped_compose_file_is_the_harness_topology() -> None:
    regenerate = "python -m harness.containers compose > deploy/container/compose.yaml"
    assert COMPOSE_FILE.read_text() == compose_file(), f"regenerate it: {regenerate}"
    for host in TOPOLOGY:
        assert f'ipv4_address: "${{MW_NET:-10.231.7}}.{host.octet}"' in compose_file()


def test_hosts_file_zone_and_topology_agree() -> None:
    hosts = {}
    for line in (STACK_ETC / "hosts").read_text().splitlines():
        if line and not line.startswith("#"):
            address, *names = line.split()
            hosts[names[0]] = address.replace("@NET@", NET)
    assert hosts == {h.hostname: f"{NET}.{h.octet}" for h in containers.HOSTS.values()}
    zone = read_zone((STACK_ETC / "zone").read_text().replace("@NET@", NET))
    # Every MX target has an address, and it is the host the topology says.
    for records in zone.values():
        for mx in records.get("MX", []):
            target = mx.split()[1].rstrip(".")
            assert zone[target]["A"] == [hosts[target]]


@pytest.mark.parametrize("role", ["front", "mailbox"])
def test_the_stack_configuration_is_valid_and_renders(role: str, tmp_path: Path) -> None:
    cfg = parse_config(stack_config(role), f"{role}.toml")
    assert cfg.dns.nameservers == [f"{NET}.53"]
    # Both ask (front) or serve (mailbox) the doveadm HTTP API with the key mw-init makes.
    assert cfg.render.doveadm_http_port == containers.DOVEADM_PORT
    # Both save (front) or take (mailbox) archive copies over IMAP as the master user.
    assert cfg.render.archive_imap_port == containers.ARCHIVE_IMAP_PORT
    key, master = tmp_path / "doveadm.key", tmp_path / "archive-master.key"
    key.write_text("stack-test-key\n")
    master.write_text("stack-master-password\n")
    text = stack_config(role).replace(cfg.render.doveadm_api_key_file, str(key))
    cfg = parse_config(text.replace(cfg.render.archive_master_password_file, str(master)), f"{role}.toml")
    if role == "front":
        written = render_postfix(cfg, [], tmp_path)
        assert {w.name for w in written} == {f"postfix-{r}" for r in containers.FRONT_INSTANCES}
        main_cf = (tmp_path / "postfix-mx" / "main.cf").read_text()
        assert "myhostname = mx1.mailwarden.test" in main_cf
        assert "maillog_file = /var/log/mailwarden/postfix.log" in main_cf
    written = render_dovecot(cfg, ["proxy" if role == "front" else "mailbox"], tmp_path)
    conf = (written[0].directory / "dovecot.conf").read_text()
    assert "log_path = /var/log/mailwarden/dovecot.log" in conf
    if role == "mailbox":
        keyed = (written[0].directory / "conf.d" / "mailwarden-doveadm.conf.ext").read_text()
        assert "doveadm_api_key = stack-test-key" in keyed
        passwd = (written[0].directory / "mailwarden-archive-master.passwd").read_text()
        assert passwd.startswith("mailwarden-archive:{SSHA256}") and f"allow_nets={NET}.8/29," in passwd


@pytest.fixture
def published(tmp_path: Path) -> Path:
    """The directory of zones the front node publishes (a volume shared with the dns host)."""
    path = tmp_path / "published"
    path.mkdir()
    return path


@pytest.fixture
def dns_stub(tmp_path: Path, published: Path) -> Iterator[int]:
    zone = tmp_path / "zone"
    zone.write_text((STACK_ETC / "zone").read_text().replace("@NET@", NET))
    port = free_port()
    servers = dns_servers(ZoneFiles(zone, published), "127.0.0.1", port)
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield port
    for server in servers:
        server.shutdown()
        server.server_close()


def test_the_dns_container_answers_from_the_zone_over_udp_and_tcp(dns_stub: int) -> None:
    mx = dns.query.udp(dns.message.make_query("example.jp", "MX"), "127.0.0.1", port=dns_stub, timeout=2)
    assert [r.to_text() for r in mx.answer[0]] == ["10 mx.mailwarden.test."]  # the balancer
    spf = dns.query.tcp(dns.message.make_query("outside.test", "TXT"), "127.0.0.1", port=dns_stub, timeout=2)
    assert spf.answer[0][0].to_text() == f'"v=spf1 ip4:{NET}.100 -all"'
    dmarc = dns.query.udp(dns.message.make_query("_dmarc.bank.test", "TXT"), "127.0.0.1", port=dns_stub,
                          timeout=2)
    assert dmarc.answer[0][0].to_text() == '"v=DMARC1; p=reject"'
    missing = dns.query.udp(dns.message.make_query("deb.debian.org", "A"), "127.0.0.1", port=dns_stub,
                            timeout=2)
    assert missing.rcode() == dns.rcode.NXDOMAIN


def test_a_dkim_record_keygen_prints_is_served_once_published(
    dns_stub: int, published: Path, tmp_path: Path
) -> None:
    config = tmp_path / "mailwarden.toml"
    config.write_text(f'[milter]\ndkim_key_path = "{tmp_path}/keys/{{domain}}.{{selector}}.key"\n')
    printed = CliRunner().invoke(dkim_group, ["keygen", "example.com", "mw2026"], obj=App(str(config)))
    assert printed.exit_code == 0, printed.output
    name = "mw2026._domainkey.example.com"

    def served() -> dns.message.Message:
        query = dns.message.make_query(name, "TXT")
        return dns.query.udp(query, "127.0.0.1", port=dns_stub, timeout=2)

    assert served().rcode() == dns.rcode.NXDOMAIN
    # As mw-init publishes it: the line keygen printed, in a *.zone file (read again at once).
    (published / "dkim-example.com-mw2026.zone").write_text(printed.stdout)
    [rdata] = served().answer[0]
    strings = [s.decode() for s in rdata.strings]
    assert len(strings) > 1 and all(len(s) <= 255 for s in strings)
    record = "".join(strings)
    assert re.findall(r'"([^"]*)"', printed.stdout) == strings and record.startswith("v=DKIM1; k=rsa; p=MII")
    # A message signed with the key verifies against what is served.
    key = (tmp_path / "keys" / "example.com.mw2026.key").read_bytes()
    data = b"From: alice@example.com\r\nSubject: hi\r\n\r\nhello\r\n"
    signed = dkim.sign(data, b"mw2026", b"example.com", key) + data
    assert dkim.verify(signed, dnsfunc=lambda _name, timeout=5: record.encode())


def test_runtime_requirements_pin_this_environment_and_add_what_only_the_image_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pins = runtime_requirements()
    assert any(p.startswith("aiospamc==") for p in pins) and any(p.startswith("redis==") for p in pins)
    assert any(p.startswith("python-ldap==") for p in pins)
    assert any(p.startswith("hiredis==") for p in pins) and any(p.startswith("uvloop==") for p in pins)
    assert not any(p.startswith(("pytest", "mypy", "mailwarden", "pymilter", "sphinx")) for p in pins)
    # A requirement whose marker holds only for the image's Debian Python (3.11.2) is added
    # as a plain requirement when this environment does not have it installed.
    real = importlib.metadata.distribution

    class Fake:
        version = "0.1.0"
        requires = ("click>=8", "async-timeout>=4.0.3; python_full_version < '3.11.3'",
                    "never-installed>=1; python_version < '3.0'")

    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: Fake() if name == "mailwarden" else real(name))
    pins = runtime_requirements()
    assert "async-timeout>=4.0.3" in pins or any(p.startswith("async-timeout==") for p in pins)
    assert not any(p.startswith("never-installed") for p in pins)
    assert any(p.startswith("click==") for p in pins)


def test_a_network_that_overlaps_a_route_is_not_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = [ipaddress.IPv4Network("10.231.0.0/21"), ipaddress.IPv4Network("10.231.8.0/24")]
    monkeypatch.setattr(containers, "_routes", lambda: taken)
    assert pick_network() == "10.231.9"
    with pytest.raises(containers.ContainerError):
        pick_network("10.231.8")


def test_dockerd_leftovers_are_removed_rules_before_chains() -> None:
    listing = "\n".join([
        "-P FORWARD DROP",
        "-N DOCKER",
        "-N DOCKER-USER",
        "-N f2b-sshd",
        "-A FORWARD -j DOCKER-USER",
        "-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A FORWARD -i eth0 -j f2b-sshd",
        "-A DOCKER-USER -j RETURN",
    ])
    assert docker_leftovers(listing) == [
        ["-D", "FORWARD", "-j", "DOCKER-USER"],
        ["-D", "FORWARD", "-o", "docker0", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
         "-j", "ACCEPT"],
        ["-D", "DOCKER-USER", "-j", "RETURN"],
        ["-F", "DOCKER"], ["-X", "DOCKER"], ["-F", "DOCKER-USER"], ["-X", "DOCKER-USER"],
    ]


def test_a_pid_that_is_not_dockerd_is_never_taken_for_it(tmp_path: Path) -> None:
    assert not containers._is_dockerd(os.getpid())
    docker = containers.Docker(tmp_path)
    docker.record.write_text(f'{{"pid": {os.getpid()}, "firewall": {{}}}}')
    assert not docker.adopt()  # a recorded PID now used by another program is left alone
    assert not docker.record.exists()


def test_docker_compose_accepts_the_compose_file() -> None:
    import shutil
    import subprocess

    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    done = subprocess.run([compose, "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True,
                          text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
