"""
Fault injection for the chaos runs: reusable pieces, all on 127.0.0.1.

:class:`FaultProxy`
    A TCP proxy in front of the control plane that can pass traffic,
    black-hole it (accept and read, forward nothing, also on connections
    already open), reset it (RST: ``abortConnection`` sets ``SO_LINGER``
    to 0), answer upgrades with garbage, and stop listening altogether
    (connection refused).
:class:`ManagedProcess`
    A real process (``twistd -n hostlink``, ``twistd -n hostlink-controlplane``)
    in its own process group, so SIGKILL/SIGSTOP/SIGCONT reach all of it and
    nothing outlives the harness.  Its output lines are kept with the
    harness's monotonic time of arrival: "the agent logged X at t" is
    measured on the harness side.
:class:`ConnectionWatch`
    Counts the agent's TCP connections to given ports from ``/proc``,
    independently of anything the agent or the control plane report.
:class:`ChaosResolver`
    The host-name faults.  Names under the reserved ``.invalid`` TLD
    (RFC 6761) must never resolve, but glibc would still send the query to
    the configured name server (it has no special case for ``.invalid``),
    and the name server of the machine this was written on is off-host.  So the
    agent process runs with this resolver installed on its reactor
    (``python -m evidence.faults resolver-twistd HOSTS.json -- twistd
    args``): ``.invalid`` names fail locally unless the harness maps them in
    ``HOSTS.json``, and the system resolver functions are trip-wired to
    refuse (and report ``CHAOS-RESOLVER-LEAK``) any ``.invalid`` lookup, so a
    run also proves nothing about that name was sent off the host.

Everything here is bounded: every wait has a timeout, every process is
killed (by process group) and reaped in :func:`kill_all`, which the chaos
command also hooks to reactor shutdown and ``atexit``.

The connection count is sampled, so it can miss a double connection that
lasts less than a sampling interval (and ``/proc`` tables are not read
atomically); the proxy's own counter (``max_open``) and the control
plane's connection count are the other two witnesses.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IResolverSimple
from twisted.internet.protocol import (
    ClientFactory,
    Factory,
    ProcessProtocol,
    Protocol,
    connectionDone,
)
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "REPO_ROOT",
    "ChaosResolver",
    "ConnectionWatch",
    "FaultProxy",
    "FaultTimeoutError",
    "Identity",
    "LineMatch",
    "ManagedProcess",
    "agent_args",
    "count_connections",
    "free_port",
    "install_resolver_tripwire",
    "kill_all",
    "reap_all",
    "make_identity",
    "sleep",
    "spawn_agent",
    "spawn_control_plane",
    "write_agents_file",
]

#: The checkout this harness runs from (processes run there, with it on sys.path).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BIN = os.path.dirname(os.path.abspath(sys.executable))

# /proc/net/tcp states a connection is *held* in by the agent: established,
# being set up, or closed by the peer but not yet by us.  (Sockets the agent
# already closed are orphans with inode 0 and never match its fds anyway.)
_HELD_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "08": "CLOSE_WAIT"}
_LISTEN = "0A"

# Environment variables that must not leak from the harness into the
# processes it starts: proxies would reroute the agent, HOSTLINK_* would
# override the options the fault relies on.
_SCRUBBED_PREFIXES = ("HOSTLINK_", "SH_CONTROL_PLANE")
_SCRUBBED = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def sleep(seconds: float) -> Deferred[None]:
    """A Deferred that fires after ``seconds`` on the global reactor."""
    return deferLater(_reactor(), seconds, lambda: None)


def _ephemeral_ports() -> range:
    """The kernel's range for outgoing connections' local ports."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago, outside the kernel's
    ephemeral range: the harnesses restart servers on the same port, and
    while one is down the kernel may hand an ephemeral port to any other
    process's outgoing connection (a test suite running alongside), which
    would then keep the server from listening again.  Chosen at random so
    harnesses running side by side do not pick the same one.
    """
    ephemeral = _ephemeral_ports()
    below = range(20000, ephemeral.start) if ephemeral.start > 20000 else range(0)
    above = range(ephemeral.stop, 65536)
    candidates = below if len(below) >= len(above) else above
    rng = random.SystemRandom()
    for _ in range(100 if candidates else 0):
        port = rng.choice(candidates)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything taken: any free port will do
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FaultTimeoutError(Exception):
    """A bounded wait of the harness ran out."""


# -- identities, agents file, certificates ------------------------------------------


@dataclass(frozen=True)
class Identity:
    """An agent's state directory and key, as ``twistd hostlink`` needs them."""

    agent_id: str
    state_path: str
    key_path: str
    public_key_b64: str


def make_identity(directory: str, agent_id: str) -> Identity:
    """Generate a key and ``agent.json`` for ``agent_id`` under ``directory``."""
    from hostlink_tw.identity import (
        AgentState,
        generate_private_key,
        public_key_base64,
        write_agent_state,
    )

    state = os.path.join(os.path.abspath(directory), f"state-{agent_id}")
    key_path = os.path.join(state, "agent.key")
    key = generate_private_key(key_path)
    write_agent_state(state, AgentState(agent_id=agent_id))
    return Identity(agent_id, state, key_path, public_key_base64(key.public_key()))


def write_agents_file(path: str, identities: Iterable[Identity]) -> str:
    """Write the control plane's agents file (agent id -> public key); return its path."""
    data = {i.agent_id: i.public_key_b64 for i in identities}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)
    return path


# -- the TCP proxy -------------------------------------------------------------------


class _Upstream(Protocol):
    """The proxy's connection to the control plane, paired with one client connection."""

    def __init__(self, peer: _Downstream) -> None:
        self.peer = peer

    def connectionMade(self) -> None:
        self.peer.factory.upstreams.add(self)
        self.peer.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:
        if self.peer.forwarding:
            assert self.peer.transport is not None
            self.peer.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.peer.factory.upstreams.discard(self)
        self.peer.upstream_lost()


class _UpstreamFactory(ClientFactory):
    noisy = False

    def __init__(self, peer: _Downstream) -> None:
        self.peer = peer

    def buildProtocol(self, addr: Any) -> _Upstream:
        return _Upstream(self.peer)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.peer.upstream_lost()


class _Downstream(Protocol):
    """One client (agent) connection to the proxy."""

    factory: FaultProxy

    def __init__(self) -> None:
        self.forwarding = False
        self.upstream: _Upstream | None = None
        self.connector: Any = None
        self._answer: bytes | None = None
        self._pending: list[bytes] = []
        self._closed = False

    def connectionMade(self) -> None:
        proxy = self.factory
        proxy._opened(self)
        if proxy.mode == "reset":
            self.reset()
        elif proxy.mode in ("blackhole", "garbage"):
            # Accepted and read; never answered, or answered with garbage.
            self.forwarding = False
            self._answer = proxy.garbage if proxy.mode == "garbage" else None
        else:
            self.forwarding = True
            self.connector = proxy.reactor.connectTCP(
                proxy.target_host, proxy.target_port, _UpstreamFactory(self), timeout=5
            )

    def upstream_ready(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        if self._closed:
            self._abort_upstream()
            return
        for chunk in self._pending:
            if self.forwarding:
                assert upstream.transport is not None
                upstream.transport.write(chunk)
        self._pending = []

    def upstream_lost(self) -> None:
        self.upstream = None
        # A black-holed connection stays up: the agent must find out by itself.
        if self.forwarding and not self._closed and self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if not self.forwarding:
            answer, self._answer = self._answer, None
            if answer is not None and self.transport is not None:
                self.transport.write(answer)
            return
        if self.upstream is None or self.upstream.transport is None:
            self._pending.append(data)
        else:
            self.upstream.transport.write(data)

    def blackhole(self) -> None:
        """Stop forwarding in both directions, for good (the byte streams are cut)."""
        self.forwarding = False
        self._pending = []

    def reset(self) -> None:
        """RST both sides."""
        transport: Any = self.transport
        if transport is not None and not self._closed:
            transport.abortConnection()
        self._abort_upstream()

    def _abort_upstream(self) -> None:
        connector = self.connector
        if self.upstream is None and connector is not None and connector.state == "connecting":
            connector.stopConnecting()
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            transport: Any = upstream.transport
            transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self.factory._closed(self)
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.loseConnection()


class FaultProxy(Factory):
    """
    A TCP proxy on 127.0.0.1 in front of ``target_port``, switchable between
    modes (:meth:`set_mode`):

    ``pass``
        forward both ways.
    ``blackhole``
        new connections are accepted and read, nothing is forwarded and
        nothing answered; open connections stop forwarding (for good).
    ``reset``
        open connections get a RST on both sides; new ones are accepted and
        reset at once.
    ``garbage``
        new connections are answered with :attr:`garbage` (once, when the
        client first writes) instead of the control plane's answer; open
        connections are not touched.

    :meth:`stop_listening` makes connection attempts refused; :meth:`listen`
    binds the same port again.  ``open_connections``/``max_open`` count
    client connections (what the proxy saw of the agent).
    """

    protocol = _Downstream
    noisy = False

    def __init__(
        self, target_port: int, target_host: str = "127.0.0.1", reactor: Any = None
    ) -> None:
        self.reactor = reactor if reactor is not None else _reactor()
        self.target_host = target_host
        self.target_port = target_port
        self.mode = "pass"
        #: What ``garbage`` mode answers: a status line that is not UTF-8.
        self.garbage = b"HTTP/1.1 101 \xff\xfe\x80\r\nUpgrade: websocket\r\n\r\n"
        self.port: int | None = None
        self._listening: Any = None
        self.connections: set[_Downstream] = set()
        self.upstreams: set[_Upstream] = set()
        self.accepted = 0
        self.max_open = 0

    @property
    def open_connections(self) -> int:
        """Client connections open right now."""
        return len(self.connections)

    def listen(self, port: int = 0) -> int:
        """Listen on 127.0.0.1 (the port used before, when given); return the port."""
        if self._listening is None:
            self._listening = self.reactor.listenTCP(
                port or self.port or 0, self, interface="127.0.0.1"
            )
            self.port = int(self._listening.getHost().port)
        assert self.port is not None
        return self.port

    def stop_listening(self) -> Deferred[None]:
        """Stop accepting (attempts are refused); open connections are not touched."""
        listening, self._listening = self._listening, None
        if listening is None:
            return defer.succeed(None)
        return defer.maybeDeferred(listening.stopListening)

    def set_mode(self, mode: str) -> None:
        """Switch to ``pass``, ``blackhole``, ``reset`` or ``garbage`` (see the class docstring)."""
        if mode not in ("pass", "blackhole", "reset", "garbage"):
            raise ValueError(f"unknown proxy mode {mode!r}")
        self.mode = mode
        for connection in list(self.connections):
            if mode == "blackhole":
                connection.blackhole()
            elif mode == "reset":
                connection.reset()

    def reset_all(self) -> None:
        """RST every open connection, whatever the mode."""
        for connection in list(self.connections):
            connection.reset()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop listening, reset everything and wait (bounded) until all is closed."""
        await self.stop_listening()
        self.reset_all()
        deadline = time.monotonic() + timeout
        while (self.connections or self.upstreams) and time.monotonic() < deadline:
            await sleep(0.01)
        for upstream in list(self.upstreams):
            if upstream.transport is not None:
                transport: Any = upstream.transport
                transport.abortConnection()
        # abortConnection delivers connectionLost on the next reactor turn.
        await sleep(0.01)

    def _opened(self, connection: _Downstream) -> None:
        self.connections.add(connection)
        self.accepted += 1
        self.max_open = max(self.max_open, len(self.connections))

    def _closed(self, connection: _Downstream) -> None:
        self.connections.discard(connection)


# -- processes -----------------------------------------------------------------------


@dataclass(frozen=True)
class LineMatch:
    """An output line and the harness's monotonic time of its arrival."""

    at: float
    line: str
    index: int


_LIVE: set[ManagedProcess] = set()


def kill_all() -> None:
    """SIGKILL every process group still alive (safe from shutdown triggers and atexit)."""
    for process in list(_LIVE):
        process.kill()


atexit.register(kill_all)


def reap_all(timeout: float = 5.0) -> Deferred[None]:
    """SIGKILL every live process group and fire once all are reaped (or after ``timeout``)."""
    live = list(_LIVE)
    kill_all()
    waits = [p.ended for p in live]
    if not waits:
        return defer.succeed(None)
    gathered: Deferred[Any] = defer.DeferredList(waits, consumeErrors=True)
    return gathered.addTimeout(timeout, _reactor()).addBoth(lambda _: None)


class ManagedProcess(ProcessProtocol):
    """
    A child process in its own process group, its output kept as lines.

    :ivar lines: ``(arrival time, text)`` of every stdout/stderr line.
    :ivar ended: fires with the exit reason once the process is reaped.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[tuple[float, str]] = []
        self.ended: Deferred[Any] = Deferred()
        self.exit_reason: Any = None
        self.pid: int | None = None
        self._buffers = {1: b"", 2: b""}
        self._waiters: list[tuple[re.Pattern[str], int, Deferred[LineMatch], Any]] = []

    # -- lifecycle -------------------------------------------------------------------

    def spawn(self, args: Sequence[str], env: dict[str, str], cwd: str = REPO_ROOT) -> None:
        """Start ``args`` (``args[0]`` a path) in a new session and process group."""
        # setsid(1) execs in place (the child is not a group leader), so the
        # pid is the program's and the process group id is the pid.
        argv = ["setsid", *args] if os.path.exists("/usr/bin/setsid") else list(args)
        executable = "/usr/bin/setsid" if argv[0] == "setsid" else argv[0]
        transport = _reactor().spawnProcess(self, executable, argv, env=env, path=cwd)
        self.pid = transport.pid
        _LIVE.add(self)

    @property
    def running(self) -> bool:
        """Whether the process has not been reaped yet."""
        return self.exit_reason is None and self.pid is not None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group."""
        if self.running and self.pid is not None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the group (after SIGCONT would not matter: KILL works on stopped ones)."""
        self.signal(signal.SIGKILL)

    def terminate(self, grace: float = 5.0) -> Deferred[Any]:
        """SIGTERM (SIGCONT first, in case it is frozen), SIGKILL after ``grace``; fire reaped."""
        if not self.running:
            return defer.succeed(self.exit_reason)
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        killer = _reactor().callLater(grace, self.kill)
        d: Deferred[Any] = Deferred()

        def reaped(reason: Any) -> Any:
            if killer.active():
                killer.cancel()
            d.callback(reason)
            return reason

        self.ended.addBoth(reaped)
        return d

    def reap(self, grace: float = 5.0) -> Deferred[Any]:
        """Kill the group at once and fire when reaped (for cleanups)."""
        if not self.running:
            return defer.succeed(self.exit_reason)
        self.kill()
        return self.terminate(grace)

    # -- output ----------------------------------------------------------------------

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        now = time.monotonic()
        buffered = self._buffers.get(childFD, b"") + data
        *complete, rest = buffered.split(b"\n")
        self._buffers[childFD] = rest
        for raw in complete:
            self._add_line(now, raw.decode("utf-8", "replace"))

    def _add_line(self, now: float, text: str) -> None:
        index = len(self.lines)
        self.lines.append((now, text))
        for waiter in list(self._waiters):
            pattern, since, d, timer = waiter
            if index >= since and pattern.search(text):
                self._waiters.remove(waiter)
                if timer.active():
                    timer.cancel()
                d.callback(LineMatch(now, text, index))

    def processEnded(self, reason: Failure) -> None:
        now = time.monotonic()
        for fd, rest in self._buffers.items():
            if rest:
                self._add_line(now, rest.decode("utf-8", "replace"))
                self._buffers[fd] = b""
        self.exit_reason = reason.value
        _LIVE.discard(self)
        for waiter in list(self._waiters):
            pattern, _, d, timer = waiter
            self._waiters.remove(waiter)
            if timer.active():
                timer.cancel()
            d.errback(
                FaultTimeoutError(f"{self.name} ended ({reason.value}) before {pattern.pattern!r}")
            )
        self.ended.callback(reason.value)

    def mark(self) -> int:
        """The index of the next line (for :meth:`wait_for`'s ``since``)."""
        return len(self.lines)

    def find(self, pattern: str, since: int = 0) -> LineMatch | None:
        """The first line from ``since`` on matching ``pattern``, if any."""
        compiled = re.compile(pattern)
        for index in range(since, len(self.lines)):
            at, text = self.lines[index]
            if compiled.search(text):
                return LineMatch(at, text, index)
        return None

    def wait_for(self, pattern: str, *, since: int = 0, timeout: float) -> Deferred[LineMatch]:
        """
        Fire with the first line from index ``since`` on that matches
        ``pattern``; fail with :class:`FaultTimeoutError` after ``timeout`` seconds
        or if the process ends first.
        """
        found = self.find(pattern, since)
        if found is not None:
            return defer.succeed(found)
        if not self.running:
            return defer.fail(FaultTimeoutError(f"{self.name} is not running ({pattern!r})"))
        d: Deferred[LineMatch] = Deferred()
        compiled = re.compile(pattern)

        def expire() -> None:
            for waiter in list(self._waiters):
                if waiter[2] is d:
                    self._waiters.remove(waiter)
            d.errback(
                FaultTimeoutError(
                    f"{self.name}: no line matching {pattern!r} within {timeout:g}s; "
                    f"last lines:\n{self.tail()}"
                )
            )

        timer = _reactor().callLater(timeout, expire)
        self._waiters.append((compiled, since, d, timer))
        return d

    def tail(self, count: int = 15) -> str:
        """The last ``count`` output lines."""
        return "\n".join(f"    {text}" for _, text in self.lines[-count:])

    def text(self, since: int = 0) -> str:
        """All output from line ``since`` on."""
        return "\n".join(text for _, text in self.lines[since:])


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_SCRUBBED_PREFIXES) and k.lower() not in _SCRUBBED
    }
    env["PYTHONUNBUFFERED"] = "1"
    # The checkout first, so the benchmarks package and the tree under test load.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p
    )
    env.update(extra or {})
    return env


def _twistd() -> str:
    path = os.path.join(_BIN, "twistd")
    return path if os.path.exists(path) else "twistd"


def agent_args(
    url: str,
    identity: Identity,
    *,
    reconnect_min: str = "100ms",
    reconnect_max: str = "2s",
    ping_interval: str = "5s",
    pong_timeout: str = "1s",
    handshake_timeout: str = "2s",
    hello_timeout: str = "2s",
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``hostlink`` subcommand and its options for ``twistd``."""
    return [
        "hostlink",
        "--enable",
        "--url", url,
        "--state-path", identity.state_path,
        "--private-key-path", identity.key_path,
        "--reconnect-min", reconnect_min,
        "--reconnect-max", reconnect_max,
        "--ping-interval", ping_interval,
        "--pong-timeout", pong_timeout,
        "--handshake-timeout", handshake_timeout,
        "--hello-timeout", hello_timeout,
        *extra,
    ]


def spawn_agent(
    hostlink_args: Sequence[str], *, name: str = "agent", hosts_file: str | None = None
) -> ManagedProcess:
    """
    ``twistd -n hostlink …`` as a real process (see :func:`agent_args`).
    With ``hosts_file``, the same twistd runs under :class:`ChaosResolver`
    (``python -m evidence.faults resolver-twistd``).
    """
    twistd_args = ["-n", "--pidfile=", "--logfile=-", *hostlink_args]
    if hosts_file is None:
        args = [_twistd(), *twistd_args]
    else:
        args = [
            sys.executable, "-m", "evidence.faults", "resolver-twistd", hosts_file, "--",
            *twistd_args,
        ]
    process = ManagedProcess(name)
    process.spawn(args, _child_env())
    return process


def spawn_control_plane(
    listen: str,
    agents_file: str,
    *,
    name: str = "control-plane",
    extra: Sequence[str] = (),
    operator_listen: str = "none",
    launcher: Sequence[str] = (),
) -> ManagedProcess:
    """
    ``twistd -n hostlink-controlplane --listen … --agents …`` as a real process
    (``operator_listen``: its ``/status`` endpoint, off by default so that
    harnesses side by side do not compete for the default port 8081).
    ``launcher``: a command that takes twistd's arguments and runs twistd
    itself (``python -m evidence.taskfaults cp-twistd --``), instead of the
    ``twistd`` script.
    """
    args = [
        *(launcher or [_twistd()]), "-n", "--pidfile=", "--logfile=-", "hostlink-controlplane",
        "--listen", listen, "--agents", agents_file, "--operator-listen", operator_listen,
        *extra,
    ]
    process = ManagedProcess(name)
    process.spawn(args, _child_env())
    return process


# -- counting the agent's connections ------------------------------------------------


def count_connections(pid: int, ports: Iterable[int]) -> int:
    """
    How many TCP connections process ``pid`` holds to 127.0.0.1-side ``ports``
    (ESTABLISHED, SYN_SENT or CLOSE_WAIT), from ``/proc``: its socket fds
    matched against its network namespace's TCP tables.
    """
    return len(held_connections(pid, ports))


def held_connections(pid: int, ports: Iterable[int]) -> list[str]:
    """The connections :func:`count_connections` counts, as ``local -> remote STATE``."""
    wanted = set(ports)
    inodes: set[str] = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return []
    for name in names:
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    rows: list[list[str]] = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}", encoding="ascii") as f:
                rows += [row.split() for row in f.read().splitlines()[1:]]
        except OSError:
            continue
    mine = [fields for fields in rows if len(fields) >= 10 and fields[9] in inodes]
    # Connections *to* the agent (its status page) are not connections to
    # the control plane, even if a client's ephemeral port happens to equal
    # a watched one (a proxy that stopped listening frees its port).
    listening = {int(f[1].rsplit(":", 1)[1], 16) for f in mine if f[3] == _LISTEN}
    held: list[str] = []
    seen: set[str] = set()
    for fields in mine:
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        # The kernel prints these tables in chunks; a table that changes
        # between two chunks can list the same socket twice.
        if local_port in listening or fields[9] in seen:
            continue
        seen.add(fields[9])
        if fields[3] in _HELD_STATES and remote_port in wanted:
                held.append(
                    f"{_address(fields[1])} -> {_address(fields[2])} "
                    f"{_HELD_STATES[fields[3]]} inode={fields[9]}"
                )
    return held


def _address(hex_address: str) -> str:
    host, port = hex_address.rsplit(":", 1)
    if len(host) == 8:
        text = socket.inet_ntop(socket.AF_INET, bytes.fromhex(host)[::-1])
    else:
        text = host
    return f"{text}:{int(port, 16)}"


class ConnectionWatch:
    """
    Samples :func:`count_connections` every ``interval`` seconds and keeps
    the maximum, plus when it was above one (what "never holds two
    connections" is checked against).
    """

    def __init__(self, pid: int, ports: Iterable[int], interval: float = 0.02) -> None:
        self.pid = pid
        self.ports = set(ports)
        self.max = 0
        self.samples = 0
        self.over: list[tuple[float, int]] = []
        #: The connections of each sample above one.
        self.details: list[list[str]] = []
        self._loop = LoopingCall(self.sample)
        self._loop.clock = _reactor()
        self.interval = interval

    def start(self) -> ConnectionWatch:
        """Start sampling (now and then every interval)."""
        self._loop.start(self.interval, now=True)
        return self

    def sample(self) -> None:
        """One sample."""
        held = held_connections(self.pid, self.ports)
        count = len(held)
        self.samples += 1
        if count > self.max:
            self.max = count
        if count > 1:
            self.over.append((time.monotonic(), count))
            self.details.append(held)

    def stop(self) -> None:
        """Stop sampling (idempotent)."""
        if self._loop.running:
            self._loop.stop()


# -- the .invalid resolver -----------------------------------------------------------


def _is_invalid_name(name: object) -> bool:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    if not isinstance(name, str):
        return False
    name = name.lower().rstrip(".")
    return name == "invalid" or name.endswith(".invalid")


@implementer(IResolverSimple)
class ChaosResolver:
    """
    A reactor resolver for the host-name faults.

    ``.invalid`` names resolve only when ``hosts_file`` (JSON: name -> IPv4
    address, re-read on every lookup) maps them; otherwise they fail at once
    with ``DNSLookupError``, locally, as RFC 6761 says they must.  A name
    mapped to ``"stall"`` never gets an answer (a hung resolver).  Every
    other name goes to ``fallback`` (the reactor's own resolver).
    """

    def __init__(self, hosts_file: str, fallback: Any) -> None:
        self.hosts_file = hosts_file
        self.fallback = fallback

    def _mapping(self) -> dict[str, str]:
        try:
            with open(self.hosts_file, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return {str(k).lower(): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def getHostByName(self, name: str, timeout: Sequence[int] = ()) -> Deferred[str]:
        """Resolve ``name`` (see the class docstring)."""
        address = self._mapping().get(name.lower().rstrip("."))
        if address == "stall":
            # No answer, ever: only the client's own deadline ends the attempt.
            return Deferred()
        if address is not None:
            return defer.succeed(address)
        if _is_invalid_name(name):
            return defer.fail(
                DNSLookupError(f"{name}: .invalid names never resolve (answered locally)")
            )
        result: Deferred[str] = self.fallback.getHostByName(name, timeout)
        return result


def install_resolver_tripwire(reactor: Any = None) -> None:
    """
    Make this process's system resolver refuse, loudly (``CHAOS-RESOLVER-LEAK``
    on stderr), any ``.invalid`` lookup: the ``socket`` module's functions
    and, when ``reactor`` is given, the ``getaddrinfo`` its stock
    ``GAIResolver`` bound when Twisted was imported (a private attribute:
    this is a test harness, and the check is that the wire is really there).
    """

    def guard(real: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
            if _is_invalid_name(host):
                sys.stderr.write(f"CHAOS-RESOLVER-LEAK {real.__name__}({host!r})\n")
                sys.stderr.flush()
                raise socket.gaierror(socket.EAI_NONAME, "blocked by the chaos harness")
            return real(host, *args, **kwargs)

        return guarded

    if getattr(socket.getaddrinfo, "_chaos_tripwire", False):
        guarded_getaddrinfo = socket.getaddrinfo
    else:
        guarded_getaddrinfo = guard(socket.getaddrinfo)
        guarded_getaddrinfo._chaos_tripwire = True  # type: ignore[attr-defined]
        socket.getaddrinfo = guarded_getaddrinfo
        socket.gethostbyname = guard(socket.gethostbyname)
        socket.gethostbyname_ex = guard(socket.gethostbyname_ex)
    name_resolver = getattr(reactor, "nameResolver", None) if reactor is not None else None
    if name_resolver is not None and hasattr(name_resolver, "_getaddrinfo"):
        name_resolver._getaddrinfo = guarded_getaddrinfo


def _resolver_twistd(argv: list[str]) -> None:
    """``resolver-twistd HOSTS.json -- twistd-args…``: twistd under :class:`ChaosResolver`."""
    if len(argv) < 2 or argv[1] != "--":
        raise SystemExit("usage: python -m evidence.faults resolver-twistd HOSTS.json -- ARGS")
    hosts_file, twistd_args = argv[0], argv[2:]
    from twisted.internet import reactor

    reactor_any: Any = reactor
    install_resolver_tripwire(reactor_any)
    reactor_any.installResolver(ChaosResolver(hosts_file, reactor_any.resolver))
    print(f"chaos resolver installed (hosts file {hosts_file})", flush=True)
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *twistd_args]
    run()  # type: ignore[no-untyped-call]


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m evidence.faults`` (the agent-side launcher)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["resolver-twistd"]:
        _resolver_twistd(args[1:])
    else:
        raise SystemExit("usage: python -m evidence.faults resolver-twistd HOSTS.json -- ARGS")


if __name__ == "__main__":
    main()
