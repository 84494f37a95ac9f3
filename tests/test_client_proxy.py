"""Tests for hostlink_tw.proxy: Go's ProxyFromEnvironment rules for ws:// and wss://."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.proxy import Proxy, UnsupportedProxyError, proxy_for

WSS = "wss://cp.example.com/api/v1/agents/ws"
WS = "ws://cp.example.com/api/v1/agents/ws"


def _hostport(p: Proxy | None) -> tuple[str, int] | None:
    return None if p is None else (p.host, p.port)


class SelectionTests(SynchronousTestCase):
    def test_no_environment_no_proxy(self) -> None:
        self.assertIsNone(proxy_for(WSS, {}))
        self.assertIsNone(proxy_for(WS, {}))

    def test_wss_uses_https_proxy_only(self) -> None:
        env = {"HTTPS_PROXY": "http://sec:3128", "HTTP_PROXY": "http://plain:3128"}
        self.assertEqual(_hostport(proxy_for(WSS, env)), ("sec", 3128))
        self.assertIsNone(proxy_for(WSS, {"HTTP_PROXY": "http://plain:3128"}))

    def test_ws_uses_http_proxy_only(self) -> None:
        env = {"HTTPS_PROXY": "http://sec:3128", "HTTP_PROXY": "http://plain:3128"}
        self.assertEqual(_hostport(proxy_for(WS, env)), ("plain", 3128))
        self.assertIsNone(proxy_for(WS, {"HTTPS_PROXY": "http://sec:3128"}))

    def test_upper_case_wins_lower_case_fallback(self) -> None:
        self.assertEqual(
            _hostport(proxy_for(WSS, {"HTTPS_PROXY": "http://u:1", "https_proxy": "http://l:2"})),
            ("u", 1),
        )
        self.assertEqual(_hostport(proxy_for(WSS, {"https_proxy": "http://l:2"})), ("l", 2))
        self.assertEqual(
            _hostport(proxy_for(WSS, {"HTTPS_PROXY": "", "https_proxy": "http://l:2"})), ("l", 2)
        )

    def test_scheme_less_value_is_http(self) -> None:
        p = proxy_for(WSS, {"HTTPS_PROXY": "proxy.corp:3128"})
        self.assertEqual(_hostport(p), ("proxy.corp", 3128))
        assert p is not None
        self.assertEqual(p.display, "http://proxy.corp:3128")

    def test_default_port_80(self) -> None:
        self.assertEqual(_hostport(proxy_for(WSS, {"HTTPS_PROXY": "http://proxy"})), ("proxy", 80))

    def test_credentials_become_basic_authorization(self) -> None:
        p = proxy_for(WSS, {"HTTPS_PROXY": "http://al%20ice:s3cr%3At@proxy:8080"})
        assert p is not None
        self.assertEqual(p.authorization, "Basic YWwgaWNlOnMzY3I6dA==")  # "al ice:s3cr:t"
        self.assertNotIn("s3cr", p.display)
        self.assertNotIn("s3cr", repr(p))

    def test_unsupported_schemes(self) -> None:
        for value in ("https://proxy:443", "socks5://proxy:1080", "socks5h://proxy"):
            self.assertRaises(UnsupportedProxyError, proxy_for, WSS, {"HTTPS_PROXY": value})

    def test_unparsable_values_never_echo_credentials(self) -> None:
        for value in ("http://u:pw@[::1", "http://u:pw@proxy:99999", "http://u:pw@proxy:port",
                      "socks5://u:pw@proxy:port", "https://u:pw@proxy:1",
                      "http://proxyuser:pw"):  # no host: urllib reads "pw" as the port
            e = self.assertRaises(UnsupportedProxyError, proxy_for, WSS, {"HTTPS_PROXY": value})
            self.assertNotIn("pw", str(e))

    def test_cgi_ignores_http_proxy(self) -> None:
        env = {"HTTP_PROXY": "http://plain:3128", "REQUEST_METHOD": "GET"}
        self.assertIsNone(proxy_for(WS, env))
        env = {"HTTPS_PROXY": "http://sec:3128", "REQUEST_METHOD": "GET"}
        self.assertIsNotNone(proxy_for(WSS, env))

    def test_loopback_never_proxied(self) -> None:
        env = {"HTTPS_PROXY": "http://p:1", "HTTP_PROXY": "http://p:1"}
        for url in ("wss://localhost/ws", "ws://127.0.0.1:8080/ws", "wss://[::1]:1/ws",
                    "ws://127.8.9.10/ws", "wss://LOCALHOST/ws"):
            self.assertIsNone(proxy_for(url, env), url)


class NoProxyTests(SynchronousTestCase):
    def _direct(self, url: str, no_proxy: str) -> bool:
        return proxy_for(url, {"HTTPS_PROXY": "http://p:1", "HTTP_PROXY": "http://p:1",
                               "NO_PROXY": no_proxy}) is None

    def test_star(self) -> None:
        self.assertTrue(self._direct(WSS, "*"))

    def test_domain_matches_itself_and_subdomains(self) -> None:
        self.assertTrue(self._direct("wss://example.com/ws", "example.com"))
        self.assertTrue(self._direct("wss://cp.example.com/ws", "example.com"))
        self.assertFalse(self._direct("wss://badexample.com/ws", "example.com"))

    def test_leading_dot_and_star_match_subdomains_only(self) -> None:
        for pattern in (".example.com", "*.example.com"):
            self.assertTrue(self._direct("wss://cp.example.com/ws", pattern))
            self.assertFalse(self._direct("wss://example.com/ws", pattern), pattern)

    def test_port_must_match_when_given(self) -> None:
        self.assertTrue(self._direct("wss://cp.example.com/ws", "example.com:443"))
        self.assertFalse(self._direct("wss://cp.example.com/ws", "example.com:8443"))
        self.assertTrue(self._direct("ws://cp.example.com:8080/ws", "cp.example.com:8080"))
        self.assertTrue(self._direct("ws://cp.example.com/ws", "cp.example.com:80"))

    def test_ip_and_cidr(self) -> None:
        self.assertTrue(self._direct("wss://10.1.2.3/ws", "10.0.0.0/8"))
        self.assertFalse(self._direct("wss://11.1.2.3/ws", "10.0.0.0/8"))
        self.assertTrue(self._direct("wss://10.1.2.3/ws", "10.1.2.3"))
        self.assertTrue(self._direct("wss://10.1.2.3:8443/ws", "10.1.2.3:8443"))
        self.assertFalse(self._direct("wss://10.1.2.3/ws", "10.1.2.3:8443"))
        self.assertTrue(self._direct("wss://[2001:db8::1]/ws", "2001:db8::/32"))
        self.assertTrue(self._direct("wss://[2001:db8::1]:443/ws", "[2001:db8::1]:443"))
        # A CIDR never matches a host name.
        self.assertFalse(self._direct(WSS, "0.0.0.0/0"))

    def test_list_spaces_case_and_empty_entries(self) -> None:
        self.assertTrue(self._direct(WSS, " other.org , ,EXAMPLE.COM "))
        self.assertTrue(self._direct("wss://CP.Example.com/ws", "example.com"))

    def test_lower_case_no_proxy(self) -> None:
        env = {"HTTPS_PROXY": "http://p:1", "no_proxy": "example.com"}
        self.assertIsNone(proxy_for(WSS, env))

    def test_malformed_entries_ignored(self) -> None:
        self.assertFalse(self._direct(WSS, ":443,[,10.0.0.0/99"))


class RobustnessTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        st.text(max_size=60),
        st.text(max_size=60),
        st.sampled_from([WSS, WS, "wss://10.0.0.1:8443/ws", "ws://[2001:db8::1]/ws"]),
    )
    def test_any_environment_is_handled(self, proxy: str, no_proxy: str, url: str) -> None:
        """Whatever the environment holds: a proxy, none, or UnsupportedProxyError."""
        env = {"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "NO_PROXY": no_proxy}
        try:
            result = proxy_for(url, env)
        except UnsupportedProxyError:
            return
        if result is not None:
            self.assertTrue(result.host)
            self.assertTrue(0 <= result.port <= 65535)
