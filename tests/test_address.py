"""Address normalisation: the key every lookup and cache uses."""

from __future__ import annotations

import pytest

from mailwarden.address import InvalidAddress, normalize_address, normalize_domain


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Taro@Example.JP", "taro@example.jp"),
        ("<taro@example.jp>", "taro@example.jp"),
        ("  taro@example.jp.  ", "taro@example.jp"),
        ("user@bücher.example", "user@xn--bcher-kva.example"),
        ("ユーザー@example.jp", "ユーザー@example.jp"),
        ('"odd@local"@example.jp', '"odd@local"@example.jp'),
        ("x@[192.0.2.1]", "x@[192.0.2.1]"),
    ],
)
def test_normalize_address_accepts_real_addresses(raw: str, expected: str) -> None:
    assert normalize_address(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "", "<>", "no-at-sign", "@example.jp", "user@", "user@exa mple.jp", "a\x00b@example.jp",
        "user@-bad-.jp", "user@" + "a" * 64 + ".jp", "x" * 65 + "@example.jp",
        "u@" + ".".join(["abc"] * 90), "user@ex\udcffample.jp", "user@xn--.jp\n",
    ],
)
def test_normalize_address_rejects_junk(raw: str) -> None:
    with pytest.raises(InvalidAddress):
        normalize_address(raw)


def test_normalize_domain_is_idempotent_for_a_labels() -> None:
    assert normalize_domain("XN--BCHER-KVA.example") == "xn--bcher-kva.example"
    assert normalize_domain(normalize_domain("bücher.example")) == "xn--bcher-kva.example"
