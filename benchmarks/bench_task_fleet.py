"""
Fleet with tasks: N agents (1,000 by default) in one process, each a whole
:class:`~hostlink_tw.service.HostlinkService` with its own identity on disk,
its own local task store (SQLite file, its own writer thread) and its task
runner; the control plane restarts (stops, closing every session with 1001,
and listens again at once), and as soon as it is back it gives every agent
one short task (``true``).  Target: every final stored at the control plane
within the storm bound (:func:`benchmarks.bench_storm.recovery_bound`,
1.25 × ``RECONNECT_MIN`` + 3 s) + 5 s of the restart.  ``RECONNECT_MIN`` is
the agent's default, 1 s (smaller only in the smoke test).

Processes, as the storm's: :func:`measure_fleet` starts
``python -m benchmarks.bench_task_fleet --output …`` (the fleet), which starts
``python -m benchmarks.bench_storm_cp`` (the control plane, driven by its
``down`` and ``tasks`` commands), so the fleet's CPU is its own.  The agents'
HTTP heartbeat is set to 5 min (its maximum) so that 1,000 agents in one
process do not spend the run on signed heartbeats that 1,000 hosts would
each send alone; everything else is the agent's defaults
(``RECONNECT_MIN`` 1 s, Go jitter, tasks in the agent's working directory).
The last one matters here: Twisted's ``spawnProcess`` uses ``posix_spawnp``
only when the child's working directory is the parent's, and ``fork()``
otherwise (``HOSTLINK_TASK_WORKDIR`` set) — whose cost grows with the
parent's memory and threads: ~50 ms per task in a fleet process of 300
agents, ~1 ms in one agent.  All on 127.0.0.1; every wait is bounded.

One harness shortcut, outside the measured phase: the agents share a few
RSA keys, and the fleet parses each distinct key file once.  Loading an
agent key (``hostlink_tw.agent.identity.load_private_key``, which lets
``cryptography`` validate the RSA key) costs about 70 ms of CPU; a real
agent pays it once per start, 1,000 agents in one process would pay it
1,000 times before the benchmark even begins.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.internet import defer, task

from benchmarks.bench_rst import NOT_JUDGED, table, verdict
from benchmarks.bench_storm import _ControlPlaneChild, _Fleet, recovery_bound
from benchmarks.bench_support import (
    ChildProcess,
    global_reactor,
    quiet_logging,
    raise_nofile_limit,
    rss_bytes,
    sleep,
)

__all__ = ["EXTRA_SECONDS", "FleetResult", "measure_fleet"]

#: The target: all finals within the storm bound plus this.
EXTRA_SECONDS = 5.0
RECONNECT_MIN = 1.0
_MB = 1024 * 1024


@dataclass
class FleetResult:
    """What one fleet run measured (times in seconds from the restart)."""

    agents: int
    command: str
    #: Fleet process: threads, RSS and seconds to start every agent.
    threads: int
    rss: int
    rss_before_agents: int
    startup_seconds: float
    #: The control plane was back / had created the tasks / every agent was
    #: active again / the last final was stored (None: not all by the timeout).
    up_after: float
    tasks_after: float
    active_after: float | None
    finals_after: float | None
    statuses: dict[str, int]
    missing: int
    fleet_cpu: float
    control_plane_cpu: float
    reconnect_min: float = RECONNECT_MIN
    #: Seconds of the fleet's main thread by owner (:func:`profile_owners`),
    #: when the run was profiled (profiling slows it: its times are not the figure).
    profile: dict[str, float] = field(default_factory=dict)
    title: str = "Fleet"
    met: bool | None = field(init=False)

    def __post_init__(self) -> None:
        self.met = (
            self.finals_after is not None
            and self.finals_after <= self.bound
            and self.statuses.get("completed", 0) == self.agents
        )

    @property
    def bound(self) -> float:
        """Storm bound + 5 s."""
        return recovery_bound(self.reconnect_min) + EXTRA_SECONDS

    def summary_row(self) -> list[str]:
        """[benchmark, measured, target, ratio, verdict]."""
        measured = ("never" if self.finals_after is None
                    else f"{self.finals_after:.2f} s")
        return [
            f"Fleet: {self.agents:,} agents, one task each after a restart",
            f"{measured} ({self.statuses.get('completed', 0):,} completed)",
            f"≤ {self.bound:.2f} s",
            "" if self.finals_after is None else f"{self.finals_after / self.bound:.2f} × limit",
            verdict(self.met, NOT_JUDGED),
        ]

    def detail_rst(self) -> str:
        """The section body: method, figures, verdict."""
        def s(v: float | None) -> str:
            return "never" if v is None else f"{v:.2f} s"

        per_agent = (self.rss - self.rss_before_agents) / self.agents / 1024
        rows = [
            ["agents in the fleet process", f"{self.agents:,}"],
            ["threads in it (a store writer each)", f"{self.threads:,}"],
            ["its RSS with every agent active",
             f"{self.rss / _MB:.0f} MiB ({per_agent:.0f} KiB per agent)"],
            ["starting every agent (identity, store, session)", s(self.startup_seconds)],
            ["restart → control plane listening again", s(self.up_after)],
            ["restart → one task created per agent", s(self.tasks_after)],
            ["restart → every agent active again", s(self.active_after)],
            ["restart → last final stored", s(self.finals_after)],
            ["finals by status", ", ".join(f"{k} {v:,}" for k, v in sorted(self.statuses.items()))
             + (f"; {self.missing:,} missing" if self.missing else "")],
            ["fleet CPU from the restart to the last final",
             f"{self.fleet_cpu:.2f} s ({1000 * self.fleet_cpu / self.agents:.1f} ms per agent)"],
            ["control plane CPU over the same", f"{self.control_plane_cpu:.2f} s"],
        ]
        return (
            self._intro() + table(["measurement", "value"], rows)
            + f"\n\nTarget: every final within the storm bound + {EXTRA_SECONDS:g} s = "
            f"{self.bound:.2f} s: {verdict(self.met, NOT_JUDGED)}.\n" + self._profile_rst()
        )

    def _profile_rst(self) -> str:
        if not self.profile:
            return ""
        busy = sum(self.profile.values())
        rows = [[k, f"{v:.1f} s", f"{v / busy:.0%}"] for k, v in
                sorted(self.profile.items(), key=lambda kv: -kv[1])]
        return (
            "\nWhere the fleet process's main thread went from the restart to the last "
            "final, in a profiled run (cProfile; it slows everything alike):\n\n"
            + table(["owner", "seconds", "share"], rows) + "\n"
        )

    def _intro(self) -> str:
        return (
            f"{self.agents:,} whole agents (``HostlinkService``: identity read from disk, "
            "a local task store each — its own SQLite file and writer thread — and a "
            "task runner) in one process against the reference control plane in "
            "another.  The control plane restarts: it closes every session (1001) and "
            "listens again at once; as soon as it is back it creates one task "
            f"(``{self.command}``) for every agent, delivered on each agent's new "
            "session.  Times from the restart; the last final is when the control plane "
            "stored it.\n\n"
        )

    def to_dict(self) -> dict[str, Any]:
        """Raw figures (for ``--json``)."""
        data = asdict(self)
        data["bound"] = self.bound
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FleetResult:
        """Inverse of :meth:`to_dict`."""
        names = [f for f in cls.__dataclass_fields__ if cls.__dataclass_fields__[f].init]
        return cls(**{k: data[k] for k in names if k in data})


# -- the fleet process ---------------------------------------------------------------

#: Profile owners: a label and the (file suffix, function) whose cumulative time is theirs.
_OWNERS = (
    ("Twisted spawnProcess (posix_spawnp, after a scan of every open fd)", "process.py",
     "_trySpawnInsteadOfFork"),
    ("Autobahn debug-log arguments (pprint.pformat)", "pprint.py", "pformat"),
    ("RSA-PSS signing of the upgrade", "signing.py", "sign_headers"),
    ("task store calls (to its thread)", "agent/store.py", "_call"),
)


def profile_owners(path: str) -> dict[str, float]:
    """Seconds by owner (cumulative, so nested owners would count twice: these do not
    nest) and the rest of the busy time, from a cProfile of the measured phase."""
    import pstats

    stats: Any = pstats.Stats(path).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    idle = sum(v[2] for k, v in stats.items() if "select.epoll" in k[2])
    owners = {}
    for label, suffix, function in _OWNERS:
        owners[label] = sum(v[3] for k, v in stats.items()
                            if k[0].endswith(suffix) and k[2] == function)
    owners["everything else"] = max(0.0, total - idle - sum(owners.values()))
    return owners


def _say(text: str) -> None:
    """A progress line on stderr (the orchestrator keeps the last ones for errors)."""
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} fleet: {text}\n")
    sys.stderr.flush()


def _share_parsed_keys() -> None:
    """
    Parse each distinct key file once: the agents share a few keys, and
    ``load_private_key`` validates the RSA key (tens of ms of CPU each, see
    the module docstring).  Every agent still reads its own ``agent.json``
    and key file; only the parsed key object is shared.
    """
    import hostlink_tw.service as service_module

    parse = service_module.load_private_key
    parsed: dict[bytes, Any] = {}

    def load(path: str, **kwargs: Any) -> Any:
        with open(path, "rb") as f:
            data = f.read()
        if data not in parsed:
            parsed[data] = parse(path, **kwargs)
        return parsed[data]

    service_module.load_private_key = load  # type: ignore[assignment]


def _build_services(count: int, keys: list[Any], url: str, port: int, tmp: str,
                    seed: int, reconnect_min: float) -> list[Any]:
    from hostlink_tw.config import load_settings
    from hostlink_tw.identity import AgentState
    from hostlink_tw.provisioning import write_identity
    from hostlink_tw.service import HostlinkService

    services = []
    for i in range(count):
        home = os.path.join(tmp, f"agent-{i:05d}")
        state = os.path.join(home, "state")
        key_path = os.path.join(state, "agent.key")
        os.makedirs(state, mode=0o700)
        write_identity(state, key_path, AgentState(agent_id=f"bench-{i:05d}"), keys[i % len(keys)])
        settings = load_settings({
            "HOSTLINK_WS_ENABLED": "true",
            "HOSTLINK_WS_URL": url,
            "SH_CONTROL_PLANE_URL": f"http://127.0.0.1:{port}",
            "HOSTLINK_STATE_PATH": state,
            "HOSTLINK_PRIVATE_KEY_PATH": key_path,
            "HOSTLINK_WS_DELIVERY_ENABLED": "true",
            "HOSTLINK_WS_RESULTS_ENABLED": "true",
            "HOSTLINK_LOCAL_STORE_PATH": os.path.join(home, "task_store.db"),
            "HOSTLINK_HEARTBEAT_INTERVAL": "5m",
            "HOSTLINK_WS_RECONNECT_MIN": f"{reconnect_min * 1000:g}ms",
        })
        if settings.errors:
            raise RuntimeError(f"agent settings refused: {settings.errors}")
        services.append(HostlinkService(settings, reactor=global_reactor(),
                                        rng=random.Random(seed * 1_000_003 + i)))
    return services


async def _fleet_main(reactor: Any, args: argparse.Namespace) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from hostlink_tw.identity import public_key_base64

    raise_nofile_limit()
    quiet_logging()
    _share_parsed_keys()
    keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048)
            for _ in range(args.keys)]
    with tempfile.TemporaryDirectory(prefix="hostlink-fleet-") as tmp:
        spec = os.path.join(tmp, "agents.json")
        with open(spec, "w", encoding="utf-8") as f:
            json.dump({"prefix": "bench-", "count": args.agents,
                       "keys": [public_key_base64(k) for k in keys]}, f)
        cp = _ControlPlaneChild.spawn(
            [sys.executable, "-m", "benchmarks.bench_storm_cp", spec], keep_lines=50)
        assert isinstance(cp, _ControlPlaneChild)
        services: list[Any] = []
        try:
            listening = await cp.expect("listening", timeout=60)
            rss_before = rss_bytes(os.getpid())
            services = _build_services(args.agents, keys, listening["url"],
                                       int(listening["port"]), tmp, args.seed,
                                       args.reconnect_min)
            _say(f"{len(services)} agents built; starting them")
            fleet = _Fleet(services)
            fleet.reset()
            started = time.time()
            for i in range(0, len(services), 100):
                for service in services[i : i + 100]:
                    service.startService()
                await sleep(0.05)
            try:
                await fleet.all_active(args.timeout)
            except defer.TimeoutError:
                raise RuntimeError(f"{fleet.still_inactive} agents never became active") from None
            startup = time.time() - started
            _say(f"all active after {startup:.1f} s; {threading.active_count()} threads")
            await sleep(args.settle)
            threads, rss = threading.active_count(), rss_bytes(os.getpid())
            fleet.reset()
            cp_cpu = float((await cp.ask("cpu", "cpu"))["seconds"])
            cpu = sum(os.times()[:2])
            profile = None
            if args.profile:
                import cProfile

                profile = cProfile.Profile()
                profile.enable()
            up = cp.expect("up", timeout=60)
            origin = float((await cp.ask("down 0", "down"))["at"])
            up_at = float((await up)["at"])
            finals = cp.expect("finals", timeout=args.timeout + 30)
            tasks_at = float((await cp.ask(f"tasks {args.timeout:g} {args.command}",
                                           "tasks"))["at"])
            _say("control plane restarted, tasks created")
            answer = await finals
            owners: dict[str, float] = {}
            if profile is not None:
                profile.disable()
                profile.dump_stats(args.profile)
                owners = profile_owners(args.profile)
            _say(f"finals: {answer['statuses']}, {answer['missing']} missing")
            fleet_cpu = sum(os.times()[:2]) - cpu
            cp_cpu = float((await cp.ask("cpu", "cpu"))["seconds"]) - cp_cpu
            try:
                active: float | None = await fleet.all_active(5.0) - origin
            except defer.TimeoutError:
                active = None
            complete = int(answer["missing"]) == 0
            result = FleetResult(
                args.agents, args.command, threads, rss, rss_before, startup,
                up_at - origin, tasks_at - origin, active,
                float(answer["at"]) - origin if complete else None,
                answer["statuses"], int(answer["missing"]), fleet_cpu, cp_cpu,
                args.reconnect_min, owners,
            )
        finally:
            if cp.running:
                cp.write(b"quit\n")
                await cp.finish(timeout=10)
            await defer.gatherResults([defer.ensureDeferred(_stop(s)) for s in services])
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(result.to_dict(), f)


async def _stop(service: Any) -> None:
    if service.running:
        await service.stopService()


# -- the orchestrator's side -----------------------------------------------------------


async def measure_fleet(agents: int = 1000, command: str = "true", *, keys: int = 8,
                        settle: float = 2.0, timeout: float = 120.0, seed: int = 1,
                        reconnect_min: float = RECONNECT_MIN,
                        profile: bool = False) -> FleetResult:
    """Run the fleet process once and return what it measured (``profile``:
    with a cProfile of its main thread over the measured phase)."""
    if agents < 1 or keys < 1:
        raise ValueError("agents and keys must be >= 1")
    with tempfile.TemporaryDirectory(prefix="hostlink-fleet-") as tmp:
        output = os.path.join(tmp, "result.json")
        child = ChildProcess.spawn(
            [sys.executable, "-m", "benchmarks.bench_task_fleet", "--agents", str(agents),
             "--command", command, "--keys", str(keys), "--settle", f"{settle:g}",
             "--timeout", f"{timeout:g}", "--seed", str(seed),
             "--reconnect-min", f"{reconnect_min:g}", "--output", output,
             *(["--profile", os.path.join(tmp, "fleet.prof")] if profile else [])],
            keep_lines=100,
        )
        limit = global_reactor().callLater(3 * timeout + 120, child.signal, "KILL")
        try:
            await child.ended()
        finally:
            if limit.active():
                limit.cancel()
            await child.kill()
        if not child.exited_cleanly() or not os.path.exists(output):
            raise RuntimeError("the task fleet failed:\n" + "\n".join(child.lines[-20:]))
        with open(output, encoding="utf-8") as f:
            return FleetResult.from_dict(json.load(f))


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_task_fleet",
                                     description="N agents with tasks after a restart.")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--command", default="true")
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reconnect-min", type=float, default=RECONNECT_MIN,
                        help="the agents' HOSTLINK_WS_RECONNECT_MIN, in seconds (0.1-300)")
    parser.add_argument("--profile", help="write a cProfile of the fleet's main thread from "
                        "the restart to the last final here")
    parser.add_argument("--profiled", action="store_true",
                        help="profile the fleet process and print where its time went")
    parser.add_argument("--output", help="run as the fleet process; write the JSON here")
    return parser.parse_args(argv)


async def _print(reactor: Any, args: argparse.Namespace) -> None:
    r = await measure_fleet(args.agents, args.command, keys=args.keys, settle=args.settle,
                            timeout=args.timeout, seed=args.seed,
                            reconnect_min=args.reconnect_min, profile=args.profiled)
    print(" | ".join(r.summary_row()))
    print(r.detail_rst())


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.bench_task_fleet [--agents N]`` prints the figures;
    with ``--output`` it is the fleet process itself."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.output:
        task.react(lambda reactor: defer.ensureDeferred(_fleet_main(reactor, args)))
    else:
        task.react(lambda reactor: defer.ensureDeferred(_print(reactor, args)))


if __name__ == "__main__":
    main()
