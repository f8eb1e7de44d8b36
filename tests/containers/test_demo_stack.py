"""``make demo`` brings up the whole topology and says how to use it; ``make demo-stop`` ends it."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from harness import demo_stack
from harness.containers import LABEL, MailStack, stacks


def test_demo_up_prints_how_to_send_and_watch_mail_and_down_removes_it(
    stack: MailStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The session's stack proves Docker and the images are there; the demo gets its own.
    monkeypatch.setattr(demo_stack, "STATE", tmp_path / "demo-stack")
    monkeypatch.setattr(demo_stack, "NAME", "mwdemotest")
    assert demo_stack.main(["demo", "up"]) == 0
    try:
        printed = capsys.readouterr().out
        front = re.search(r"front node\s+(\d+\.\d+\.\d+)\.10\s", printed)
        assert front, printed
        net = front.group(1)
        assert f"swaks --server {net}.10 --from you@elsewhere.test --to taro@example.jp" in printed
        assert "make demo-stop" in printed
        # The first printed swaks line, run as printed on this machine.
        line = re.search(r"^  (swaks --server .*--header 'Subject: hello')$", printed, re.MULTILINE)
        assert line, printed
        sent = subprocess.run([*shlex.split(line.group(1)), "--timeout", "30"], capture_output=True,
                              text=True, timeout=60, check=False)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        demo = MailStack.attach(stack.docker, "mwdemotest")
        demo.wait_for_messages(demo.maildir("taro@example.jp"), match="Subject: hello")
        assert demo_stack.main(["demo", "mail", "taro@example.jp"]) == 0
        assert "1 message(s) for taro@example.jp" in capsys.readouterr().out
    finally:
        assert demo_stack.main(["demo", "down"]) == 0
    assert "stopped: stack mwdemotest" in capsys.readouterr().out
    assert "mwdemotest" not in stacks(stack.docker)
    leftovers = stack.docker("ps", "-aq", "--filter", f"label={LABEL}=mwdemotest").stdout
    assert not leftovers.strip()
