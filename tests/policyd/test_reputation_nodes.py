"""Reputation an operator steers, seen by two policy daemon processes (two nodes) that share
a real Redis: `mailwarden reputation allow / deny / reset / unlist` on one take effect on
the other at its next request."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from click.testing import CliRunner

from harness.dnsstub import StubDns
from harness.ports import free_port
from harness.redisserver import RedisServer
from harness.slapd import SERVICE_BIND, SlapdServer
from mailwarden.cli import main
from tests.policyd.test_cli import MAILWARDEN, stop_daemon, wait_answering

BAD = "198.51.100.20"


def node(slapd: SlapdServer, tmp: Path, dns: StubDns, redis: RedisServer, prefix: str, name: str) -> Path:
    listen = f"inet:127.0.0.1:{free_port()}"
    path = tmp / f"{name}.toml"
    path.write_text(
        f'[general]\nnode_name = "{name}"\n[ldap]\nuri = "{slapd.uri}"\n{SERVICE_BIND}'
        f'[store]\nbackend = "redis"\nredis_url = "{redis.url}"\nkey_prefix = "{prefix}"\n'
        f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns.port}\n'
        f'[policyd]\nlisten = ["{listen}"]\nlogin_report_listen = []\nchecks = ["reputation"]\n')
    return path


def test_steering_on_one_node_takes_effect_on_the_other(
        slapd: SlapdServer, tmp_path: Path, empty_dns: StubDns, redis_server: RedisServer) -> None:
    prefix = f"{uuid.uuid4().hex}:"
    config_a = node(slapd, tmp_path, empty_dns, redis_server, prefix, "node-a")
    config_b = node(slapd, tmp_path, empty_dns, redis_server, prefix, "node-b")
    listen_b = config_b.read_text().split('listen = ["', 1)[1].split('"', 1)[0]
    runner = CliRunner()

    def on_a(*args: str) -> str:
        result = runner.invoke(main, ["--config", str(config_a), "reputation", *args])
        assert result.exit_code == 0, result.output
        return result.output

    proc = subprocess.Popen([*MAILWARDEN, "--config", str(config_b), "policyd", "run"],
                            stderr=subprocess.PIPE, text=True)
    try:
        b = wait_answering(listen_b, proc)
        ask = {"client_address": BAD, "sender": "x@outside.example", "recipient": "taro@example.jp"}
        assert b.ask(**ask) == "DUNNO"
        for _ in range(6):
            on_a("show", BAD, "--record", "virus")  # 30: refused
        assert b.ask(**ask, instance="2").startswith("554 5.7.1 Service unavailable; Client host")
        assert "allowed" not in on_a("show", BAD)
        on_a("allow", BAD, "--reason", "customer relay, cleaned")
        assert b.ask(**ask, instance="3") == "DUNNO"
        assert f"{BAD}/32\tallow\tstore\tcustomer relay, cleaned" in on_a("list")
        on_a("unlist", BAD)
        assert b.ask(**ask, instance="4").startswith("554")
        on_a("reset", BAD)
        assert b.ask(**ask, instance="5") == "DUNNO"
        on_a("deny", "198.51.100.0/24", "--for", "1h")
        assert b.ask(**ask, instance="6") == (
            f"554 5.7.1 Service unavailable; Client host [{BAD}] is blocked here")
        b.close()
    finally:
        stop_daemon(proc)
