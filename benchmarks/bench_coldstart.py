"""
Cold start: ``twistd -n hostlink`` spawned → ``agent.hello`` received by the
control plane, against the floor of a bare
``python -c "import autobahn.twisted.websocket"``.

The control plane runs in this process (its reactor is otherwise idle, so it
sees the hello as soon as it arrives).  Agent and floor runs alternate, so
any drift of the machine during the benchmark hits both alike; the first run
of each warms the page cache and bytecode caches and is not counted.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.bench_support import (
    ChildProcess,
    make_identity,
    median,
    spawn_agent,
    subprocess_env,
)

__all__ = ["TARGET_RATIO", "ColdStartResult", "measure_cold_start", "measure_status_import"]

#: Cold start may take at most this many times the import floor.
TARGET_RATIO = 1.5

_FLOOR_CODE = "import autobahn.twisted.websocket"

# What importing hostlink_tw.status adds once everything else the agent
# loads is in: the status page's dependencies, which an agent loads only when
# a status page is configured.
_STATUS_IMPORT_CODE = """
import time
import autobahn.twisted.websocket, twisted.scripts.twistd, twisted.application.app
import hostlink_tw.client, hostlink_tw.config, hostlink_tw.identity, hostlink_tw.signing
import hostlink_tw.tap
start = time.perf_counter()
import hostlink_tw.status
print(f"{time.perf_counter() - start:.6f}")
"""


@dataclass(frozen=True)
class ColdStartResult:
    """Seconds per run (warm-up excluded) for the agent and the floor."""

    agent_runs: list[float]
    floor_runs: list[float]
    #: Seconds importing hostlink_tw.status adds to a start (median), if measured.
    status_import: float | None = None

    @property
    def agent_median(self) -> float:
        """Median seconds from spawn to hello received."""
        return median(self.agent_runs)

    @property
    def floor_median(self) -> float:
        """Median seconds of the bare import, process start to exit."""
        return median(self.floor_runs)

    @property
    def ratio(self) -> float:
        """Agent median / floor median."""
        return self.agent_median / self.floor_median

    @property
    def met(self) -> bool:
        """Whether the target (≤ 1.5 × floor) is met."""
        return self.ratio <= TARGET_RATIO

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, derived values included."""
        return {
            **asdict(self),
            "agent_median": self.agent_median,
            "floor_median": self.floor_median,
            "ratio": self.ratio,
            "met": self.met,
        }


async def _floor_once() -> float:
    start = time.monotonic()
    child = ChildProcess.spawn([sys.executable, "-c", _FLOOR_CODE], env=subprocess_env())
    await child.ended()
    elapsed = time.monotonic() - start
    if not child.exited_cleanly():
        raise RuntimeError(f"the import floor failed: {child.lines[-5:]}")
    return elapsed


async def _agent_once(cp: Any, identity: Any, timeout: float) -> float:
    waiting = cp.wait_active(identity.agent_id, new=True, timeout=timeout)
    start = time.monotonic()
    child = spawn_agent(identity, cp.ws_url)
    try:
        await child.wait_while_running(waiting, "the agent never said hello")
        return time.monotonic() - start
    finally:
        await child.kill()


async def measure_cold_start(runs: int = 7, timeout: float = 30.0) -> ColdStartResult:
    """
    ``runs`` counted runs of each (plus one warm-up), alternating floor and agent.

    :param timeout: seconds an agent may take to say hello before the
        benchmark fails.
    """
    from hostlink_tw.controlplane import start_control_plane

    if runs < 1:
        raise ValueError("runs must be >= 1")
    with tempfile.TemporaryDirectory(prefix="hostlink-bench-") as tmp:
        identity = make_identity(f"{tmp}/agent", "bench-cold-start")
        cp = await start_control_plane({identity.agent_id: identity.key.public_key()})
        agent_runs: list[float] = []
        floor_runs: list[float] = []
        try:
            for i in range(runs + 1):
                floor = await _floor_once()
                agent = await _agent_once(cp, identity, timeout)
                if i > 0:  # run 0 warms caches
                    floor_runs.append(floor)
                    agent_runs.append(agent)
        finally:
            await cp.stop()
    return ColdStartResult(agent_runs, floor_runs, await measure_status_import())


async def measure_status_import(runs: int = 5) -> float:
    """Median seconds ``import hostlink_tw.status`` adds on top of the rest of the agent."""
    samples = []
    for _ in range(runs):
        child = ChildProcess.spawn(
            [sys.executable, "-c", _STATUS_IMPORT_CODE], env=subprocess_env()
        )
        await child.ended()
        if not child.exited_cleanly() or not child.lines:
            raise RuntimeError(f"status import measurement failed: {child.lines[-5:]}")
        samples.append(float(child.lines[-1]))
    return median(samples)
