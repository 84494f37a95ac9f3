"""
The quick chaos faults (``make chaos`` runs them all): a real ``twistd -n
hostlink`` process against the reference control plane on 127.0.0.1, with
the harness of :mod:`evidence.faults` and the scenarios of
:mod:`evidence.chaos`.  Plus the harness's own checks, so a broken
connection counter or proxy cannot make the faults pass vacuously.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost, ProcessTerminated
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from evidence.chaos import QUICK_FAULTS, ChaosConfig, FaultResult, run_fault
from evidence.faults import (
    FaultProxy,
    FaultTimeoutError,
    ManagedProcess,
    count_connections,
    reap_all,
    sleep,
)

# Short holds keep the four faults around 20 s together; the bounds are the
# same as make chaos's (they follow from the agent's settings, not the hold).
QUICK = ChaosConfig(hold=1.0, slack=1.5)

# Connections are counted from /proc (Linux); elsewhere the check would pass
# without looking.
NO_PROC = None if os.path.exists("/proc/self/net/tcp") else "needs Linux /proc/<pid>/net/tcp"


class CountConnectionsTests(SynchronousTestCase):
    """The /proc counter behind "never holds two connections" does count."""

    skip = NO_PROC

    def test_counts_each_established_connection(self) -> None:
        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        self.assertEqual(count_connections(os.getpid(), {port}), 0)
        clients = []
        for _ in range(2):
            client = socket.create_connection(("127.0.0.1", port))
            self.addCleanup(client.close)
            clients.append(client)
        self.assertEqual(count_connections(os.getpid(), {port}), 2)
        self.assertEqual(count_connections(os.getpid(), {port + 1 if port < 65535 else 1}), 0)
        clients[0].close()
        self.assertEqual(count_connections(os.getpid(), {port}), 1)

    def test_connections_to_own_listening_port_are_not_counted(self) -> None:
        """
        A client of the agent's status page whose ephemeral port equals a
        watched port is not a connection of the agent to the control plane.
        """
        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        client = socket.socket()
        self.addCleanup(client.close)
        client.bind(("127.0.0.1", 0))
        watched = client.getsockname()[1]
        client.connect(server.getsockname())
        accepted, _ = server.accept()
        self.addCleanup(accepted.close)
        self.assertEqual(count_connections(os.getpid(), {watched}), 0)
        self.assertEqual(count_connections(os.getpid(), {server.getsockname()[1]}), 1)

    def test_dead_process_counts_nothing(self) -> None:
        self.assertEqual(count_connections(2**22 + 12345, {80}), 0)


class FreePortTests(SynchronousTestCase):
    """Ports the harnesses restart servers on stay out of the kernel's ephemeral range."""

    def test_outside_the_ephemeral_range_and_free(self) -> None:
        from evidence.faults import _ephemeral_ports, free_port

        ephemeral = _ephemeral_ports()
        for _ in range(20):
            port = free_port()
            self.assertNotIn(port, ephemeral)
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))  # really free


class ManagedProcessTests(TestCase):
    """Processes: output lines with arrival times, bounded waits, group kill even when frozen."""

    timeout = 20

    def test_lines_waits_and_kill_while_stopped(self) -> Deferred[None]:
        async def scenario() -> None:
            process = ManagedProcess("sh")
            process.spawn(["/bin/sh", "-c", "echo one; echo two; exec sleep 30"], dict(os.environ))
            self.addCleanup(reap_all)
            two = await process.wait_for("^two$", timeout=10)
            self.assertEqual((two.index, two.line), (1, "two"))
            self.assertEqual(process.find("one").index, 0)  # type: ignore[union-attr]
            with self.assertRaises(FaultTimeoutError):
                await process.wait_for("never", since=process.mark(), timeout=0.2)
            process.signal(signal.SIGSTOP)
            await reap_all()
            self.assertFalse(process.running)
            self.assertIsInstance(process.exit_reason, ProcessTerminated)
            self.assertEqual(process.exit_reason.signal, signal.SIGKILL)

        return Deferred.fromCoroutine(scenario())


class ResolverTripwireTests(TestCase):
    """The wire behind "no lookup of a .invalid name leaves the machine" is really there."""

    timeout = 20

    def test_system_lookups_of_invalid_names_are_refused_and_reported(self) -> Deferred[None]:
        # Every real resolver entry point is first replaced by a sentinel, so
        # a tripwire with a hole says REAL-LOOKUP instead of asking the
        # machine's name server.
        script = (
            "import socket\n"
            "def sentinel(host, *args, **kwargs):\n"
            "    print('REAL-LOOKUP', host, flush=True)\n"
            "    raise socket.gaierror(socket.EAI_NONAME, 'sentinel')\n"
            "socket.getaddrinfo = socket.gethostbyname = socket.gethostbyname_ex = sentinel\n"
            "from twisted.internet import reactor\n"
            "reactor.nameResolver._getaddrinfo = sentinel\n"
            "from evidence.faults import install_resolver_tripwire\n"
            "install_resolver_tripwire(reactor)\n"
            "try:\n"
            "    socket.getaddrinfo('hostlink.invalid', 80)\n"
            "except socket.gaierror:\n"
            "    print('socket refused', flush=True)\n"
            "d = reactor.resolve('hostlink.invalid')\n"
            "d.addBoth(lambda r: print('reactor:', type(getattr(r, 'value', r)).__name__, "
            "flush=True))\n"
            "d.addBoth(lambda _: reactor.stop())\n"
            "reactor.run()\n"
        )

        async def scenario() -> None:
            process = ManagedProcess("tripwire")
            env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
            process.spawn([sys.executable, "-c", script], env)
            self.addCleanup(reap_all)
            await process.wait_for("^socket refused$", timeout=10)
            await process.wait_for("^reactor: DNSLookupError$", timeout=10)
            await process.ended
            leaks = [text for _, text in process.lines if "CHAOS-RESOLVER-LEAK" in text]
            # One from each path: the socket module and the reactor's resolver.
            self.assertEqual(len(leaks), 2, process.text())
            self.assertNotIn("REAL-LOOKUP", process.text())

        return Deferred.fromCoroutine(scenario())


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class _Client(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.made: Deferred[None] = Deferred()
        # Fires with None (a Failure passed to callback() would errback).
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)


class _OneClient(ClientFactory):
    def __init__(self, client: _Client) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> _Client:
        return self.client

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.client.made.errback(reason)


class FaultProxyTests(TestCase):
    """The proxy passes, black-holes and resets as the faults need."""

    timeout = 20

    async def _setup(self) -> FaultProxy:
        echo = Factory.forProtocol(_Echo)
        listening = reactor.listenTCP(0, echo, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        proxy = FaultProxy(listening.getHost().port)
        proxy.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.stop()))
        return proxy

    async def _connect(self, proxy: FaultProxy) -> _Client:
        client = _Client()
        assert proxy.port is not None
        reactor.connectTCP("127.0.0.1", proxy.port, _OneClient(client))
        await client.made

        async def close() -> None:
            if not client.lost.called:
                assert client.transport is not None
                client.transport.loseConnection()
                await client.lost

        self.addCleanup(lambda: Deferred.fromCoroutine(close()))
        return client

    async def _echoed(self, client: _Client, data: bytes, wait: float = 1.0) -> bytes:
        assert client.transport is not None
        client.transport.write(data)
        for _ in range(int(wait / 0.02)):
            if client.received.endswith(data):
                break
            await sleep(0.02)
        return client.received

    def test_pass_then_blackhole_then_pass(self) -> Deferred[None]:
        async def scenario() -> None:
            proxy = await self._setup()
            old = await self._connect(proxy)
            self.assertEqual(await self._echoed(old, b"one"), b"one")
            proxy.set_mode("blackhole")
            self.assertEqual(await self._echoed(old, b"two", wait=0.3), b"one")
            fresh = await self._connect(proxy)
            self.assertEqual(await self._echoed(fresh, b"three", wait=0.3), b"")
            self.assertFalse(old.lost.called or fresh.lost.called)
            proxy.set_mode("pass")
            # A black-holed stream stays cut; new connections pass again.
            self.assertEqual(await self._echoed(old, b"four", wait=0.3), b"one")
            new = await self._connect(proxy)
            self.assertEqual(await self._echoed(new, b"five"), b"five")
            self.assertEqual(proxy.max_open, 3)

        return Deferred.fromCoroutine(scenario())

    def test_reset_aborts_open_and_new_connections(self) -> Deferred[None]:
        async def scenario() -> None:
            proxy = await self._setup()
            old = await self._connect(proxy)
            self.assertEqual(await self._echoed(old, b"x"), b"x")
            proxy.set_mode("reset")
            await old.lost
            assert old.reason is not None
            self.assertIsInstance(old.reason.value, ConnectionLost)
            fresh = _Client()
            assert proxy.port is not None
            reactor.connectTCP("127.0.0.1", proxy.port, _OneClient(fresh))
            await fresh.made
            await fresh.lost
            assert fresh.reason is not None
            self.assertIsInstance(fresh.reason.value, ConnectionLost)

        return Deferred.fromCoroutine(scenario())

    def test_garbage_answers_new_connections_only(self) -> Deferred[None]:
        async def scenario() -> None:
            proxy = await self._setup()
            old = await self._connect(proxy)
            proxy.garbage = b"junk"
            proxy.set_mode("garbage")
            self.assertEqual(await self._echoed(old, b"still"), b"still")
            fresh = await self._connect(proxy)
            self.assertEqual(await self._echoed(fresh, b"hello", wait=0.3), b"junk")
            self.assertEqual(await self._echoed(fresh, b"more", wait=0.2), b"junk")

        return Deferred.fromCoroutine(scenario())

    def test_stop_listening_refuses(self) -> Deferred[None]:
        async def scenario() -> None:
            proxy = await self._setup()
            port = proxy.port
            await proxy.stop_listening()
            client = _Client()
            assert port is not None
            reactor.connectTCP("127.0.0.1", port, _OneClient(client))
            with self.assertRaises(Exception) as caught:
                await client.made
            self.assertIn("refused", str(caught.exception).lower())
            self.assertEqual(proxy.listen(), port)

        return Deferred.fromCoroutine(scenario())


class QuickChaosTests(TestCase):
    """
    Each quick fault against a real agent process: never exits, never two
    connections, the cause in one line, active again within the bound.
    """

    timeout = 90
    skip = NO_PROC

    def _fault(self, name: str) -> Deferred[None]:
        scenario, kind = QUICK_FAULTS[name]
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        # run_fault tears down what it started; this is the backstop if the
        # test itself is cut short (trial's timeout).
        self.addCleanup(reap_all)

        async def run() -> None:
            result: FaultResult = await run_fault(name, scenario, kind, QUICK, workdir)
            self.assertTrue(result.ok, result.describe())
            self.assertIsNotNone(result.detected)
            self.assertIsNotNone(result.recovered)
            self.assertLessEqual(result.max_connections, 1)

        return Deferred.fromCoroutine(run())

    def test_control_plane_killed_and_restarted(self) -> Deferred[None]:
        return self._fault("control plane SIGKILL + restart")

    def test_refused_401_then_allowed(self) -> Deferred[None]:
        return self._fault("upgrade refused 401")

    def test_connection_refused(self) -> Deferred[None]:
        return self._fault("connection refused")

    def test_blackhole_detected_by_pong_timeout(self) -> Deferred[None]:
        return self._fault("proxy black-hole")
