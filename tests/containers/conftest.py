"""The containerized topology: one stack of real containers for the whole session.

The stack is built and started once (Docker from Debian's docker.io, images from
debootstrap; see docs/containers.md) and removed at the end, dockerd included if this
session started it.  ``MAILWARDEN_SKIP_CONTAINERS=1`` skips the suite;
``MAILWARDEN_CONTAINER_STACK=NAME`` runs it against a stack that is already up
(``make demo`` starts one named ``mwdemo``) and leaves that stack running.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from types import FrameType

import pytest

from harness.containers import Docker, MailStack, StackRun

# Directory changes are seen by every daemon of the stack after its caches expire
# ([policy] cache_ttl and Dovecot's auth cache: 2 s in the stack's configuration).
CACHE_WAIT = 2.5


def _missing() -> str | None:
    if os.environ.get("MAILWARDEN_SKIP_CONTAINERS") == "1":
        return "MAILWARDEN_SKIP_CONTAINERS=1"
    if os.geteuid() != 0:
        return "the container suite needs root (it may start dockerd and adds client addresses)"
    for tool in ("dockerd", "debootstrap", "iptables"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            return f"{tool} is not installed (apt-get install docker.io debootstrap iptables)"
    return None


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM ends the session as Ctrl-C does: pytest stops and still runs the
    # finalizers that remove the containers.
    raise KeyboardInterrupt


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailStack]:
    """The running stack (started here, or attached to with MAILWARDEN_CONTAINER_STACK)."""
    reason = _missing()
    if reason:
        if os.environ.get("CI") and os.environ.get("MAILWARDEN_SKIP_CONTAINERS") != "1":
            pytest.fail(f"container suite cannot run in CI: {reason}")
        pytest.skip(reason)
    attach = os.environ.get("MAILWARDEN_CONTAINER_STACK")
    if attach:
        yield MailStack.attach(Docker(tmp_path_factory.mktemp("docker")), attach)
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    run = StackRun(tmp_path_factory.mktemp("containers"))
    try:
        yield run.start()
    finally:
        run.close()
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(autouse=True)
def independent_scenarios(request: pytest.FixtureRequest) -> None:
    """Each scenario starts without the reputation earlier ones gave their clients."""
    if "stack" in request.fixturenames:
        request.getfixturevalue("stack").forget_reputation()


@pytest.fixture
def token() -> str:
    """A string unique to this test, to find its messages and log lines."""
    return f"mw{secrets.token_hex(4)}"


class DirectoryChanges:
    """Settings changed in LDAP through the front node's ``mailwarden`` command, put back
    as they were when the test ends."""

    def __init__(self, stack: MailStack) -> None:
        self.stack = stack
        self._undo: list[list[str]] = []

    def set(self, kind: str, name: str, setting: str, *values: str) -> None:
        """``mailwarden KIND set NAME SETTING VALUE...`` (kind: user or domain)."""
        probe = name if kind == "user" else f"nobody-{secrets.token_hex(3)}@{name}"
        explained = json.loads(self.stack.mailwarden("explain", "--json", probe).stdout)
        current = explained["settings"][setting]
        if current["source"] == kind:
            old = current["value"] if isinstance(current["value"], list) else [current["value"]]
            self._undo.append([kind, "set", name, setting, *map(str, old)])
        else:
            self._undo.append([kind, "unset", name, setting])
        self.stack.mailwarden(kind, "set", name, setting, *values, admin=True)
        time.sleep(CACHE_WAIT)

    def restore(self) -> None:
        """Undo every change, newest first."""
        while self._undo:
            self.stack.mailwarden(*self._undo.pop(), check=False, admin=True)
        time.sleep(CACHE_WAIT)


@pytest.fixture
def directory(stack: MailStack) -> Iterator[DirectoryChanges]:
    """Change the sample directory for one test."""
    changes = DirectoryChanges(stack)
    try:
        yield changes
    finally:
        changes.restore()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None]:
    """Attach the stack's log tails to a failed test's report."""
    outcome = yield
    report = outcome.get_result()
    stack = getattr(item, "funcargs", {}).get("stack")
    if report.failed and isinstance(stack, MailStack):
        report.sections.append(("container logs", stack.log_tails(lines=15)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of this directory that use the stack are marked ``containers`` (``-m "not
    containers"`` skips them).  The hook sees every collected item, and other suites have
    fixtures called ``stack`` of their own (the milter's real-Postfix rig): only this
    directory's are the container stack."""
    here = Path(__file__).parent
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()) and here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.containers)
