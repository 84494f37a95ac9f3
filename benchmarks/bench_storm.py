"""
Fleet reconnect storm: N agents in one process against one control plane
that (run 1) drops every session at once and keeps listening, and (run 2)
is down for a while, then listens again.

Three reconnect strategies are compared, each in a fresh fleet process:

``rcf``
    Twisted's stock ``ReconnectingClientFactory`` delay sequence (26.10):
    initialDelay 1.0, factor *e*, Gaussian jitter of 0.119626565582 × delay
    stored back into the delay (so it compounds), maxDelay 3600 — emulated
    by :class:`StockRCFBackoff`, injected into the client's factory here;
    the package never uses it.
``go``
    the default: the Go agent's doubling from ``RECONNECT_MIN`` with ±25 %
    uniform jitter.
``full``
    ``HOSTLINK_WS_RECONNECT_JITTER=full``: uniform in ``[0, delay]``.

Processes: ``benchmarks.run`` calls :func:`run_storm`, which starts
``python -m benchmarks.bench_storm fleet …`` (the agents, many
``HostlinkClient`` on one reactor), which starts
``python -m benchmarks.bench_storm_cp`` (the control plane), so the agents'
CPU is measured on its own.  All of it on 127.0.0.1; every wait is bounded.

Agents need distinct ids and keys the control plane knows: a handful of RSA
keys is generated and shared among the agents (ids ``bench-00000``…).  Each
connection attempt signs once (RSA-PSS, 2048 bits), which is what bounds a
single process's reconnect rate; :func:`signing_cost` measures it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred

from benchmarks.bench_support import (
    ChildProcess,
    global_reactor,
    quiet_logging,
    raise_nofile_limit,
    sleep,
)

__all__ = [
    "RCF_FACTOR",
    "RCF_INITIAL_DELAY",
    "RCF_JITTER",
    "RCF_MAX_DELAY",
    "STRATEGIES",
    "PhaseResult",
    "StockRCFBackoff",
    "StormResult",
    "arrivals_per_bin",
    "jitter_window",
    "main",
    "recovery_bound",
    "run_storm",
    "signing_cost",
]

#: The strategies, in the order they are reported.
STRATEGIES = ("rcf", "go", "full")

# twisted.internet.protocol.ReconnectingClientFactory (Twisted 26.10) defaults.
RCF_INITIAL_DELAY = 1.0
RCF_FACTOR = 2.7182818284590451  # math.e, as Twisted spells it
RCF_JITTER = 0.119626565582
RCF_MAX_DELAY = 3600.0

#: Width of one arrival bin, seconds.
BIN = 0.1


class _BackoffLike:
    """What ``HostlinkClientFactory`` asks of its backoff (see hostlink_tw.backoff.Backoff)."""

    minimum: float
    maximum: float
    jitter: str
    failures: int


class StockRCFBackoff(_BackoffLike):
    """
    The delays Twisted's stock ``ReconnectingClientFactory.retry`` produces,
    step for step (Twisted 26.10)::

        delay = normalvariate(delay, delay * jitter)   # stored back: compounds
        wait delay
        delay = min(delay * factor, maxDelay)          # the jittered value grows

    and ``resetDelay`` puts ``delay`` back to ``initialDelay``.  The only
    departure: a (vanishingly rare) negative draw waits 0, where the stock
    class would hand a negative delay to ``callLater``.

    Benchmark only: it shows what the stock class would do to a fleet.
    """

    def __init__(self, rng: random.Random) -> None:
        self.minimum = RCF_INITIAL_DELAY
        self.maximum = RCF_MAX_DELAY
        self.jitter = "rcf"
        self.failures = 0
        self.delay = RCF_INITIAL_DELAY
        self._rng = rng

    @property
    def upper_bound(self) -> float:
        """Unbounded in principle (the jitter compounds); reported as the cap."""
        return self.maximum

    def next_delay(self) -> float:
        """Record a failure; the wait before the next attempt."""
        self.failures += 1
        self.delay = self._rng.normalvariate(self.delay, self.delay * RCF_JITTER)
        wait = self.delay
        self.delay = min(self.delay * RCF_FACTOR, self.maximum)
        return max(wait, 0.0)

    def peek_base(self) -> float:
        """The delay the next draw is centred on."""
        return self.delay

    def reset(self) -> None:
        """``resetDelay``: back to ``initialDelay``."""
        self.failures = 0
        self.delay = RCF_INITIAL_DELAY


def jitter_window(strategy: str, reconnect_min: float) -> float:
    """
    Seconds over which the first retries of a fleet dropped at once spread:
    ``go`` ``[0.75, 1.25] × min``, ``full`` ``[0, 1] × min``; ``rcf`` the
    central 95.4 % (± 2 σ) of its normal distribution around 1 s.
    """
    if strategy == "go":
        return 0.5 * reconnect_min
    if strategy == "full":
        return reconnect_min
    if strategy == "rcf":
        return 4 * RCF_JITTER * RCF_INITIAL_DELAY
    raise ValueError(f"unknown strategy {strategy!r}")


def recovery_bound(reconnect_min: float) -> float:
    """The target: all agents active again within 1.25 × RECONNECT_MIN + 3 s of the drop."""
    return 1.25 * reconnect_min + 3.0


def arrivals_per_bin(times: Sequence[float], width: float = BIN) -> list[int]:
    """Counts of ``times`` (seconds from the event, ≥ 0) in consecutive bins of ``width``."""
    valid = [t for t in times if t >= 0]
    if not valid:
        return []
    counts = [0] * (int(max(valid) / width) + 1)
    for t in valid:
        counts[int(t / width)] += 1
    return counts


@dataclass
class PhaseResult:
    """One storm (drop or outage) as seen by the fleet and the control plane."""

    name: str
    #: ``time.time()`` of the drop (run 1) or of the control plane's return (run 2).
    origin: float
    agents: int
    #: Seconds from the origin until every agent was active again (None: not all were).
    recovery: float | None
    still_inactive: int
    #: Upgrades the control plane accepted, seconds from the origin.
    accepted: list[float]
    #: Connection attempts the agents started, seconds from the origin.
    attempts: list[float]
    #: Sessions that became active, seconds from the origin.
    active: list[float]
    #: The first retry delay each agent drew after losing its session.
    first_delays: list[float]
    refused: dict[str, int]
    fleet_cpu: float
    control_plane_cpu: float
    #: For an outage: seconds it lasted (origin is the return).
    down_for: float = 0.0

    @property
    def arrivals(self) -> list[int]:
        """Accepted upgrades per 100 ms from the origin."""
        return arrivals_per_bin(self.accepted)

    @property
    def peak(self) -> int:
        """The most upgrades accepted in one 100 ms bin."""
        return max(self.arrivals, default=0)

    @property
    def failed_attempts(self) -> int:
        """Attempts that did not end in an active session."""
        return max(0, len(self.attempts) - len(self.active))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class StormResult:
    """One strategy's fleet run: both phases, and what one reconnect costs."""

    strategy: str
    agents: int
    reconnect_min: float
    sign_ms: float
    phases: dict[str, PhaseResult] = field(default_factory=dict)
    startup_seconds: float = 0.0

    @property
    def window(self) -> float:
        """The strategy's jitter window for the first retry (seconds)."""
        return jitter_window(self.strategy, self.reconnect_min)

    @property
    def mean_per_bin(self) -> float:
        """N spread evenly over the jitter window, per 100 ms bin."""
        return self.agents * BIN / self.window

    def drop_recovery_met(self) -> bool | None:
        """Run 1 recovered within the bound (None when there was no run 1)."""
        drop = self.phases.get("drop")
        if drop is None:
            return None
        return drop.recovery is not None and drop.recovery <= recovery_bound(self.reconnect_min)

    def drop_peak_met(self) -> bool | None:
        """Run 1's peak arrivals ≤ 2 × the mean rate over the jitter window."""
        drop = self.phases.get("drop")
        if drop is None:
            return None
        return drop.peak <= 2 * self.mean_per_bin

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "strategy": self.strategy,
            "agents": self.agents,
            "reconnect_min": self.reconnect_min,
            "sign_ms": self.sign_ms,
            "startup_seconds": self.startup_seconds,
            "phases": {k: v.to_dict() for k, v in self.phases.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StormResult:
        """Inverse of :meth:`to_dict`."""
        result = cls(
            data["strategy"],
            data["agents"],
            data["reconnect_min"],
            data["sign_ms"],
            startup_seconds=data.get("startup_seconds", 0.0),
        )
        for name, phase in data["phases"].items():
            result.phases[name] = PhaseResult(**phase)
        return result


def signing_cost(key: Any, samples: int = 200) -> float:
    """Milliseconds of CPU per signed upgrade (``RequestSigner.sign_headers``)."""
    from hostlink_tw.signing import RequestSigner

    signer = RequestSigner.from_key(key, "bench-sign")
    start = time.process_time()
    for _ in range(samples):
        signer.sign_headers()
    return (time.process_time() - start) * 1000 / samples


# -- the fleet process ---------------------------------------------------------------


class _ControlPlaneChild(ChildProcess):
    """The control plane process, spoken to in JSON lines."""

    def __init__(self, keep_lines: int = 200) -> None:
        super().__init__(keep_lines)
        self._waiting: list[tuple[str, Deferred[dict[str, Any]]]] = []

    def line_received(self, line: str) -> None:
        """Hand each JSON answer to the first waiter for its event."""
        try:
            message = json.loads(line)
        except ValueError:
            return  # a log line on stderr
        if not isinstance(message, dict):
            return
        if message.get("event") == "error":
            sys.stderr.write(f"control plane: {message.get('error')}\n")
        for entry in list(self._waiting):
            if entry[0] == message.get("event"):
                self._waiting.remove(entry)
                entry[1].callback(message)
                return

    def expect(self, event: str, timeout: float = 60.0) -> Deferred[dict[str, Any]]:
        """Fire with the next answer of kind ``event``."""
        reactor = global_reactor()

        d: Deferred[dict[str, Any]] = Deferred()
        self._waiting.append((event, d))
        d.addTimeout(timeout, reactor)
        return d

    async def ask(self, command: str, event: str, timeout: float = 60.0) -> dict[str, Any]:
        """Send a command and wait for its answer."""
        d = self.expect(event, timeout)
        self.write(command.encode("utf-8") + b"\n")
        return await d


class _Fleet:
    """N clients on the global reactor and what happened to them."""

    def __init__(self, clients: list[Any]) -> None:
        self.clients = clients
        self.attempts: list[float] = []
        self.active: list[float] = []
        self.first_delays: list[float] = []
        self._delay_pending: set[int] = set()
        self._waiting_for: set[int] = set()
        self._all_active: Deferred[float] | None = None
        self._last_active = 0.0
        for index, client in enumerate(clients):
            client.add_observer(lambda event, i=index: self._observe(i, event))

    def _observe(self, index: int, event: Any) -> None:
        kind = event.kind
        if kind == "attempt":
            self.attempts.append(time.time())
        elif kind == "retry_scheduled":
            if index in self._delay_pending:
                self._delay_pending.discard(index)
                self.first_delays.append(float(event.fields["delay"]))
        elif kind == "active":
            now = time.time()
            self.active.append(now)
            if index in self._waiting_for:
                self._waiting_for.discard(index)
                self._last_active = now
                if not self._waiting_for and self._all_active is not None:
                    d, self._all_active = self._all_active, None
                    d.callback(now)

    def reset(self) -> None:
        """Forget what was recorded; from now on every agent must become active anew."""
        self.attempts = []
        self.active = []
        self.first_delays = []
        self._delay_pending = set(range(len(self.clients)))
        self._waiting_for = set(range(len(self.clients)))

    def all_active(self, timeout: float) -> Deferred[float]:
        """Fire with the time the last awaited agent became active."""
        reactor = global_reactor()

        if not self._waiting_for:
            return defer.succeed(self._last_active)
        d: Deferred[float] = Deferred()
        self._all_active = d
        d.addTimeout(timeout, reactor)
        return d

    @property
    def still_inactive(self) -> int:
        """How many awaited agents have not become active."""
        return len(self._waiting_for)


def _build_clients(
    strategy: str, count: int, keys: list[Any], url: str, reconnect_min: float, seed: int
) -> list[Any]:
    reactor = global_reactor()

    from hostlink_tw.client import HostlinkClient
    from hostlink_tw.config import Settings
    from hostlink_tw.signing import RequestSigner

    settings = Settings(
        enabled=True,
        ws_url=url,
        reconnect_min=reconnect_min,
        reconnect_jitter="full" if strategy == "full" else "go",
    )
    clients = []
    for i in range(count):
        rng = random.Random(seed * 1_000_003 + i)
        client = HostlinkClient(
            settings,
            RequestSigner.from_key(keys[i % len(keys)], f"bench-{i:05d}"),
            reactor=reactor,
            rng=rng,
            environ={},
            # Benchmark-only: the stock RCF delay sequence in place of ours.
            backoff=StockRCFBackoff(rng) if strategy == "rcf" else None,
        )
        clients.append(client)
    return clients


async def _phase(
    name: str,
    fleet: _Fleet,
    cp: _ControlPlaneChild,
    timeout: float,
    profile: Any = None,
) -> tuple[float, float | None, float]:
    """Run one storm; return (origin, time all active or None, fleet CPU seconds)."""
    fleet.reset()
    cpu_before = sum(os.times()[:2])
    if profile is not None:
        profile.enable()
    try:
        if name == "drop":
            answer = await cp.ask("drop", "dropped")
            origin = float(answer["at"])
        else:
            seconds = float(name.split(":")[1])
            up = cp.expect("up", timeout=seconds + 60)
            await cp.ask(f"down {seconds}", "down")
            origin = float((await up)["at"])
        try:
            done: float | None = await fleet.all_active(timeout)
        except defer.TimeoutError:
            done = None
    finally:
        if profile is not None:
            profile.disable()
    return origin, done, sum(os.times()[:2]) - cpu_before


async def _fleet_main(reactor: Any, args: argparse.Namespace) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from hostlink_tw.identity import public_key_base64

    raise_nofile_limit()
    quiet_logging()
    keys = [
        rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(args.keys)
    ]
    result = StormResult(args.strategy, args.agents, args.reconnect_min, signing_cost(keys[0]))
    with tempfile.TemporaryDirectory(prefix="hostlink-storm-") as tmp:
        spec = os.path.join(tmp, "agents.json")
        with open(spec, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "prefix": "bench-",
                    "count": args.agents,
                    "keys": [public_key_base64(k) for k in keys],
                },
                f,
            )
        cp = _ControlPlaneChild.spawn(
            [sys.executable, "-m", "benchmarks.bench_storm_cp", spec], keep_lines=50
        )
        assert isinstance(cp, _ControlPlaneChild)
        clients: list[Any] = []
        try:
            listening = await cp.expect("listening", timeout=60)
            clients = _build_clients(
                args.strategy, args.agents, keys, listening["url"], args.reconnect_min, args.seed
            )
            fleet = _Fleet(clients)
            fleet.reset()
            started = time.time()
            # Start in slices so the first connect is not itself a storm.
            for i in range(0, len(clients), 100):
                for client in clients[i : i + 100]:
                    client.start()
                await sleep(0.05)
            await fleet.all_active(args.timeout)
            result.startup_seconds = time.time() - started
            phases = ["drop", f"down:{args.down:g}"] if args.down > 0 else ["drop"]
            profile = None
            if args.profile:
                import cProfile

                profile = cProfile.Profile()
            for name in phases:
                await sleep(args.settle)
                await cp.ask("arrivals", "arrivals")  # forget the start-up arrivals
                cp_cpu = float((await cp.ask("cpu", "cpu"))["seconds"])
                origin, done, fleet_cpu = await _phase(
                    name, fleet, cp, args.timeout, profile if name == "drop" else None
                )
                await sleep(args.settle)  # late refusals and their retries land
                arrivals = await cp.ask("arrivals", "arrivals")
                cp_cpu = float((await cp.ask("cpu", "cpu"))["seconds"]) - cp_cpu
                result.phases[name.split(":")[0]] = PhaseResult(
                    name=name.split(":")[0],
                    origin=origin,
                    agents=args.agents,
                    recovery=None if done is None else done - origin,
                    still_inactive=fleet.still_inactive,
                    accepted=[t - origin for t in arrivals["accepted"]],
                    attempts=[t - origin for t in fleet.attempts],
                    active=[t - origin for t in fleet.active],
                    first_delays=fleet.first_delays,
                    refused=arrivals["refused"],
                    fleet_cpu=fleet_cpu,
                    control_plane_cpu=cp_cpu,
                    down_for=args.down if name != "drop" else 0.0,
                )
            if profile is not None:
                profile.dump_stats(args.profile)
        finally:
            if cp.running:
                cp.write(b"quit\n")
                await cp.finish(timeout=10)
            await defer.gatherResults([defer.ensureDeferred(_stop(c)) for c in clients])
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(result.to_dict(), f)


async def _stop(client: Any) -> None:
    await client.stop()


# -- the orchestrator's side -----------------------------------------------------------


async def run_storm(
    strategy: str,
    agents: int = 1000,
    *,
    down: float = 10.0,
    reconnect_min: float = 1.0,
    keys: int = 8,
    settle: float = 2.0,
    timeout: float = 120.0,
    seed: int = 1,
    profile: str | None = None,
) -> StormResult:
    """
    Run one strategy's fleet process (run 1, then run 2 when ``down`` > 0)
    and return what it measured.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    with tempfile.TemporaryDirectory(prefix="hostlink-storm-") as tmp:
        output = os.path.join(tmp, "result.json")
        argv = [
            sys.executable,
            "-m",
            "benchmarks.bench_storm",
            "--strategy", strategy,
            "--agents", str(agents),
            "--down", f"{down:g}",
            "--reconnect-min", f"{reconnect_min:g}",
            "--keys", str(keys),
            "--settle", f"{settle:g}",
            "--timeout", f"{timeout:g}",
            "--seed", str(seed),
            "--output", output,
        ]
        if profile:
            argv += ["--profile", profile]
        child = ChildProcess.spawn(argv, keep_lines=100)
        # Start-up + two phases, each bounded by ``timeout``; then give up.
        reactor = global_reactor()

        limit = reactor.callLater(
            4 * timeout + down + 120, child.signal, "KILL"
        )
        try:
            await child.ended()
        finally:
            if limit.active():
                limit.cancel()
            await child.kill()
        if not child.exited_cleanly() or not os.path.exists(output):
            tail = "\n".join(child.lines[-20:])
            raise RuntimeError(f"the {strategy} fleet failed:\n{tail}")
        with open(output, encoding="utf-8") as f:
            return StormResult.from_dict(json.load(f))


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_storm", description="One fleet of the reconnect storm."
    )
    parser.add_argument("--strategy", choices=STRATEGIES, default="go")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--down", type=float, default=10.0, help="outage of run 2 (0: skip)")
    parser.add_argument("--reconnect-min", type=float, default=1.0)
    parser.add_argument("--keys", type=int, default=8, help="RSA keys shared by the agents")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", help="write a cProfile of run 1 here")
    parser.add_argument("--output", required=True, help="where the JSON result goes")
    args = parser.parse_args(argv)
    if args.agents < 1 or args.keys < 1 or not math.isfinite(args.down):
        parser.error("--agents and --keys must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the fleet process."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    task.react(lambda reactor: defer.ensureDeferred(_fleet_main(reactor, args)))


if __name__ == "__main__":
    main()
