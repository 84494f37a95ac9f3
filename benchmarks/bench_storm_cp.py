"""
The control plane of the reconnect-storm benchmark, in its own process.

Run by :mod:`benchmarks.bench_storm` as
``python -m benchmarks.bench_storm_cp AGENTS_JSON``, where the JSON file is
``{"prefix": "bench-", "count": 1000, "keys": ["<base64 PKIX DER>", ...]}``
(agent ``i`` is ``prefix`` + ``i`` in five digits, with key ``i % len(keys)``).

It is driven by one-line commands on stdin and answers with one JSON object
per line on stdout (times are ``time.time()``; the fleet process compares
them with its own):

``drop``
    abort every session's TCP connection (no close frame) and keep listening:
    ``{"event": "dropped", "at": t, "sessions": n}``.
``down SECONDS``
    stop the control plane (stop listening, close every session with 1001),
    ``{"event": "down", "at": t}``; after SECONDS a fresh control plane
    listens on the same port: ``{"event": "up", "at": t}``.
``arrivals``
    the accepted upgrades since the last ``arrivals`` (their times) and the
    refusals by HTTP status: ``{"event": "arrivals", "accepted": [...],
    "refused": {...}}``.
``cpu``
    this process's CPU seconds so far: ``{"event": "cpu", "seconds": s}``.
``tasks TIMEOUT COMMAND…``
    create one task running COMMAND for every agent, at once:
    ``{"event": "tasks", "at": t, "count": n}``; once every one of them has
    its final stored (or TIMEOUT seconds passed), ``{"event": "finals",
    "at": t_last, "count": n, "statuses": {...}, "missing": m}``, where
    ``t_last`` is when the last final was stored (used by
    :mod:`benchmarks.bench_task_fleet`).
``quit`` (or end of stdin)
    stop and exit.

It listens on 127.0.0.1 only, with a listen backlog of the kernel's
``somaxconn`` (Twisted's default of 50 would drop SYNs of a storm and make
agents wait for TCP's 1 s SYN retransmission, which is not what we measure).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, stdio, task
from twisted.internet.defer import Deferred
from twisted.protocols.basic import LineReceiver

from benchmarks.bench_support import quiet_logging, raise_nofile_limit

__all__ = ["StormControlPlane", "main"]


def _backlog() -> int:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text().strip())
    except (OSError, ValueError):
        return 1024


class StormControlPlane(LineReceiver):
    """The command loop around one (restartable) reference control plane."""

    delimiter = b"\n"

    def __init__(self, agents: dict[str, Any], reactor: Any) -> None:
        self.agents = agents
        self.reactor = reactor
        self.cp: Any = None
        self.port = 0
        self.finished: Deferred[None] = Deferred()
        self._pending_attempts: list[Any] = []
        self._restart: Any = None
        self._quitting = False

    def _options(self) -> dict[str, Any]:
        return {
            # Room for every agent plus the connections of a replaced session.
            "max_connections": 2 * len(self.agents) + 100,
            # The whole fleet may be mid-upgrade at once: none may push out another.
            "max_pending_connections": 2 * len(self.agents) + 100,
            "nonce_cache_size": max(100_000, 20 * len(self.agents)),
        }

    async def start(self) -> None:
        """Listen on an ephemeral port (the first time) or on the same port again."""
        from hostlink_tw.controlplane import start_control_plane

        listen = f"tcp:port={self.port}:interface=127.0.0.1:backlog={_backlog()}"
        self.cp = await start_control_plane(
            self.agents, listen=listen, reactor=self.reactor, **self._options()
        )
        self.port = self.cp.port

    def send(self, **fields: Any) -> None:
        """One JSON line to the fleet."""
        self.sendLine(json.dumps(fields).encode("utf-8"))

    def lineReceived(self, line: bytes) -> None:
        """Run one command; errors are reported, never fatal."""
        words = line.decode("utf-8", "replace").split()
        if not words:
            return
        d = defer.ensureDeferred(self._command(words[0], words[1:]))
        d.addErrback(lambda f: self.send(event="error", error=str(f.value)))

    async def _command(self, name: str, args: list[str]) -> None:
        if name == "drop":
            sessions = list(self.cp.sessions())
            at = time.time()
            for session in sessions:
                session.abort()
            self.send(event="dropped", at=at, sessions=len(sessions))
        elif name == "down":
            seconds = float(args[0])
            at = time.time()
            cp, self.cp = self.cp, None
            self._pending_attempts.extend(cp.attempts)
            self.send(event="down", at=at)
            await cp.stop()
            self._restart = self.reactor.callLater(
                max(0.0, at + seconds - time.time()), self._come_back
            )
        elif name == "arrivals":
            attempts = self._pending_attempts + (list(self.cp.attempts) if self.cp else [])
            self._pending_attempts = []
            if self.cp is not None:
                del self.cp.attempts[:]
            refused: dict[str, int] = {}
            for a in attempts:
                if not a.accepted:
                    refused[str(a.status)] = refused.get(str(a.status), 0) + 1
            self.send(
                event="arrivals",
                accepted=[a.at for a in attempts if a.accepted],
                refused=refused,
            )
        elif name == "cpu":
            times = os.times()
            self.send(event="cpu", seconds=times.user + times.system)
        elif name == "tasks":
            await self._tasks(float(args[0]), " ".join(args[1:]))
        elif name == "quit":
            await self.quit()
        else:
            self.send(event="error", error=f"unknown command {name!r}")

    async def _tasks(self, timeout: float, command: str) -> None:
        at = time.time()
        records = [self.cp.tasks.create(agent_id, command) for agent_id in self.agents]
        self.send(event="tasks", at=at, count=len(records))
        arrivals: list[float] = []

        def arrived(record: Any) -> Any:
            arrivals.append(time.time())
            return record

        waits = [
            self.cp.tasks.wait_final(r.task_id, timeout=timeout).addCallback(arrived)
            for r in records
        ]
        results = await defer.DeferredList(waits, consumeErrors=True)
        statuses: dict[str, int] = {}
        for ok, record in results:
            if ok:
                statuses[record.status] = statuses.get(record.status, 0) + 1
        self.send(event="finals", at=max(arrivals, default=at), count=len(arrivals),
                  statuses=statuses, missing=len(records) - len(arrivals))

    def _come_back(self) -> None:
        self._restart = None

        async def restart() -> None:
            await self.start()
            self.send(event="up", at=time.time(), port=self.port)

        defer.ensureDeferred(restart()).addErrback(
            lambda f: self.send(event="error", error=f"restart failed: {f.value}")
        )

    async def quit(self) -> None:
        """Stop everything and fire :attr:`finished` (once)."""
        if self._quitting:
            return
        self._quitting = True
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        if self.cp is not None:
            await self.cp.stop()
        self.finished.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        """stdin closed: the fleet is gone, so are we."""
        defer.ensureDeferred(self.quit())


def _load_agents(path: str) -> dict[str, Any]:
    from hostlink_tw.identity import load_public_key

    spec = json.loads(Path(path).read_text())
    keys = [load_public_key(text) for text in spec["keys"]]
    prefix = spec["prefix"]
    return {f"{prefix}{i:05d}": keys[i % len(keys)] for i in range(int(spec["count"]))}


async def _main(reactor: Any, agents_path: str) -> None:
    raise_nofile_limit()
    quiet_logging()
    server = StormControlPlane(_load_agents(agents_path), reactor)
    await server.start()
    stdio.StandardIO(server, reactor=reactor)
    server.send(event="listening", port=server.port, url=server.cp.ws_url)
    await server.finished


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m benchmarks.bench_storm_cp AGENTS_JSON``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m benchmarks.bench_storm_cp AGENTS_JSON")
    task.react(lambda reactor: defer.ensureDeferred(_main(reactor, args[0])))


if __name__ == "__main__":
    main()
