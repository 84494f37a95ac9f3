"""
A small blocking client of the control plane's operator API, for the
``hostlink-tw`` command (:class:`OperatorClient`).

Why not Twisted here: the command is short-lived and does one thing at a
time (send a request, then read one answer line by line until it ends), it
runs no reactor today (``hostlink-tw status`` reads with urllib), and
treq is not a dependency.  A blocking read is the natural shape, Ctrl-C is
a plain ``KeyboardInterrupt``, and ``http.client`` from the standard library
streams a chunked answer line by line.  It is ``http.client`` rather than
urllib so that no ``http_proxy`` variable can send the token to a proxy,
and so that every error can be named in one line.

Everything that can go wrong is an :class:`OperatorError` with a one-line
message: :class:`UnreachableError` when the control plane cannot be reached
or the connection broke (worth retrying), otherwise the API's own refusal
(``status`` and ``code`` set) or an answer that is not the operator API's.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

from hostlink_tw.safetext import escape_control

__all__ = [
    "API_PATH",
    "MAX_ANSWER_BYTES",
    "MAX_EVENT_BYTES",
    "EventStream",
    "OperatorClient",
    "OperatorError",
    "UnreachableError",
    "check_operator_url",
    "task_path",
]

#: The API's path under the operator URL.
API_PATH = "/operator/v1"
#: The most of one JSON answer read (a task list of 1000 long commands fits).
MAX_ANSWER_BYTES = 256 * 1024 * 1024
#: The longest event line of an output stream (a 1 MiB chunk, escaped, fits).
MAX_EVENT_BYTES = 16 * 1024 * 1024


class OperatorError(Exception):
    """
    The operator API cannot do it; ``str()`` is one line.

    :ivar status: The HTTP status, when the control plane answered.
    :ivar code: The API's error code (``unknown_task``, …), when it said one.
    """

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class UnreachableError(OperatorError):
    """The control plane could not be reached, or the connection broke."""


def check_operator_url(text: str) -> str:
    """
    ``text`` if it is an ``http://`` or ``https://`` URL with a host.

    :raises ValueError: It is not (a one-line reason).
    """
    shown = escape_control(text, 100)
    if "://" not in text:
        raise ValueError(f"{shown!r} has no scheme: add http://, e.g. http://{shown}")
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as e:
        raise ValueError(f"{shown!r} is not a URL ({escape_control(str(e), 100)})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{shown!r} is not an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError(f"{shown!r} has no host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{shown!r} must be only scheme, host, port and path")
    return text


def task_path(task_id: str, *rest: str) -> str:
    """``/tasks/{id}[/rest…]`` with the id quoted (an id cannot name another path)."""
    return "/".join(["/tasks", urllib.parse.quote(task_id, safe=""), *rest])


def _describe(error: BaseException) -> str:
    """Why a connection failed, in a few words."""
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "no answer in time"
    if isinstance(error, socket.gaierror):
        return f"unknown host ({escape_control(error.strerror or str(error), 100)})"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ssl.SSLError):
        return f"TLS failed ({escape_control(error.reason or str(error), 100)})"
    if isinstance(error, http.client.RemoteDisconnected):
        return "the connection was closed without an answer"
    if isinstance(error, http.client.IncompleteRead):
        return "the connection broke off"
    if isinstance(error, http.client.HTTPException):
        return "the answer is not HTTP"
    if isinstance(error, OSError) and error.strerror:
        return escape_control(error.strerror.lower(), 100)
    return escape_control(str(error) or type(error).__name__, 100)


class OperatorClient:
    """Requests to one control plane's operator API."""

    def __init__(self, url: str, token: str, *, timeout: float = 10.0) -> None:
        """
        :param url: The operator listener's base URL (``http://127.0.0.1:8081``).
        :param token: The bearer token.
        :param timeout: Seconds for connecting and for each read.
        :raises ValueError: ``url`` is not usable (:func:`check_operator_url`).
        """
        check_operator_url(url)
        parts = urllib.parse.urlsplit(url)
        self.url = url
        self._https = parts.scheme.lower() == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._base = parts.path.rstrip("/") + API_PATH
        self._token = token
        self.timeout = timeout

    def with_timeout(self, timeout: float) -> OperatorClient:
        """The same client with another timeout."""
        return OperatorClient(self.url, self._token, timeout=timeout)

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _send(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        document: Any,
        timeout: float,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        target = self._base + path
        if query:
            target += "?" + urllib.parse.urlencode(query)
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        body = None
        if document is not None:
            body = json.dumps(document).encode("ascii")
            headers["Content-Type"] = "application/json"
        connection = self._connect(timeout)
        try:
            connection.request(method, target, body=body, headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException, ValueError) as e:
            connection.close()
            raise UnreachableError(
                f"cannot reach the control plane at {escape_control(self.url, 200)}: "
                f"{_describe(e)}"
            ) from None
        return connection, response

    def request(
        self,
        method: str,
        path: str,
        document: Any = None,
        query: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """
        One request; the answer's JSON object.

        :param path: Under ``/operator/v1``, quoted (``/tasks``; see :func:`task_path`).
        :param document: The JSON body, if any.
        :raises OperatorError: See the module.
        """
        connection, response = self._send(method, path, query, document, self.timeout)
        try:
            try:
                raw = response.read(MAX_ANSWER_BYTES + 1)
            except (OSError, http.client.HTTPException) as e:
                raise UnreachableError(
                    f"the control plane at {escape_control(self.url, 200)} broke off its "
                    f"answer: {_describe(e)}"
                ) from None
        finally:
            connection.close()
        if not 200 <= response.status < 300:
            raise self._refusal(response.status, raw)
        return self._parse(raw, response.status)

    def stream(self, path: str, query: Mapping[str, str] | None = None) -> EventStream:
        """
        A GET whose answer is newline-delimited JSON, read event by event
        (close it, or use it as a context manager).

        :raises OperatorError: The request failed or was refused (before any event).
        """
        connection, response = self._send("GET", path, query, None, self.timeout)
        if response.status != 200:
            try:
                raw = response.read(MAX_ANSWER_BYTES + 1)
            except (OSError, http.client.HTTPException):
                raw = b""
            finally:
                connection.close()
            raise self._refusal(response.status, raw)
        return EventStream(connection, response, self.url)

    def _parse(self, raw: bytes, status: int) -> dict[str, Any]:
        if len(raw) > MAX_ANSWER_BYTES:
            raise OperatorError(self._not_api(f"answered more than {MAX_ANSWER_BYTES} bytes"))
        try:
            document = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise OperatorError(self._not_api(f"answered HTTP {status} without JSON")) from None
        if not isinstance(document, dict):
            raise OperatorError(self._not_api(f"answered HTTP {status} with unexpected JSON"))
        return document

    def _not_api(self, what: str) -> str:
        return (
            f"{escape_control(self.url, 200)} {what}: is it a hostlink control plane's "
            f"operator listener (--operator-listen)?"
        )

    def _refusal(self, status: int, raw: bytes) -> OperatorError:
        try:
            document = json.loads(raw[:MAX_ANSWER_BYTES].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            document = None
        if not (isinstance(document, dict) and isinstance(document.get("error"), str)):
            if status == 404:
                return OperatorError(
                    self._not_api("has no operator API (HTTP 404)"), status=status
                )
            return OperatorError(self._not_api(f"answered HTTP {status}"), status=status)
        code = escape_control(document["error"], 60)
        message = escape_control(str(document.get("message") or code), 500)
        if status == 401:
            message = (
                f"the control plane refused the operator token ({message}); use the token "
                f"file the control plane wrote (--operator-token-file, "
                f"HOSTLINK_OPERATOR_TOKEN_FILE) or HOSTLINK_OPERATOR_TOKEN"
            )
        return OperatorError(message, status=status, code=code)


class EventStream:
    """The events of one streamed answer; iterating ends after the ``end`` event."""

    def __init__(
        self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse, url: str
    ) -> None:
        self._connection = connection
        self._response = response
        self._url = escape_control(url, 200)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the connection."""
        self._connection.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """
        Each event as a JSON object.

        :raises UnreachableError: The connection broke before the ``end`` event.
        :raises OperatorError: A line is not an event.
        """
        while True:
            try:
                line = self._response.readline(MAX_EVENT_BYTES + 1)
            except (OSError, http.client.HTTPException, ValueError) as e:
                raise UnreachableError(
                    f"lost the control plane at {self._url}: {_describe(e)}"
                ) from None
            if not line:
                raise UnreachableError(
                    f"lost the control plane at {self._url}: the answer ended early"
                )
            if len(line) > MAX_EVENT_BYTES:
                raise OperatorError(f"{self._url} sent an event line over {MAX_EVENT_BYTES} bytes")
            if not line.strip():
                continue
            try:
                event = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise OperatorError(
                    f"{self._url} sent a line that is not JSON: not an operator API stream"
                ) from None
            if not isinstance(event, dict) or not isinstance(event.get("event"), str):
                raise OperatorError(f"{self._url} sent a line that is not an event")
            yield event
            if event["event"] == "end":
                return
