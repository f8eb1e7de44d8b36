"""The front node's quarantine on the mail volume the mailbox hosts share (the NAS)."""

from __future__ import annotations

import stat

from harness.containers import MailStack
from tests.containers.conftest import DirectoryChanges
from tests.containers.test_inbound import MX, virus_message

QUARANTINE = "/srv/mail/.quarantine"  # milter.quarantine_dir in front.toml


def test_quarantined_mail_is_kept_on_the_shared_volume_for_the_milter_alone_and_released_from_it(
    stack: MailStack, token: str, directory: DirectoryChanges
) -> None:
    directory.set("user", "taro@example.jp", "virus_action", "quarantine")
    milter_log = stack.log_size("front", "milter")
    msg = virus_message("alice@outside.test", "taro@example.jp", f"held {token}")
    msg["X-Test-Token"] = token  # not in the notices, which quote the subject
    sent = stack.swaks("internet", "--server", MX, "--from", "alice@outside.test", "--to", "taro@example.jp",
                       "--data", "-", input_text=msg.as_string())
    assert sent.returncode == 0, sent.stdout  # accepted, then kept from taro
    entry_id = stack.wait_for_log("front", r"taro@example\.jp=quarantine\[.* quarantine=(\S+)", name="milter",
                                  after=milter_log).group(1)

    # On the shared volume, in the milter's own directory: the mailbox hosts see the
    # file (as a second front node will), their Dovecot users cannot read it.
    inside = f"{QUARANTINE}/{entry_id[:8]}/{entry_id}.eml"
    on_volume = stack.volume_path("mail") / ".quarantine" / entry_id[:8] / f"{entry_id}.eml"
    postfix_uid = int(stack.exec("front", "id", "-u", "postfix").stdout)
    assert on_volume.stat().st_uid == postfix_uid and stat.S_IMODE(on_volume.stat().st_mode) == 0o600
    top = on_volume.parents[1].stat()
    assert top.st_uid == postfix_uid and stat.S_IMODE(top.st_mode) == 0o700
    assert stack.exec("mbox2", "test", "-f", inside, check=False).returncode == 0
    as_vmail = stack.exec("mbox2", "setpriv", "--reuid=vmail", "--regid=vmail", "--init-groups",
                          "cat", inside, check=False)
    assert as_vmail.returncode != 0 and "Permission denied" in as_vmail.stderr

    listed = stack.mailwarden("quarantine", "list").stdout
    assert entry_id in listed and "[file missing]" not in listed
    assert "released" in stack.mailwarden("quarantine", "release", entry_id).stdout
    [released] = stack.wait_for_messages(stack.maildir("taro@example.jp"), match=f"X-Test-Token: {token}")
    assert released["Subject"] == f"held {token}"
    assert [p.get_filename() for p in released.walk() if p.get_filename()] == ["report.txt"]
    assert not on_volume.exists() and entry_id not in stack.mailwarden("quarantine", "list").stdout
    stack.wait_queues_empty()
