"""
Which HTTP proxy, if any, the agent's WebSocket connection goes through.

The reference agent dials with Go's default proxy function
(``http.ProxyFromEnvironment``, i.e. ``golang.org/x/net/http/httpproxy``),
treating ``wss://`` like ``https://`` and ``ws://`` like ``http://``, and
always tunnels through the proxy with ``CONNECT``.  :func:`proxy_for`
reproduces its rules:

* ``HTTPS_PROXY`` (or ``https_proxy``) for ``wss://``, ``HTTP_PROXY`` (or
  ``http_proxy``) for ``ws://``; the upper-case name wins when both are set
  and non-empty.  ``HTTP_PROXY`` is ignored in a CGI environment
  (``REQUEST_METHOD`` set), as Go refuses it there.
* A proxy value without a known scheme is read as ``http://`` + value; the
  port defaults to 80 (``http``) or 443 (``https``).  User info in the proxy
  URL becomes a ``Proxy-Authorization: Basic`` header.
* ``localhost`` and loopback addresses never use a proxy.
* ``NO_PROXY`` (or ``no_proxy``): comma-separated entries; ``*`` disables
  proxying; an IP or CIDR matches IP hosts; ``example.com`` matches the host
  and its subdomains, ``.example.com`` and ``*.example.com`` only the
  subdomains; an entry may carry ``:port``, which must then match too.

Only ``http://`` proxies are supported (a TLS connection *to* the proxy, or
SOCKS, is not): :func:`proxy_for` raises :class:`UnsupportedProxyError` for
the others, and for a value it cannot parse, so the caller can say so
clearly (its message never repeats the value, which may hold a password).
The client then refuses to connect rather than go around the proxy, as Go's
dialer fails for a proxy it cannot use.

Everything here is pure: the environment comes in as a mapping.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

__all__ = ["Proxy", "UnsupportedProxyError", "proxy_for"]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "socks5": 1080, "socks5h": 1080}


class UnsupportedProxyError(ValueError):
    """The environment names a proxy this client cannot use (not ``http://``)."""


@dataclass(frozen=True)
class Proxy:
    """
    An HTTP proxy to tunnel through with ``CONNECT``.

    :ivar host: the proxy's host name or IP address.
    :ivar port: the proxy's TCP port.
    :ivar authorization: the ``Proxy-Authorization`` header value, or None.
    :ivar display: the proxy URL without credentials, for log lines.
    """

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)
    display: str = ""


def _getenv_any(environ: Mapping[str, str], *names: str) -> str:
    for name in names:
        value = environ.get(name, "")
        if value:
            return value
    return ""


def _parse_proxy(value: str) -> Proxy:
    # Messages never quote the value: it may hold the proxy's password.
    try:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https", "socks5", "socks5h") or not parts.netloc:
            # Go's rule: a bogus value is retried as "http://" + value.
            parts = urlsplit("http://" + value)
    except ValueError:
        # (urllib's own message may quote part of the value.)
        raise UnsupportedProxyError("the proxy URL cannot be parsed") from None
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        # urllib quotes the port text, which in "user:password" without a
        # host is the password.
        raise UnsupportedProxyError("invalid proxy port (expected a number)") from None
    if scheme != "http":
        raise UnsupportedProxyError(
            f"proxy scheme {scheme!r} is not supported (only http:// proxies): "
            f"{_display(scheme, parts.hostname, port)}"
        )
    host = parts.hostname
    if not host:
        raise UnsupportedProxyError("proxy URL has no host")
    if port is None:
        port = _DEFAULT_PORTS[scheme]
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode("utf-8")).decode("ascii")
    return Proxy(host, port, authorization, _display(scheme, host, port))


def _display(scheme: str, host: str | None, port: int | None) -> str:
    host = host or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _split_host_port(entry: str) -> tuple[str, str]:
    """Go's net.SplitHostPort, leniently: ("host", "") when there is no port."""
    if entry.startswith("["):
        end = entry.find("]")
        if end < 0:
            return entry, ""
        host, rest = entry[1:end], entry[end + 1 :]
        return (host, rest[1:]) if rest.startswith(":") else (host, "")
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, port
    return entry, ""


def _no_proxy_matches(no_proxy: str, host: str, port: str) -> bool:
    ip = _ip(host)
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if "/" in entry:
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                pass
            else:
                if ip is not None and ip in network:
                    return True
                continue
        entry_host, entry_port = _split_host_port(entry)
        if not entry_host:
            continue
        entry_ip = _ip(entry_host)
        if entry_ip is not None:
            if ip is not None and ip == entry_ip and entry_port in ("", port):
                return True
            continue
        if entry_host.startswith("*."):
            entry_host = entry_host[1:]
        match_host = not entry_host.startswith(".")
        if match_host:
            entry_host = "." + entry_host
        if host.endswith(entry_host) or (match_host and host == entry_host[1:]):
            if entry_port in ("", port):
                return True
    return False


def proxy_for(url: str, environ: Mapping[str, str] | None = None) -> Proxy | None:
    """
    The proxy to use for the WebSocket ``url``, or None for a direct connection.

    :param url: a ``ws://`` or ``wss://`` URL.
    :param environ: the environment; ``os.environ`` by default.
    :raises UnsupportedProxyError: when the chosen proxy is not ``http://``.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("wss", "https"):
        value = _getenv_any(env, "HTTPS_PROXY", "https_proxy")
    elif scheme in ("ws", "http"):
        value = _getenv_any(env, "HTTP_PROXY", "http_proxy")
        if value and env.get("REQUEST_METHOD"):
            # Go refuses HTTP_PROXY under CGI (it may be a request header).
            return None
    else:
        return None
    if not value:
        return None
    host = (parts.hostname or "").lower()
    port = str(parts.port or _DEFAULT_PORTS.get(scheme, 80))
    if host == "localhost":
        return None
    ip = _ip(host)
    if ip is not None and ip.is_loopback:
        return None
    if _no_proxy_matches(_getenv_any(env, "NO_PROXY", "no_proxy"), host, port):
        return None
    return _parse_proxy(value.strip())
