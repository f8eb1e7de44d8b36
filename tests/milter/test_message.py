"""One parse of a message: names, archives, charsets, limits, broken input."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zipfile
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.clamd import EICAR
from milters.message import BodySpool, Limits, extensions_of
from milters.text import decode_header_value, guess_decode, normalize_for_match
from tests.milter.helpers import parse

PE = b"MZ" + b"\x90" * 58 + b"\x40\x00\x00\x00" + b"PE\x00\x00" + b"\x00" * 200


def with_attachment(data: bytes, filename: str | None, maintype: str = "application",
                    subtype: str = "octet-stream") -> bytes:
    msg = EmailMessage()
    msg["From"] = "a@remote.example"
    msg["Subject"] = "files"
    msg.set_content("see attached")
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def names(raw: bytes, limits: Limits | None = None) -> dict[str, set[str]]:
    """name -> where it was found."""
    out: dict[str, set[str]] = {}
    for a in parse(raw, limits).inventory.attachments:
        out.setdefault(a.name, set()).add(a.where)
    return out


def zip_of(members: dict[str, bytes], *, deflate: bool = False) -> bytes:
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def tar_of(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ---------------------------------------------------------------- names


def test_rfc2231_continued_utf8_filename_is_decoded() -> None:
    raw = (b"From: a@b\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
           b"--XX\r\nContent-Type: text/plain\r\n\r\nhi\r\n--XX\r\n"
           b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment;\r\n"
           b" filename*0*=UTF-8''%E8%AB%8B%E6%B1%82; filename*1=.pdf.exe\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n--XX--\r\n")
    found = names(raw)
    assert "請求.pdf.exe" in found
    assert extensions_of("請求.pdf.exe") == {"exe"}


def test_encoded_word_filename_in_iso2022jp_is_decoded() -> None:
    raw = (b"From: a@b\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
           b'Content-Type: application/octet-stream; name="=?ISO-2022-JP?B?GyRCQEE1YRsoQg==?=.scr"\r\n'
           b"Content-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n--B--\r\n")
    assert "請求.scr" in names(raw)


def test_raw_shift_jis_filename_is_decoded() -> None:
    raw = (b"From: a@b\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
           b'Content-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="'
           + "見積書.exe".encode("cp932") + b'"\r\n\r\nhello\r\n--B--\r\n')
    assert "見積書.exe" in names(raw)


@pytest.mark.parametrize(("name", "expected"), [
    ("invoice.pdf.exe", {"exe"}),
    ("invoice.exe.", {"exe"}),
    ("invoice.exe   ", {"exe"}),
    ("invoice.exe\x00.txt", {"exe", "txt"}),
    ("C:\\temp\\run.SCR", {"scr"}),
    ("README", set()),
])
def test_extension_is_what_a_file_manager_acts_on(name: str, expected: set[str]) -> None:
    assert extensions_of(name) == expected


def test_executable_content_behind_a_harmless_name_is_an_exe() -> None:
    found = names(with_attachment(PE, "invoice.pdf"))
    assert found["invoice.pdf"] == {"attachment", "content"}
    att = [a for a in parse(with_attachment(PE, "invoice.pdf")).inventory.attachments if a.where == "content"]
    assert att[0].extensions == {"exe"}


def test_declared_executable_type_counts_whatever_the_name() -> None:
    raw = with_attachment(b"hello", "report.txt", "application", "x-msdownload")
    exts = {e for a in parse(raw).inventory.attachments for e in a.extensions}
    assert "exe" in exts


# ---------------------------------------------------------------- archives


def test_members_of_a_zip_inside_a_zip_are_listed() -> None:
    inner = zip_of({"eicar.com": EICAR, "run.scr": b"x"})
    outer = zip_of({"inner.zip": inner, "readme.txt": b"hi"}, deflate=True)
    found = names(with_attachment(outer, "docs.zip", "application", "zip"))
    assert found["run.scr"] == {"in docs.zip > inner.zip"}
    assert found["eicar.com"] == {"in docs.zip > inner.zip"}
    assert "readme.txt" in found


@pytest.mark.parametrize(("filename", "data"), [
    ("a.tar", tar_of({"dir/evil.vbs": b"x"})),
    ("a.tgz", tar_of({"dir/evil.vbs": b"x"}, "w:gz")),
    ("a.tar.bz2", tar_of({"dir/evil.vbs": b"x"}, "w:bz2")),
    ("a.txz", tar_of({"dir/evil.vbs": b"x"}, "w:xz")),
])
def test_tar_members_are_listed_compressed_or_not(filename: str, data: bytes) -> None:
    assert "dir/evil.vbs" in names(with_attachment(data, filename))


@pytest.mark.parametrize(("filename", "data", "member"), [
    ("notes.js.gz", gzip.compress(b"alert(1)"), "notes.js"),
    ("notes.js.bz2", bz2.compress(b"alert(1)"), "notes.js"),
    ("notes.js.xz", lzma.compress(b"alert(1)"), "notes.js"),
])
def test_single_compressed_file_reveals_its_name(filename: str, data: bytes, member: str) -> None:
    assert member in names(with_attachment(data, filename))


def test_gzip_stored_name_is_used() -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="payload.exe", mode="wb", fileobj=buf) as gz:
        gz.write(b"x")
    assert "payload.exe" in names(with_attachment(buf.getvalue(), "harmless.gz"))


def test_archive_is_looked_into_even_without_an_archive_name() -> None:
    data = zip_of({"evil.exe": b"x"})
    assert "evil.exe" in names(with_attachment(data, "photo.jpg"))


def _encrypted(zip_bytes: bytes) -> bytes:
    """Set the 'encrypted' flag on every entry (what a password-protected zip looks like)."""
    data = bytearray(zip_bytes)
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = data.find(sig)
        while pos >= 0:
            data[pos + flag_at] |= 0x01
            pos = data.find(sig, pos + 4)
    return bytes(data)


def test_password_protected_zip_is_unscannable_but_names_are_listed() -> None:
    msg = parse(with_attachment(_encrypted(zip_of({"secret.exe": b"x" * 100})), "locked.zip"))
    reasons = [u for u in msg.unscannable if "encrypted" in u.reason]
    assert reasons and reasons[0].virus and not reasons[0].listing
    assert any(a.name == "secret.exe" for a in msg.inventory.attachments)


def test_zip_bomb_by_ratio_is_unscannable() -> None:
    bomb = zip_of({"zeros.bin": b"\0" * (20 << 20)}, deflate=True)
    msg = parse(with_attachment(bomb, "bomb.zip"))
    # The lister's own limit: its listing is incomplete (the extension filter's concern);
    # the virus scan is left to clamd, whose own limits decide.
    assert any("archive bomb" in u.reason and not u.virus and u.listing for u in msg.unscannable)


def test_gzip_bomb_is_stopped_at_the_size_limit() -> None:
    bomb = gzip.compress(b"\0" * (8 << 20))
    limits = Limits(archive_max_size=4 << 20, archive_max_ratio=10_000)
    msg = parse(with_attachment(bomb, "big.gz"), limits)
    assert any("more than" in u.reason for u in msg.unscannable)


def test_too_many_archive_members_is_unscannable() -> None:
    data = zip_of({f"f{i}.txt": b"" for i in range(50)})
    msg = parse(with_attachment(data, "many.zip"), Limits(archive_max_members=20))
    assert any("more than 20 archive members" in u.reason for u in msg.unscannable)


def test_archives_nested_too_deep_are_unscannable() -> None:
    data = zip_of({"evil.exe": b"x"})
    for level in range(6):
        data = zip_of({f"level{level}.zip": data})
    msg = parse(with_attachment(data, "deep.zip"), Limits(archive_max_depth=3))
    deep = [u for u in msg.unscannable if "nested deeper than 3" in u.reason]
    # What the lister cannot open is not hidden from clamd, which unpacks deeper.
    assert deep and deep[0].listing and not deep[0].virus


def test_broken_zip_is_noted_for_the_listing() -> None:
    msg = parse(with_attachment(b"PK\x03\x04 this is not really a zip", "broken.zip"))
    assert any("broken archive" in u.reason and u.listing and not u.virus for u in msg.unscannable)


# ---------------------------------------------------------------- structure


def test_thousands_of_parts_stop_at_the_limit() -> None:
    body = b"".join(b"--B\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(3000)) + b"--B--\r\n"
    raw = b"From: a@b\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n" + body
    msg = parse(raw, Limits(max_parts=500))
    assert len(msg.parts) < 500
    assert any("more than 500 MIME parts" in u.reason for u in msg.unscannable)


def test_deep_nesting_stops_at_the_limit() -> None:
    inner = b"Content-Type: text/plain\r\n\r\nhi\r\n"
    for i in range(60):
        inner = (f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n".encode() + inner
                 + f"\r\n--b{i}--\r\n".encode())
    msg = parse(b"From: a@b\r\n" + inner, Limits(max_depth=20))
    assert any("nesting deeper than 20" in u.reason for u in msg.unscannable)


def test_truncated_message_still_lists_what_arrived() -> None:
    raw = with_attachment(b"x" * 3000, "tail.exe")
    msg = parse(raw[: len(raw) - 1500])
    assert any(n == ("tail.exe",) for n in (p.filenames for p in msg.parts))
    assert any("no closing boundary" in p for p in msg.problems)


def test_multipart_without_its_boundary_is_one_leaf() -> None:
    raw = b"From: a@b\r\nContent-Type: multipart/mixed; boundary=NOPE\r\n\r\njust text\r\n"
    msg = parse(raw)
    assert len(msg.parts) == 1 and msg.problems


def test_similar_boundary_lines_are_not_ours() -> None:
    raw = (b"From: a@b\r\nContent-Type: multipart/mixed; boundary=ab\r\n\r\n--ab\r\n"
           b"Content-Type: text/plain\r\n\r\n--abc is not a delimiter\r\n--ab--\r\n")
    msg = parse(raw)
    assert len(msg.parts) == 1
    assert "--abc is not a delimiter" in msg.texts(1000).body


def test_parts_after_the_closing_delimiter_are_still_seen() -> None:
    raw = (b"From: a@b\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
           b"Content-Type: text/plain\r\n\r\nhi\r\n--B--\r\n--B\r\n"
           b'Content-Type: application/octet-stream; name="late.exe"\r\n\r\nx\r\n--B--\r\n')
    assert "late.exe" in names(raw)


def test_forwarded_message_attachment_is_looked_into() -> None:
    from email import message_from_bytes, policy

    inner = message_from_bytes(with_attachment(b"x", "inner.scr"), policy=policy.default)
    outer = EmailMessage()
    outer["From"] = "a@b"
    outer.set_content("fwd")
    outer.add_attachment(inner)
    assert names(outer.as_bytes())["inner.scr"] == {"attachment"}


def test_limits_inside_a_forwarded_message_are_the_listers_but_encryption_is_not() -> None:
    """A forwarded message parsed by the lister: its part limit stops the listing only;
    an encrypted archive in it stays unscannable for the virus scan too."""
    many = b"".join(b"--B\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(30)) + b"--B--\r\n"
    inner = b"From: a@b\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n" + many
    outer = EmailMessage()
    outer["From"] = "a@b"
    outer.set_content("fwd")
    outer.add_attachment(inner, maintype="application", subtype="octet-stream", filename="fw.eml")
    outer.add_attachment(with_attachment(_encrypted(zip_of({"a.txt": b"x" * 50})), "locked.zip"),
                         maintype="application", subtype="octet-stream", filename="fw2.eml")
    msg = parse(outer.as_bytes(), Limits(max_parts=20))
    parts = [u for u in msg.unscannable if "MIME parts" in u.reason]
    locked = [u for u in msg.unscannable if "encrypted" in u.reason]
    assert parts and parts[0].listing and not parts[0].virus
    assert locked and locked[0].virus


def test_base64_encoded_forwarded_message_is_looked_into() -> None:
    inner = with_attachment(b"x", "inner.scr")
    outer = EmailMessage()
    outer["From"] = "a@b"
    outer.set_content("fwd")
    outer.add_attachment(inner, maintype="message", subtype="rfc822")
    outer.add_attachment(inner, maintype="application", subtype="octet-stream", filename="fw.eml")
    assert names(outer.as_bytes())["inner.scr"] == {
        "in forwarded message part 2", "in forwarded message fw.eml"}


def test_huge_message_is_spooled_to_disk_and_parsed_from_the_map(tmp_path: Path) -> None:
    limits = Limits(memory_limit=256 * 1024, spool_dir=str(tmp_path))
    raw = with_attachment(b"\x01" * (3 << 20), "big.bin")
    msg = parse(raw, limits)
    assert msg.spool.on_disk
    assert [p.filenames for p in msg.parts] == [(), ("big.bin",)]
    assert list(tmp_path.iterdir()) == []  # the spool file is unlinked from the start
    msg.close()


def test_a_body_in_one_chunk_is_used_without_a_copy() -> None:
    spool = BodySpool(memory_limit=1024)
    chunk = b"hello\r\n" * 10
    spool.write(chunk)
    assert spool.buffer() is chunk and spool.size == len(chunk) and not spool.on_disk


def test_body_chunks_are_joined_in_order_and_spill_to_disk_whole(tmp_path: Path) -> None:
    in_memory = BodySpool(memory_limit=1024)
    for piece in (b"a" * 100, bytearray(b"b" * 100), b"c"):
        in_memory.write(piece)
    assert in_memory.buffer() == b"a" * 100 + b"b" * 100 + b"c"
    on_disk = BodySpool(memory_limit=150, spool_dir=str(tmp_path))
    for piece in (b"a" * 100, b"b" * 100, b"c" * 100):
        on_disk.write(piece)
    assert on_disk.on_disk and on_disk.size == 300
    assert bytes(on_disk.buffer()) == b"a" * 100 + b"b" * 100 + b"c" * 100
    on_disk.close()


def test_body_written_after_being_read_keeps_what_was_read() -> None:
    spool = BodySpool(memory_limit=1024)
    spool.write(b"first ")
    assert spool.buffer() == b"first "
    spool.write(b"second")
    assert spool.buffer() == b"first second" and spool.size == 12


# ---------------------------------------------------------------- text


@pytest.mark.parametrize("charset", ["iso-2022-jp", "shift_jis", "euc-jp", "utf-8"])
def test_body_text_is_decoded_from_japanese_charsets(charset: str) -> None:
    text = "未承諾広告※ 格安の薬"
    msg = EmailMessage()
    msg["From"] = "a@b"
    msg["Subject"] = "x"
    msg.set_content(text.encode(charset if charset != "shift_jis" else "cp932"), maintype="text",
                    subtype="plain", cte="base64")
    msg.replace_header("Content-Type", f'text/plain; charset="{charset}"')
    assert text in parse(msg.as_bytes()).texts(10_000).body


@pytest.mark.parametrize("encoding", ["cp932", "euc_jis_2004", "utf-8", "iso2022_jp"])
def test_undeclared_japanese_bytes_are_guessed(encoding: str) -> None:
    assert guess_decode("お得なキャンペーンのお知らせ".encode(encoding)) == "お得なキャンペーンのお知らせ"


def test_header_with_8bit_junk_and_encoded_words_decodes() -> None:
    assert decode_header_value(b"=?ISO-2022-JP?B?GyRCTCQ+NUJ6OS05cCEjGyhC?=") == "未承諾広告。"
    assert decode_header_value(b"\xff\xfe\x80 broken") != ""
    assert decode_header_value("件名".encode("euc_jp")) == "件名"


def test_html_parts_are_matched_as_visible_text() -> None:
    msg = EmailMessage()
    msg["From"] = "a@b"
    msg.set_content("<html><style>p{}</style><p>Cheap&nbsp;<b>pills</b></p></html>", subtype="html")
    assert "Cheap\xa0 pills" in parse(msg.as_bytes()).texts(1000).body


def test_full_width_text_matches_half_width_keywords() -> None:
    assert normalize_for_match("ＣＨＥＡＰ　ﾊﾞｲｱｸﾞﾗ") == normalize_for_match("cheap バイアグラ")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), st.sampled_from([b"multipart/mixed; boundary=B", b"text/plain",
                                                  b"message/rfc822", b"multipart/digest; boundary=\"\""]))
def test_any_bytes_parse_without_error(body: bytes, ctype: bytes) -> None:
    msg = parse(b"From: a@b\r\nContent-Type: " + ctype + b"\r\n\r\n--B\r\n" + body)
    assert msg.inventory is not None
    msg.texts(5000)
    assert msg.body_digest
