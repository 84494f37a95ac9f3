"""
Text from elsewhere, made safe to log or print.

Two helpers, for everything a peer or an operator's setting can put into a
log line, the ``/status`` JSON or a terminal:

:func:`escape_control`
    control characters (C0, DEL, C1), lone surrogates, line and paragraph
    separators and bidirectional overrides become visible escapes (``\\r``,
    ``\\x1b``, ``\\u202e``), so a peer cannot rewrite a terminal line, forge
    a log line or make a UTF-8 writer raise; optionally bounded in length.
:func:`redact_url`
    a URL without its secrets: no user info, every query value replaced by
    ``REDACTED`` (keys kept, so the shape stays recognisable), no fragment.

Both are total: any ``str`` (and, for robustness, anything else) gives a
printable one-line result, never an exception.
"""

from __future__ import annotations

import re

__all__ = ["REDACTED", "URL_PLACEHOLDER", "escape_control", "redact_url"]

#: What a query value is replaced with by :func:`redact_url`.
REDACTED = "REDACTED"
#: What :func:`redact_url` returns for something that is not text at all.
URL_PLACEHOLDER = "<unprintable URL>"
#: Appended by :func:`escape_control` when it shortened its input.
ELLIPSIS = "\u2026"

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}

# C0 controls, DEL and C1 controls (a terminal acts on all of them: ESC
# starts sequences, CSI U+009B is ESC [ in one character); lone surrogates
# (a UTF-8 writer raises on them); line and paragraph separators (some log
# readers split lines there); bidirectional embeddings, overrides and
# isolates (they reorder what a reader sees).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def _escape_one(character: str) -> str:
    named = _NAMED.get(character)
    if named is not None:
        return named
    code = ord(character)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_control(text: str, limit: int | None = None) -> str:
    """
    ``text`` with every unsafe character replaced by a visible escape.

    Tab, newline and carriage return become ``\\t``, ``\\n`` and ``\\r``;
    other C0 and C1 controls and DEL become ``\\xNN``; lone surrogates,
    U+2028/U+2029 and the bidirectional controls become ``\\uNNNN``.  Other
    text, including backslashes and printable non-ASCII, is kept as is.

    :param limit: when given, the result is at most ``limit`` characters:
        a longer one is cut (never inside an escape) and ends with ``…``.
        Only about ``limit`` characters of ``text`` are looked at, so a huge
        input costs no more than a short one.
    """
    if not isinstance(text, str):
        text = repr(text)
    if limit is not None and limit < 1:
        return ""
    if limit is None:
        return _UNSAFE.sub(lambda match: _escape_one(match.group()), text)
    # Each input character gives at least one output character: no more than
    # limit + 1 of them can matter.
    head = text[: limit + 1]
    escaped = _UNSAFE.sub(lambda match: _escape_one(match.group()), head)
    if len(head) <= limit and len(escaped) <= limit:
        return escaped
    pieces: list[str] = []
    used = 0
    for character in head:
        piece = _escape_one(character) if _UNSAFE.match(character) else character
        if used + len(piece) > limit - 1:
            break
        pieces.append(piece)
        used += len(piece)
    return "".join(pieces) + ELLIPSIS


def _redact_query(query: str) -> str:
    items = []
    for item in query.split("&"):
        key, equals, _value = item.partition("=")
        # An item without "=" ("?s3cr3t") may be a bare token: a value, not a key.
        items.append(f"{key}={REDACTED}" if equals else (REDACTED if item else item))
    return "&".join(items)


_AUTHORITY_END = re.compile(r"[/?#]")
# What an authority without user info can be: an optional bracketed IPv6
# literal or a name, and an optional numeric port.
_PORT = re.compile(r"(?:\[[^\]]*\])?[^:\[\]]*(?::[0-9]*)?")


def redact_url(url: str) -> str:
    """
    ``url`` without its secrets, for log lines and ``/status``.

    * user info (``user:password@``) is removed from the authority;
    * every query value is replaced by ``REDACTED``, keys kept
      (``?token=abc&x=1`` → ``?token=REDACTED&x=REDACTED``); an item without
      ``=`` may be a bare token and is replaced whole;
    * the fragment is dropped.

    Works on text rather than on a parsed URL, so an unparsable URL (bad
    port, unbalanced bracket, spaces) is redacted too.  The authority ends
    at the first ``/``, ``?`` or ``#``, as in every URL parser; when that
    leaves an authority that cannot be a host and port (``user:pa`` of
    ``user:pa/ss@host``, an unescaped ``/`` in a password) and an ``@``
    follows, everything up to the last ``@`` is taken as user info.  The
    result is passed through :func:`escape_control`.  Anything that is not a
    ``str`` gives :data:`URL_PLACEHOLDER`.
    """
    if not isinstance(url, str):
        return URL_PLACEHOLDER
    try:
        start = url.find("//")
        start = 0 if start == -1 else start + 2
        match = _AUTHORITY_END.search(url, start)
        end = len(url) if match is None else match.start()
        authority = url[start:end]
        if "@" in authority:
            url = url[:start] + authority.rpartition("@")[2] + url[end:]
        elif _PORT.fullmatch(authority) is None and "@" in url[end:]:
            url = url[:start] + url[url.rindex("@") + 1 :]
        base, question, query = url.partition("#")[0].partition("?")
        if question:
            base += "?" + _redact_query(query)
        return escape_control(base)
    except Exception:  # noqa: BLE001 - a log line must never fail on a URL
        return URL_PLACEHOLDER
