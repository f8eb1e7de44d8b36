"""`mailwarden policyd ...`: the foreground daemon as Postfix/systemd run it, and the tools."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.dnsstub import StubDns
from harness.ports import free_port
from harness.slapd import SERVICE_BIND, SlapdServer
from mailwarden.cli import main
from tests.policyd.conftest import PolicyClient

OUT = "friend@remote.example"
MAILWARDEN = [str(Path(sys.executable).parent / "mailwarden")]


def stop_daemon(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, as systemd stops it; a daemon that does not exit within 15 s is killed
    (so a failing test leaves no process behind) and the test fails. Returns stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"daemon ignored SIGTERM for 15 s:\n{err}") from None
    return err or ""


def write_config(slapd: SlapdServer, tmp: Path, dns: StubDns, extra: str = "") -> tuple[Path, list[str]]:
    """A configuration file for a daemon on a temp unix socket and a free TCP port."""
    listen = [f"unix:{tmp}/policy.sock", f"inet:127.0.0.1:{free_port()}"]
    (tmp / "mw.toml").write_text(
        f'[ldap]\nuri = "{slapd.uri}"\n{SERVICE_BIND}[store]\nsqlite_path = "{tmp}/state.sqlite3"\n'
        f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns.port}\n'
        f'[policyd]\nlisten = ["{listen[0]}", "{listen[1]}"]\n{extra}'
    )
    return tmp / "mw.toml", listen


def wait_answering(spec: str, proc: subprocess.Popen[str]) -> PolicyClient:
    deadline = time.monotonic() + 15
    while True:
        try:
            return PolicyClient(spec)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"daemon did not start: {proc.communicate()[1]}") from None
            time.sleep(0.05)


@pytest.mark.parametrize(("workers", "loop"), [(1, "uvloop"), (2, "uvloop"), (1, "asyncio")])
def test_run_serves_in_the_foreground_and_stops_cleanly_on_sigterm(
    slapd: SlapdServer, tmp_path: Path, empty_dns: StubDns, workers: int, loop: str,
) -> None:
    extra = f'workers = {workers}\nlogin_report_listen = []\nevent_loop = "{loop}"\n'
    path, listen = write_config(slapd, tmp_path, empty_dns, extra)
    proc = subprocess.Popen([*MAILWARDEN, "--config", str(path), "policyd", "run"],
                            stderr=subprocess.PIPE, text=True)
    try:
        for spec in listen:
            c = wait_answering(spec, proc)
            assert c.ask(recipient=OUT).startswith("554 5.7.1")
            assert c.ask(recipient=OUT, sasl_username="taro@example.jp", sender="taro@example.jp") == "OK"
            c.close()
        if workers == 2:
            pids = set()
            for _ in range(40):  # both workers share the socket
                c = PolicyClient(listen[1])
                c.ask(recipient=OUT)
                c.close()
            children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True,
                                      check=False)
            pids = {int(p) for p in children.stdout.split()}
            assert len(pids) == 2
    finally:
        err = stop_daemon(proc)
    assert proc.returncode == 0, err
    assert "policyd ready: listening on" in err
    assert "policyd stopping" in err
    assert "action=\"554 5.7.1 <friend@remote.example>: Relay access denied\" check=relay" in err
    assert not Path(listen[0].split(":", 1)[1]).exists()  # the unix socket is removed


def test_run_refuses_a_bad_policyd_section(slapd: SlapdServer, tmp_path: Path, empty_dns: StubDns) -> None:
    path, _ = write_config(slapd, tmp_path, empty_dns,
                           'checks = ["relay", "telepathy"]\nlogin_report_listen = ["tcp:1234"]\n')
    result = subprocess.run([*MAILWARDEN, "--config", str(path), "policyd", "run"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 78
    assert "policyd.checks[1]: unknown check 'telepathy'" in result.stderr
    assert "policyd.login_report_listen[0]" in result.stderr


def test_run_reports_a_socket_in_use(slapd: SlapdServer, tmp_path: Path, empty_dns: StubDns) -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    path, _ = write_config(slapd, tmp_path, empty_dns, "login_report_listen = []\n")
    text = path.read_text().replace("\nlisten = [", f'\nlisten = ["inet:127.0.0.1:{port}", ', 1)
    path.write_text(text)
    result = subprocess.run([*MAILWARDEN, "--config", str(path), "policyd", "run"],
                            capture_output=True, text=True, timeout=30, check=False)
    busy.close()
    assert result.returncode == 71
    assert f"cannot listen: inet:127.0.0.1:{port}: Address already in use" in result.stderr


def test_pbs_reputation_and_query_commands(slapd: SlapdServer, tmp_path: Path, empty_dns: StubDns) -> None:
    path, listen = write_config(slapd, tmp_path, empty_dns, "login_report_listen = []\n")
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(main, ["--config", str(path), "policyd", *args])
        return result.exit_code, result.output

    assert run("pbs", "add", "198.51.100.7", "pbs@example.jp") == (0, "198.51.100.7\tpbs@example.jp\t600\n")
    assert run("pbs", "add", "2001:DB8::7", "taro@example.jp", "--ttl", "60")[0] == 0
    code, out = run("pbs", "list")
    assert code == 0 and "198.51.100.7\tpbs@example.jp\t600" in out
    assert "2001:db8::7\ttaro@example.jp\t60" in out
    assert run("pbs", "add", "198.51.100.9", "ghost@example.jp")[0] == 1
    assert run("pbs", "add", "not-an-ip", "pbs@example.jp")[0] == 2
    assert run("pbs", "remove", "198.51.100.7") == (0, "198.51.100.7: closed\n")
    assert run("pbs", "remove", "198.51.100.7")[0] == 1
    shown = runner.invoke(main, ["--config", str(path), "reputation", "show", "192.0.2.1",
                                 "--record", "virus"])
    assert shown.exit_code == 0 and "score 5.00" in shown.output
    assert "network 5.00" in shown.output
    assert run("check") == (0, f"{path}: [policyd] OK\n")
    proc = subprocess.Popen([*MAILWARDEN, "--config", str(path), "policyd", "run"],
                            stderr=subprocess.DEVNULL, text=True)
    try:
        wait_answering(listen[0], proc).close()
        answer = subprocess.run([*MAILWARDEN, "--config", str(path), "policyd", "query",
                              "client_address=2001:db8::7", "sender=taro@example.jp", f"recipient={OUT}"],
                             capture_output=True, text=True, timeout=30, check=False)
        assert answer.stdout == "OK\n", answer.stderr
    finally:
        stop_daemon(proc)


def test_root_start_binds_then_runs_as_the_configured_user(
    slapd: SlapdServer, tmp_path: Path, empty_dns: StubDns,
) -> None:
    import grp
    import pwd
    import shutil
    import stat
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root")
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    state = Path(tempfile.mkdtemp(prefix="mw-policyd-state-"))
    state.chmod(0o777)  # the store must be writable after the switch
    try:
        path, listen = write_config(slapd, tmp_path, empty_dns,
                                    f'user = "nobody"\nsocket_group = "{group}"\nsocket_mode = "0660"\n'
                                    "login_report_listen = []\n")
        path.write_text(path.read_text().replace(f'sqlite_path = "{tmp_path}/state.sqlite3"',
                                                 f'sqlite_path = "{state}/state.sqlite3"'))
        proc = subprocess.Popen([*MAILWARDEN, "--config", str(path), "policyd", "run"],
                                stderr=subprocess.PIPE, text=True)
        try:
            c = wait_answering(listen[0], proc)
            assert c.ask(recipient=OUT, sasl_username="taro@example.jp", sender="taro@example.jp") == "OK"
            # DNS (SPF) and IDN still work after the switch: nothing is imported late
            assert c.ask(recipient="taro@example.jp", client_address="192.0.2.1",
                         sender="a@example.org").startswith("PREPEND Received-SPF: None")
            assert c.ask(recipient="user@例え.jp").startswith("554 5.7.1 <user@xn--r8jz45g.jp>")
            sock = Path(listen[0].split(":", 1)[1]).stat()
            assert stat.S_IMODE(sock.st_mode) == 0o660 and sock.st_gid == nobody.pw_gid
            status = Path(f"/proc/{proc.pid}/status").read_text()
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert uid_line.split()[1:] == [str(nobody.pw_uid)] * 4
        finally:
            err = stop_daemon(proc)
        assert proc.returncode == 0, err
        assert f"switched to user nobody (uid {nobody.pw_uid}" in err
    finally:
        shutil.rmtree(state, ignore_errors=True)
