"""The validity period (notBefore, notAfter) of an X.509 certificate in DER, read with
no library beyond the standard one: the TLS probe names the dates of a broker
certificate that this machine's clock puts outside them (a board without a
battery-backed clock boots years in the past). The stdlib decodes a certificate's
dates only once it verified it, which is what failed.

Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber,
signature, issuer, validity SEQUENCE { notBefore Time, notAfter Time }, ... }, ... }
(RFC 5280 4.1), Time a UTCTime (YYMMDDHHMMSSZ, 1950-2049) or a GeneralizedTime
(YYYYMMDDHHMMSSZ).
"""

from __future__ import annotations

from datetime import datetime, timezone

_SEQUENCE, _VERSION, _UTC_TIME, _GENERALIZED_TIME = 0x30, 0xA0, 0x17, 0x18


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of the contents, end of the contents) of the DER element at `at`."""
    tag, length = der[at], der[at + 1]
    start = at + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4:
            raise ValueError("not a DER length")
        length = int.from_bytes(der[start:start + count], "big")
        start += count
    if start + length > len(der):
        raise ValueError("an element runs past the end")
    return tag, start, start + length


def _time(der: bytes, at: int) -> tuple[datetime, int]:
    tag, start, end = _element(der, at)
    text = der[start:end].decode("ascii")
    if tag == _UTC_TIME and len(text) == 13:
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != _GENERALIZED_TIME or len(text) != 15:
        raise ValueError("not a certificate time")
    if not text.endswith("Z"):
        raise ValueError("not a certificate time")
    return datetime.strptime(text[:-1], "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc), end


def validity(der: bytes) -> tuple[datetime, datetime]:
    """(notBefore, notAfter) of a DER certificate, in UTC. ValueError for what is not one."""
    try:
        tag, cert, _ = _element(der, 0)
        tag_tbs, at, _ = _element(der, cert)
        if tag != _SEQUENCE or tag_tbs != _SEQUENCE:
            raise ValueError("not a certificate")
        if der[at] == _VERSION:
            at = _element(der, at)[2]
        for _ in range(3):  # serialNumber, signature, issuer
            at = _element(der, at)[2]
        tag, at, _ = _element(der, at)
        if tag != _SEQUENCE:
            raise ValueError("no validity period")
        not_before, at = _time(der, at)
        not_after, _ = _time(der, at)
    except (IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a certificate ({exc})") from None
    return not_before, not_after
