"""DKIM signing of subscribers' mail: RSA and ed25519, after every change mailwarden makes.

signing.example has ``dkim_signing`` with selector ``mw1``; its keys live under the
test's ``milter.dkim_key_path``.  Each signed copy (the queued one after the milter's
header changes, a re-injected one as sent) is verified with dkimpy against the keys
the stub DNS would publish.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import pytest
from click.testing import CliRunner, Result

from harness import netns
from harness.dnsstub import StubDns
from harness.fakes import FakeDirectory
from mailwarden.cli.common import App
from mailwarden.pbs import PopBeforeSmtp
from milters import protocol as p
from milters.cli import dkim_group
from tests.milter.helpers import Fed, Harness, harness, make_message, sample_directory
from tests.milter.test_message import PE
from tests.milter.test_sender_auth import CLIENT, Keys, dns_section, make_keys, txt

FROM = "alice@signing.example"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("signing-keys"))


def published(keys: Keys) -> dict[str, bytes]:
    """The TXT records a verifier finds, by name."""
    return {"mw1._domainkey.signing.example.": f"v=DKIM1; k=rsa; p={keys.rsa_public}".encode(),
            "mw1-ed25519._domainkey.signing.example.": f"v=DKIM1; k=ed25519; p={keys.ed_public}".encode()}


def directory() -> FakeDirectory:
    d = sample_directory()
    d.add_domain("signing.example", enabled_service=["dkim-signing", "extension-filter"], dkim_selector="mw1",
                 extension_action="strip")
    d.add_user(FROM)
    d.add_user("bob@signing.example", disabled_service=["dkim-signing"])
    d.add_domain("unsigned.example")
    d.add_user("carl@unsigned.example")
    return d


def rig(tmp: Path, keys: Keys, *, rsa: bool = True, ed25519: bool = True) -> Harness:
    keydir = tmp / "dkim"
    keydir.mkdir()
    if rsa:
        (keydir / "signing.example.mw1.key").write_bytes(keys.rsa_private)
    if ed25519:
        (keydir / "signing.example.mw1-ed25519.key").write_bytes(keys.ed_private)
    return harness(tmp, f'dkim_key_path = "{keydir}/{{domain}}.{{selector}}.key"\n', directory())


def verified(data: bytes, keys: Keys) -> list[tuple[str, bool]]:
    """(selector, verifies) of every DKIM-Signature in ``data``."""
    records = published(keys)
    verifier = dkim.DKIM(data)
    out = []
    head = data.split(b"\r\n\r\n")[0].split(b"\r\n")
    count = sum(1 for line in head if line.lower().startswith(b"dkim-signature:"))
    for idx in range(count):
        ok = verifier.verify(idx, dnsfunc=lambda name, timeout=5: records.get(name.decode(), b""))
        out.append((verifier.selector.decode(), ok))
    return out


def queued(fed: Fed) -> bytes:
    """The queued copy after the milter's changes, as it leaves."""
    head = "".join(f"{n}: {v.replace(chr(10), chr(13) + chr(10))}\r\n" for n, v in fed.headers)
    return head.encode("utf-8", "surrogateescape") + b"\r\n" + fed.body


def test_subscriber_mail_is_signed_with_both_keys(tmp_path: Path, keys: Keys,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    h = rig(tmp_path, keys)
    with caplog.at_level(logging.INFO, logger="mailwarden.milter"):
        fed = h.feed(make_message(sender=FROM, to="friend@remote.example"), FROM, "friend@remote.example",
                     login=FROM)
    assert "signed=signing.example:mw1+mw1-ed25519" in caplog.text
    assert fed.rc == p.ACCEPT
    assert sorted(verified(queued(fed), keys)) == [("mw1", True), ("mw1-ed25519", True)]
    sigs = [v for n, v in fed.headers if n == "DKIM-Signature"]
    assert all("d=signing.example" in v and "c=relaxed/relaxed" in v for v in sigs)


def test_only_the_rsa_key_gives_one_signature(tmp_path: Path, keys: Keys) -> None:
    h = rig(tmp_path, keys, ed25519=False)
    fed = h.feed(make_message(sender=FROM), FROM, "friend@remote.example", login=FROM)
    assert verified(queued(fed), keys) == [("mw1", True)]


def test_every_variant_is_signed_after_the_milters_changes(tmp_path: Path, keys: Keys) -> None:
    h = rig(tmp_path, keys)
    msg = make_message(sender=FROM, body="see attached")
    msg.add_attachment(PE, maintype="application", subtype="octet-stream", filename="setup.exe")
    fed = h.feed(msg, FROM, "friend@remote.example", "bob@signing.example", login=FROM)
    assert fed.rc == p.ACCEPT
    # The queued copy (friend) keeps the attachment; bob's copy is stripped and re-injected.
    assert sorted(verified(queued(fed), keys)) == [("mw1", True), ("mw1-ed25519", True)]
    (copy,) = h.injector.to("bob@signing.example")
    assert b"TVqQ" not in copy.data and b"TVqQ" in queued(fed)  # the PE part gave way to a note
    assert sorted(verified(copy.data, keys)) == [("mw1", True), ("mw1-ed25519", True)]


def test_a_missing_key_defers_with_one_line_naming_the_file(tmp_path: Path, keys: Keys,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    h = rig(tmp_path, keys, rsa=False, ed25519=False)
    with caplog.at_level(logging.ERROR, logger="mailwarden.milter"):
        fed = h.feed(make_message(sender=FROM), FROM, "friend@remote.example", login=FROM)
    assert fed.rc == p.TEMPFAIL or fed.reply[0] == "451"
    lines = [r.getMessage() for r in caplog.records if "DKIM" in r.getMessage()]
    assert len(lines) == 1 and str(tmp_path / "dkim" / "signing.example.mw1.key") in lines[0]


@pytest.mark.parametrize(("sender", "from_", "login"), [
    (FROM, FROM, ""),                                        # not submitted with SMTP AUTH
    ("bob@signing.example", "bob@signing.example", "bob"),   # the subscriber switched it off
    ("carl@unsigned.example", "carl@unsigned.example", "carl"),  # the domain has no signing
    (FROM, "ceo@unsigned.example", FROM),                    # From is another domain
])
def test_not_signed(tmp_path: Path, keys: Keys, sender: str, from_: str, login: str) -> None:
    h = rig(tmp_path, keys)
    fed = h.feed(make_message(sender=from_), sender, "friend@remote.example", login=login)
    assert fed.rc == p.ACCEPT and not any(n == "DKIM-Signature" for n, _ in fed.headers)


# ---------------------------------------------------------------- mailwarden dkim keygen / check


def cli(tmp: Path, stub: StubDns, *args: str) -> Result:
    config = tmp / "mailwarden.toml"
    config.write_text(f'[milter]\ndkim_key_path = "{tmp}/keys/{{domain}}.{{selector}}.key"\n'
                      + dns_section(stub))
    return CliRunner().invoke(dkim_group, list(args), obj=App(str(config)))


def record_of(output: str) -> tuple[str, str]:
    """The name and the record of ``keygen``'s zone-file line (strings of at most 255)."""
    name, _, rest = output.strip().partition(" IN TXT ")
    strings = re.findall(r'"([^"]*)"', rest)
    assert strings and all(len(s) <= 255 for s in strings)
    return name.rstrip("."), "".join(strings)


def test_keygen_writes_private_keys_and_check_compares_them(tmp_path: Path) -> None:
    with StubDns() as stub:
        rsa = cli(tmp_path, stub, "keygen", "Example.COM", "mw9")
        assert rsa.exit_code == 0, rsa.output
        name, record = record_of(rsa.stdout)
        assert name == "mw9._domainkey.example.com" and record.startswith("v=DKIM1; k=rsa; p=MII")
        key = tmp_path / "keys" / "example.com.mw9.key"
        assert key.stat().st_mode & 0o777 == 0o600 and b"PRIVATE KEY" in key.read_bytes()
        ed = cli(tmp_path, stub, "keygen", "example.com", "mw9", "--type", "ed25519")
        ed_name, ed_record = record_of(ed.stdout)
        assert ed_name == "mw9-ed25519._domainkey.example.com" and ed_record.startswith("v=DKIM1; k=ed25519;")
        assert (tmp_path / "keys" / "example.com.mw9-ed25519.key").stat().st_mode & 0o777 == 0o600
        again = cli(tmp_path, stub, "keygen", "example.com", "mw9")
        assert again.exit_code == 2 and "exists" in again.output

        missing = cli(tmp_path, stub, "check", "example.com", "--selector", "mw9")
        assert missing.exit_code == 1 and "no record" in missing.output
        stub.add(name, "TXT", txt(record))
        stub.add(ed_name, "TXT", txt(ed_record.replace("p=", "p=AAAA")))
        differs = cli(tmp_path, stub, "check", "example.com", "--selector", "mw9")
        assert differs.exit_code == 1 and "published key differs" in differs.output
        stub.records[ed_name]["TXT"] = [txt(ed_record)]
        fine = cli(tmp_path, stub, "check", "example.com", "--selector", "mw9")
        assert fine.exit_code == 0, fine.output
        assert "rsa-sha256 key published" in fine.output and "ed25519-sha256 key published" in fine.output
        stub.silent.add(name)
        assert cli(tmp_path, stub, "check", "example.com", "--selector", "mw9").exit_code == 75


def test_a_generated_key_signs_what_its_record_verifies(tmp_path: Path) -> None:
    with StubDns() as stub:
        out = cli(tmp_path, stub, "keygen", "signing.example", "mw1").stdout
    _, record = record_of(out)
    private = (tmp_path / "keys" / "signing.example.mw1.key").read_bytes()
    data = make_message(sender=FROM).as_bytes().replace(b"\n", b"\r\n")
    signed = dkim.sign(data, b"mw1", b"signing.example", private) + data
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record.encode())


# ---------------------------------------------------------------- interoperability


@pytest.mark.skipif(not netns.available() or shutil.which("opendkim-testmsg") is None,
                    reason="needs root, unshare and OpenDKIM's opendkim-testmsg (opendkim-tools)")
@pytest.mark.parametrize("ed25519", [False, True], ids=["rsa", "rsa+ed25519"])
def test_opendkim_verifies_what_mailwarden_signs(tmp_path: Path, keys: Keys, ed25519: bool) -> None:
    h = rig(tmp_path, keys, ed25519=ed25519)
    # OpenDKIM refuses a message without the fields RFC 5322 requires (Date) as a syntax error.
    msg = make_message(sender=FROM, body="hello from the milter\n",
                       headers={"Date": "Sun, 06 Dec 2026 20:00:00 +0000"})
    fed = h.feed(msg, FROM, "friend@remote.example", login=FROM)
    records = {name.rstrip("."): {"TXT": [txt(value.decode())]} for name, value in published(keys).items()}
    data = queued(fed).replace(b"\r\n", b"\n")
    good = netns.run_with_stub_dns(records, ["opendkim-testmsg"], data)
    assert good.returncode == 0, good.stderr
    bad = netns.run_with_stub_dns(records, ["opendkim-testmsg"], data.replace(b"hello from", b"HELLO FROM"))
    assert bad.returncode != 0 and b"Bad signature" in bad.stderr


# ---------------------------------------------------------------- ARC sealing of forwarded mail

SEALING_ZONE_EXTRA = 'authserv_id = "mx.isp.test"\n'


def sealing_rig(tmp: Path, keys: Keys, stub: StubDns, *, seal: bool = True, rsa: bool = True) -> Harness:
    """signing.example seals what alice forwards; bob forwards too, his domain does not seal."""
    keydir = tmp / "dkim"
    keydir.mkdir(parents=True)
    if rsa:
        (keydir / "signing.example.mw1.key").write_bytes(keys.rsa_private)
    d = directory()
    d.entries["mwDomainName=signing.example,ou=domains"]["arc_seal_forwards"] = ["TRUE" if seal else "FALSE"]
    d.entries[d.add_user(FROM)]["forward_addresses"] = ["alice@far.example"]
    d.entries[d.add_user("dan@unsigned.example")]["forward_addresses"] = ["dan@far.example"]
    return harness(tmp, f'dkim_key_path = "{keydir}/{{domain}}.{{selector}}.key"\n'
                   + SEALING_ZONE_EXTRA + dns_section(stub), d, sender_auth=True)


@pytest.fixture(scope="module")
def stub(keys: Keys) -> Iterator[StubDns]:
    records = {name.rstrip("."): {"TXT": [txt(value.decode())]} for name, value in published(keys).items()}
    records["_dmarc.news.example"] = {"TXT": [txt("v=DMARC1; p=reject")]}
    records["news.example"] = {"TXT": [txt("v=spf1 ip4:192.0.2.0/24 -all")]}
    with StubDns(records) as server:
        yield server


def arc_verified(data: bytes, keys: Keys) -> tuple[bytes | None, list[dict[str, Any]]]:
    """dkimpy's verdict on the ARC chain of ``data`` against the published keys."""
    records = published(keys)
    cv, results, _ = dkim.ARC(data).verify(dnsfunc=lambda name, timeout=5: records.get(name.decode(), b""))
    return cv, results


def inbound() -> EmailMessage:
    return make_message(sender="editor@news.example", to=FROM, body="the news\n",
                        headers={"Date": "Sun, 06 Dec 2026 20:00:00 +0000"})


def test_mail_a_subscriber_forwards_is_sealed_by_their_domain(tmp_path: Path, keys: Keys,
                                                              stub: StubDns) -> None:
    h = sealing_rig(tmp_path, keys, stub)
    fed = h.feed(inbound(), "editor@news.example", FROM, "carl@unsigned.example")
    # One copy for both: those who share a copy share its seal.
    assert fed.rc == p.ACCEPT and h.injector.sent == []
    names = [n for n, _ in fed.headers]
    assert names.count("ARC-Seal") == 1 and names.count("ARC-Message-Signature") == 1
    (aar,) = [v for n, v in fed.headers if n == "ARC-Authentication-Results"]
    assert " ".join(aar.split()).startswith("i=1; mx.isp.test; dkim=none; spf=pass")
    assert "dmarc=pass" in aar
    cv, results = arc_verified(queued(fed), keys)
    assert cv == dkim.CV_Pass and results[0]["as-domain"] == b"signing.example"
    # On its way out (Received and Delivered-To on top, our own Authentication-Results
    # removed as a forgery at the next hop of ours) the chain still holds; changed, it breaks.
    onward = (b"Received: from mbox1 by mx1; Sun, 06 Dec 2026 20:00:01 +0000\r\n"
              b"Delivered-To: alice@signing.example\r\n" + queued(fed))
    assert arc_verified(onward, keys)[0] == dkim.CV_Pass
    assert arc_verified(onward.replace(b"the news", b"THE NEWS"), keys)[0] == dkim.CV_Fail


def test_an_existing_chain_is_extended(tmp_path: Path, keys: Keys, stub: StubDns) -> None:
    h = sealing_rig(tmp_path, keys, stub)
    first = h.feed(inbound(), "editor@news.example", FROM)
    again = sealing_rig(tmp_path / "second", keys, stub).feed(queued(first), "editor@news.example", FROM)
    (seal,) = [v for n, v in again.headers if n == "ARC-Seal" and "i=2" in v]
    assert "cv=pass" in seal
    cv, results = arc_verified(queued(again), keys)
    assert cv == dkim.CV_Pass and len(results) == 2


@pytest.mark.parametrize("case", ["domain does not seal", "does not forward", "sender_auth off"])
def test_not_sealed(tmp_path: Path, keys: Keys, stub: StubDns, case: str) -> None:
    h = sealing_rig(tmp_path, keys, stub, seal=case != "domain does not seal")
    if case == "sender_auth off":
        h.service.signing.authserv_id = ""  # type: ignore[union-attr]
    recipient = "bob@signing.example" if case == "does not forward" else FROM
    fed = h.feed(inbound(), "editor@news.example", recipient, "dan@unsigned.example")
    assert fed.rc == p.ACCEPT and not any(n.startswith("ARC-") for n, _ in fed.headers)


def test_a_missing_key_delivers_unsealed_with_a_warning(tmp_path: Path, keys: Keys, stub: StubDns,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    h = sealing_rig(tmp_path, keys, stub, rsa=False)
    with caplog.at_level(logging.WARNING, logger="mailwarden.milter"):
        fed = h.feed(inbound(), "editor@news.example", FROM)
    assert fed.rc == p.ACCEPT and not any(n.startswith("ARC-") for n, _ in fed.headers)
    key = str(tmp_path / "dkim" / "signing.example.mw1.key")
    assert any("ARC seal of signing.example" in r.getMessage() and key in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------- clients of ours without SMTP AUTH


def test_a_pop_before_smtp_client_is_signed_for_its_subscriber(tmp_path: Path, keys: Keys) -> None:
    h = rig(tmp_path, keys, ed25519=False)
    PopBeforeSmtp(h.store).open(CLIENT, FROM, 60)
    fed = h.feed(make_message(sender=FROM), FROM, "friend@remote.example")
    assert fed.rc == p.ACCEPT and verified(queued(fed), keys) == [("mw1", True)]
    # The window's subscriber must own the sender: carl's window does not sign alice's mail.
    PopBeforeSmtp(h.store).open(CLIENT, "carl@unsigned.example", 60)
    fed = h.feed(make_message(sender=FROM), FROM, "friend@remote.example")
    assert fed.rc == p.ACCEPT and not any(n == "DKIM-Signature" for n, _ in fed.headers)


def test_an_internal_network_client_is_signed(tmp_path: Path, keys: Keys) -> None:
    keydir = tmp_path / "dkim"
    keydir.mkdir()
    (keydir / "signing.example.mw1.key").write_bytes(keys.rsa_private)
    h = harness(tmp_path, f'dkim_key_path = "{keydir}/{{domain}}.{{selector}}.key"\n'
                f'internal_networks = ["192.0.2.0/28", "2001:db8::/32"]\n', directory())
    fed = h.feed(make_message(sender=FROM), FROM, "friend@remote.example")
    assert fed.rc == p.ACCEPT and verified(queued(fed), keys) == [("mw1", True)]
