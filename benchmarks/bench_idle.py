"""
Idle cost: a ``twistd -n hostlink`` agent with an active session and a 5 s
ping, for 60 s: its resident memory and CPU seconds (utime + stime from
``/proc/PID/stat``, 10 ms resolution).

The floor is a bare Python that imports ``autobahn.twisted.websocket`` and
sleeps.  The control plane runs in this process with its default keepalive
(a ping every 30 s), as a real one would; the agent answers those too.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.bench_support import (
    ChildProcess,
    cpu_seconds,
    make_identity,
    rss_bytes,
    run_seconds,
    sleep,
    spawn_agent,
    subprocess_env,
)

__all__ = [
    "TARGET_CPU_PER_MINUTE",
    "TARGET_RSS_OVER_FLOOR",
    "IdleResult",
    "measure_floor_rss",
    "measure_idle",
]

#: Idle RSS may exceed the floor by at most this many bytes.
TARGET_RSS_OVER_FLOOR = 10 * 1024 * 1024
#: Idle CPU seconds per minute, at most.
TARGET_CPU_PER_MINUTE = 0.1

_FLOOR_CODE = (
    "import autobahn.twisted.websocket, time; print('ready', flush=True); time.sleep(600)"
)


@dataclass(frozen=True)
class IdleResult:
    """What the idle agent cost over ``seconds``."""

    seconds: float
    ping_interval: float
    floor_rss: int
    rss_samples: list[tuple[float, int]]
    cpu: float
    pings_seen: int
    #: The same window from ``/proc/PID/schedstat`` (ns precision), if available.
    cpu_precise: float | None = None

    @property
    def rss(self) -> int:
        """The largest RSS sampled over the window."""
        return max(r for _, r in self.rss_samples)

    @property
    def rss_over_floor(self) -> int:
        """Bytes above the floor."""
        return self.rss - self.floor_rss

    @property
    def cpu_per_minute(self) -> float:
        """CPU seconds per minute of idling."""
        return self.cpu * 60.0 / self.seconds

    @property
    def rss_met(self) -> bool:
        """RSS ≤ floor + 10 MB."""
        return self.rss_over_floor <= TARGET_RSS_OVER_FLOOR

    @property
    def cpu_met(self) -> bool:
        """CPU ≤ 0.1 s per minute."""
        return self.cpu_per_minute <= TARGET_CPU_PER_MINUTE

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, derived values included."""
        return {
            **asdict(self),
            "rss": self.rss,
            "rss_over_floor": self.rss_over_floor,
            "cpu_per_minute": self.cpu_per_minute,
            "rss_met": self.rss_met,
            "cpu_met": self.cpu_met,
        }


async def measure_floor_rss(settle: float = 0.5) -> int:
    """RSS of a bare Python that has imported ``autobahn.twisted.websocket``."""
    child = ChildProcess.spawn([sys.executable, "-c", _FLOOR_CODE], env=subprocess_env())
    try:
        await child.wait_for_line("ready")
        await sleep(settle)
        return rss_bytes(child.pid)
    finally:
        await child.kill()


async def measure_idle(
    seconds: float = 60.0,
    ping_interval: float = 5.0,
    sample_every: float = 5.0,
    settle: float = 2.0,
) -> IdleResult:
    """
    Start an agent, wait until it is active and ``settle`` seconds more,
    then watch it for ``seconds``.
    """
    from hostlink_tw.controlplane import start_control_plane

    floor = await measure_floor_rss()
    with tempfile.TemporaryDirectory(prefix="hostlink-bench-") as tmp:
        identity = make_identity(f"{tmp}/agent", "bench-idle")
        cp = await start_control_plane({identity.agent_id: identity.key.public_key()})
        child: ChildProcess | None = None
        try:
            active = cp.wait_active(identity.agent_id, timeout=30)
            child = spawn_agent(identity, cp.ws_url, "--ping-interval", f"{ping_interval:g}s")
            session = await child.wait_while_running(active, "the agent never became active")
            # Let start-up work (imports, first GC passes, log flushes) finish.
            await sleep(settle)
            pid = child.pid
            pings_before = session.pings_received
            cpu_before = cpu_seconds(pid)
            precise_before = run_seconds(pid)
            start = time.monotonic()
            samples = [(0.0, rss_bytes(pid))]
            while (elapsed := time.monotonic() - start) < seconds:
                await sleep(min(sample_every, seconds - elapsed))
                samples.append((time.monotonic() - start, rss_bytes(pid)))
            cpu = cpu_seconds(pid) - cpu_before
            precise_after = run_seconds(pid)
            precise = (
                None
                if precise_before is None or precise_after is None
                else precise_after - precise_before
            )
            measured = time.monotonic() - start
            if not session.active or session.closed:
                raise RuntimeError(f"the session did not stay active: {child.lines[-10:]}")
            pings = session.pings_received - pings_before
        finally:
            if child is not None:
                await child.kill()
            await cp.stop()
    return IdleResult(measured, ping_interval, floor, samples, cpu, pings, precise)
