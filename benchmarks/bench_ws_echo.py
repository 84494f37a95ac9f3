"""
The floor of the output benchmark: ``cat`` of a file through a loopback
WebSocket, Autobahn on both ends.

An Autobahn echo server runs in a child process (``python -m
benchmarks.bench_ws_echo``, on an ephemeral 127.0.0.1 port it prints); an
Autobahn client in this process reads the file in messages of the agent's
chunk size, sends each as a text frame, and hashes what comes back.  At most
``window`` bytes are in flight (sent, not echoed yet), so neither side
buffers the whole file; the transfer ends when every byte is back.  The rate
is the file's size over the time from the first send to the last echo.
"""

from __future__ import annotations

import hashlib
import sys
import time
from typing import Any

from twisted.internet.defer import Deferred

from benchmarks.bench_support import ChildProcess, global_reactor, subprocess_env

__all__ = ["echo_floor"]

_READY = "echo listening on port "


def _serve() -> None:
    """The child: echo every message back, on an ephemeral 127.0.0.1 port; stop on stdin EOF."""
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor, stdio
    from twisted.internet.protocol import Protocol

    class Echo(WebSocketServerProtocol):
        def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
            self.sendMessage(payload, isBinary)

    class StopOnEOF(Protocol):
        def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
            if reactor.running:  # type: ignore[attr-defined]
                reactor.stop()  # type: ignore[attr-defined]

    factory = WebSocketServerFactory("ws://127.0.0.1")
    factory.protocol = Echo
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"{_READY}{port.getHost().port}", flush=True)
    stdio.StandardIO(StopOnEOF())
    reactor.run()  # type: ignore[attr-defined]


class _Client:
    """Sends the file in messages, keeps ``window`` bytes in flight, hashes the echo."""

    def __init__(self, path: str, message_bytes: int, window: int) -> None:
        self.file = open(path, "rb")  # noqa: SIM115 - closed in finish()
        self.message_bytes = message_bytes
        self.window = window
        self.in_flight = 0
        self.sent = 0
        self.received = 0
        self.digest = hashlib.sha256()
        self.eof = False
        self.started = 0.0
        self.done: Deferred[float] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.proto: Any = None

    def opened(self, proto: Any) -> None:
        self.proto = proto
        self.started = time.perf_counter()
        self.pump()

    def pump(self) -> None:
        while not self.eof and self.in_flight < self.window:
            data = self.file.read(self.message_bytes)
            if not data:
                self.eof = True
                break
            self.proto.sendMessage(data, False)
            self.in_flight += len(data)
            self.sent += len(data)
        self.check_done()

    def echoed(self, payload: bytes) -> None:
        self.digest.update(payload)
        self.in_flight -= len(payload)
        self.received += len(payload)
        self.pump()

    def check_done(self) -> None:
        if self.eof and self.received == self.sent and not self.done.called:
            self.done.callback(time.perf_counter() - self.started)

    def finish(self) -> None:
        self.file.close()


async def echo_floor(
    path: str, message_bytes: int, window: int = 4 << 20, timeout: float = 600.0
) -> tuple[float, str]:
    """
    Seconds to ``cat`` ``path`` through the loopback echo, and the SHA-256
    of the bytes that came back.
    """
    from autobahn.twisted.websocket import (
        WebSocketClientFactory,
        WebSocketClientProtocol,
        connectWS,
    )

    reactor = global_reactor()
    server = ChildProcess.spawn(
        [sys.executable, "-m", "benchmarks.bench_ws_echo"], env=subprocess_env()
    )
    client = _Client(path, message_bytes, window)
    connector: Any = None
    try:
        line = await server.wait_while_running(
            server.wait_for_line(_READY).addTimeout(30, reactor), "the echo server did not start"
        )
        port = int(line.split(_READY, 1)[1])

        class Proto(WebSocketClientProtocol):
            def onOpen(self) -> None:  # noqa: N802
                client.opened(self)

            def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
                client.echoed(payload)

            def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:  # noqa: N802, N803
                if not client.done.called:
                    client.done.errback(RuntimeError(f"the echo connection closed: {reason}"))
                if not client.closed.called:
                    client.closed.callback(None)

        factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}")
        factory.protocol = Proto
        # No timers of Autobahn's own (they run on txaio's batched loop and
        # would outlive the transfer): every wait here has its own timeout.
        factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0,
                                   autoPingInterval=0, autoPingTimeout=0)
        connector = connectWS(factory)
        seconds = await client.done.addTimeout(timeout, reactor)
        if client.proto is not None:
            client.proto.sendClose()
            await client.closed.addTimeout(10, reactor)
    finally:
        client.finish()
        if connector is not None:
            connector.disconnect()
        server.transport.closeStdin()
        await server.finish(timeout=5)
    return seconds, client.digest.hexdigest()


if __name__ == "__main__":
    _serve()
