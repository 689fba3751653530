"""Turn a raw request target into the one canonical Target the proxy authorizes and forwards."""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote, unquote_to_bytes

from proxy.policy.model import BadTarget, Target

__all__ = ["canonicalize"]

# Bytes never allowed raw anywhere in the target, path or query. Controls and space are not
# legal in a request-target (RFC 9112 §3.2, RFC 3986 §2); "\" is turned into "/" by some
# servers (IIS, Tomcat, Windows file APIs), so a raw one would move segment boundaries behind
# our back; "#" starts a fragment (RFC 9110 §7.1), which a client never sends and parsers
# disagree about (truncate or keep).
_RAW_FORBIDDEN = re.compile(rb"[\x00-\x20\x7f\\#]")

# "%" must start a complete escape (RFC 3986 §2.1); leniency here ("%u002e" on IIS, "%%32%65")
# is exactly what the double-decoding traversals abused (CVE-2021-42013).
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")

# What one decode of a path segment may not produce. An encoded "/" or "\" is a separator to a
# backend that decodes before routing (the reason Apache has AllowEncodedSlashes off); an
# encoded control byte truncates or splits paths in C code (NUL) and logs; a "%HH" left after
# one decode means the target was encoded twice, and a backend that decodes again would see
# something we never authorized (CVE-2021-42013, "%%32%65" after CVE-2021-41773's "%2e").
_DECODED_FORBIDDEN = re.compile(
    rb"(?P<ctl>[\x00-\x1f\x7f])|(?P<sl>/)|(?P<bs>\\)|(?P<pct>%[0-9A-Fa-f]{2})"
)
_DECODED_MESSAGE = {
    "ctl": "encoded control character in path",
    "sl": "encoded '/' (%2F) in path",
    "bs": "encoded '\\' (%5C) in path",
    "pct": "double percent-encoding in path",
}

# Characters that Unicode normalization may not introduce into a segment: a backend that
# normalizes (NFKC, or Windows "best fit" to an ANSI code page) would turn e.g. U+FF0F into
# "/", U+FF3C into "\", U+FF1F into "?" (which would cut the path there) or U+FF03 into "#".
# The same characters are fine as percent-encoded data: we forward them encoded.
_NORMALIZATION_DELIMITERS = "/\\?#"
# ...nor a complete escape: U+FF05 U+FF12 U+FF45 normalizes to "%2e".
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
# C1 controls (U+0080-U+009F) are controls too, just outside ASCII.
_C1_CONTROL = re.compile(r"[\x80-\x9f]")

# Look-alike separators that NFKC leaves alone but Windows best-fit code pages map to "/" or
# "\" (Orange Tsai & splitline, "WorstFit", 2025): division slash, fraction slash, set minus,
# reverse solidus operator, big solidus, big reverse solidus; and the yen sign and won sign,
# which the Japanese (932) and Korean (949) code pages turn into byte 0x5C, "\" (WorstFit's
# "..¥..¥" traversal on a backend that converts the path to its ANSI code page).
_LOOKALIKE_SEPARATORS = frozenset("\u2215\u2044\u2216\u29f5\u29f8\u29f9\u00a5\u20a9")

# Re-encoding: RFC 3986 unreserved characters (which `quote` always keeps) plus the sub-delims
# and ":" "@" that are legal in a path segment (RFC 3986 §3.3) and carry no path structure.
# ";" is deliberately NOT kept: see _encode_segment.
_SEGMENT_SAFE = "!$&'()*+,=:@"
_NEEDS_QUOTING = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,=:@]")
# A path made only of these bytes is already canonical apart from repeated slashes.
_NOT_PLAIN = re.compile(rb"[^A-Za-z0-9\-._~!$&'()*+,=:@/]")

# Query parameters are separated by "&", and by ";" in older form-decoding conventions
# (HTML 4 appendix B.2.2; Python's parse_qs before bpo-42967, older Rack), so both split.
_QUERY_SEPARATOR = re.compile(rb"[&;]")


def canonicalize(target: str | bytes, *, allow_semicolons: bool = False) -> Target:
    """Return the canonical form of a raw request target, or raise BadTarget (SPEC §4).

    A str is taken to come from aiohttp, which decodes the raw target with surrogateescape;
    it is turned back into the exact bytes the client sent.
    """
    raw = _as_bytes(target)
    _check_form(raw)
    path, _, query = raw.partition(b"?")
    query_text = _check_query(query)
    if _NOT_PLAIN.search(path) is None and b"/." not in path:
        # Fast path for the common case: nothing to decode, re-encode or reject, and no
        # segment that starts with "." (so none can be a dot segment).
        text = path.decode("ascii")
        plain = tuple(filter(None, text.split("/")))
        if "//" in text:
            text = "/" + "/".join(plain) + ("/" if plain and text.endswith("/") else "")
        return Target(path=text, segments=plain, query=query_text)
    if b"%" in path and _BAD_PERCENT.search(path):
        raise BadTarget("invalid percent-encoding in path")

    segments: list[str] = []
    encoded: list[str] = []
    # Splitting on the raw "/" before decoding is sound because an encoded "/" is rejected.
    # Empty segments are dropped, which merges repeated slashes. That is also what makes a
    # "//host/x" start safe: it is origin-form (we already required the leading "/"), the
    # proxy matches the segments ("host", "x") and forwards "/host/x", so no backend ever sees
    # a "//host" that it could mistake for a network-path reference (RFC 3986 §4.2), e.g. in
    # a redirect it builds from the request path.
    for raw_segment in path.split(b"/"):
        if raw_segment:
            text = _decode_segment(raw_segment, allow_semicolons)
            segments.append(text)
            encoded.append(_encode_segment(text))

    canonical = "/" + "/".join(encoded)
    if encoded and path.endswith(b"/"):
        # A trailing slash is forwarded (backends may treat /x and /x/ differently), but it
        # takes no part in matching (SPEC §4).
        canonical += "/"
    return Target(path=canonical, segments=tuple(segments), query=query_text)


def _as_bytes(target: str | bytes) -> bytes:
    if isinstance(target, bytes):
        return target
    try:
        return target.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        # A lone surrogate that surrogateescape did not produce: not from any byte sequence.
        raise BadTarget("invalid UTF-8 in request target") from None


def _check_form(raw: bytes) -> None:
    """Accept only origin-form targets free of raw controls, space, "\\" and "#"."""
    if not raw:
        raise BadTarget("empty request target")
    if raw[0] != 0x2F:  # "/"
        # RFC 9112 §3.2.2-3.2.4: absolute-form is for forward proxies, authority-form for
        # CONNECT, asterisk-form for server-wide OPTIONS; a reverse proxy serves none of them.
        if raw == b"*":
            raise BadTarget("asterisk-form request target not allowed")
        if b"://" in raw:
            raise BadTarget("absolute-form request target not allowed")
        raise BadTarget("request target must be origin-form (start with '/')")
    found = _RAW_FORBIDDEN.search(raw)
    if found is not None:
        byte = found.group()
        if byte == b"#":
            raise BadTarget("fragment ('#') in request target")
        if byte == b"\\":
            raise BadTarget("backslash in request target")
        if byte == b" ":
            raise BadTarget("space in request target")
        raise BadTarget("control character in request target")


def _check_query(query: bytes) -> str:
    """Reject method-override parameters; return the raw query as text."""
    # Fast path: no escape and no "method" at all means no override parameter can hide here.
    if query and (b"%" in query or b"method" in query.lower()):
        for parameter in _QUERY_SEPARATOR.split(query):
            if _is_method_override(parameter.partition(b"=")[0]):
                # Frameworks (Rails, Laravel, Symfony, Express method-override) let `_method`
                # change the verb after the proxy authorized the real one (SPEC §4).
                raise BadTarget("'_method' query parameter not allowed")
    try:
        return query.decode("utf-8")
    except UnicodeDecodeError:
        raise BadTarget("invalid UTF-8 in query") from None


def _is_method_override(key: bytes) -> bool:
    if b"%" in key or b"+" in key:
        key = unquote_to_bytes(key.replace(b"+", b" "))
    # Compare the name the way a lenient backend would read it: case-insensitively, cut at a
    # NUL or an array suffix ("_method[]"), trimmed, and with PHP's variable-name mangling
    # that turns "." and " " into "_" (".method" and " method" arrive as "_method").
    name = key.partition(b"\x00")[0].partition(b"[")[0].strip().lower()
    return name.replace(b".", b"_").replace(b" ", b"_") == b"_method"


def _decode_segment(raw_segment: bytes, allow_semicolons: bool) -> str:
    """Percent-decode one non-empty raw segment once and reject anything ambiguous."""
    if b"%" in raw_segment:
        data = unquote_to_bytes(raw_segment)
        found = _DECODED_FORBIDDEN.search(data)
        if found is not None:
            raise BadTarget(_DECODED_MESSAGE[found.lastgroup or "ctl"])
    else:
        # Raw controls, "\" and "%" were excluded above, and "/" cannot occur in a segment.
        data = raw_segment

    if data.isascii():
        text = data.decode("ascii")
        non_ascii = False
    else:
        try:
            # Strict UTF-8 rejects overlong forms (%C0%AE is an overlong "."), surrogates and
            # truncated sequences, which lenient decoders turn into "." or "/" (CVE-2000-0884).
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadTarget("invalid UTF-8 in path") from None
        non_ascii = True

    if _is_dot_like(text):
        raise BadTarget("dot segment in path")
    if not allow_semicolons and ";" in text:
        # Servlet containers treat ";..." as path parameters and drop it, so "/admin;x" or
        # "/..;/" would route differently there than here (Orange Tsai, "Breaking Parser
        # Logic", Black Hat USA 2018).
        raise BadTarget("';' in path not allowed")
    if non_ascii:
        _check_unicode(text, allow_semicolons)
    return text


def _is_dot_like(text: str) -> bool:
    """True for "." and ".." and anything a backend might read as one.

    The part before the first ";" counts (Tomcat reads "..;x" as ".."), and segments of only
    dots and spaces count too (Windows trims trailing dots and spaces: "... " is "").
    """
    if not text or text[0] not in ". ":
        return False
    head = text.partition(";")[0]
    return not head.strip(". ")


def _check_unicode(text: str, allow_semicolons: bool) -> None:
    """Reject a non-ASCII segment that a Unicode-normalizing backend would read differently."""
    if _C1_CONTROL.search(text) is not None:
        raise BadTarget("encoded control character in path")
    if not _LOOKALIKE_SEPARATORS.isdisjoint(text):
        raise BadTarget("ambiguous Unicode in path (look-alike '/' or '\\')")
    if unicodedata.is_normalized("NFKC", text):
        return
    normal = unicodedata.normalize("NFKC", text)
    # Only what normalization introduces counts: "%3F" decoded is a legitimate "?" in a
    # segment, U+FF1F turning into one is not.
    delimiters = _NORMALIZATION_DELIMITERS if allow_semicolons else _NORMALIZATION_DELIMITERS + ";"
    if (
        any(normal.count(c) > text.count(c) for c in delimiters)
        or _ESCAPE.search(normal) is not None  # text itself has no escape left (checked)
        or _is_dot_like(normal)  # U+FF0E U+FF0E is "..", U+2024 is "."
    ):
        raise BadTarget("ambiguous Unicode in path (normalizes to a delimiter or dot segment)")


def _encode_segment(text: str) -> str:
    """Re-encode a decoded segment so that one decode at the backend yields it exactly.

    ";" is percent-encoded (%3B) even when semicolons are allowed: the proxy authorized the
    whole segment, e.g. "a;b", as literal data, and a backend that treats ";" as the start of
    path parameters must not see a shorter segment than the one we matched. "%" becomes %25,
    so nothing we forward can be decoded into a different path a second time.
    """
    if _NEEDS_QUOTING.search(text) is None:
        return text
    return quote(text, safe=_SEGMENT_SAFE)
