"""Tests for L{hostlink_tw.safetext}: escaping peer text and redacting URLs."""

from __future__ import annotations

import unicodedata
from urllib.parse import quote

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.safetext import (
    ELLIPSIS,
    REDACTED,
    URL_PLACEHOLDER,
    escape_control,
    redact_url,
)

C0 = [chr(code) for code in range(0x20)]
C1 = [chr(code) for code in range(0x80, 0xA0)]
OTHER_UNSAFE = ["\x7f", "\ud800", "\udfff", "\u2028", "\u2029", "\u202e", "\u2066", "\u200f"]


def unsafe(character: str) -> bool:
    """What must never reach a terminal or log raw."""
    return unicodedata.category(character) in ("Cc", "Cs", "Zl", "Zp") or character in (
        "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    )


class EscapeControlTests(SynchronousTestCase):
    def test_plain_text_unchanged(self) -> None:
        for text in ("", "agent-1", "caf\u00e9 \u2603 \U0001f600", "back\\slash", "a b\u00a0c"):
            with self.subTest(text=text):
                self.assertEqual(escape_control(text), text)

    def test_named_escapes(self) -> None:
        self.assertEqual(escape_control("a\r\nb\tc"), "a\\r\\nb\\tc")

    def test_every_c0_and_c1_character(self) -> None:
        for character in C0 + C1 + ["\x7f"]:
            with self.subTest(code=hex(ord(character))):
                escaped = escape_control(f"x{character}y")
                self.assertNotIn(character, escaped)
                self.assertTrue(escaped.isprintable(), escaped)
                if character not in "\t\n\r":
                    self.assertEqual(escaped, f"x\\x{ord(character):02x}y")

    def test_terminal_sequences(self) -> None:
        """ESC and CSI (U+009B) sequences cannot reach a terminal."""
        self.assertEqual(escape_control("\x1b[2J\x1b]0;title\x07"), "\\x1b[2J\\x1b]0;title\\x07")
        self.assertEqual(escape_control("\x9b31m"), "\\x9b31m")

    def test_surrogates_separators_and_bidi(self) -> None:
        for character in OTHER_UNSAFE[1:]:
            with self.subTest(code=hex(ord(character))):
                escaped = escape_control(character)
                self.assertEqual(escaped, f"\\u{ord(character):04x}")
                escaped.encode("utf-8")  # a lone surrogate would raise here

    def test_limit(self) -> None:
        self.assertEqual(escape_control("abcdef", 6), "abcdef")
        self.assertEqual(escape_control("abcdefg", 6), "abcde" + ELLIPSIS)
        # An escape is never cut in half.
        self.assertEqual(escape_control("abc\x1bdef", 6), "abc" + ELLIPSIS)
        self.assertEqual(escape_control("\x1b", 4), "\\x1b")
        self.assertEqual(escape_control("\x1b\x1b", 4), ELLIPSIS)
        self.assertEqual(escape_control("anything", 0), "")

    def test_limit_on_a_huge_input_is_cheap(self) -> None:
        text = "\x1b" * 50_000_000
        self.assertEqual(len(escape_control(text, 100)), 97)

    def test_not_text(self) -> None:
        self.assertEqual(escape_control(b"\x1b"), "b'\\x1b'")  # type: ignore[arg-type]

    @given(st.text(), st.none() | st.integers(min_value=1, max_value=200))
    def test_nothing_unsafe_survives(self, text: str, limit: int | None) -> None:
        escaped = escape_control(text, limit)
        self.assertFalse([c for c in escaped if unsafe(c)], escaped)
        escaped.encode("utf-8")
        self.assertNotIn("\n", escaped)
        if limit is not None:
            self.assertLessEqual(len(escaped), limit)
        else:
            self.assertGreaterEqual(len(escaped), len(text))

    @given(st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp", "Cf"))))
    def test_safe_text_is_kept(self, text: str) -> None:
        self.assertEqual(escape_control(text), text)


class RedactURLTests(SynchronousTestCase):
    CASES = [
        ("wss://cp.example/api/v1/agents/ws", "wss://cp.example/api/v1/agents/ws"),
        ("https://user:pw@cp.example:8443/x", "https://cp.example:8443/x"),
        ("https://user@cp.example", "https://cp.example"),
        ("https://a:b@c@cp.example/", "https://cp.example/"),
        ("wss://cp.example/ws?token=s3cret", f"wss://cp.example/ws?token={REDACTED}"),
        ("wss://cp.example/ws?a=1&b=&c", f"wss://cp.example/ws?a={REDACTED}&b={REDACTED}&{REDACTED}"),
        ("wss://cp.example/ws?s3cret", f"wss://cp.example/ws?{REDACTED}"),
        ("wss://cp.example/ws?", "wss://cp.example/ws?"),
        ("wss://cp.example/ws#frag", "wss://cp.example/ws"),
        ("wss://cp.example/ws?t=1#frag?x=2", f"wss://cp.example/ws?t={REDACTED}"),
        ("http://[::1]:8080/a@b", "http://[::1]:8080/a@b"),
        ("http://u:p@[::1]:8080/", "http://[::1]:8080/"),
        ("https://cp.example/path@x?mail=a@b", f"https://cp.example/path@x?mail={REDACTED}"),
        # unparsable URLs are redacted all the same
        ("https://admin:pw@[::1", "https://[::1"),
        ("https://admin:pw@cp example/", "https://cp example/"),
        ("https://admin:pw@cp.example:port/", "https://cp.example:port/"),
        ("https://admin:pa/ss@cp.example/x", "https://cp.example/x"),
        ("https://admin:pa?ss@cp.example/x", "https://cp.example/x"),
        ("https://admin:pa#ss@cp.example/x", "https://cp.example/x"),
        ("admin:pw@cp.example/x", "cp.example/x"),
        ("", ""),
        ("not a url", "not a url"),
        ("wss://cp.example/\x1b[2J\r", "wss://cp.example/\\x1b[2J\\r"),
    ]

    def test_cases(self) -> None:
        for url, expected in self.CASES:
            with self.subTest(url=url):
                self.assertEqual(redact_url(url), expected)

    def test_not_text(self) -> None:
        for value in (None, 5, b"wss://u:p@h/"):
            with self.subTest(value=value):
                self.assertEqual(redact_url(value), URL_PLACEHOLDER)  # type: ignore[arg-type]

    SCHEMES = st.sampled_from(["ws", "wss", "http", "https", "ftp", ""])
    HOSTS = st.sampled_from(["cp.example", "cp.example:8443", "[::1]:9", "127.0.0.1", "h"])
    SECRETS = st.text(min_size=1)
    # Unescaped characters a hand-written password plausibly contains; "/",
    # "?" and "#" end the authority in every parser (covered by CASES).
    RAW_SECRETS = st.text(
        alphabet=st.characters(exclude_characters="/?#", exclude_categories=("Cs",)),
        min_size=1,
    )

    @given(SCHEMES, HOSTS, st.text(max_size=10), SECRETS, SECRETS, st.text())
    def test_no_secret_survives(
        self, scheme: str, host: str, user: str, password: str, token: str, fragment: str
    ) -> None:
        """Percent-encoded user info and any query value never reach the output."""
        url = (
            f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}/p"
            f"?token={quote(token, safe='')}&n={quote(token, safe='')}#{fragment}"
        )
        expected = f"{scheme}://{host}/p?token={REDACTED}&n={REDACTED}"
        self.assertEqual(redact_url(url), expected)

    @given(SCHEMES, HOSTS, RAW_SECRETS)
    def test_no_raw_password_survives(self, scheme: str, host: str, password: str) -> None:
        url = f"{scheme}://admin:{password}@{host}/p"
        self.assertEqual(redact_url(url), f"{scheme}://{host}/p")

    @given(st.text())
    def test_any_text(self, text: str) -> None:
        """Never raises; never lets a control character through."""
        redacted = redact_url(text)
        self.assertFalse([c for c in redacted if unsafe(c)], redacted)
        self.assertNotIn("#", redacted)
