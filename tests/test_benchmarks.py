"""
Smoke tests of the benchmarks (``make bench``): each benchmark's core runs
with tiny sizes so the code cannot rot, and the pure parts (the stock
ReconnectingClientFactory emulation, binning, bounds, the report) are
checked exactly.  These assert structure and sanity, never speed.
"""

from __future__ import annotations

import cProfile
import dataclasses
import os
import random
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ReconnectingClientFactory
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from benchmarks.bench_coldstart import ColdStartResult, measure_cold_start
from benchmarks.bench_idle import IdleResult, measure_idle
from benchmarks.bench_profile import breakdown, top_functions
from benchmarks.bench_report import Results, plot_storm, render
from benchmarks.bench_storm import (
    RCF_FACTOR,
    PhaseResult,
    StockRCFBackoff,
    StormResult,
    arrivals_per_bin,
    jitter_window,
    recovery_bound,
    run_storm,
)
from benchmarks.bench_support import cpu_seconds, machine_description, rss_bytes
from benchmarks.bench_task_output import OutputResult, measure_output, write_base64_file
from benchmarks.bench_task_roundtrip import RoundTripResult, measure_roundtrip, percentile
from benchmarks.bench_tasks_report import (
    SUMMARY_HEADER,
    NotMeasured,
    TaskBenchResult,
    render_tasks,
    tasks_to_dict,
)
from benchmarks.bench_throughput import ThroughputResult, measure_throughput


class _Connector:
    """Just enough of an IConnector for ReconnectingClientFactory.retry."""

    def __init__(self) -> None:
        self.connects = 0

    def connect(self) -> None:
        self.connects += 1


class StockRCFBackoffTests(SynchronousTestCase):
    """The emulation produces exactly the stock class's delays."""

    def test_same_delays_as_twisted_for_the_same_draws(self) -> None:
        import twisted.internet.protocol as twisted_protocol

        clock = Clock()
        # The stock class draws from the random module; give it a seeded one.
        self.patch(twisted_protocol, "random", random.Random(42))
        factory = ReconnectingClientFactory()
        factory.clock = clock
        connector = _Connector()
        ours = StockRCFBackoff(random.Random(42))
        for step in range(12):
            if step == 6:  # a session became active in between
                factory.resetDelay()
                ours.reset()
            factory.retry(connector)  # type: ignore[arg-type]
            call = clock.getDelayedCalls()[0]
            expected = call.getTime() - clock.seconds()
            self.assertAlmostEqual(ours.next_delay(), expected, places=9)
            clock.advance(expected)
        self.assertEqual(connector.connects, 12)

    def test_delay_compounds_and_resets(self) -> None:
        backoff = StockRCFBackoff(random.Random(1))
        first = backoff.next_delay()
        self.assertAlmostEqual(backoff.peek_base(), first * RCF_FACTOR)
        self.assertEqual(backoff.failures, 1)
        backoff.reset()
        self.assertEqual((backoff.failures, backoff.peek_base()), (0, 1.0))

    def test_plugs_into_the_client_factory(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from benchmarks.bench_storm import _build_clients

        key = _key()
        reactor = MemoryReactorClock()
        self.patch(
            __import__("twisted.internet", fromlist=["reactor"]), "reactor", reactor
        )
        clients = _build_clients("rcf", 2, [key], "ws://127.0.0.1:9/api/v1/agents/ws", 1.0, 3)
        self.assertIsInstance(clients[0].factory.backoff, StockRCFBackoff)
        clients[0].start()
        self.assertEqual(len(reactor.tcpClients), 1)
        go = _build_clients("go", 1, [key], "ws://127.0.0.1:9/api/v1/agents/ws", 1.0, 3)
        self.assertNotIsInstance(go[0].factory.backoff, StockRCFBackoff)
        self.assertEqual(go[0].factory.backoff.jitter, "go")
        full = _build_clients("full", 1, [key], "ws://127.0.0.1:9/api/v1/agents/ws", 1.0, 3)
        self.assertEqual(full[0].factory.backoff.jitter, "full")


_KEY: Any = None


def _key() -> Any:
    global _KEY
    if _KEY is None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        _KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _KEY


class StormArithmeticTests(SynchronousTestCase):
    """Bins, windows and bounds."""

    def test_arrivals_per_bin(self) -> None:
        self.assertEqual(arrivals_per_bin([]), [])
        self.assertEqual(arrivals_per_bin([0.0, 0.05, 0.1, 0.35, -1.0]), [2, 1, 0, 1])

    def test_jitter_windows(self) -> None:
        self.assertEqual(jitter_window("go", 2.0), 1.0)
        self.assertEqual(jitter_window("full", 2.0), 2.0)
        self.assertAlmostEqual(jitter_window("rcf", 5.0), 4 * 0.119626565582)
        self.assertRaises(ValueError, jitter_window, "nope", 1.0)

    def test_recovery_bound(self) -> None:
        self.assertEqual(recovery_bound(1.0), 4.25)


def _phase(name: str, recovery: float | None, accepted: list[float]) -> PhaseResult:
    return PhaseResult(
        name=name,
        origin=1_800_000_000.0,
        agents=len(accepted),
        recovery=recovery,
        still_inactive=0 if recovery is not None else 1,
        accepted=accepted,
        attempts=accepted + [0.5],
        active=accepted,
        first_delays=[a - 0.01 for a in accepted],
        refused={"503": 1},
        fleet_cpu=0.5,
        control_plane_cpu=0.25,
        down_for=10.0 if name == "down" else 0.0,
    )


def _fake_results() -> Results:
    storms = []
    for strategy, spread in (("rcf", 0.2), ("go", 0.5), ("full", 1.0)):
        accepted = [0.75 + spread * k / 10 for k in range(10)]
        storm = StormResult(strategy, 10, 1.0, 0.3)
        storm.phases["drop"] = _phase("drop", max(accepted) + 0.1, accepted)
        storm.phases["down"] = _phase("down", None if strategy == "full" else 3.0, accepted)
        storms.append(storm)
    scale = StormResult("go", 50, 1.0, 0.3, startup_seconds=2.0)
    scale.phases["drop"] = _phase("drop", 9.0, [0.8 + k / 10 for k in range(50)])
    return Results(
        date="2026-01-01 00:00 UTC",
        machine={"cores (nproc)": "2", "CPU": "test"},
        cold_start=ColdStartResult([0.5, 0.6, 0.7], [0.4, 0.4, 0.4]),
        idle=IdleResult(60.0, 5.0, 50 << 20, [(0.0, 55 << 20), (60.0, 56 << 20)], 0.05, 12),
        throughput=ThroughputResult(1000, 369, [30_000.0], [19_000.0]),
        storms=storms,
        profile=[("hostlink_tw", 0.2), ("waiting in epoll (idle)", 0.5)],
        profile_top=[("hostlink_tw/client.py:1(f)", 3, 0.1, 0.2)],
        profile_agents=10,
        runtime=120.0,
        load=[("coldstart", 0.5), ("end", 3.5)],
        scale=scale,
    )


class ReportTests(SynchronousTestCase):
    """The document is complete, and its verdicts follow the numbers."""

    def test_render_has_every_section_and_verdict(self) -> None:
        text = render(_fake_results())
        for heading in (
            "Machine", "Targets", "Cold start", "Idle cost", "Inbound throughput",
            "Fleet reconnect storm", "One process is CPU-bound", "50 agents",
            "Reading the storm, and when to choose full jitter",
        ):
            self.assertIn(f"\n{heading}\n", text)
        self.assertIn("0.95 ×", text)  # throughput 19,000 / 20,000
        self.assertIn("Cold start ≤ 1.5 × import floor", text)
        # cold start 0.6/0.4 = 1.5: met; throughput: missed; full never recovered in run 2.
        target_lines = text.split("\nTargets\n")[1].split("\n\n")[0].splitlines()
        cold = next(line for line in target_lines if line.startswith("Cold start"))
        self.assertIn("**met**", cold)
        inbound = next(line for line in target_lines if "inbound" in line)
        self.assertIn("**missed**", inbound)
        self.assertIn("never", text)
        self.assertIn("storm.png", text)
        self.assertIn("Other jobs shared this machine", text)  # load 3.5 on 2 cores

    def test_missing_benchmarks_say_not_run(self) -> None:
        text = render(Results(date="d", machine={"CPU": "x"}))
        self.assertEqual(text.count("Not run."), 5)  # four of phase 1, phase 2's part

    def test_plot(self) -> None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise self.skipTest("matplotlib is only in the bench extra") from None
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "storm.png")
            plot_storm(_fake_results().storms, path)
            with open(path, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_result_round_trip(self) -> None:
        storm = _fake_results().storms[1]
        again = StormResult.from_dict(storm.to_dict())
        self.assertEqual(again.to_dict(), storm.to_dict())
        drop = again.phases["drop"]
        self.assertEqual(drop.peak, max(arrivals_per_bin(drop.accepted)))
        self.assertEqual(sum(drop.arrivals), 10)


def _roundtrip(median_ms: float, floor_ms: float) -> RoundTripResult:
    return RoundTripResult(
        tasks=[median_ms / 1000] * 3,
        floor_twisted=[floor_ms / 1000] * 3,
        floor_subprocess=[floor_ms / 1000] * 3,
        store_filesystem="ext4",
        agent_cpu=0.03,
        stages=[(0.001, 0.002, 0.003)] * 3,
        elsewhere=[0.05],
        elsewhere_cpu=0.01,
        commits=[0.001, 0.002, 0.004],
    )


def _output(seconds: float, floor_seconds: float, rss_max: int) -> OutputResult:
    return OutputResult(
        size=64 << 20, flush_threshold=16384, seconds=seconds,
        seconds_from_first_output=seconds - 0.1, floor_seconds=floor_seconds,
        rss_before=50 << 20, rss_max=rss_max, complete=True, floor_complete=True,
        chunks=4097, agent_cpu=1.0, cp_file_bytes=70 << 20, cp_rss_growth=1 << 20,
        store_filesystem="ext4", settings={"--output-flush-threshold": "16384"},
    )


class TaskReportTests(SynchronousTestCase):
    """Phase 2's part of the document: one summary table, one subsection each."""

    def test_results_satisfy_the_interface(self) -> None:
        for result in (_roundtrip(20, 2), _output(2, 1, 60 << 20),
                       NotMeasured("Replay", "≤ 3 s", "not written yet")):
            self.assertIsInstance(result, TaskBenchResult)
            self.assertEqual(len(result.summary_row()), len(SUMMARY_HEADER))

    def test_roundtrip_verdict_follows_the_margin(self) -> None:
        self.assertTrue(_roundtrip(16.9, 2).met)   # floor + 14.9 ms
        self.assertFalse(_roundtrip(17.1, 2).met)  # floor + 15.1 ms
        result = _roundtrip(30, 2)
        self.assertAlmostEqual(result.margin, 0.028)
        self.assertIn("floor + 28.0 ms", result.summary_row()[3])
        self.assertEqual(percentile([5.0, 1.0, 3.0, 2.0, 4.0], 99), 5.0)
        self.assertEqual(percentile([float(i) for i in range(1, 201)], 99), 198.0)

    def test_output_verdict_needs_rate_rss_and_bytes(self) -> None:
        self.assertTrue(_output(2.0, 1.0, 60 << 20).met)       # 50 %, +10 MiB
        self.assertFalse(_output(2.1, 1.0, 60 << 20).met)      # 48 %
        self.assertFalse(_output(1.0, 1.0, 71 << 20).met)      # +21 MiB
        self.assertFalse(dataclasses.replace(_output(1.0, 1.0, 60 << 20), complete=False).met)
        self.assertEqual(_output(1.0, 1.0, 40 << 20).rss_growth, 0)

    def test_render(self) -> None:
        results = [_roundtrip(30, 2), _output(2.0, 1.0, 60 << 20),
                   NotMeasured("Replay", "≤ 3 s", "not written yet")]
        text = render_tasks(results)
        self.assertTrue(text.startswith("Phase 2: tasks\n--------------\n"))
        for title in ("Task round trip", "Output throughput", "Replay"):
            self.assertIn(f"\n{title}\n{'~' * len(title)}\n", text)
        lines = text.splitlines()
        self.assertIn("**missed**", next(line for line in lines if line.startswith("Task round")))
        self.assertIn("**met**", next(line for line in lines if line.startswith("Output of")))
        self.assertIn("not run", next(line for line in lines if line.startswith("Replay ")))
        self.assertIn("Not measured: not written yet", text)
        self.assertIn("posix_spawnp", text)  # the elsewhere-workdir note
        self.assertIn("one commit takes 2.0 ms (median, p99 4.0 ms)", text)
        self.assertIn("Ours, fixed — one fsync per chunk", text)
        self.assertEqual(render_tasks([]), "Phase 2: tasks\n--------------\nNot run.\n\n")

    def test_whole_document_and_json(self) -> None:
        from benchmarks.bench_report import results_to_dict

        results = _fake_results()
        results.tasks = [_roundtrip(30, 2), _output(2.0, 1.0, 60 << 20)]
        text = render(results)
        self.assertIn("\nPhase 2: tasks\n", text)
        self.assertNotIn("Phase 2: tasks\n--------------\nNot run.", text)
        dumped = results_to_dict(results)["tasks"]
        self.assertEqual([d["title"] for d in dumped], ["Task round trip", "Output throughput"])
        self.assertEqual(dumped, tasks_to_dict(results.tasks))
        self.assertFalse(dumped[0]["met"])
        self.assertAlmostEqual(dumped[1]["ratio"], 0.5)

    def test_run_knows_the_task_benchmarks(self) -> None:
        from benchmarks.run import BENCHMARKS, _parse

        self.assertIn("task-roundtrip", BENCHMARKS)
        self.assertIn("task-output", BENCHMARKS)
        args = _parse(["--only", "task-output", "--output-mib", "1"])
        self.assertEqual((args.only, args.output_mib), (["task-output"], 1.0))

    def test_base64_file(self) -> None:
        import hashlib

        path = self.mktemp()
        digest = write_base64_file(path, 100_003)
        with open(path, "rb") as f:
            data = f.read()
        self.assertEqual(len(data), 100_003)
        self.assertEqual(hashlib.sha256(data).hexdigest(), digest)
        data.decode("ascii")  # valid text: what the control plane stores is the bytes


class ProfileTests(SynchronousTestCase):
    """The profile summary reads a real cProfile file."""

    def test_breakdown(self) -> None:
        from hostlink_tw.protocol import ACK, ack_payload, make_envelope, parse_envelope

        profile = cProfile.Profile()
        profile.enable()
        for i in range(50):
            env = make_envelope(ACK, "agent-1", ack_payload(f"msg_{i}", "agent.hello"))
            parse_envelope(env.to_json(), "agent-1")
        profile.disable()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "p.prof")
            profile.dump_stats(path)
            owners = dict(breakdown(path))
            top = top_functions(path, 5)
        self.assertIn("hostlink_tw", owners)
        self.assertTrue(all(v >= 0 for v in owners.values()))
        self.assertEqual(len(top), 5)
        self.assertGreaterEqual(top[0][2], top[-1][2])


class ThroughputSmokeTests(SynchronousTestCase):
    """The throughput benchmark's session is really active and survives the acks."""

    def test_tiny_run(self) -> None:
        # More than the 5,000 acks the step profile replays: the checks must
        # see the timed runs' last ack, not the profile's.
        result = measure_throughput(envelopes=5200, repeats=1)
        self.assertEqual(result.envelopes_per_repeat, 5200)
        self.assertIn("the message_in event", result.shares)
        self.assertTrue(all(0 <= v <= 1 for v in result.shares.values()))
        self.assertGreater(result.on_message_rate, 0)
        self.assertGreater(result.data_received_rate, 0)
        self.assertGreater(result.envelope_bytes, 100)
        self.assertEqual(set(result.to_dict()) >= {"met", "ratio"}, True)


class ProcessSmokeTests(TestCase):
    """Cold start, idle and storm with real processes on 127.0.0.1, tiny sizes."""

    timeout = 90

    def test_proc_readings(self) -> None:
        pid = os.getpid()
        self.assertGreater(rss_bytes(pid), 1 << 20)
        self.assertGreater(cpu_seconds(pid), 0)
        machine = machine_description()
        self.assertIn("Twisted", machine)
        self.assertIn("CPU", machine)

    def test_cold_start(self) -> defer.Deferred[None]:
        async def check() -> None:
            result = await measure_cold_start(runs=1)
            self.assertEqual((len(result.agent_runs), len(result.floor_runs)), (1, 1))
            self.assertGreater(result.agent_median, 0)
            self.assertGreater(result.floor_median, 0)

        return defer.ensureDeferred(check())

    def test_idle(self) -> defer.Deferred[None]:
        async def check() -> None:
            # 5 s is the shortest ping twistd hostlink accepts: none within 1 s.
            result = await measure_idle(
                seconds=1.0, ping_interval=5.0, sample_every=0.5, settle=0.1
            )
            self.assertGreaterEqual(len(result.rss_samples), 3)
            self.assertGreater(result.floor_rss, 1 << 20)
            self.assertGreater(result.rss, result.floor_rss)
            self.assertEqual(result.pings_seen, 0)
            self.assertGreaterEqual(result.cpu, 0)
            self.assertGreaterEqual(result.seconds, 1.0)

        return defer.ensureDeferred(check())

    def test_task_roundtrip(self) -> defer.Deferred[None]:
        async def check() -> None:
            result = await measure_roundtrip(tasks=3, floor_runs=2, elsewhere_tasks=1)
            self.assertEqual((len(result.tasks), len(result.stages)), (3, 3))
            self.assertEqual(len(result.elsewhere), 1)
            self.assertEqual((len(result.floor_twisted), len(result.floor_subprocess)), (2, 2))
            for seconds, stages in zip(result.tasks, result.stages, strict=True):
                self.assertAlmostEqual(sum(stages), seconds, places=6)
                self.assertTrue(all(s > 0 for s in stages), stages)
            self.assertGreater(result.floor, 0)
            self.assertEqual(len(result.commits), 200)
            self.assertTrue(all(c > 0 for c in result.commits))
            self.assertIn("Median", result.detail_rst())
            self.assertIn("one commit takes", result.detail_rst())

        return defer.ensureDeferred(check())

    def test_task_output(self) -> defer.Deferred[None]:
        async def check() -> None:
            result = await measure_output(size=300_000, flush_threshold=16384)
            self.assertTrue(result.complete)
            self.assertTrue(result.floor_complete)
            self.assertEqual(result.chunks, -(-300_000 // 16384))
            self.assertGreaterEqual(result.rss_max, result.rss_before)
            self.assertGreater(result.seconds, result.seconds_from_first_output)
            self.assertGreater(result.cp_file_bytes, 300_000)

        return defer.ensureDeferred(check())

    def test_storm(self) -> defer.Deferred[None]:
        async def check() -> None:
            result = await run_storm(
                "go", 4, down=0.5, reconnect_min=0.2, keys=1, settle=0.2, timeout=30
            )
            self.assertEqual(sorted(result.phases), ["down", "drop"])
            for phase in result.phases.values():
                self.assertIsNotNone(phase.recovery)
                self.assertEqual(phase.still_inactive, 0)
                self.assertEqual(len(phase.accepted), 4)
                self.assertGreaterEqual(len(phase.attempts), 4)
            drop = result.phases["drop"]
            # Go jitter: every first retry within ±25 % of RECONNECT_MIN.
            self.assertEqual(len(drop.first_delays), 4)
            for delay in drop.first_delays:
                self.assertTrue(0.15 <= delay <= 0.25, delay)
            self.assertGreater(result.sign_ms, 0)

        return defer.ensureDeferred(check())


class OutputPlaceTests(SynchronousTestCase):
    """What the benchmark commands write, and where (issue 9 item 20)."""

    def test_bench_writes_into_the_results_folder_not_docs(self) -> None:
        from benchmarks.bench_support import REPO
        from benchmarks.run import _parse

        args = _parse([])
        results = REPO / "benchmarks" / "results"
        self.assertEqual((Path(args.rst).parent, Path(args.png).parent), (results, results))
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(results / "performance.rst")],
            cwd=REPO,
            timeout=30,
        )
        self.assertEqual(ignored.returncode, 0, "benchmarks/results/ must be git-ignored")

    def test_chaos_note_counts_name_servers_without_addresses(self) -> None:
        from evidence.chaos import _resolver_note

        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write("# resolv.conf\nnameserver 10.1.2.3\nnameserver fe80::1%eth0\n\nsearch x\n")
        note = _resolver_note(path)
        self.assertIn("2 configured", note)
        self.assertNotIn("10.1.2.3", note)
        self.assertNotIn("fe80", note)

    def test_docs_name_no_host_address(self) -> None:
        """Published results carry no address of the machine that made them."""
        from benchmarks.bench_support import REPO

        generated = ("chaos.rst", "performance.rst", "soak.rst", "fuzzing.rst")
        for doc in (REPO / "docs" / name for name in generated):
            for address in re.findall(r"\b(?:\d{1,3}\.){3}\d{1,3}\b", doc.read_text()):
                with self.subTest(doc=doc.name, address=address):
                    self.assertTrue(
                        address.startswith("127.") or address == "0.0.0.0",  # noqa: S104
                        f"{doc.name} names {address}",
                    )
