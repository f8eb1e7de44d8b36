"""A private, real Postfix instance on 127.0.0.1 for end-to-end tests.

Everything lives in one work directory: ``etc/`` (main.cf, master.cf), ``queue/``,
``data/`` and the log file ``maillog``.  Every service runs without chroot, the
instance listens only on loopback ports chosen at run time, DNS is off, and it is
started and stopped only through ``postfix -c ITS_DIR start|stop`` (which signals the
PID in its own queue directory), so the system's Postfix is never touched.

The client side lives here too: :func:`send_mail` talks SMTP to any port and returns
every reply instead of raising, so tests can assert on refusals.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pty
import re
import select
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, Self

from harness.ports import free_port
from harness.process import TestDaemon, log_size, read_log, tail

__all__ = [
    "BASE_MASTER_CF",
    "PostfixError",
    "PostfixInstance",
    "SmtpResult",
    "missing_postfix",
    "send_mail",
]

_SBIN = "/usr/sbin:/usr/bin:/sbin:/bin:" + os.environ.get("PATH", "")
POSTFIX = shutil.which("postfix", path=_SBIN)
POSTCONF = shutil.which("postconf", path=_SBIN)
POSTQUEUE = shutil.which("postqueue", path=_SBIN)
SENDMAIL = shutil.which("sendmail", path=_SBIN)

# Debian's service list minus the Internet-facing smtpd and the pipe examples, all
# without chroot (a chroot would need copies of /etc files inside the queue dir).
BASE_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_running: set[PostfixInstance] = set()
_PROBLEM = re.compile(r"\]: (?:warning|error|fatal|panic): ")


class PostfixError(RuntimeError):
    """A Postfix command failed; the message holds its output and the log tail."""


def missing_postfix() -> str | None:
    """Why this machine cannot run the harness (a reason for pytest.skip), or None."""
    for name, path in (("postfix", POSTFIX), ("postconf", POSTCONF), ("postqueue", POSTQUEUE)):
        if path is None:
            return f"{name} not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    return None


def run_with_tty(args: Sequence[str], timeout: float = 60.0) -> tuple[int, str]:
    """Run a command whose stderr is a terminal; returns (exit status, output).

    Postfix commands print their errors only when stderr is a tty.
    """
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(list(args), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                                close_fds=True)
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            exited = proc.poll() is not None
            ready, _, _ = select.select([master], [], [], 0 if exited else 0.05)
            data = b""
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: no process has the terminal open any more
                    break
                if not data:
                    break
            if data:
                chunks.append(data)
            elif exited:
                # A daemonised child may keep the terminal open: stop once ours has exited.
                break
            elif time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise PostfixError(f"{' '.join(args)}: no exit after {timeout:g}s")
    finally:
        os.close(master)
    try:
        status = proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise PostfixError(f"{' '.join(args)}: no exit after {timeout:g}s") from None
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return status, text


def _format_option(name: str, value: str) -> str:
    """A master.cf ``-o`` option; values with blanks use the ``{ name = value }`` form."""
    if re.search(r"\s", value) or not value:
        return f"-o {{ {name} = {value} }}"
    return f"-o {name}={value}"


class PostfixInstance(TestDaemon):
    """One Postfix instance in its own directory, with an smtpd on ``127.0.0.1:smtpd_port``.

    ``main_cf`` overrides or adds main.cf parameters (see :meth:`default_main_cf`),
    ``master_cf`` adds master.cf lines.  Clients from 127.0.0.1 are in ``mynetworks``;
    bind a client to 127.0.0.2 and up (or use XCLIENT) to be an outsider.
    Changes made with :meth:`postconf` or :meth:`add_service` while running take
    effect at :meth:`restart` (a reload leaves idle smtpd processes on the old
    settings).
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        main_cf: Mapping[str, str] | None = None,
        master_cf: Sequence[str] = (),
        smtpd_port: int | None = None,
        smtpd_options: Mapping[str, str] | None = None,
        myhostname: str = "mx.mailwarden.test",
        syslog_name: str = "postfix-mw",
    ) -> None:
        reason = missing_postfix()
        if reason is not None:
            raise PostfixError(reason)
        self.owns_dir = workdir is None
        self.dir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mw-postfix-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        # Postfix daemons run as the postfix user and must traverse the work directory.
        self.dir.chmod(0o755)
        self.config_dir = self.dir / "etc"
        self.queue_dir = self.dir / "queue"
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "maillog"
        self.smtpd_port = smtpd_port or free_port()
        self.main = self.default_main_cf(myhostname, syslog_name)
        self.main.update(main_cf or {})
        self.services: list[str] = [self.smtpd_line(self.smtpd_port, smtpd_options or {})]
        self.services.extend(master_cf)
        self._checked = False
        self._started = False

    # -- configuration ------------------------------------------------------------------
    def default_main_cf(self, myhostname: str, syslog_name: str) -> dict[str, str]:
        """The test instance's main.cf: loopback only, no DNS, fast retries, log to a file."""
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "myhostname": myhostname,
            "mydomain": "mailwarden.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.1/32",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "smtpd_banner": "$myhostname ESMTP",
            # Never ask DNS: /etc/resolv.conf points off the machine.
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.dir),
            "syslog_name": syslog_name,
            # Retry quickly and never slow a test down on purpose.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "in_flow_delay": "0",
            "smtpd_error_sleep_time": "0",
            "smtpd_soft_error_limit": "100",
            "smtpd_hard_error_limit": "200",
            "delay_warning_time": "0",
            "smtpd_client_port_logging": "yes",
            # Tests may pose as any client address with XCLIENT from 127.0.0.1.
            "smtpd_authorized_xclient_hosts": "127.0.0.1",
        }

    @staticmethod
    def smtpd_line(port: int, options: Mapping[str, str] | None = None, *, service: str = "smtpd") -> str:
        """A master.cf line for an smtpd on ``127.0.0.1:port`` with ``-o`` overrides."""
        opts = " ".join(_format_option(k, v) for k, v in (options or {}).items())
        return f"127.0.0.1:{port} inet n - n - - {service} {opts}".rstrip()

    def add_service(self, line: str) -> None:
        """Add a master.cf line (continuation lines start with blanks)."""
        self.services.append(line)
        self._write_config()

    def add_smtpd(self, options: Mapping[str, str] | None = None, *, port: int | None = None) -> int:
        """Add another smtpd on a free loopback port (a submission service, a re-injection
        port); returns the port."""
        port = port or free_port()
        self.add_service(self.smtpd_line(port, options))
        return port

    def postconf(self, settings: Mapping[str, str] | None = None, /, **more: str) -> None:
        """Set main.cf parameters (``postconf(relayhost="[127.0.0.1]:2526")``)."""
        self.main.update(settings or {})
        self.main.update(more)
        self._write_config()

    def postconf_n(self) -> dict[str, str]:
        """Postfix's own reading of main.cf (``postconf -n``)."""
        assert POSTCONF is not None
        out = subprocess.run([POSTCONF, "-c", str(self.config_dir), "-n"], capture_output=True,
                             text=True, check=True, timeout=30).stdout
        return dict(_split_setting(line) for line in out.splitlines() if " = " in line)

    def _write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        main = "".join(f"{k} = {v}\n" for k, v in self.main.items())
        (self.config_dir / "main.cf").write_text(main, encoding="utf-8")
        master = BASE_MASTER_CF + "".join(line.rstrip("\n") + "\n" for line in self.services)
        (self.config_dir / "master.cf").write_text(master, encoding="utf-8")
        # Postfix waits (in 0.3 s steps) until a just-written main.cf is two seconds old,
        # in case an editor is still writing it: date the files back.
        past = time.time() - 10
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

    # -- life cycle ---------------------------------------------------------------------
    def _postfix(self, *args: str, timeout: float = 60.0) -> str:
        assert POSTFIX is not None
        status, out = run_with_tty([POSTFIX, "-c", str(self.config_dir), *args], timeout)
        if status != 0:
            raise PostfixError(
                f"postfix -c {self.config_dir} {' '.join(args)} failed ({status}):\n{out.strip()}\n"
                f"--- {self.log_path} (tail) ---\n{self.log_tail()}"
            )
        return out

    @property
    def running(self) -> bool:
        """Whether this instance's master holds its lock."""
        if not self._started:
            return False
        assert POSTFIX is not None
        res = subprocess.run([POSTFIX, "-c", str(self.config_dir), "status"], capture_output=True,
                             check=False, timeout=30)
        return res.returncode == 0

    @property
    def master_pid(self) -> int | None:
        """The PID in this instance's ``pid/master.pid``, if any."""
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> Self:
        """Write the configuration, check it and start the master (returns when listening)."""
        if self.running:
            return self
        self._write_config()
        self.queue_dir.mkdir(exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        shutil.chown(self.data_dir, "postfix")
        if not self._checked:
            self._postfix("check")  # builds the queue subdirectories with their owners
            self._checked = True
        else:
            # Checked once already: let "postfix start" skip its integrity checks (0.25 s).
            (self.queue_dir / "quick-start").touch()
        self._postfix("start")  # "master -w": returns once the listeners are open
        self._started = True
        _running.add(self)
        return self

    def stop(self) -> None:
        """Stop this instance (``postfix -c DIR stop``, which waits for the master)."""
        if not self.running:
            self._started = False
            _running.discard(self)
            return
        self._postfix("stop")
        self._started = False
        _running.discard(self)

    def reload(self) -> None:
        """``postfix reload`` (new processes only; see the class notes)."""
        self._write_config()
        self._postfix("reload")

    def __repr__(self) -> str:
        return f"PostfixInstance({self.dir}, smtpd 127.0.0.1:{self.smtpd_port})"

    # -- the log ------------------------------------------------------------------------
    def log_offset(self) -> int:
        """The current end of the log; pass it as ``since`` to look only at what follows."""
        return log_size(self.log_path)

    def log_text(self, since: int = 0) -> str:
        """The log from byte offset ``since``."""
        return read_log(self.log_path, since)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the log, for error messages."""
        return tail(self.log_text(), lines)

    def log_problems(self, since: int = 0) -> list[str]:
        """Log lines with ``warning:``, ``error:``, ``fatal:`` or ``panic:`` (after ``since``)."""
        return [line for line in self.log_text(since).splitlines() if _PROBLEM.search(line)]

    def wait_for_log(self, pattern: str, timeout: float = 10.0, since: int = 0) -> re.Match[str]:
        """Wait until a log line (after ``since``) matches the regex ``pattern``."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.log_text(since))
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no log line matching {pattern!r} within {timeout:g}s; log since offset {since}:\n"
                    + "\n".join(self.log_text(since).splitlines()[-40:])
                )
            time.sleep(0.05)

    # -- the queue ----------------------------------------------------------------------
    def queue(self) -> list[dict[str, Any]]:
        """The queue as ``postqueue -j`` reports it (one dict per message)."""
        assert POSTQUEUE is not None
        out = subprocess.run([POSTQUEUE, "-c", str(self.config_dir), "-j"], capture_output=True,
                             text=True, check=True, timeout=30).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        """Attempt delivery of every queued message now (``postqueue -f``)."""
        assert POSTQUEUE is not None
        subprocess.run([POSTQUEUE, "-c", str(self.config_dir), "-f"], capture_output=True,
                       check=True, timeout=30)

    def wait_queue_empty(self, timeout: float = 20.0) -> None:
        """Wait until the queue is empty; on timeout the error lists what is left and why."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.queue()
            if not left:
                return
            if time.monotonic() > deadline:
                summary = "; ".join(
                    f"{m.get('queue_id')} ({m.get('queue_name')}) from=<{m.get('sender')}> "
                    + ", ".join(f"{r.get('address')}: {r.get('delay_reason', '')}"
                                for r in m.get("recipients", []))
                    for m in left
                )
                raise TimeoutError(f"queue not empty after {timeout:g}s: {summary}")
            time.sleep(0.1)

    # -- injection ----------------------------------------------------------------------
    def sendmail(self, message: bytes, sender: str, recipients: Iterable[str]) -> None:
        """Submit through the ``sendmail`` command (pickup, non_smtpd_milters)."""
        if SENDMAIL is None:
            raise PostfixError("sendmail not found")
        subprocess.run([SENDMAIL, "-C", str(self.config_dir), "-f", sender, "--", *recipients],
                       input=message, check=True, capture_output=True, timeout=30)

    def send(self, sender: str, recipients: Sequence[str], message: bytes | EmailMessage | None = None,
             **kwargs: Any) -> SmtpResult:
        """:func:`send_mail` to this instance's main smtpd (``port=`` picks another)."""
        port = kwargs.pop("port", self.smtpd_port)
        return send_mail("127.0.0.1", port, sender, recipients, message, **kwargs)


def _split_setting(line: str) -> tuple[str, str]:
    name, _, value = line.partition(" = ")
    return name.strip(), value.strip()


# -- the SMTP client side ---------------------------------------------------------------

Reply = tuple[int, str]
_QUEUED = re.compile(r"queued as ([0-9A-Za-z]+)")


@dataclass
class SmtpResult:
    """Every reply of one SMTP transaction; codes are 0 where a step was not reached."""

    connect: Reply = (0, "")
    auth: Reply | None = None
    mail: Reply = (0, "")
    rcpt: dict[str, Reply] = field(default_factory=dict)
    data: Reply = (0, "")

    @property
    def accepted(self) -> bool:
        """Whether the message was queued (end of DATA answered 250)."""
        return self.data[0] == 250

    @property
    def queue_id(self) -> str | None:
        """The queue id from ``250 2.0.0 Ok: queued as ID``."""
        found = _QUEUED.search(self.data[1])
        return found.group(1) if found else None

    @property
    def refusal(self) -> Reply:
        """The first reply that was not a success (or the DATA reply)."""
        steps: list[Reply | None] = [self.connect, self.auth, self.mail, *self.rcpt.values()]
        for reply in steps:
            if reply is not None and reply[0] >= 400:
                return reply
        return self.data


def make_message(sender: str, recipients: Sequence[str], subject: str = "test",
                 body: str = "hello\n", headers: Mapping[str, str] | None = None) -> EmailMessage:
    """A small well-formed message (Message-ID, Date, From, To, Subject)."""
    msg = EmailMessage()
    msg["From"] = sender or "MAILER-DAEMON@mailwarden.test"
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain="client.mailwarden.test")
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    return msg


def _reply(code: int, text: bytes | str) -> Reply:
    return code, text.decode("utf-8", "replace") if isinstance(text, bytes) else text


def send_mail(
    host: str,
    port: int,
    sender: str,
    recipients: Sequence[str],
    message: bytes | EmailMessage | None = None,
    *,
    source_address: str = "127.0.0.1",
    login: tuple[str, str] | None = None,
    helo: str = "client.mailwarden.test",
    xclient: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> SmtpResult:
    """One SMTP transaction that records each reply instead of raising on a refusal.

    ``source_address`` binds the client to another loopback address (127.0.0.2 …) so
    the server sees a different client IP; ``xclient`` sends ``XCLIENT`` (attributes
    such as ``{"ADDR": "192.0.2.1"}``) before MAIL; ``login`` authenticates with
    AUTH PLAIN.  DATA is sent only when at least one recipient was accepted.
    """
    result = SmtpResult()
    if message is None:
        message = make_message(sender, recipients)
    data = message.as_bytes() if isinstance(message, EmailMessage) else message
    with smtplib.SMTP(timeout=timeout, local_hostname=helo, source_address=(source_address, 0)) as smtp:
        result.connect = _reply(*smtp.connect(host, port))
        if result.connect[0] != 220:
            return result
        smtp.ehlo()
        if xclient:
            attrs = " ".join(f"{k}={v}" for k, v in xclient.items())
            code, text = smtp.docmd("XCLIENT", attrs)
            if code != 220:
                raise smtplib.SMTPResponseException(code, text)
            smtp.ehlo()
        if login is not None:
            try:
                smtp.login(*login)
                result.auth = (235, "2.7.0 Authentication successful")
            except smtplib.SMTPAuthenticationError as exc:
                result.auth = _reply(exc.smtp_code, exc.smtp_error)
                return result
        result.mail = _reply(*smtp.mail(sender))
        if result.mail[0] != 250:
            return result
        for rcpt in recipients:
            result.rcpt[rcpt] = _reply(*smtp.rcpt(rcpt))
        if not any(code == 250 for code, _ in result.rcpt.values()):
            smtp.rset()
            return result
        code, text = smtp.docmd("DATA")
        if code != 354:
            result.data = _reply(code, text)
            return result
        result.data = _send_data(smtp, data)
    return result


def _send_data(smtp: smtplib.SMTP, data: bytes) -> Reply:
    """Send the message body after a 354 (dot-stuffed, CRLF) and read the reply."""
    body = re.sub(rb"(?:\r\n|\n|\r(?!\n))", b"\r\n", data)
    body = re.sub(rb"(?m)^\.", b"..", body)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    smtp.send(body + b".\r\n")
    return _reply(*smtp.getreply())


@atexit.register
def _stop_leftovers() -> None:
    """Stop instances a crashed test run left behind (only ours, by their own dirs)."""
    for instance in list(_running):
        with contextlib.suppress(Exception):
            instance.stop()
