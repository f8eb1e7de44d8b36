"""Moving a hosted domain from a legacy mail system to the mailbox hosts while mail flows.

A domain's ``migration_state`` (LDAP, the catalogue) decides where its mail lives, on every
node at the next directory lookup: ``legacy`` and ``syncing`` relay inbound mail to the
domain's ``legacy_mx`` and proxy POP3/IMAP logins to its ``legacy_mailbox_host``;
``migrated`` lets the mailbox hosts serve it.  The filters apply in every state: the
domain is hosted here, so the milter and the policy daemon treat it as local.

Mailboxes are copied with Dovecot's own dsync (``doveadm``) over the imapc backend: it
reads the legacy server over IMAP with a migration master user, so it works whatever the
legacy server keeps its mail in and wherever that is, needs no shared file system, and
keeps IMAP UIDs and the mailbox's UIDVALIDITY when the destination is new.  POP3 UIDLs
are fetched from the legacy POP3 server (pop3c) by Dovecot's ``pop3_migration`` plugin
and saved with each message, whatever their format (qmail-pop3d's Maildir file names,
Dovecot's ``%08Xu%08Xv``); the mailbox host's POP3 serves the saved ones.
Reading the legacy Maildir directly would need it mounted on the mailbox host and would
not see the legacy server's own UID list.

* before the switch, ``doveadm backup -R`` makes the new mailbox an exact copy (flags,
  expunges); dsync compares both sides, so a second run copies only what changed;
* after the switch, ``doveadm sync -1 -R -s STATE`` fetches mail the legacy MX still
  accepted, never deleting what the mailbox host received meanwhile; the dsync state is
  kept per subscriber (``--state-dir``), so a repeated catch-up copies nothing twice;
* a rollback copies each message the legacy side lacks (by Message-ID) back with
  ``doveadm fetch`` and ``doveadm save`` over imapc; nothing is deleted there, a second
  run copies nothing, and a message without a Message-ID is listed for the operator.

The copying runs on a mailbox host (``doveadm`` needs the host's Dovecot configuration).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mailwarden.catalogue import LEGACY_STATES, MIGRATION_STATES, SETTINGS, InvalidValue
from mailwarden.directory import Directory, Entry

__all__ = [
    "DoveadmMailboxes", "LegacyServer", "Mailboxes", "MigrationError", "UserCopy", "check_transition",
]

TRANSITIONS: dict[str, tuple[frozenset[str], str]] = {
    "sync": (frozenset({"legacy", "syncing"}), "syncing"),
    "cutover": (frozenset({"syncing"}), "migrated"),
    "rollback": (frozenset({"syncing", "migrated"}), "legacy"),
}
"""For each migration step: the states it starts from, and the state it leaves."""

DSYNC_RERUNS = 3
"""How often a copy is run when dsync says the mailbox changed while it ran (exit 2),
as it does while mail is delivered to either side, or when the legacy POP3 listing and
the IMAP mailbox differed (a message delivered between the two)."""

POP3_UIDL_RACE = "POP3 UIDLs couldn't be synced"
"""dsync's error when the pop3_migration plugin finds no legacy UIDL for a message: the POP3
listing was taken before the message arrived (measured while mail flows); a fresh run
takes a fresh listing."""

DOVEADM_TIMEOUT = 3600.0
"""Seconds one mailbox's copy may take before it is given up (and reported)."""


class MigrationError(Exception):
    """A step that cannot run in the domain's present state, or a missing setting."""


def check_transition(step: str, state: str) -> str:
    """The state ``step`` leaves the domain in; MigrationError when it cannot start from ``state``."""
    starts, target = TRANSITIONS[step]
    if state not in starts:
        hint = {
            ("cutover", "legacy"): "run mailwarden migrate sync first",
            ("sync", "migrated"): "the domain is served by the mailbox hosts; roll back first",
            ("cutover", "migrated"): "the domain is already served by the mailbox hosts",
            ("rollback", "legacy"): "the domain is already served by the legacy system",
        }.get((step, state), "")
        raise MigrationError(
            f"{step} starts from {' or '.join(sorted(starts))}, the domain is {state}"
            + (f": {hint}" if hint else "")
        )
    return target


def is_legacy(state: str) -> bool:
    """Whether the legacy system receives and serves mail in ``state``."""
    return state in LEGACY_STATES


@dataclass(frozen=True)
class LegacyServer:
    """How the mailbox host reaches the legacy server over IMAP (imapc)."""

    host: str
    port: int
    master_user: str
    master_password: str
    pop3_port: int = 0
    """The legacy POP3 server's port, whose UIDLs each copied message keeps (0: none
    fetched; the mailbox host derives UIDLs from the kept IMAP UIDs and UIDVALIDITY)."""


POP3_MIGRATION_NAMESPACE = "POP3-MIGRATION-NS/"

POP3_MIGRATION_CONF = """# Written by mailwarden migrate for one copy: the mailbox host's configuration
# and Dovecot's pop3_migration plugin, which reads the legacy POP3 server's UIDLs over
# pop3c and saves them with the messages dsync copies (the POP3 server serves them).
!include {config}
namespace pop3c {{
  prefix = {prefix}
  separator = /
  location = pop3c:
  inbox = no
  list = no
  hidden = yes
}}
mail_plugins = $mail_plugins pop3_migration
plugin {{
  pop3_migration_mailbox = {prefix}INBOX
}}
"""
"""The configuration doveadm reads for a copy that keeps the legacy POP3 UIDLs."""

DEFAULT_DOVECOT_CONF = "/etc/dovecot/dovecot.conf"


@dataclass
class UserCopy:
    """One mailbox's copy: message counts on both sides before and after, and how long."""

    user: str
    source_before: int = 0
    target_before: int = 0
    source_after: int = 0
    target_after: int = 0
    seconds: float = 0.0
    error: str = ""
    left: list[str] = field(default_factory=list)
    """Messages a copy back to the legacy server could not judge, for the operator."""
    exact: bool = True
    """An exact copy (both sides end equal); a one-way copy keeps what only the target has."""

    @property
    def ok(self) -> bool:
        """The copy ran and the target holds at least (exact: just) the source's messages.

        While mail flows, the source may change between the copy and the count: an exact
        copy whose source count moved meanwhile is not judged by the counts, and a one-way
        copy then needs only what the source held before it (the next copy takes the
        change)."""
        if self.error:
            return False
        if self.exact:
            return self.source_after == self.target_after or self.source_after != self.source_before
        if self.source_after != self.source_before:
            return self.target_after >= min(self.source_before, self.source_after)
        return self.target_after >= self.source_after

    @property
    def copied(self) -> int:
        """Messages the target gained."""
        return max(0, self.target_after - self.target_before)


class Mailboxes(Protocol):
    """Copies one user's mailbox between the legacy server and the mailbox host."""

    def count(self, user: str, *, legacy: bool) -> int:
        """Messages in all of the user's folders on one side."""

    def pull(self, user: str, *, exact: bool, state: str = "") -> str:
        """Legacy -> mailbox host: an exact copy (``exact``) or only what is new there,
        since ``state`` (what the previous one-way copy returned; '' the first time).
        Returns the state to pass next time."""

    def push(self, user: str) -> list[str]:
        """Mailbox host -> legacy: what the legacy side lacks, nothing deleted.  Returns the
        messages it could not judge (left on the mailbox host, for the operator)."""


class UsersOf(Protocol):
    """What the migration needs of the directory beyond :class:`Directory`."""

    def users_of(self, domain: Entry, name: str) -> list[Entry]:
        """Every subscriber entry of a domain."""


class DoveadmMailboxes:
    """:class:`Mailboxes` with ``doveadm`` of the mailbox host's Dovecot and the imapc backend."""

    def __init__(self, legacy: LegacyServer, *, config: str = "", doveadm: str = "doveadm",
                 timeout: float = DOVEADM_TIMEOUT) -> None:
        self.legacy = legacy
        self.config = config
        self.doveadm = doveadm
        self.timeout = timeout

    def _run(self, user: str, *args: str, imapc: bool = False, stdin: str | None = None,
             again: bool = False) -> str:
        """doveadm's output; MigrationError when it fails.  With ``again``, exit status 2
        (dsync: done, but the mailbox changed meanwhile, run again) is retried with the
        state it printed, a few times; so is a POP3 listing that missed a new message."""
        for _ in range(DSYNC_RERUNS if again else 1):
            status, out, why = self._once(user, args, imapc=imapc, stdin=stdin)
            if status == 0 or not again or (status != 2 and POP3_UIDL_RACE not in why):
                break
            if "-s" in args and out.strip():
                at = args.index("-s") + 1
                args = (*args[:at], out.strip(), *args[at + 1:])
        if status != 0:
            raise MigrationError(f"{user}: doveadm {args[0]} exited {status}: {why}")
        return out

    def _once(self, user: str, args: tuple[str, ...], *, imapc: bool,
              stdin: str | None) -> tuple[int, str, str]:
        lg = self.legacy
        pop3 = imapc and bool(lg.pop3_port) and args[0] in ("backup", "sync")
        with tempfile.TemporaryDirectory(prefix="mw-migrate-") as tmp:
            cmd = [self.doveadm]
            if pop3:
                conf = Path(tmp) / "dovecot.conf"
                conf.write_text(POP3_MIGRATION_CONF.format(
                    config=Path(self.config or DEFAULT_DOVECOT_CONF).resolve(),
                    prefix=POP3_MIGRATION_NAMESPACE))
                cmd += ["-c", str(conf)]
            elif self.config:
                cmd += ["-c", self.config]
            if imapc:
                # imapc_user / pop3c_user are not expanded from -o; they name the user whose
                # mailbox the master user opens (SASL authorization identity).
                options = [("imapc_host", lg.host), ("imapc_port", str(lg.port)),
                           ("imapc_user", user), ("imapc_master_user", lg.master_user),
                           ("imapc_password", lg.master_password),
                           ("imapc_features", "rfc822.size fetch-headers"),
                           ("mail_prefetch_count", "20")]
                if pop3:
                    options += [("pop3c_host", lg.host), ("pop3c_port", str(lg.pop3_port)),
                                ("pop3c_user", user), ("pop3c_master_user", lg.master_user),
                                ("pop3c_password", lg.master_password)]
                for key, value in options:
                    cmd += ["-o", f"{key}={value}"]
            return self._exec(user, args, cmd, stdin)

    def _exec(self, user: str, args: tuple[str, ...], cmd: list[str],
              stdin: str | None) -> tuple[int, str, str]:
        cmd += list(args)
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=self.timeout,
                                 input=stdin)
        except subprocess.TimeoutExpired:
            raise MigrationError(f"{user}: doveadm {args[0]} did not finish in {self.timeout:g} s") from None
        except OSError as exc:
            raise MigrationError(f"{self.doveadm}: {exc.strerror}") from None
        lines = [ln for ln in res.stderr.splitlines() if "Error" in ln or "Fatal" in ln or "Warning" in ln]
        why = (lines or res.stderr.strip().splitlines() or ["no message"])[-1]
        return res.returncode, res.stdout, why

    def count(self, user: str, *, legacy: bool) -> int:
        """``doveadm mailbox status -t messages '*'`` on one side."""
        where = ["-o", "mail_location=imapc:"] if legacy else []
        out = self._run(user, *where, "-f", "flow", "mailbox", "status", "-u", user, "-t",
                        "messages", "*", imapc=legacy)
        for word in out.split():
            if word.startswith("messages="):
                return int(word.partition("=")[2])
        raise MigrationError(f"{user}: doveadm mailbox status said {out.strip()!r}")

    def pull(self, user: str, *, exact: bool, state: str = "") -> str:
        """``doveadm backup -R`` (exact) or ``doveadm sync -1 -R -s STATE`` from imapc.

        The one-way copy is stateful: a message the legacy side received after the switch
        may collide with the UID the mailbox host gave its own new mail; dsync then saves
        it under a new UID, and a stateless second run would not recognise it and copy it
        again.  With the state it starts from what the previous run saw."""
        if exact:
            self._run(user, "backup", "-R", "-u", user, "imapc:", imapc=True, again=True)
            return ""
        out = self._run(user, "sync", "-1", "-R", "-s", state, "-u", user, "imapc:", imapc=True, again=True)
        return out.strip()

    def _message_ids(self, user: str, *, legacy: bool) -> list[tuple[str, str, str]]:
        """(folder, UID, Message-ID) of every message on one side."""
        where = ["-o", "mail_location=imapc:"] if legacy else []
        out = self._run(user, *where, "-f", "tab", "fetch", "-u", user, "mailbox uid hdr.message-id", "all",
                        imapc=legacy)
        rows = [line.split("\t") for line in out.splitlines()[1:]]
        return [(r[0], r[1], r[2].strip()) for r in rows if len(r) >= 3]

    def push(self, user: str) -> list[str]:
        """Each message here whose Message-ID the same folder on the legacy side lacks, read
        with ``doveadm fetch text`` and stored there with ``doveadm save`` over imapc.

        Not ``doveadm sync -1`` to imapc: once both sides gave new mail the same UIDs, dsync
        resolves the conflict by moving mail within the legacy mailbox, which imapc cannot
        do ("Couldn't move mail within mailbox", measured with Dovecot 2.3.19).  Matching by
        Message-ID makes a second run copy nothing; a message without one is listed."""
        there = {(folder, mid) for folder, _, mid in self._message_ids(user, legacy=True)}
        left: list[str] = []
        for folder, uid, mid in self._message_ids(user, legacy=False):
            if not mid:
                left.append(f"{folder} UID {uid} (no Message-ID)")
                continue
            if (folder, mid) in there:
                continue
            text = self._run(user, "fetch", "-u", user, "text", "mailbox", folder, "uid", uid)
            self._run(user, "-o", "mail_location=imapc:", "save", "-u", user, "-m", folder,
                      imapc=True, stdin=text.removeprefix("text:\n"))
        return left


@dataclass
class Migration:
    """One domain's migration: its entry, state and subscribers, and the steps."""

    directory: Directory
    lister: UsersOf
    domain: str
    entry: Entry
    archive_status: str = "archive"
    sleep: Callable[[float], None] = time.sleep
    users: list[str] = field(default_factory=list)
    state_dir: Path | None = None
    """Where the one-way copies keep each subscriber's dsync state (None: nowhere, every
    catch-up compares everything)."""

    @classmethod
    def load(cls, directory: Directory, lister: UsersOf, domain: str, *,
             archive_status: str = "archive", state_dir: Path | None = None) -> Migration:
        """The domain's entry and subscribers; MigrationError when it is not hosted here."""
        entry = directory.find_domain(domain)
        if entry is None:
            raise MigrationError(f"no such domain {domain}")
        name = (entry.first("domain_name") or domain).lower()
        users = sorted({
            (e.first("mail") or "").lower() for e in lister.users_of(entry, name)
            if e.first("mail") and (e.first("account_status") or "").lower() != archive_status.lower()
        })
        return cls(directory, lister, name, entry, archive_status, users=users,
                   state_dir=state_dir / name if state_dir is not None else None)

    @property
    def state(self) -> str:
        """The stored ``migration_state`` (``migrated`` when unset: an ordinary domain)."""
        value = (self.entry.first("migration_state") or "migrated").strip().lower()
        if value not in MIGRATION_STATES:
            raise MigrationError(f"{self.domain}: migration_state {value!r} is not one of "
                                 f"{', '.join(MIGRATION_STATES)}")
        return value

    def set_state(self, state: str) -> None:
        """Write ``migration_state`` and keep the entry in step."""
        self.directory.modify(self.entry.dn, {"migration_state": [state]})
        values = dict(self.entry.values)
        values["migration_state"] = [state]
        self.entry = Entry(self.entry.dn, values, self.entry.problems)

    def legacy_host(self) -> str:
        """The domain's ``legacy_mailbox_host`` (MigrationError when it has none or it is
        not a valid one, e.g. with a port)."""
        host = self.entry.first("legacy_mailbox_host")
        if not host:
            raise MigrationError(f"{self.domain} has no legacy_mailbox_host "
                                 "(mailwarden domain set DOMAIN legacy_mailbox_host HOST)")
        try:
            value: str = SETTINGS["legacy_mailbox_host"].parse([host])
        except InvalidValue as exc:
            raise MigrationError(f"{self.domain}: {exc}") from None
        return value

    def copy(self, mailboxes: Mailboxes, step: str, users: Sequence[str] | None = None,
             progress: Callable[[UserCopy], None] | None = None) -> list[UserCopy]:
        """Copy every mailbox for ``step``: ``sync`` (exact), ``catch-up`` (legacy -> here,
        nothing deleted) or ``push`` (here -> legacy).  One user's failure is recorded and
        the others go on."""
        results: list[UserCopy] = []
        for user in users if users is not None else self.users:
            result = UserCopy(user, exact=step == "sync")
            started = time.monotonic()
            to_legacy = step == "push"
            try:
                result.source_before = mailboxes.count(user, legacy=not to_legacy)
                result.target_before = mailboxes.count(user, legacy=to_legacy)
                if to_legacy:
                    result.left = mailboxes.push(user)
                elif step == "sync":
                    self._forget_state(user)  # the next one-way copy starts from this one
                    mailboxes.pull(user, exact=True)
                else:
                    self._save_state(user, mailboxes.pull(user, exact=False, state=self._state(user)))
                result.source_after = mailboxes.count(user, legacy=not to_legacy)
                result.target_after = mailboxes.count(user, legacy=to_legacy)
            except MigrationError as exc:
                result.error = str(exc)
            result.seconds = time.monotonic() - started
            results.append(result)
            if progress is not None:
                progress(result)
        return results

    def _state_file(self, user: str) -> Path | None:
        return self.state_dir / f"{user}.dsync" if self.state_dir is not None else None

    def _state(self, user: str) -> str:
        path = self._state_file(user)
        try:
            return path.read_text().strip() if path is not None else ""
        except FileNotFoundError:
            return ""
        except OSError as exc:
            raise MigrationError(f"{user}: dsync state {path}: {exc.strerror}") from None

    def _save_state(self, user: str, state: str) -> None:
        path = self._state_file(user)
        if path is None or not state:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_suffix(".new")
            tmp.write_text(state + "\n")
            tmp.replace(path)
        except OSError as exc:
            raise MigrationError(f"{user}: dsync state {path}: {exc.strerror}") from None

    def _forget_state(self, user: str) -> None:
        path = self._state_file(user)
        if path is not None:
            path.unlink(missing_ok=True)
