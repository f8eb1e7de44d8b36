"""Turning mail bytes into text: charsets (Japanese first), RFC 2047 words, HTML.

Mail from Japanese senders arrives as ISO-2022-JP, Shift_JIS (in practice
Microsoft's cp932), EUC-JP or UTF-8, declared or not, and header fields often
carry raw 8-bit text.  Every function here returns text for any input: bytes
that fit no charset are decoded with replacement characters, never an error.
"""

from __future__ import annotations

import codecs
import html
import re
import unicodedata
from email.header import decode_header

# Declared labels mapped to the codec that decodes what such mail really contains:
# Japanese mailers label cp932 text "Shift_JIS" and use NEC/IBM extensions in
# ISO-2022-JP, so the supersets are used.
_CHARSET_ALIASES = {
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "windows-31j": "cp932",
    "ms_kanji": "cp932",
    "iso-2022-jp": "iso2022_jp_ext",
    "csiso2022jp": "iso2022_jp_ext",
    "iso-2022-jp-ms": "iso2022_jp_ext",
    "euc-jp": "euc_jis_2004",
    "x-euc-jp": "euc_jis_2004",
    "eucjp": "euc_jis_2004",
    "us-ascii": "utf-8",
    "ascii": "utf-8",
    "unknown-8bit": "",
    "x-unknown": "",
}
# Tried after the declared charset fails, or when none is declared.
_FALLBACKS_ISO2022 = ("iso2022_jp_ext", "iso2022_jp_2", "iso2022_jp_3")
_ESC = 0x1B
_HIGH = re.compile(rb"[\x80-\xff]")
_SJIS_ONLY = re.compile(rb"[\x81-\x8d\x90-\xa0]")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<!--.*?-->|<[^>]*>", re.IGNORECASE | re.DOTALL)
_SPACES = re.compile(r"[ \t\r\f\v]+")


def codec_for(charset: str | None) -> str | None:
    """The Python codec for a declared charset label, or None if unknown/absent."""
    if not charset:
        return None
    label = charset.strip().strip('"').lower()
    mapped = _CHARSET_ALIASES.get(label, label)
    if not mapped:
        return None
    try:
        return codecs.lookup(mapped).name
    except LookupError:
        return None


def guess_decode(data: bytes) -> str:
    """Decode bytes of unknown charset: ASCII, UTF-8, ISO-2022-JP, EUC-JP, cp932, else Latin-1."""
    if not _HIGH.search(data):
        if _ESC in data:
            for name in _FALLBACKS_ISO2022:
                try:
                    return data.decode(name)
                except UnicodeDecodeError:
                    continue
        return data.decode("ascii", "replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # EUC-JP uses only 0xA1-0xFE (plus 0x8E/0x8F shifts); bytes in 0x81-0xA0 mean Shift_JIS.
    order = ("cp932", "euc_jis_2004") if _SJIS_ONLY.search(data) else ("euc_jis_2004", "cp932")
    for name in order:
        try:
            return data.decode(name)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode with the declared charset when it works, else guess; never raises."""
    name = codec_for(charset)
    if name is not None:
        try:
            return data.decode(name)
        except UnicodeDecodeError:
            if name.startswith("iso2022_jp"):
                for alt in _FALLBACKS_ISO2022:
                    try:
                        return data.decode(alt)
                    except UnicodeDecodeError:
                        continue
        except (LookupError, ValueError):  # a codec that cannot decode (e.g. utf-7 misuse)
            pass
    guessed = guess_decode(data)
    if name is not None and "\ufffd" in guessed:
        return data.decode(name, "replace")
    return guessed


def decode_header_value(raw: bytes | str) -> str:
    """A header field value as text: raw 8-bit guessed, RFC 2047 encoded-words decoded."""
    text = guess_decode(raw) if isinstance(raw, bytes) else raw
    if "=?" not in text or not _ENCODED_WORD.search(text):
        return _unfold(text)
    try:
        chunks = decode_header(_unfold(text))
    except (ValueError, AssertionError, LookupError):  # broken words stay as they are
        return _unfold(text)
    out: list[str] = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            out.append(chunk)
        else:
            out.append(decode_bytes(chunk, charset))
    return "".join(out)


def _unfold(text: str) -> str:
    return re.sub(r"\r?\n[ \t]*", " ", text) if "\n" in text else text


def html_to_text(markup: str) -> str:
    """Visible text of HTML, roughly: scripts, styles, comments and tags dropped."""
    return html.unescape(_TAG.sub(" ", markup))


def normalize_for_match(text: str) -> str:
    """The form keyword rules compare: NFKC (full-width = half-width), case-folded, blanks squeezed."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text)).casefold()
