"""``make demo`` brings up the whole topology and says how to use it; ``make demo-stop`` ends it."""

from __future__ import annotations

import re
import shlex
import subprocess
import urllib.request
from pathlib import Path

import pytest

from harness import demo_stack
from harness.containers import LABEL, MailStack, stacks


def run_printed(printed: str, start: str, docker: str) -> subprocess.CompletedProcess[str]:
    """Run the printed command that begins with ``start`` (a regex), with its continuation
    lines, on this machine (``docker`` as the Docker client)."""
    found = re.search(rf"^  ({start}.*(?:\\\n.*)*?)$(?<!\\)", printed, re.MULTILINE)
    assert found, printed
    args = shlex.split(found.group(1).replace("\\\n", " "))
    if args[0] == "docker":
        args[0] = docker
    return subprocess.run([*args, *(["--timeout", "30"] if args[0] == "swaks" else [])],
                          capture_output=True, text=True, timeout=60, check=False)


def test_demo_up_prints_how_to_send_and_watch_mail_and_down_removes_it(
    stack: MailStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The session's stack proves Docker and the images are there; the demo gets its own.
    monkeypatch.setattr(demo_stack, "STATE", tmp_path / "demo-stack")
    monkeypatch.setattr(demo_stack, "NAME", "mwdemotest")
    # The session's stack holds MAILWARDEN_CONTAINER_NET: the demo picks another free /24.
    monkeypatch.delenv("MAILWARDEN_CONTAINER_NET", raising=False)
    assert demo_stack.main(["demo", "up"]) == 0
    try:
        printed = capsys.readouterr().out
        balancer = re.search(r"balancer\s+(\d+\.\d+\.\d+)\.5\s", printed)
        assert balancer, printed
        net = balancer.group(1)
        assert f"swaks --server {net}.5 --from you@elsewhere.test --to taro@example.jp" in printed
        assert "make demo-stop" in printed
        # The first printed swaks line, run as printed on this machine.
        sent = run_printed(printed, r"swaks --server .*--header 'Subject: hello'", stack.docker.cli)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        demo = MailStack.attach(stack.docker, "mwdemotest")
        demo.wait_for_messages(demo.maildir("taro@example.jp"), match="Subject: hello")
        assert demo_stack.main(["demo", "mail", "taro@example.jp"]) == 0
        assert "1 message(s) for taro@example.jp" in capsys.readouterr().out
        # The signed submission, then the check on the Internet host, as printed: the demo's
        # front node made example.com's key at start and its DNS publishes it.
        signed = run_printed(printed, r"swaks --server .*--auth-user alice@example\.com", stack.docker.cli)
        assert signed.returncode == 0, signed.stdout + signed.stderr
        demo.wait_for_messages(demo.internet_maildir(), match="Subject: signed")
        verified = run_printed(printed, r"docker exec mwdemotest-internet sh -c", stack.docker.cli)
        assert verified.stdout.strip() == "signature ok", verified.stdout + verified.stderr
        # example.com archives: the signed submission is in its archive, as the printed search finds.
        archived = run_printed(printed, r"docker exec mwdemotest-front mailwarden archive search "
                               r"example\.com --from", stack.docker.cli)
        assert archived.returncode == 0, archived.stdout + archived.stderr
        assert re.search(r"alice@example\.com -> friend@outside\.test\s+signed$", archived.stdout, re.M), \
            archived.stdout
        # The printed console URL serves the login page, and the printed logins work.
        console = re.search(r"^  (http://\S+:80/)$", printed, re.M)
        assert console and "com-admin (example.com)" in printed, printed
        with urllib.request.urlopen(console.group(1) + "login", timeout=30) as reply:
            assert reply.status == 200 and 'name="password"' in reply.read().decode()
        # A directory change as printed (as the system administrator) is accepted.
        changed = run_printed(printed, r"docker exec mwdemotest-front env MAILWARDEN_AS=root",
                              stack.docker.cli)
        assert changed.returncode == 0, changed.stdout + changed.stderr
    finally:
        assert demo_stack.main(["demo", "down"]) == 0
    assert "stopped: stack mwdemotest" in capsys.readouterr().out
    assert "mwdemotest" not in stacks(stack.docker)
    leftovers = stack.docker("ps", "-aq", "--filter", f"label={LABEL}=mwdemotest").stdout
    assert not leftovers.strip()
