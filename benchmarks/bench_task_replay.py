"""
Replay: N unacked output chunks in the agent's local store; seconds from
the control plane's ``agent.hello_ack`` to the last chunk stored and acked
by it (PROTOCOL §8.6).  Target ≤ 3 s for 10,000 chunks.

How the store is filled (honestly: by the agent itself, through a task):

1. a reference control plane runs in this process (tasks in a SQLite file),
   a real agent (``twistd -n hostlink``) connects and is delivered a task
   that waits for a go-file, then prints exactly N × chunk bytes;
2. once the task has started the control plane stops; the go-file appears
   and the agent stores the N chunks and the final with no session up (its
   reconnects are refused), exactly as it would during an outage;
3. the agent is stopped (SIGTERM) and its store read: N unacked chunks and
   one unacked final;
4. the control plane comes back on the same port with the same tasks file
   (so the task is still wanted and none of its output is stored there:
   ``output_replay`` asks for sequence 1), a new agent process starts on the
   same store, and the clock runs from the hello_ack the control plane sends
   to the N-th chunk it stored and acked.  The final follows the output.

The chunk size is ``HOSTLINK_TASK_OUTPUT_FLUSH_THRESHOLD`` (1 KiB by default
here, the smallest allowed: the figure is about messages, not bytes); the
flush interval is 5 s so the task's fast output is cut only at the threshold.
Everything on 127.0.0.1; both agent processes are stopped before returning.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred

from benchmarks.bench_rst import NOT_JUDGED, table, verdict
from benchmarks.bench_support import (
    ChildProcess,
    Identity,
    cpu_seconds,
    make_identity,
    quiet_logging,
    sleep,
    spawn_agent,
)
from benchmarks.bench_tasks_support import (
    start_task_control_plane,
    store_count,
    task_agent_args,
    unacked_messages,
)

__all__ = ["TARGET_SECONDS", "ReplayResult", "measure_replay"]

#: hello_ack → last chunk acked, for 10,000 chunks.
TARGET_SECONDS = 3.0
TARGET_CHUNKS = 10_000

_MB = 1024 * 1024


@dataclass
class ReplayResult:
    """What :func:`measure_replay` measured (``seconds`` None: never all acked)."""

    chunks: int
    chunk_bytes: int
    #: hello_ack sent → N-th chunk stored and acked, at the control plane.
    seconds: float | None
    #: hello_ack sent → the final stored (it follows the output).
    final_seconds: float | None
    #: How long the agent took to store the N chunks with the session down.
    fill_seconds: float
    #: Unacked messages in the agent's store before the replay and after it.
    unacked_before: int
    unacked_after: int
    #: CPU seconds over the replay (hello_ack → last chunk): the control
    #: plane (this process) and the agent process.
    control_plane_cpu: float | None = None
    agent_cpu: float | None = None
    title: str = "Replay"
    met: bool | None = field(init=False)

    def __post_init__(self) -> None:
        # Judged at the target's size (or above, pro rata) only: a smaller
        # replay is a smoke test, dominated by fixed costs.
        if self.seconds is None:
            self.met = False
        elif self.chunks < TARGET_CHUNKS:
            self.met = None
        else:
            self.met = self.seconds <= self._limit()

    @property
    def rate(self) -> float | None:
        """Chunks per second over the replay."""
        return None if not self.seconds else self.chunks / self.seconds

    def summary_row(self) -> list[str]:
        """[benchmark, measured, target, ratio, verdict]."""
        measured = "never" if self.seconds is None else f"{self.seconds:.2f} s"
        ratio = "" if self.seconds is None else f"{self.seconds / self._limit():.2f} × limit"
        return [
            f"Replay: {self.chunks:,} unacked chunks, hello_ack → last acked",
            measured,
            f"≤ {self._limit():.2f} s",
            ratio,
            verdict(self.met, NOT_JUDGED),
        ]

    def _limit(self) -> float:
        return TARGET_SECONDS * max(1.0, self.chunks / TARGET_CHUNKS)

    def detail_rst(self) -> str:
        """The section body: method, figures, verdict."""
        rows = [
            ("chunks in the store (unacked) before", f"{self.unacked_before - 1:,} + 1 final"),
            ("chunk size", f"{self.chunk_bytes:,} bytes "
             f"({self.chunks * self.chunk_bytes / _MB:.1f} MiB in all)"),
            ("hello_ack → last chunk acked",
             "never" if self.seconds is None else f"{self.seconds:.3f} s"),
            ("hello_ack → final stored",
             "never" if self.final_seconds is None else f"{self.final_seconds:.3f} s"),
            ("replay rate", "" if self.rate is None else f"{self.rate:,.0f} chunks/s"),
            ("unacked in the store after", f"{self.unacked_after:,}"),
            ("filling the store (session down)", f"{self.fill_seconds:.1f} s"),
            ("CPU over the replay: control plane",
             "" if self.control_plane_cpu is None else f"{self.control_plane_cpu:.2f} s"),
            ("CPU over the replay: agent process",
             "" if self.agent_cpu is None else f"{self.agent_cpu:.2f} s"),
        ]
        figures = table(["measurement", "value"], [list(r) for r in rows])
        return (
            "The agent's own task filled its store: a task printing exactly "
            f"{self.chunks:,} × {self.chunk_bytes:,} bytes while the control plane was "
            "down (``HOSTLINK_TASK_OUTPUT_FLUSH_THRESHOLD`` = the chunk size, flush "
            "interval 5 s, so chunks are cut only at the threshold).  The agent was then "
            "stopped, the reference control plane (in the benchmark's process, same tasks "
            "file) came back, and a new ``twistd -n hostlink`` started on the same store.  "
            "Timed at the control plane, from sending ``agent.hello_ack`` to storing and "
            "acking the last chunk (``output_replay`` asked for sequence 1: nothing was "
            "stored there).\n\n"
            + figures
            + self._cpu_text()
            + f"\n\nTarget ≤ {self._limit():g} s for {TARGET_CHUNKS:,} chunks: "
            + verdict(self.met, "not judged (a smaller run)")
            + ".\n"
        )

    def _cpu_text(self) -> str:
        if self.control_plane_cpu is None or self.agent_cpu is None or not self.chunks:
            return ""
        cp, agent = (1000 * x / self.chunks for x in (self.control_plane_cpu, self.agent_cpu))
        return (
            f"\n\nPer chunk: {agent:.2f} ms of the agent's CPU (reading the store a page "
            "at a time, the envelope, Autobahn's framing and masking, then the ack: "
            f"parsed, checked against §5 and committed in batches) and {cp:.2f} ms of the "
            "reference control plane's (parsing and checking the envelope; then, per "
            "read of the connection, one SQLite transaction for all its chunks and one "
            "ack per stream carrying ``highest_output_sequence``, which acks every chunk "
            "of the stream up to it, §7.5).  Both run at once; whichever is the larger, "
            "times the chunks, is the floor of the replay on an idle machine."
        )

    def to_dict(self) -> dict[str, Any]:
        """Raw figures (for ``--json``)."""
        return {
            "title": self.title,
            "chunks": self.chunks,
            "chunk_bytes": self.chunk_bytes,
            "seconds": self.seconds,
            "final_seconds": self.final_seconds,
            "fill_seconds": self.fill_seconds,
            "unacked_before": self.unacked_before,
            "unacked_after": self.unacked_after,
            "rate": self.rate,
            "control_plane_cpu": self.control_plane_cpu,
            "agent_cpu": self.agent_cpu,
            "target_seconds": self._limit(),
            "met": self.met,
        }


async def _fill(identity: Identity, tmp: str, chunks: int, chunk_bytes: int, spool: int,
                timeout: float) -> tuple[Any, int, str, float]:
    """Steps 1–3; return (the stopped control plane's port, unacked count, task id, seconds)."""
    cp = await _start_cp(identity, tmp)
    port = cp.port
    go = os.path.join(tmp, "go")
    command = (
        f"for i in $(seq 600); do [ -e {go} ] && break; sleep 0.05; done; "
        f"head -c {chunks * chunk_bytes} /dev/zero | tr '\\0' x"
    )
    agent = spawn_agent(identity, cp.ws_url, *agent_args(port, tmp, chunk_bytes, spool))
    try:
        await agent.wait_while_running(
            cp.wait_active(identity.agent_id, timeout=timeout), "the agent never became active")
        record = cp.tasks.create(identity.agent_id, command)
        started = cp.wait_message(identity.agent_id, "task.started", timeout=timeout)
        await agent.wait_while_running(started, "the task never started")
        await cp.stop()
        began = time.monotonic()
        with open(go, "w"):
            pass
        store = os.path.join(tmp, "agent.db")
        deadline = began + timeout + chunks / 50
        while not final_committed(store):
            if not agent.running or time.monotonic() > deadline:
                raise RuntimeError("the task's final was never stored:\n"
                                   + "\n".join(agent.lines[-15:]))
            await sleep(0.1)
        fill = time.monotonic() - began
    finally:
        await agent.kill()  # SIGTERM: the final and every chunk are committed first
    if not agent.exited_cleanly():
        raise RuntimeError("the filling agent did not stop cleanly:\n"
                           + "\n".join(agent.lines[-15:]))
    return port, unacked_messages(os.path.join(tmp, "agent.db")), record.task_id, fill


def final_committed(path: str) -> bool:
    """Whether a running agent's store holds a final yet."""
    return store_count(path, "SELECT count(*) FROM outbox WHERE type = 'task.final'") > 0


def agent_args(cp_port: int, tmp: str, chunk_bytes: int, spool: int) -> list[str]:
    """The agent's options: chunks of ``chunk_bytes``, cut only at that size."""
    return task_agent_args(
        cp_port, tmp,
        "--output-flush-threshold", str(chunk_bytes),
        "--output-flush-interval", "5s",
        "--spool-cap-bytes", str(spool),
        "--task-output-limit-bytes", str(spool),
    )


async def _start_cp(identity: Identity, tmp: str, port: int = 0) -> Any:
    return await start_task_control_plane([identity], tmp, port, max_output_bytes=1 << 40)


def _reactor() -> Any:
    from benchmarks.bench_support import global_reactor

    return global_reactor()


async def measure_replay(
    chunks: int = TARGET_CHUNKS, chunk_bytes: int = 1024, timeout: float = 120.0
) -> ReplayResult:
    """Fill an agent's store with ``chunks`` unacked chunks, then time their replay."""
    if chunks < 1 or chunk_bytes < 1024:
        raise ValueError("chunks must be >= 1 and chunk_bytes >= 1024")
    spool = 2 * chunks * chunk_bytes + 8 * _MB
    with tempfile.TemporaryDirectory(prefix="hostlink-bench-replay-") as tmp:
        identity = make_identity(os.path.join(tmp, "state"), "bench-replay")
        port, before, task_id, fill = await _fill(
            identity, tmp, chunks, chunk_bytes, spool, timeout)
        if before != chunks + 1:
            raise RuntimeError(f"expected {chunks} chunks and a final in the store, found {before}")
        cp = await _start_cp(identity, tmp, port)
        agent: ChildProcess | None = None
        seconds: float | None = None
        final_seconds: float | None = None
        cp_cpu: float | None = None
        agent_cpu: float | None = None
        try:
            times: dict[str, float] = {}
            stored = 0
            all_in: Deferred[None] = Deferred()

            def mark(name: str) -> None:
                times[name] = time.monotonic()
                times[f"{name}.cp"] = _own_cpu()
                if agent is not None and agent.running:
                    times[f"{name}.agent"] = cpu_seconds(agent.pid)

            def on_chunk(chunk: Any) -> None:
                nonlocal stored
                stored += 1
                if stored == chunks:
                    mark("last")
                    all_in.callback(None)

            cp.tasks.on_output(on_chunk, task_id)
            active = cp.wait_active(identity.agent_id, timeout=timeout)
            active.addCallback(lambda s: mark("hello_ack"))
            final = cp.tasks.wait_final(task_id, timeout=timeout)
            final.addCallback(lambda r: times.setdefault("final", time.monotonic()))
            agent = spawn_agent(identity, cp.ws_url, *agent_args(port, tmp, chunk_bytes, spool))
            await agent.wait_while_running(active, "the replaying agent never became active")
            try:
                await agent.wait_while_running(all_in.addTimeout(timeout, _reactor()),
                                               "the replay never completed")
                await agent.wait_while_running(final, "the final never came")
            except RuntimeError as e:
                print(f"replay: {e}", file=sys.stderr)
            if "last" in times:
                seconds = times["last"] - times["hello_ack"]
                cp_cpu = times["last.cp"] - times["hello_ack.cp"]
                if "last.agent" in times and "hello_ack.agent" in times:
                    agent_cpu = times["last.agent"] - times["hello_ack.agent"]
            if "final" in times:
                final_seconds = times["final"] - times["hello_ack"]
            await sleep(0.5)  # the agent commits the last acks
        finally:
            if agent is not None:
                await agent.kill()
            await cp.stop()
        after = unacked_messages(os.path.join(tmp, "agent.db"))
    return ReplayResult(chunks, chunk_bytes, seconds, final_seconds, fill, before, after,
                        cp_cpu, agent_cpu)


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_task_replay",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--chunks", type=int, default=TARGET_CHUNKS)
    parser.add_argument("--chunk-bytes", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=120.0)
    return parser.parse_args(argv)


async def _main(reactor: Any, args: argparse.Namespace) -> None:
    quiet_logging()
    r = await measure_replay(args.chunks, args.chunk_bytes, args.timeout)
    print(" | ".join(r.summary_row()))
    print(r.detail_rst())


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.bench_task_replay [--chunks N] [--chunk-bytes B]``."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    task.react(lambda reactor: defer.ensureDeferred(_main(reactor, args)))


if __name__ == "__main__":
    main()
