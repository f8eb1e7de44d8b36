"""Sender authentication in the milter against a zone served by the stub DNS.

DKIM (RSA and ed25519; broken body, changed header, missing and revoked key, DNS
timeout), SPF of the envelope sender, DMARC of the From domain (alignment, sp, np,
pct, p=none, each recipient domain's dmarc_action), the one Authentication-Results
field under the node's authserv-id, and forged copies of it removed for every recipient.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import nacl.encoding
import nacl.signing
import pytest
from miltertest import constants as c

from harness.dnsstub import StubDns
from harness.process import stop_process
from harness.slapd import SlapdServer
from mailwarden.config import DnsConfig
from mailwarden.dns import make_resolver
from mailwarden.pbs import PopBeforeSmtp
from milters import protocol as p
from milters.authentication import AuthDns, Dmarc, SpfResult, check_spf_async
from milters.filters import Envelope
from milters.signing import zone_txt
from tests.milter.conftest import MilterProcess, base_sections
from tests.milter.helpers import Fed, Harness, harness, make_message, sample_directory
from tests.milter.mta import EomResult, MtaSession

CLIENT = "192.0.2.10"  # what tests.milter.helpers.drive connects from


@dataclass(frozen=True)
class Keys:
    """An RSA-2048 and an ed25519 key pair, private keys as dkimpy reads them."""

    rsa_private: bytes
    rsa_public: str
    ed_private: bytes
    ed_public: str


txt = zone_txt


def make_keys(tmp: Path) -> Keys:
    """Fresh keys (openssl for RSA, PyNaCl for ed25519)."""
    pem = tmp / "rsa.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(pem), "2048"], check=True, capture_output=True)
    der = subprocess.run(["openssl", "rsa", "-in", str(pem), "-pubout", "-outform", "DER"],
                         check=True, capture_output=True).stdout
    seed = nacl.signing.SigningKey.generate()
    return Keys(pem.read_bytes(), base64.b64encode(der).decode(),
                seed.encode(encoder=nacl.encoding.Base64Encoder),
                seed.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("dkim"))


def zone(keys: Keys) -> dict[str, dict[str, list[str]]]:
    """The signer's keys and SPF records."""
    return {
        "rsa._domainkey.signer.example": {"TXT": [txt(f"v=DKIM1; k=rsa; p={keys.rsa_public}")]},
        "ed._domainkey.signer.example": {"TXT": [txt(f"v=DKIM1; k=ed25519; p={keys.ed_public}")]},
        "revoked._domainkey.signer.example": {"TXT": [txt("v=DKIM1; k=rsa; p=")]},
        "rsa._domainkey.other.example": {"TXT": [txt(f"v=DKIM1; k=rsa; p={keys.rsa_public}")]},
        "rsa._domainkey.fwd.example": {"TXT": [txt(f"v=DKIM1; k=rsa; p={keys.rsa_public}")]},
        "rsa._domainkey.sub.orgpolicy.example": {"TXT": [txt(f"v=DKIM1; k=rsa; p={keys.rsa_public}")]},
        "signer.example": {"TXT": [txt("v=spf1 ip4:192.0.2.0/24 -all")]},
        "mail.signer.example": {"TXT": [txt("v=spf1 ip4:192.0.2.0/24 -all")]},
        "mail.strict.example": {"TXT": [txt("v=spf1 ip4:192.0.2.0/24 -all")]},
        "elsewhere.example": {"TXT": [txt("v=spf1 ip4:198.51.100.0/24 -all")]},
        "_dmarc.signer.example": {"TXT": [txt("v=DMARC1; p=reject")]},
        "_dmarc.strict.example": {"TXT": [txt("v=DMARC1; p=reject; aspf=s; adkim=s")]},
        "_dmarc.orgpolicy.example": {"TXT": [txt("v=DMARC1; p=reject; sp=quarantine; np=reject")]},
        "sub.orgpolicy.example": {"A": ["192.0.2.1"]},
        "_dmarc.lenient.example": {"TXT": [txt("v=DMARC1; p=none")]},
        "_dmarc.sampled.example": {"TXT": [txt("v=DMARC1; p=reject; pct=0")]},
    }


@pytest.fixture(scope="module")
def stub(keys: Keys) -> Iterator[StubDns]:
    with StubDns(zone(keys), silent=["slow._domainkey.signer.example",
                                         "slow._domainkey.sub.orgpolicy.example"]) as server:
        yield server


def dns_section(stub: StubDns) -> str:
    return f'[dns]\nnameservers = ["127.0.0.1"]\nport = {stub.port}\ntimeout = 0.3\nlifetime = 0.6\n'


@pytest.fixture
def h(tmp_path: Path, stub: StubDns) -> Harness:
    return harness(tmp_path, 'authserv_id = "mx.isp.test"\n' + dns_section(stub), sender_auth=True)


def signed(keys: Keys, selector: str = "rsa", *, ed25519: bool = False, body: str = "hello\n",
           sender: str = "news@signer.example", domain: str = "signer.example") -> bytes:
    """A message from ``sender`` signed by ``domain`` (CRLF, as the milter sees it)."""
    raw = make_message(body=body, sender=sender).as_bytes().replace(b"\n", b"\r\n")
    key = keys.ed_private if ed25519 else keys.rsa_private
    algorithm = b"ed25519-sha256" if ed25519 else b"rsa-sha256"
    signature = dkim.sign(raw, selector.encode(), domain.encode(), key, signature_algorithm=algorithm,
                          include_headers=[b"from", b"to", b"subject", b"message-id"])
    return signature.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n") + raw


def results(fed: Fed) -> list[str]:
    """The Authentication-Results fields of the queued copy."""
    return [v for n, v in fed.headers if n.lower() == "authentication-results"]


def ours(fed: Fed) -> str:
    found = [v for v in results(fed) if v.startswith("mx.isp.test;")]
    assert len(found) == 1, results(fed)
    return " ".join(found[0].split())


def test_valid_rsa_signature_passes(h: Harness, keys: Keys) -> None:
    fed = h.feed(signed(keys), "news@signer.example", "taro@example.jp")
    assert fed.rc == p.ACCEPT
    header = ours(fed)
    assert "dkim=pass header.d=signer.example header.a=rsa-sha256 header.s=rsa" in header
    assert "spf=pass smtp.mailfrom=news@signer.example" in header


def test_valid_ed25519_signature_passes(h: Harness, keys: Keys) -> None:
    fed = h.feed(signed(keys, "ed", ed25519=True), "news@signer.example", "taro@example.jp")
    assert "dkim=pass header.d=signer.example header.a=ed25519-sha256 header.s=ed" in ours(fed)


def test_both_signatures_are_reported(h: Harness, keys: Keys) -> None:
    raw = signed(keys)
    ed = dkim.sign(raw, b"ed", b"signer.example", keys.ed_private, signature_algorithm=b"ed25519-sha256",
                   include_headers=[b"from", b"subject"])
    fed = h.feed(ed.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + raw, "news@signer.example",
                 "taro@example.jp")
    header = ours(fed)
    assert header.count("dkim=pass") == 2 and "header.s=ed" in header and "header.s=rsa" in header


def test_broken_body_hash_fails(h: Harness, keys: Keys) -> None:
    raw = signed(keys).replace(b"hello", b"HELLO")
    header = ours(h.feed(raw, "news@signer.example", "taro@example.jp"))
    assert "dkim=fail" in header and "body hash mismatch" in header


def test_header_changed_after_signing_fails(h: Harness, keys: Keys) -> None:
    raw = signed(keys).replace(b"Subject: hi", b"Subject: changed")
    header = ours(h.feed(raw, "news@signer.example", "taro@example.jp"))
    assert "dkim=fail" in header and "header.d=signer.example" in header


def test_missing_key_is_a_permerror(h: Harness, keys: Keys) -> None:
    header = ours(h.feed(signed(keys, "nokey"), "news@signer.example", "taro@example.jp"))
    assert "dkim=permerror" in header and "no key" in header


def test_revoked_key_is_a_permerror(h: Harness, keys: Keys) -> None:
    header = ours(h.feed(signed(keys, "revoked"), "news@signer.example", "taro@example.jp"))
    assert "dkim=permerror" in header and "key revoked" in header


def test_dns_timeout_is_a_temperror_never_a_pass(h: Harness, keys: Keys) -> None:
    fed = h.feed(signed(keys, "slow"), "news@signer.example", "taro@example.jp")
    assert fed.rc == p.ACCEPT
    header = ours(fed)
    assert "dkim=temperror" in header and "dkim=pass" not in header


def test_unsigned_mail_from_a_host_the_domain_does_not_list(h: Harness) -> None:
    msg = make_message(sender="someone@elsewhere.example")
    header = ours(h.feed(msg, "someone@elsewhere.example", "taro@example.jp"))
    assert "dkim=none" in header and "spf=fail smtp.mailfrom=someone@elsewhere.example" in header


def test_null_sender_is_checked_by_helo(h: Harness) -> None:
    header = ours(h.feed(make_message(), "", "taro@example.jp"))
    assert "spf=none smtp.helo=client.example" in header


class CountingExecutor(ThreadPoolExecutor):
    """The loop's executor, counting what is handed to it."""

    handed = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        CountingExecutor.handed += 1
        return super().submit(fn, *args, **kwargs)


@pytest.mark.parametrize(("sender", "client", "expected"), [
    ("news@signer.example", "192.0.2.25", "pass"), ("news@elsewhere.example", "192.0.2.25", "fail"),
    ("news@nowhere.example", "192.0.2.25", "none"),
])
def test_spf_asks_dns_once_then_runs_on_the_loop_from_the_cache(stub: StubDns, sender: str, client: str,
                                                                expected: str) -> None:
    resolver = make_resolver(DnsConfig(nameservers=["127.0.0.1"], port=stub.port))
    auth = AuthDns(resolver)
    envelope = Envelope(sender=sender, client_address=client,
                        helo="mail.signer.example")

    async def twice() -> tuple[SpfResult, SpfResult, int, int]:
        asyncio.get_running_loop().set_default_executor(CountingExecutor(2))
        CountingExecutor.handed = 0
        first = await check_spf_async(auth, envelope, "mx.isp.test", 2.0)
        handed, asked = CountingExecutor.handed, len(stub.queries)
        second = await check_spf_async(auth, envelope, "mx.isp.test", 2.0)
        assert len(stub.queries) == asked  # nothing asked the second time
        return first, second, handed, CountingExecutor.handed - handed

    first, second, to_thread_first, to_thread_second = asyncio.run(twice())
    assert first == second and first.result == expected
    assert (to_thread_first, to_thread_second) == (1, 0)


def test_authenticated_submission_records_the_login_and_skips_spf(h: Harness) -> None:
    header = ours(h.feed(make_message(), "taro@example.jp", "hanako@example.jp", login="taro"))
    assert "auth=pass smtp.auth=taro" in header and "spf=" not in header


def test_one_header_for_every_hosted_recipient_and_none_for_others(h: Harness, keys: Keys) -> None:
    fed = h.feed(signed(keys), "news@signer.example", "taro@example.jp", "bob@example.com",
                 "someone@remote.example")
    assert fed.rc == p.ACCEPT
    ours(fed)  # the queued copy: the largest group (the two hosted recipients)
    assert h.injector.sent and all(b"Authentication-Results" not in m.data
                                   for m in h.injector.to("someone@remote.example"))


def test_forged_header_with_our_id_is_removed_for_every_recipient(h: Harness, keys: Keys) -> None:
    raw = (b"Authentication-Results: mx.isp.test; dkim=pass header.d=bank.example\r\n"
           b"Authentication-Results: other.example; spf=pass\r\n"
           b"Authentication-Results: (comment) MX.ISP.TEST; dmarc=pass\r\n" + signed(keys, "nokey"))
    fed = h.feed(raw, "news@signer.example", "taro@example.jp", "someone@remote.example")
    header = ours(fed)
    assert "dkim=permerror" in header
    assert [v for v in results(fed) if not v.startswith("mx.isp.test;")] == ["other.example; spf=pass"]
    outside = h.injector.to("someone@remote.example")
    assert len(outside) == 1
    assert b"bank.example" not in outside[0].data and b"dmarc=pass" not in outside[0].data
    assert b"other.example; spf=pass" in outside[0].data


def test_switched_off_adds_nothing(tmp_path: Path, stub: StubDns, keys: Keys) -> None:
    off = harness(tmp_path, dns_section(stub))
    fed = off.feed(signed(keys), "news@signer.example", "taro@example.jp")
    assert results(fed) == [] and not fed.headers_changed


# ---------------------------------------------------------------- DMARC


def test_dmarc_passes_by_dkim_alone(h: Harness, keys: Keys) -> None:
    fed = h.feed(signed(keys), "bounce@elsewhere.example", "taro@example.jp")
    header = ours(fed)
    assert "spf=fail" in header and "dkim=pass" in header
    assert "dmarc=pass (p=reject dis=none) header.from=signer.example" in header
    assert fed.rc == p.ACCEPT and fed.delrcpt == []


def test_dmarc_passes_by_relaxed_spf_alone(h: Harness) -> None:
    fed = h.feed(make_message(sender="news@signer.example"), "bounce@mail.signer.example", "taro@example.jp")
    header = ours(fed)
    assert "dkim=none" in header and "spf=pass smtp.mailfrom=bounce@mail.signer.example" in header
    assert "dmarc=pass" in header and fed.rc == p.ACCEPT


def test_unaligned_signature_and_spf_fail_and_p_reject_refuses(h: Harness, keys: Keys) -> None:
    raw = signed(keys, sender="ceo@signer.example", domain="other.example")
    fed = h.feed(raw, "x@elsewhere.example", "taro@example.jp")
    assert fed.rc == p.REJECT and fed.reply[0] == "550"
    assert "DMARC policy of signer.example: reject" in fed.reply[2]


def test_strict_alignment_needs_the_same_domain(h: Harness) -> None:
    fed = h.feed(make_message(sender="news@strict.example"), "bounce@mail.strict.example", "taro@example.jp")
    assert fed.rc == p.REJECT


def test_subdomain_policy_files_as_junk(h: Harness) -> None:
    fed = h.feed(make_message(sender="a@sub.orgpolicy.example"), "x@elsewhere.example", "taro@example.jp")
    assert fed.rc == p.ACCEPT
    assert ("X-Mailwarden-Junk", "yes") in fed.headers
    assert "dmarc=fail (p=quarantine) header.from=sub.orgpolicy.example" in ours(fed)


def test_subdomain_that_does_not_exist_gets_np(h: Harness) -> None:
    fed = h.feed(make_message(sender="a@ghost.orgpolicy.example"), "x@elsewhere.example", "taro@example.jp")
    assert fed.rc == p.REJECT


def test_aligned_subdomain_signature_passes_for_the_subdomain(h: Harness, keys: Keys) -> None:
    raw = signed(keys, sender="a@sub.orgpolicy.example", domain="sub.orgpolicy.example")
    fed = h.feed(raw, "x@elsewhere.example", "taro@example.jp")
    assert fed.rc == p.ACCEPT and "dmarc=pass" in ours(fed)


def test_p_none_is_recorded_only(h: Harness) -> None:
    fed = h.feed(make_message(sender="a@lenient.example"), "x@elsewhere.example", "taro@example.jp")
    assert fed.rc == p.ACCEPT and "X-Mailwarden-Junk" not in dict(fed.headers)
    assert "dmarc=fail (p=none) header.from=lenient.example" in ours(fed)


def test_pct_zero_applies_the_next_weaker_policy(h: Harness) -> None:
    fed = h.feed(make_message(sender="a@sampled.example"), "x@elsewhere.example", "taro@example.jp")
    assert fed.rc == p.ACCEPT and ("X-Mailwarden-Junk", "yes") in fed.headers
    assert "dmarc=fail (p=reject dis=quarantine)" in ours(fed)


def test_no_policy_is_none(h: Harness) -> None:
    fed = h.feed(make_message(sender="a@elsewhere.example"), "a@elsewhere.example", "taro@example.jp")
    assert "dmarc=none header.from=elsewhere.example" in ours(fed)


def test_two_recipients_whose_domains_honour_and_tag(tmp_path: Path, stub: StubDns) -> None:
    directory = sample_directory()
    directory.add_domain("tagging.example", dmarc_action="tag")
    directory.add_user("u@tagging.example")
    both = harness(tmp_path, 'authserv_id = "mx.isp.test"\n' + dns_section(stub), directory, sender_auth=True)
    fed = both.feed(make_message(sender="ceo@signer.example"), "x@elsewhere.example",
                    "taro@example.jp", "u@tagging.example")
    assert fed.rc == p.ACCEPT
    assert fed.delrcpt == ["<taro@example.jp>"]
    assert "dmarc=fail (p=reject) header.from=signer.example" in ours(fed)


def test_authenticated_submission_is_not_held_to_dmarc(h: Harness) -> None:
    fed = h.feed(make_message(sender="ceo@signer.example"), "ceo@signer.example", "taro@example.jp",
                 login="ceo")
    assert fed.rc == p.ACCEPT and "dmarc=" not in ours(fed)


def test_pop_before_smtp_and_internal_clients_are_not_held_to_spf_or_dmarc(tmp_path: Path, stub: StubDns,
                                                                           h: Harness) -> None:
    forged = make_message(sender="ceo@signer.example")
    assert h.feed(forged, "x@elsewhere.example", "taro@example.jp").rc == p.REJECT
    PopBeforeSmtp(h.store).open(CLIENT, "hanako@example.jp", 60)
    fed = h.feed(forged, "x@elsewhere.example", "taro@example.jp")
    assert fed.rc == p.ACCEPT
    assert "auth=pass (POP-before-SMTP) smtp.auth=hanako@example.jp" in ours(fed)
    assert "spf=" not in ours(fed) and "dmarc=" not in ours(fed)
    internal = harness(tmp_path, 'authserv_id = "mx.isp.test"\ninternal_networks = ["192.0.2.0/24"]\n'
                       + dns_section(stub), sender_auth=True)
    fed = internal.feed(forged, "x@elsewhere.example", "taro@example.jp")
    assert fed.rc == p.ACCEPT and "auth=none (internal network)" in ours(fed)


def test_policy_record_that_dns_cannot_answer_is_accepted_by_default(tmp_path: Path, keys: Keys) -> None:
    """No policy known: ``auto`` accepts (only a known p=reject defers)."""
    with StubDns(zone(keys), servfail=["_dmarc.signer.example"]) as failing:
        h = harness(tmp_path, 'authserv_id = "mx.isp.test"\n' + dns_section(failing), sender_auth=True)
        fed = h.feed(make_message(sender="ceo@signer.example"), "x@elsewhere.example", "taro@example.jp")
    assert fed.rc == p.ACCEPT and "dmarc=temperror" in ours(fed)


def forged_with_slow_key(keys: Keys) -> bytes:
    """From p=reject signer.example, signed with a key DNS does not answer for; SPF fails."""
    return signed(keys, "slow", sender="ceo@signer.example")


def test_aligned_key_dns_cannot_answer_defers_a_p_reject_sender(h: Harness, keys: Keys) -> None:
    fed = h.feed(forged_with_slow_key(keys), "x@elsewhere.example", "taro@example.jp")
    assert fed.rc == p.TEMPFAIL and fed.reply[0] == "451"
    assert "DMARC of signer.example: DNS temporary error (dkim temperror for signer.example)" in fed.reply[2]


def test_temperror_action_accept_and_p_quarantine_deliver(tmp_path: Path, stub: StubDns, keys: Keys) -> None:
    directory = sample_directory()
    directory.add_domain("patient.example", dmarc_temperror_action="accept")
    directory.add_user("u@patient.example")
    h = harness(tmp_path, 'authserv_id = "mx.isp.test"\n' + dns_section(stub), directory, sender_auth=True)
    fed = h.feed(forged_with_slow_key(keys), "x@elsewhere.example", "u@patient.example")
    assert fed.rc == p.ACCEPT and fed.delrcpt == []
    assert "dmarc=temperror (p=reject) reason=\"dkim temperror for signer.example\"" in ours(fed)
    raw = signed(keys, "slow", sender="a@sub.orgpolicy.example", domain="sub.orgpolicy.example")
    fed = h.feed(raw, "x@elsewhere.example", "taro@example.jp")
    assert fed.rc == p.ACCEPT and "dmarc=temperror (p=quarantine)" in ours(fed)
    assert ("X-Mailwarden-Junk", "yes") not in fed.headers


@pytest.mark.parametrize(("identifier", "domain", "mode", "aligned"), [
    ("mail.example.co.uk", "news.example.co.uk", "r", True),
    ("other.co.uk", "example.co.uk", "r", False),
    ("co.uk", "example.co.uk", "r", False),
    ("mail.example.com", "example.com", "s", False),
    ("EXAMPLE.com.", "example.com", "s", True),
])
def test_alignment_uses_the_public_suffix_list(identifier: str, domain: str, mode: str,
                                              aligned: bool) -> None:
    import dns.resolver

    checker = Dmarc(AuthDns(dns.resolver.Resolver(configure=False)))
    assert checker.aligned(identifier, domain, mode) is aligned


@pytest.mark.slapd
def test_the_daemon_adds_ours_and_removes_a_forged_one(slapd: SlapdServer, stub: StubDns, keys: Keys,
                                                      tmp_path: Path) -> None:
    """``mailwarden milter run`` with the sample directory: the resolver and the authserv-id
    come from the configuration, the changes go to the MTA as header edits."""
    sections = base_sections(ldap_uri=slapd.uri, store_path=tmp_path / "state.sqlite3") + dns_section(stub)
    milter = MilterProcess(tmp_path / "milter", sections,
                           'sender_auth = true\nauthserv_id = "mx.isp.test"\nmta_timeout = 3\n').start()
    try:
        milter.wait_for_log("(1 worker(s)")
        session = MtaSession(milter.socket_path)
        session.connect()
        session.helo()
        forged = b"Authentication-Results: MX.isp.test; dkim=pass header.d=bank.example\r\n"
        result = session.message("news@signer.example", ["nobody@bare.example.net"], forged + signed(keys))
        session.close()
        line = milter.wait_for_log("TESTQ1: accept")
    finally:
        milter.stop()
    assert isinstance(result, EomResult) and result.final == c.SMFIR_ACCEPT
    assert result.of(c.SMFIR_CHGHEADER) == [{"name": "Authentication-Results", "index": 1, "value": ""}]
    added = result.of(c.SMFIR_ADDHEADER)
    assert [a["name"] for a in added] == ["Authentication-Results", "X-Mailwarden-Id"]
    value = " ".join(str(added[0]["value"]).split())
    assert value.startswith("mx.isp.test; dkim=pass header.d=signer.example")
    assert "spf=pass" in value and "dmarc=pass" in value
    assert "dkim=pass:signer.example" in line and "spf=pass" in line and "dmarc=pass(none)" in line


# ---------------------------------------------------------------- ARC


def arc_sealed(keys: Keys, raw: bytes, results: bytes = b"dkim=pass header.d=signer.example") -> bytes:
    """``raw`` as a forwarder (fwd.example) passes it on: its Authentication-Results and ARC set."""
    raw = b"Authentication-Results: fwd.example; " + results + b"\r\n" + raw
    sealed = dkim.arc_sign(raw, b"rsa", b"fwd.example", keys.rsa_private, b"fwd.example")
    return b"".join(h if h.endswith(b"\r\n") else h + b"\r\n" for h in sealed) + raw


def test_a_valid_arc_chain_is_recorded(h: Harness, keys: Keys) -> None:
    header = ours(h.feed(arc_sealed(keys, signed(keys)), "fwd@fwd.example", "taro@example.jp"))
    assert "arc=pass (i=1)" in header


def test_a_broken_arc_chain_fails(h: Harness, keys: Keys) -> None:
    raw = arc_sealed(keys, signed(keys)).replace(b"hello", b"HELLO")
    # SPF passes for signer.example's own bounce domain, so DMARC lets it through.
    header = ours(h.feed(raw, "bounce@mail.signer.example", "taro@example.jp"))
    assert "arc=fail" in header and "dkim=fail" in header


def test_mail_without_arc_says_none(h: Harness) -> None:
    assert "arc=none" in ours(h.feed(make_message(), "s@remote.example", "taro@example.jp"))


def test_role_addresses_are_spared_dmarc_refusal(h: Harness) -> None:
    fed = h.feed(make_message(sender="ceo@signer.example"), "x@elsewhere.example",
                 "taro@example.jp", "abuse@example.com")
    assert fed.rc == p.ACCEPT and fed.delrcpt == ["<taro@example.jp>"]
    assert "dmarc=fail (p=reject) header.from=signer.example" in ours(fed)


def listed(keys: Keys, recorded: bytes) -> bytes:
    """ceo@signer.example's signed mail as a mailing list (fwd.example) passes it on: the
    subject rewritten after the list recorded ``recorded``, then sealed."""
    raw = signed(keys, sender="ceo@signer.example").replace(b"Subject: hi", b"Subject: [list] hi")
    return arc_sealed(keys, raw, recorded + b" header.from=signer.example")


def test_a_trusted_sealer_vouching_overrides_dmarc_for_its_domain_only(
        tmp_path: Path, stub: StubDns, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    directory = sample_directory()
    directory.add_domain("listreader.example", arc_trusted_sealers=["lists.other.example", "FWD.example."])
    directory.add_user("u@listreader.example")
    h = harness(tmp_path, 'authserv_id = "mx.isp.test"\n' + dns_section(stub), directory, sender_auth=True)
    fed = h.feed(listed(keys, b"dmarc=pass"), "list-bounce@elsewhere.example", "taro@example.jp",
                 "u@listreader.example")
    assert fed.rc == p.ACCEPT and fed.delrcpt == ["<taro@example.jp>"]
    header = ours(fed)
    assert "dkim=fail" in header and "dmarc=fail (p=reject)" in header and "arc=pass (i=1)" in header
    assert "trusted ARC sealer fwd.example recorded dmarc=pass" in caplog.text
    # The same sealer recording a failure vouches for nothing.
    fed = h.feed(listed(keys, b"dmarc=fail"), "list-bounce@elsewhere.example", "u@listreader.example")
    assert fed.rc == p.REJECT


# ---------------------------------------------------------------- OpenDKIM's keys and signatures


def opendkim_key(tmp: Path, selector: str) -> tuple[Path, str]:
    """A key made by OpenDKIM's ``opendkim-genkey``, and the record from its zone fragment."""
    subprocess.run(["opendkim-genkey", "-b", "2048", "-D", str(tmp), "-d", "signer.example", "-s", selector],
                   check=True, capture_output=True, timeout=60)
    fragment = (tmp / f"{selector}.txt").read_text()
    return tmp / f"{selector}.private", "".join(re.findall(r'"([^"]*)"', fragment))


def opendkim_signature(tmp: Path, key: Path, selector: str, raw: bytes) -> bytes:
    """The DKIM-Signature field OpenDKIM's milter (signing mode) adds to ``raw``."""
    socket_path = tmp / "opendkim.sock"
    conf = tmp / "opendkim.conf"
    conf.write_text(f"Syslog no\nMode s\nDomain signer.example\nSelector {selector}\nKeyFile {key}\n"
                    f"Socket local:{socket_path}\nInternalHosts 192.0.2.0/24\nSignatureAlgorithm rsa-sha256\n"
                    "Canonicalization relaxed/relaxed\nRequireSafeKeys false\n")
    proc = subprocess.Popen(["opendkim", "-f", "-x", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.05)
        session = MtaSession(socket_path)
        session.connect()
        session.helo()
        result = session.message("news@signer.example", ["taro@example.jp"], raw)
        session.close()
    finally:
        stop_process(proc, 10)
    assert isinstance(result, EomResult) and result.final == c.SMFIR_ACCEPT
    (added,) = result.of(c.SMFIR_INSHEADER)
    assert added["name"] == "DKIM-Signature"
    return b"DKIM-Signature:" + str(added["value"]).replace("\n", "\r\n").encode() + b"\r\n"


@pytest.mark.skipif(shutil.which("opendkim") is None or shutil.which("opendkim-genkey") is None,
                    reason="needs OpenDKIM (opendkim, opendkim-tools)")
def test_mail_opendkim_signs_with_its_own_keys_verifies(h: Harness, stub: StubDns, tmp_path: Path) -> None:
    key, record = opendkim_key(tmp_path, "od")
    assert "h=sha256" in record
    stub.add("od._domainkey.signer.example", "TXT", txt(record))
    raw = make_message(sender="news@signer.example", body="hello from opendkim\n",
                       headers={"Date": "Sun, 06 Dec 2026 20:00:00 +0000"}).as_bytes()
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    signed_by_opendkim = opendkim_signature(tmp_path, key, "od", raw) + raw
    # SPF fails (another envelope domain): DMARC passes on OpenDKIM's signature alone.
    fed = h.feed(signed_by_opendkim, "bounce@elsewhere.example", "taro@example.jp")
    header = ours(fed)
    assert fed.rc == p.ACCEPT
    assert "dkim=pass header.d=signer.example header.a=rsa-sha256 header.s=od" in header
    assert "spf=fail" in header and "dmarc=pass" in header
    changed = h.feed(signed_by_opendkim.replace(b"hello from", b"HELLO FROM"), "bounce@elsewhere.example",
                     "taro@example.jp")
    assert changed.rc == p.REJECT and "DMARC policy of signer.example: reject" in changed.reply[2]
