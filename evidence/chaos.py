"""
Chaos: a real ``twistd -n hostlink`` agent against a real reference control
plane, one fault at a time, all on 127.0.0.1.  ``make chaos`` runs every
fault and prints the table; ``tests/test_chaos.py`` runs the quick ones.

For each fault the agent must

* never exit;
* never hold two connections to the control plane (or the proxy in front
  of it), sampled from ``/proc`` every 20 ms (:class:`~evidence.faults.ConnectionWatch`);
* log the cause in one line (a line matching the fault's pattern that also
  carries ``agent_id=``), and never log a traceback;
* never be active while the fault lasts;
* be active again within the backoff bound once the fault ends.

Times are taken on the harness side (:func:`time.monotonic` when the
harness injects or ends a fault, and when an agent log line arrives):

detected
    fault start -> the agent's first log line naming the cause.
active again
    fault end -> the agent's ``session active`` line.
bound
    ``1.25 × RECONNECT_MAX + HANDSHAKE_TIMEOUT``: the longest jittered
    wait plus one attempt (connect, TLS, upgrade; hello_ack on loopback
    takes milliseconds); a fault that leaves an open connection waiting for
    its hello_ack adds ``HELLO_TIMEOUT``.  Detection is bounded by the same
    for faults the agent meets on its next attempt, and by
    ``PING_INTERVAL + PONG_TIMEOUT`` (+ ``slack``, 0.5 s) for a dead peer.
    Dead-peer faults start right after the session became active, so their
    detection time is the worst case, not a lucky ping phase.

Usage: ``python -m evidence.chaos [--hold SECONDS] [--only NAME ...] [--extra] [--keep]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from evidence.faults import (
    ConnectionWatch,
    FaultProxy,
    FaultTimeoutError,
    Identity,
    LineMatch,
    ManagedProcess,
    agent_args,
    free_port,
    kill_all,
    make_identity,
    reap_all,
    sleep,
    spawn_agent,
    spawn_control_plane,
    write_agents_file,
)
from hostlink_tw.testing import TestCertificates, make_test_certificates

__all__ = [
    "EXTRA_FAULTS",
    "FAULTS",
    "QUICK_FAULTS",
    "ChaosConfig",
    "FaultResult",
    "format_table",
    "main",
    "run_fault",
]

#: The agent's log line for an active session (hello acked).
ACTIVE = r"\[hostlink_tw\.client#info\] session active agent_id="
#: A control plane process is serving.
LISTENING = r"control plane listening on"
_GATEWAY = "/api/v1/agents/ws"


@dataclass(frozen=True)
class ChaosConfig:
    """The agent's timing settings for the run, and how long each fault lasts."""

    reconnect_min: float = 0.1
    reconnect_max: float = 2.0
    ping_interval: float = 5.0
    pong_timeout: float = 1.0
    handshake_timeout: float = 2.0
    hello_timeout: float = 2.0
    #: How long a fault goes on after the agent first noticed it (long
    #: enough for the backoff to reach RECONNECT_MAX in the full run).
    hold: float = 4.0
    #: Time allowed for processes to start and the first session to be active.
    startup_timeout: float = 30.0
    #: Scheduling slack on top of the dead-peer detection bound (a busy
    #: machine delays the agent's pong timer as it delays everything).
    slack: float = 0.5
    #: Safety net: a fault's whole run (setup to teardown) is cancelled after this.
    fault_timeout: float = 120.0

    @property
    def bound(self) -> float:
        """Longest time from the end of a fault to an active session."""
        return 1.25 * self.reconnect_max + self.handshake_timeout

    @property
    def pong_detect_bound(self) -> float:
        """Longest time for the agent to notice a dead peer (plus scheduling slack)."""
        return self.ping_interval + self.pong_timeout + self.slack

    def agent_args(
        self, url: str, identity: Identity, extra: tuple[str, ...] = ()
    ) -> list[str]:
        """``hostlink`` options with these settings."""

        def d(seconds: float) -> str:
            return f"{round(seconds * 1000)}ms"

        return agent_args(
            url,
            identity,
            reconnect_min=d(self.reconnect_min),
            reconnect_max=d(self.reconnect_max),
            ping_interval=d(self.ping_interval),
            pong_timeout=d(self.pong_timeout),
            handshake_timeout=d(self.handshake_timeout),
            hello_timeout=d(self.hello_timeout),
            extra=extra,
        )


@dataclass
class FaultResult:
    """What one fault did to the agent."""

    fault: str
    bound: float
    detect_bound: float
    detected: float | None = None
    recovered: float | None = None
    max_connections: int = 0
    cause: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return not self.problems

    def describe(self) -> str:
        """Problems and notes, for a failure message."""
        lines = [f"{self.fault}: {'ok' if self.ok else 'FAILED'}"]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  cause line: {self.cause}")
        return "\n".join(lines)


class FaultRun:
    """
    One fault's harness: a scratch directory, the agent's identity, the
    processes and servers it starts (all torn down in :meth:`cleanup`) and
    the checks common to every fault.
    """

    def __init__(
        self, name: str, config: ChaosConfig, workdir: str, detect_bound: float
    ) -> None:
        self.name = name
        self.config = config
        self.dir = tempfile.mkdtemp(prefix=f"{name}-", dir=workdir)
        self.identity = make_identity(self.dir, f"chaos-{name}")
        self.result = FaultResult(name, config.bound, detect_bound)
        self.agent: ManagedProcess | None = None
        self.watch: ConnectionWatch | None = None
        self.status_port: int | None = None
        self._cleanups: list[Callable[[], Awaitable[Any]]] = []
        # Agents go first, so tearing down the control plane is not one more fault.
        self._first_cleanups: list[Callable[[], Awaitable[Any]]] = []
        self._fault_started: float | None = None
        self._fault_mark = 0
        self._started = time.monotonic()

    # -- building blocks ---------------------------------------------------------------

    def on_cleanup(self, action: Callable[[], Awaitable[Any]], first: bool = False) -> None:
        """Run ``action`` at the end, last registered first (``first``: before all others)."""
        if first:
            self._first_cleanups.append(action)
        else:
            self._cleanups.append(action)

    def agents_file(self, identities: list[Identity] | None = None) -> str:
        """An agents file listing this run's agent (or ``identities``)."""
        return write_agents_file(
            os.path.join(self.dir, "agents.json"), identities or [self.identity]
        )

    async def control_plane_process(
        self,
        port: int,
        name: str = "control-plane",
        status_port: int | None = None,
        extra: Sequence[str] = (),
        launcher: Sequence[str] = (),
    ) -> ManagedProcess:
        """
        A ``twistd hostlink-controlplane`` on ``port`` (and its ``/status`` on
        ``status_port``, if given), listening when this returns (``extra``,
        ``launcher``: see :func:`~evidence.faults.spawn_control_plane`).
        """
        process = spawn_control_plane(
            f"tcp:{port}:interface=127.0.0.1",
            self.agents_file(),
            name=name,
            operator_listen=(
                "none" if status_port is None else f"tcp:{status_port}:interface=127.0.0.1"
            ),
            extra=extra,
            launcher=launcher,
        )
        self.on_cleanup(process.reap)
        await process.wait_for(LISTENING, timeout=self.config.startup_timeout)
        return process

    async def control_plane(self, listen: str | None = None, **options: Any) -> Any:
        """The reference control plane in this process (its test controls usable)."""
        from hostlink_tw.controlplane import start_control_plane

        cp = await start_control_plane(
            {self.identity.agent_id: self.identity.public_key_b64},
            listen=listen or f"tcp:{free_port()}:interface=127.0.0.1",
            **options,
        )
        self.on_cleanup(cp.stop)
        return cp

    def proxy(self, target_port: int) -> FaultProxy:
        """A :class:`FaultProxy` in front of ``target_port``, listening."""
        proxy = FaultProxy(target_port)
        proxy.listen()
        self.on_cleanup(proxy.stop)
        return proxy

    async def start_agent(
        self,
        url: str,
        ports: set[int],
        extra: tuple[str, ...] = (),
        hosts_file: str | None = None,
    ) -> ManagedProcess:
        """
        Start the agent, wait for its first active session, then start
        counting its connections to ``ports``.
        """
        # The agent's own status endpoint: a second opinion on "active".
        self.status_port = free_port()
        status = ("--status-listen", f"tcp:{self.status_port}:interface=127.0.0.1")
        agent = spawn_agent(
            self.config.agent_args(url, self.identity, (*extra, *status)),
            name=f"agent[{self.name}]",
            hosts_file=hosts_file,
        )
        self.agent = agent
        self.on_cleanup(agent.reap, first=True)
        await agent.wait_for(ACTIVE, timeout=self.config.startup_timeout)
        assert agent.pid is not None
        self.watch = ConnectionWatch(agent.pid, ports).start()
        return agent

    # -- the fault's timeline -------------------------------------------------------------

    def fault_starts(self) -> None:
        """Call right before injecting the fault."""
        assert self.agent is not None
        self._fault_mark = self.agent.mark()
        self._fault_started = time.monotonic()

    async def detected(self, pattern: str, timeout: float | None = None) -> LineMatch:
        """Wait for the agent's first line naming the cause; record the detection time."""
        assert self.agent is not None and self._fault_started is not None
        match = await self.agent.wait_for(
            pattern,
            since=self._fault_mark,
            timeout=timeout or self.result.detect_bound + 5,
        )
        self.result.detected = match.at - self._fault_started
        self.result.cause = match.line
        if "agent_id=" not in match.line:
            self.result.problems.append(f"cause line lacks agent_id: {match.line!r}")
        return match

    async def also_logged(self, pattern: str, what: str, timeout: float) -> LineMatch | None:
        """Wait for another expected line during the fault; note its time."""
        assert self.agent is not None and self._fault_started is not None
        try:
            match = await self.agent.wait_for(pattern, since=self._fault_mark, timeout=timeout)
        except FaultTimeoutError as e:
            self.result.problems.append(f"{what} not logged: {e}")
            return None
        self.result.notes.append(f"{what} after {match.at - self._fault_started:.2f}s")
        return match

    async def hold(self) -> None:
        """Let the fault go on for ``config.hold`` seconds."""
        await sleep(self.config.hold)

    async def ends(self, action: Callable[[], Any]) -> None:
        """
        End the fault with ``action`` (which may return an awaitable; if it
        returns a float, that monotonic time is when the fault ended, e.g.
        a restarted control plane's "listening" line), then wait for the
        agent to be active again and record the time.
        """
        assert self.agent is not None and self._fault_started is not None
        during = self.agent.find(ACTIVE, self._fault_mark)
        if during is not None:
            self.result.problems.append(f"active during the fault: {during.line!r}")
        await self._expect_health(503, "during the fault")
        mark = self.agent.mark()
        ended = time.monotonic()
        outcome = action()
        if isinstance(outcome, Deferred) or hasattr(outcome, "__await__"):
            outcome = await outcome
        if isinstance(outcome, float):
            ended = outcome
        try:
            match = await self.agent.wait_for(
                ACTIVE, since=mark, timeout=self.config.bound + 10
            )
        except FaultTimeoutError as e:
            self.result.problems.append(f"not active again: {e}")
            return
        self.result.recovered = match.at - ended
        await self._expect_health(200, "once active again")

    async def _expect_health(self, code: int, when: str) -> None:
        """The agent's ``/healthz`` must answer ``code`` (bounded poll: it may lag a log line)."""
        if self.status_port is None:
            return
        deadline = time.monotonic() + 1.0
        seen: tuple[int, bytes] | str = "no answer"
        while time.monotonic() < deadline:
            try:
                seen = await http_get(self.status_port, "/healthz")
            except Exception as e:  # noqa: BLE001 - reported below
                seen = f"{type(e).__name__}: {e}"
            if isinstance(seen, tuple) and seen[0] == code:
                return
            await sleep(0.05)
        self.result.problems.append(f"agent /healthz {when}: expected {code}, got {seen!r}")

    # -- verdict and teardown ---------------------------------------------------------------

    def check(self) -> None:
        """The checks common to every fault."""
        r = self.result
        agent = self.agent
        if agent is None:
            r.problems.append("the agent never started")
            return
        if not agent.running:
            r.problems.append(f"the agent exited: {agent.exit_reason}")
        if self.watch is not None:
            self.watch.stop()
            r.max_connections = self.watch.max
            if self.watch.max > 1:
                r.problems.append(
                    f"held {self.watch.max} connections at once ({len(self.watch.over)} samples;"
                    f" first: {self.watch.details[0]})"
                )
            if self.watch.samples < 10:
                r.problems.append(f"too few connection samples ({self.watch.samples})")
        output = agent.text()
        for bad in ("Traceback", "Unhandled", "CHAOS-RESOLVER-LEAK"):
            if bad in output:
                r.problems.append(f"{bad!r} in the agent's output")
        if r.detected is None:
            r.problems.append("cause not detected")
        elif r.detected > r.detect_bound:
            r.problems.append(f"detected after {r.detected:.2f}s > {r.detect_bound:.2f}s")
        if r.recovered is not None and r.recovered > r.bound:
            r.problems.append(f"active again after {r.recovered:.2f}s > bound {r.bound:.2f}s")

    async def cleanup(self) -> None:
        """Tear everything down, last started first; never raises."""
        if self.watch is not None:
            self.watch.stop()
        for action in [*reversed(self._first_cleanups), *reversed(self._cleanups)]:
            try:
                await action()
            except Exception as e:  # noqa: BLE001 - teardown goes on whatever failed
                self.result.notes.append(f"cleanup: {type(e).__name__}: {e}")
        self._first_cleanups.clear()
        self._cleanups.clear()
        self.result.seconds = time.monotonic() - self._started


class _HTTPGet(Protocol):
    """A minimal HTTP/1.0 GET: the whole response, once the server closes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(f"GET {self.path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(self.data)


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET ``path`` from 127.0.0.1:``port`` (HTTP/1.0, bounded): ``(status, body)``."""
    from twisted.internet import reactor

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    protocol = _HTTPGet(path)
    await connectProtocol(endpoint, protocol)  # type: ignore[no-untyped-call]
    response = await protocol.done.addTimeout(5, reactor)
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(None, 2)[1]), body


async def _process_status(status_port: int) -> dict[str, Any]:
    """GET /status of a control plane process (from its operator listener)."""
    _, body = await http_get(status_port, "/status")
    data: dict[str, Any] = json.loads(body)
    return data


async def _expect_one_session(
    run: FaultRun, status: Callable[[], Awaitable[dict[str, Any]]]
) -> None:
    """The control plane must end with one TCP connection, one active session (bounded poll)."""
    deadline = time.monotonic() + 3.0
    data: dict[str, Any] = {}
    while time.monotonic() < deadline:
        data = await status()
        active = [s for s in data["sessions"] if s["active"]]
        if data["connections"] == 1 and len(active) == 1:
            return
        await sleep(0.1)
    run.result.problems.append(
        f"control plane sees {data.get('connections')} connections, sessions {data.get('sessions')}"
    )


def _in_process_status(cp: Any) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def status() -> dict[str, Any]:
        result: dict[str, Any] = cp.status()
        return result

    return status


# -- the faults -----------------------------------------------------------------------------
# Each takes a FaultRun whose result it fills; run_fault() does setup and teardown.

_CONNECTION_LOST = r"connection ended: connection lost: .*agent_id="
_REFUSED = r"connection ended: connection failed: Connection was refused.*agent_id="
_NO_PONG = r"aborting connection: no pong within .*agent_id="
_GAVE_UP = r"giving up this attempt: connect and upgrade not done within .* \(stuck in .*agent_id="


async def control_plane_killed(run: FaultRun) -> None:
    """SIGKILL the control plane process, keep it down, start it again on the same port."""
    port, status_port = free_port(), free_port()
    cp = await run.control_plane_process(port, status_port=status_port)
    await run.start_agent(f"ws://127.0.0.1:{port}{_GATEWAY}", {port})
    run.fault_starts()
    cp.signal(signal.SIGKILL)
    await run.detected(_CONNECTION_LOST)
    await cp.ended
    await run.also_logged(_REFUSED, "connection refused while down", run.config.bound + 2)
    await run.hold()
    async def restart() -> float:
        new = await run.control_plane_process(
            port, name="control-plane (restarted)", status_port=status_port
        )
        match = new.find(LISTENING)
        assert match is not None
        return match.at

    await run.ends(restart)
    await _expect_one_session(run, lambda: _process_status(status_port))


async def control_plane_frozen(run: FaultRun) -> None:
    """SIGSTOP the control plane (a dead peer: TCP up, nothing answers), then SIGCONT."""
    port, status_port = free_port(), free_port()
    cp = await run.control_plane_process(port, status_port=status_port)
    await run.start_agent(f"ws://127.0.0.1:{port}{_GATEWAY}", {port})
    run.fault_starts()
    cp.signal(signal.SIGSTOP)
    await run.detected(_NO_PONG)
    # The kernel still completes TCP handshakes into the listen backlog, so
    # attempts hang until the agent's handshake timeout.
    await run.also_logged(_GAVE_UP, "frozen attempt given up", run.config.bound + 2)
    await run.hold()
    await run.ends(lambda: cp.signal(signal.SIGCONT))
    await _expect_one_session(run, lambda: _process_status(status_port))


async def proxy_blackhole_then_reset(run: FaultRun, reset_phase: bool = True) -> None:
    """
    A proxy in between black-holes everything (open connection included),
    then (``reset_phase``) resets every connection, then passes again.
    """
    cp = await run.control_plane()
    proxy = run.proxy(cp.port)
    await run.start_agent(f"ws://127.0.0.1:{proxy.port}{_GATEWAY}", {proxy.port or 0})
    run.fault_starts()
    proxy.set_mode("blackhole")
    await run.detected(_NO_PONG)
    await run.also_logged(_GAVE_UP, "black-holed attempt given up", run.config.bound + 2)
    if reset_phase:
        mark = run.agent.mark() if run.agent else 0
        switched = time.monotonic()
        proxy.set_mode("reset")
        assert run.agent is not None
        try:
            match = await run.agent.wait_for(
                r"connection ended: connection (lost|failed): .*agent_id=",
                since=mark,
                timeout=run.config.bound + 2,
            )
            run.result.notes.append(f"reset phase detected after {match.at - switched:.2f}s")
        except FaultTimeoutError as e:
            run.result.problems.append(f"reset phase not noticed: {e}")
        await sleep(run.config.hold / 2)
    else:
        await run.hold()
    await run.ends(lambda: proxy.set_mode("pass"))
    run.result.notes.append(
        f"proxy accepted {proxy.accepted} connections, at most {proxy.max_open} open at once"
    )


async def proxy_blackhole(run: FaultRun) -> None:
    """A proxy in between black-holes everything, then passes again (no reset phase)."""
    await proxy_blackhole_then_reset(run, reset_phase=False)


async def proxy_reset(run: FaultRun) -> None:
    """A proxy in between resets (RST) the live session and every new connection."""
    cp = await run.control_plane()
    proxy = run.proxy(cp.port)
    await run.start_agent(f"ws://127.0.0.1:{proxy.port}{_GATEWAY}", {proxy.port or 0})
    run.fault_starts()
    proxy.set_mode("reset")
    await run.detected(_CONNECTION_LOST)
    await run.hold()
    await run.ends(lambda: proxy.set_mode("pass"))
    await _expect_one_session(run, _in_process_status(cp))


async def upgrade_stalled(run: FaultRun) -> None:
    """The control plane holds every upgrade unanswered (the session dropped: the agent retries)."""
    cp = await run.control_plane()
    await run.start_agent(cp.ws_url, {cp.port})
    run.fault_starts()
    cp.stall_upgrades()
    cp.abort(run.identity.agent_id)
    await run.detected(_GAVE_UP)
    await run.hold()
    await run.ends(cp.clear_stall)
    await _expect_one_session(run, _in_process_status(cp))


async def _refused(run: FaultRun, status: int) -> None:
    cp = await run.control_plane()
    await run.start_agent(cp.ws_url, {cp.port})
    run.fault_starts()
    if status == 401:
        # The real cause of a 401: the agent is no longer registered.
        cp.set_agents({})
    else:
        cp.refuse_upgrades(status)
    cp.close(run.identity.agent_id, 1001, "control plane restarting")
    await run.detected(rf"upgrade refused: HTTP {status} .*agent_id=")
    await run.hold()
    if status == 401:
        await run.ends(
            lambda: cp.set_agents({run.identity.agent_id: run.identity.public_key_b64})
        )
    else:
        await run.ends(cp.clear_refusal)
    await _expect_one_session(run, _in_process_status(cp))


async def refused_401(run: FaultRun) -> None:
    """Upgrades refused with 401 (agent removed from the control plane) for a while."""
    await _refused(run, 401)


async def refused_403(run: FaultRun) -> None:
    """Upgrades refused with 403 for a while."""
    await _refused(run, 403)


async def refused_503(run: FaultRun) -> None:
    """Upgrades refused with 503 for a while."""
    await _refused(run, 503)


async def hello_ack_withheld(run: FaultRun) -> None:
    """
    Upgrades succeed but the control plane never answers agent.hello (an
    application-level stall); the agent must give up after HELLO_TIMEOUT.
    """
    cp = await run.control_plane()
    # An open connection may be waiting for its (never coming) hello_ack
    # when the fault ends: it times out first, then the usual backoff.
    run.result.bound = run.config.hello_timeout + run.config.bound
    run.result.detect_bound = run.config.hello_timeout + run.config.bound
    await run.start_agent(cp.ws_url, {cp.port})
    run.fault_starts()
    cp.withhold_hello_ack = True
    cp.close(run.identity.agent_id, 1001, "control plane restarting")
    await run.detected(r"closing connection: no agent.hello_ack within .*agent_id=")
    await run.hold()

    def answer() -> None:
        cp.withhold_hello_ack = False

    await run.ends(answer)
    await _expect_one_session(run, _in_process_status(cp))


async def name_unresolvable(run: FaultRun, stall: bool = False) -> None:
    """
    The control plane's host name stops resolving: ``hostlink.invalid``
    (reserved TLD) served by :class:`~evidence.faults.ChaosResolver` in the
    agent process, so no lookup of it ever leaves the machine.  With
    ``stall``, lookups hang instead of failing.
    """
    if stall:
        # A lookup hanging when the fault ends must time out first.
        run.result.bound = run.config.handshake_timeout + run.config.bound
    cp = await run.control_plane()
    hosts = os.path.join(run.dir, "hosts.json")
    name = "hostlink.invalid"

    def resolve(mapping: dict[str, str]) -> None:
        tmp = hosts + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(mapping, f)
        os.replace(tmp, hosts)

    resolve({name: "127.0.0.1"})
    agent = await run.start_agent(f"ws://{name}:{cp.port}{_GATEWAY}", {cp.port}, hosts_file=hosts)
    if agent.find(r"chaos resolver installed") is None:
        run.result.problems.append("the chaos resolver was not installed in the agent")
    run.fault_starts()
    resolve({name: "stall"} if stall else {})
    cp.abort(run.identity.agent_id)
    await run.detected(_GAVE_UP if stall else r"connection failed: DNSLookupError: .*agent_id=")
    await run.hold()
    await run.ends(lambda: resolve({name: "127.0.0.1"}))
    await _expect_one_session(run, _in_process_status(cp))
    run.result.notes.append(
        "resolver: .invalid answered in-process; system lookups of it trip-wired (none seen)"
    )


async def name_lookup_stalled(run: FaultRun) -> None:
    """The resolver stops answering for the control plane's host name."""
    await name_unresolvable(run, stall=True)


async def tls_unknown_ca(run: FaultRun) -> None:
    """
    ``wss://`` with a certificate from a CA the agent does not trust: the
    control plane (trusted via ``--ca-file``) comes back with a certificate
    from an unknown CA, then with the right one again.  A second agent
    without ``--ca-file`` must be refused by TLS all along.
    """
    # Two authorities that do not trust each other: the agent is told of the first.
    good = make_test_certificates(os.path.join(run.dir, "trusted"), names=(), label="chaos trusted")
    bad = make_test_certificates(os.path.join(run.dir, "unknown"), names=(), label="chaos unknown")
    port = free_port()

    noca = make_identity(run.dir, f"chaos-{run.name}-noca")
    holder: dict[str, Any] = {"cp": await run.control_plane(good.listen(port))}
    holder["cp"].set_agents(
        {run.identity.agent_id: run.identity.public_key_b64, noca.agent_id: noca.public_key_b64}
    )
    url = f"wss://127.0.0.1:{port}{_GATEWAY}"
    await run.start_agent(url, {port}, extra=("--ca-file", good.ca))

    # The agent without the CA: refused by TLS, keeps trying, never active.
    without = spawn_agent(run.config.agent_args(url, noca), name="agent without --ca-file")
    run.on_cleanup(without.reap, first=True)
    try:
        line = await without.wait_for(
            r"TLS failed: server certificate not trusted.*agent_id=",
            timeout=run.config.startup_timeout,
        )
        message = line.line.split("] ", 1)[-1].split(";", 1)[0]
        run.result.notes.append(f"agent without --ca-file refused by TLS: {message}")
    except FaultTimeoutError as e:
        run.result.problems.append(f"agent without --ca-file was not refused by TLS: {e}")

    async def restart(certificates: TestCertificates) -> None:
        await holder["cp"].stop()
        holder["cp"] = await run.control_plane(certificates.listen(port))

    run.fault_starts()
    await restart(bad)
    await run.detected(r"TLS failed: server certificate not trusted.*agent_id=")
    await run.hold()
    await run.ends(lambda: restart(good))
    await _expect_one_session(run, lambda: _status_of(holder))
    if without.find(ACTIVE) is not None:
        run.result.problems.append("the agent without --ca-file became active")
    if not without.running:
        run.result.problems.append(f"the agent without --ca-file exited: {without.exit_reason}")


async def _status_of(holder: dict[str, Any]) -> dict[str, Any]:
    # The agent without --ca-file never gets a session; its short-lived TLS
    # attempts may be counted as connections, which the bounded poll of
    # _expect_one_session rides out.
    status: dict[str, Any] = holder["cp"].status()
    return status


async def connection_refused(run: FaultRun) -> None:
    """Nothing listens any more (the proxy stops listening and drops the session), then again."""
    cp = await run.control_plane()
    proxy = run.proxy(cp.port)
    await run.start_agent(f"ws://127.0.0.1:{proxy.port}{_GATEWAY}", {proxy.port or 0})
    run.fault_starts()
    await proxy.stop_listening()
    proxy.reset_all()
    await run.detected(_REFUSED)
    await run.hold()
    await run.ends(proxy.listen)
    await _expect_one_session(run, _in_process_status(cp))


async def upgrade_garbage(run: FaultRun) -> None:
    """
    The upgrade is answered with a status line that is not UTF-8 (a broken
    middlebox); the session is reset so the agent has to reconnect into it.
    """
    cp = await run.control_plane()
    proxy = run.proxy(cp.port)
    await run.start_agent(f"ws://127.0.0.1:{proxy.port}{_GATEWAY}", {proxy.port or 0})
    run.fault_starts()
    proxy.set_mode("garbage")
    proxy.reset_all()
    # The agent names the broken head itself (one warning line), and its
    # "connection ended" line carries that reason, not "connection failed".
    await run.detected(r"upgrade failed: response unparsable \(UnicodeDecodeError\).*agent_id=")
    await run.hold()
    await run.ends(lambda: proxy.set_mode("pass"))
    await _expect_one_session(run, _in_process_status(cp))


#: Every fault of ``make chaos``, in order: (name, scenario, detection bound kind).
FAULTS: dict[str, tuple[Callable[[FaultRun], Coroutine[Any, Any, None]], str]] = {
    "control plane SIGKILL + restart": (control_plane_killed, "attempt"),
    "control plane SIGSTOP/SIGCONT": (control_plane_frozen, "pong"),
    "proxy black-hole then reset": (proxy_blackhole_then_reset, "pong"),
    "proxy reset (RST)": (proxy_reset, "attempt"),
    "upgrade stalled": (upgrade_stalled, "attempt"),
    "upgrade refused 401": (refused_401, "attempt"),
    "upgrade refused 403": (refused_403, "attempt"),
    "upgrade refused 503": (refused_503, "attempt"),
    "hello_ack withheld": (hello_ack_withheld, "attempt"),
    "host name unresolvable": (name_unresolvable, "attempt"),
    "host name lookup stalled": (name_lookup_stalled, "attempt"),
    "TLS unknown CA": (tls_unknown_ca, "attempt"),
    "connection refused": (connection_refused, "attempt"),
}

#: Beyond the issue's list, run with ``--extra``.
EXTRA_FAULTS: dict[str, tuple[Callable[[FaultRun], Coroutine[Any, Any, None]], str]] = {
    "upgrade answered with garbage": (upgrade_garbage, "attempt"),
}

#: Faults quick enough for ``make test`` (tests/test_chaos.py).
QUICK_FAULTS: dict[str, tuple[Callable[[FaultRun], Coroutine[Any, Any, None]], str]] = {
    "control plane SIGKILL + restart": FAULTS["control plane SIGKILL + restart"],
    "upgrade refused 401": FAULTS["upgrade refused 401"],
    "connection refused": FAULTS["connection refused"],
    "proxy black-hole": (proxy_blackhole, "pong"),
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40]


async def run_fault(
    name: str,
    scenario: Callable[[FaultRun], Coroutine[Any, Any, None]],
    detect_kind: str,
    config: ChaosConfig,
    workdir: str,
) -> FaultResult:
    """Run one fault from setup to teardown; the result says what happened (never raises)."""
    detect_bound = config.pong_detect_bound if detect_kind == "pong" else config.bound
    run = FaultRun(_slug(name), config, workdir, detect_bound)
    run.result.fault = name
    from twisted.internet import reactor

    running: Deferred[None] = Deferred.fromCoroutine(scenario(run))
    running.addTimeout(config.fault_timeout, reactor)
    try:
        await running
    except FaultTimeoutError as e:
        run.result.problems.append(str(e))
    except defer.TimeoutError:
        run.result.problems.append(f"fault did not finish within {config.fault_timeout:g}s")
    except Exception as e:  # noqa: BLE001 - one broken fault must not stop the table
        import traceback

        run.result.problems.append(
            f"harness error: {type(e).__name__}: {e}\n{traceback.format_exc()}"
        )
    finally:
        run.check()
        await run.cleanup()
    if run.agent is not None and not run.result.ok:
        run.result.notes.append(f"agent output tail:\n{run.agent.tail(25)}")
    return run.result


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}s"


def format_table(results: list[FaultResult]) -> str:
    """The chaos table: fault, detection time and bound, time to active again, bound, verdict."""
    header = ("fault", "detection", "its bound", "active again", "bound", "max conns", "verdict")
    rows = [
        (
            r.fault,
            _seconds(r.detected),
            _seconds(r.detect_bound),
            _seconds(r.recovered),
            _seconds(r.bound),
            str(r.max_connections),
            "ok" if r.ok else "FAIL",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _resolver_note(resolv_conf: str = "/etc/resolv.conf") -> str:
    # Only how many: the addresses describe the build host's network, and
    # this output is pasted into docs/chaos.rst.
    try:
        with open(resolv_conf, encoding="utf-8") as f:
            count = sum(1 for line in f if line.split()[:1] == ["nameserver"])
    except OSError:
        count = 0
    return (
        f"system name servers: {count} configured; glibc would send a query for a "
        ".invalid name to them, so the agent resolves through the harness's in-process "
        "ChaosResolver (system lookups of .invalid trip-wired: a leak fails the fault)"
    )


async def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m evidence.chaos", description=__doc__)
    parser.add_argument("--hold", type=float, default=ChaosConfig.hold,
                        help="seconds each fault lasts after the agent noticed it")
    parser.add_argument("--only", action="append", default=[],
                        help="run only faults whose name contains this (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--extra", action="store_true",
                        help=f"also run faults beyond the issue's list ({', '.join(EXTRA_FAULTS)})")
    args = parser.parse_args(argv)
    config = ChaosConfig(hold=args.hold)
    faults = {**FAULTS, **(EXTRA_FAULTS if args.extra else {})}
    selected = {
        name: entry
        for name, entry in faults.items()
        if not args.only or any(word.lower() in name.lower() for word in args.only)
    }
    if not selected:
        print(f"no fault matches {args.only}; faults: {', '.join(FAULTS)}", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="hostlink-chaos-")
    print(
        f"chaos: {len(selected)} faults; agent settings: reconnect {config.reconnect_min:g}s.."
        f"{config.reconnect_max:g}s, ping {config.ping_interval:g}s, pong timeout "
        f"{config.pong_timeout:g}s, handshake timeout {config.handshake_timeout:g}s, "
        f"hello timeout {config.hello_timeout:g}s; fault held {config.hold:g}s after detection",
        flush=True,
    )
    print(f"bound = 1.25 x {config.reconnect_max:g}s + {config.handshake_timeout:g}s "
          f"= {config.bound:.2f}s; dead-peer detection <= {config.pong_detect_bound:.2f}s",
          flush=True)
    started = time.monotonic()
    results: list[FaultResult] = []
    try:
        for name, (scenario, kind) in selected.items():
            print(f"-- {name} ...", end=" ", flush=True)
            result = await run_fault(name, scenario, kind, config, workdir)
            results.append(result)
            print(
                f"{'ok' if result.ok else 'FAIL'} (detected {_seconds(result.detected)}, "
                f"active again {_seconds(result.recovered)}, {result.seconds:.1f}s)",
                flush=True,
            )
    finally:
        await reap_all()
    print()
    print(format_table(results))
    print()
    print("cause lines (one per fault, as the agent logged it):")
    for r in results:
        cause = r.cause.split("] ", 1)[-1] if r.cause else "(none)"
        print(f"  {r.fault}: {cause}")
    print()
    print("notes:")
    for fault, note in [(r.fault, n) for r in results for n in r.notes]:
        print(f"  {fault}: {note}")
    print(f"  {_resolver_note()}")
    failed = [r for r in results if not r.ok]
    for r in failed:
        print()
        print(r.describe())
    print()
    print(f"{len(results) - len(failed)}/{len(results)} faults within bounds "
          f"in {time.monotonic() - started:.0f}s")
    if args.keep or failed:
        print(f"scratch directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    """``python -m evidence.chaos``: run the faults, print the table, exit 1 on any miss."""
    from twisted.internet import reactor, task

    reactor_any: Any = reactor
    # Whatever stops the reactor (Ctrl-C included), no process outlives us.
    reactor_any.addSystemEventTrigger("before", "shutdown", kill_all)

    async def run(_: Any) -> None:
        code = await _main(sys.argv[1:] if argv is None else argv)
        if code:
            raise SystemExit(code)  # react() exits with it

    task.react(lambda r: Deferred.fromCoroutine(run(r)))


if __name__ == "__main__":
    main()
