"""
``docs/performance.rst`` and ``docs/storm.png`` from the benchmark results.

Every number in the document comes from the run that writes it; the prose
that depends on the numbers is generated from them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.bench_coldstart import TARGET_RATIO, ColdStartResult
from benchmarks.bench_idle import TARGET_CPU_PER_MINUTE, TARGET_RSS_OVER_FLOOR, IdleResult
from benchmarks.bench_rst import section as _section
from benchmarks.bench_rst import table as _table
from benchmarks.bench_rst import verdict as _verdict
from benchmarks.bench_storm import (
    BIN,
    RCF_JITTER,
    StormResult,
    arrivals_per_bin,
    recovery_bound,
)
from benchmarks.bench_tasks_report import TaskBenchResult, render_tasks, tasks_to_dict
from benchmarks.bench_throughput import TARGET_PER_SECOND, ThroughputResult

__all__ = ["Results", "plot_storm", "render"]

_LABELS = {
    "rcf": "Twisted ReconnectingClientFactory (stock)",
    "go": "Go ±25 % (default)",
    "full": "full jitter",
}
_SHORT = {"rcf": "stock RCF", "go": "go ±25 %", "full": "full"}
_STEP_ORDER = (
    "parse_envelope (JSON + every §5 rule)",
    "  of which JSON parsing with duplicate-key/depth checks",
    "  of which Envelope.validate",
    "the session's dispatch (ack handling, last-ack bookkeeping)",
    "the message_in event",
)
_MB = 1024 * 1024


@dataclass
class Results:
    """Everything one ``make bench`` measured (a benchmark not run is None)."""

    date: str
    machine: dict[str, str]
    cold_start: ColdStartResult | None = None
    idle: IdleResult | None = None
    throughput: ThroughputResult | None = None
    storms: list[StormResult] = field(default_factory=list)
    #: (owner, seconds) of the profiled storm, and its fleet size.
    profile: list[tuple[str, float]] = field(default_factory=list)
    profile_top: list[tuple[str, int, float, float]] = field(default_factory=list)
    profile_agents: int = 0
    runtime: float = 0.0
    command: str = "make bench"
    #: (benchmark, 1-min load average) sampled before each benchmark and at the end.
    load: list[tuple[str, float]] = field(default_factory=list)
    #: The Go-jitter fleet at a larger size (run 1 only), if run.
    scale: StormResult | None = None
    #: Phase 2's benchmarks, in the order they ran (see bench_tasks_report).
    tasks: list[TaskBenchResult] = field(default_factory=list)


def _cores(r: Results) -> int:
    try:
        return int(r.machine.get("cores (nproc)", "1"))
    except ValueError:
        return 1


def _fmt_s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def _summary_rows(r: Results) -> list[list[str]]:
    rows: list[list[str]] = []
    c = r.cold_start
    if c is not None:
        rows.append([
            "Cold start ≤ 1.5 × import floor",
            f"{c.agent_median:.3f} s vs floor {c.floor_median:.3f} s",
            f"{c.ratio:.2f} × floor (limit {TARGET_RATIO:g})",
            _verdict(c.met),
        ])
    i = r.idle
    if i is not None:
        rows.append([
            "Idle RSS ≤ floor + 10 MB",
            f"{i.rss / _MB:.1f} MB vs floor {i.floor_rss / _MB:.1f} MB",
            f"+{i.rss_over_floor / _MB:.1f} MB = {i.rss_over_floor / TARGET_RSS_OVER_FLOOR:.2f}"
            " × allowance",
            _verdict(i.rss_met),
        ])
        rows.append([
            "Idle CPU ≤ 0.1 s per minute",
            f"{i.cpu:.2f} s over {i.seconds:.0f} s",
            f"{i.cpu_per_minute:.3f} s/min = {i.cpu_per_minute / TARGET_CPU_PER_MINUTE:.2f}"
            " × limit",
            _verdict(i.cpu_met),
        ])
    t = r.throughput
    if t is not None:
        rows.append([
            "≥ 20,000 inbound envelopes/s, one core",
            f"{t.data_received_rate:,.0f}/s framed, {t.on_message_rate:,.0f}/s onMessage",
            f"{t.ratio:.2f} × target",
            _verdict(t.met),
        ])
    for s in r.storms:
        drop = s.phases.get("drop")
        if drop is None:
            continue
        bound = recovery_bound(s.reconnect_min)
        recovery = drop.recovery
        rows.append([
            f"{s.agents:,}-agent storm, {_SHORT[s.strategy]}: active again ≤ {bound:.2f} s",
            _fmt_s(recovery),
            "—" if recovery is None else f"{recovery / bound:.2f} × bound",
            _verdict(s.drop_recovery_met()),
        ])
        rows.append([
            f"{s.agents:,}-agent storm, {_SHORT[s.strategy]}: peak ≤ 2 × mean",
            f"{drop.peak} per 100 ms vs mean {s.mean_per_bin:.0f}",
            f"{drop.peak / s.mean_per_bin:.2f} × mean (limit 2)",
            _verdict(s.drop_peak_met()),
        ])
    return rows


def _storm_rows(storms: Sequence[StormResult], phase: str) -> list[list[str]]:
    rows = []
    for s in storms:
        p = s.phases.get(phase)
        if p is None:
            continue
        # First delays are drawn at the loss; only after a drop is that the origin.
        scheduled = arrivals_per_bin(p.first_delays) if phase == "drop" else []
        reconnects = max(1, len(p.active))
        rows.append([
            _SHORT[s.strategy],
            _fmt_s(p.recovery) + ("" if not p.still_inactive else f" ({p.still_inactive} left)"),
            f"{p.peak}",
            f"{max(scheduled)}" if scheduled else "—",
            f"{len(p.attempts):,}",
            f"{p.failed_attempts:,}",
            ", ".join(f"{k}: {v}" for k, v in sorted(p.refused.items())) or "none",
            f"{p.fleet_cpu:.2f} s",
            f"{p.fleet_cpu * 1000 / reconnects:.2f} ms",
            f"{p.control_plane_cpu:.2f} s",
        ])
    return rows


_STORM_HEADER = [
    "strategy",
    "all active after",
    "peak /100 ms",
    "peak scheduled",
    "attempts",
    "failed",
    "refused",
    "fleet CPU",
    "CPU per session",
    "control plane CPU",
]


def _storm_text(r: Results) -> str:
    out: list[str] = []
    storms = r.storms
    if not storms:
        return "Not run.\n"
    s0 = storms[0]
    out.append(
        f"{s0.agents:,} agents (``HostlinkClient`` instances sharing one reactor) in one "
        "process, against the reference control plane in a second process, both on "
        f"127.0.0.1; ``RECONNECT_MIN`` = {s0.reconnect_min:g} s.  The agents share 8 RSA "
        "keys under distinct agent ids, all authorized.  The control plane listens with "
        "a backlog of ``somaxconn``.  Each strategy runs in a fresh fleet process:\n\n"
        "* **Run 1 — drop**: the control plane aborts every session's TCP connection at "
        "once and keeps listening.  Times are from the drop.\n"
        f"* **Run 2 — outage**: the control plane stops (close 1001 to every session, "
        f"stops listening) and listens again {s0.phases['down'].down_for:g} s later. "
        "Times are from its return.\n\n"
        if "down" in s0.phases
        else "* **Run 1 — drop** only (the outage run was skipped).\n\n"
    )
    out.append(
        "*all active after*: until the last agent's ``agent.hello_ack``; *peak /100 ms*: "
        "the most upgrades the control plane accepted in one 100 ms bin; *peak scheduled*: "
        "the same for the first retry times the agents drew (what a fleet of separate "
        "hosts, each with its own CPU, would send); *failed*: attempts that did not end in "
        "a session (refused connections during the outage, timeouts); *CPU per session*: "
        "the fleet process's CPU over the run divided by the sessions it re-established.\n\n"
    )
    strategies = {
        "rcf": (
            f"Twisted's stock ``ReconnectingClientFactory`` delays, emulated step for step "
            f"(``benchmarks.bench_storm.StockRCFBackoff``): initialDelay 1 s, factor *e*, "
            f"Gaussian jitter σ = {RCF_JITTER} × delay stored back into the delay, "
            "maxDelay 3600 s"
        ),
        "go": "the default: doubling from ``RECONNECT_MIN``, uniform ±25 %",
        "full": "``HOSTLINK_WS_RECONNECT_JITTER=full``: uniform in [0, delay]",
    }
    for key in ("rcf", "go", "full"):
        if any(s.strategy == key for s in storms):
            out.append(f"* **{_SHORT[key]}** — {strategies[key]}\n")
    out.append("\n")
    out.append(_section("Run 1: every session dropped, control plane listening", "~"))
    out.append(_table(_STORM_HEADER, _storm_rows(storms, "drop")) + "\n\n")
    if any("down" in s.phases for s in storms):
        out.append(_section("Run 2: control plane down, then back", "~"))
        out.append(_table(_STORM_HEADER, _storm_rows(storms, "down")) + "\n\n")
    out.append(
        ".. figure:: storm.png\n   :alt: upgrades accepted per 100 ms after the drop and "
        "after the return, one line per strategy\n\n"
        "   Upgrades the control plane accepted per 100 ms (solid), and the first retries "
        "the agents scheduled (dotted: the shape a fleet of separate hosts would produce).\n\n"
    )
    return "".join(out)


def _scale_text(r: Results) -> str:
    s = r.scale
    if s is None or "drop" not in s.phases:
        return ""
    p = s.phases["drop"]
    out = [_section(f"{s.agents:,} agents", "~")]
    out.append(
        f"The same run 1 with {s.agents:,} go agents in one process (``--scale-agents``; "
        "``python -m benchmarks.run --agents 5000`` runs every strategy at that size).  "
        f"Fleet start-up took {s.startup_seconds:.1f} s.\n\n"
    )
    out.append(_table(_STORM_HEADER, _storm_rows([s], "drop")) + "\n\n")
    bound = recovery_bound(s.reconnect_min)
    out.append(
        f"All active again after {_fmt_s(p.recovery)} against the 1,000-agent bound of "
        f"{bound:.2f} s: the process needs {p.fleet_cpu:.1f} s of CPU for "
        f"{s.agents:,} sessions"
        + (
            f", and {p.failed_attempts:,} attempts failed (the control plane gives a new "
            "TCP connection 10 s to deliver its upgrade request; a fleet process that is "
            "behind misses that, backs off and tries again later)"
            if p.failed_attempts
            else ""
        )
        + ".  This is a limit of packing thousands of agents into one Python process, "
        "not of an agent.\n\n"
    )
    return "".join(out)


def _cpu_bound_text(r: Results) -> str:
    storms = r.storms
    go = next((s for s in storms if s.strategy == "go"), storms[0] if storms else None)
    if go is None or "drop" not in go.phases:
        return ""
    drop = go.phases["drop"]
    per = drop.fleet_cpu / max(1, len(drop.active))
    sign = go.sign_ms / 1000
    out = [
        _section("One process is CPU-bound", "~"),
        f"Re-establishing one session costs the fleet process {per * 1000:.2f} ms of CPU "
        f"({go.strategy} strategy, run 1); the RSA-PSS signature of the upgrade is "
        f"{go.sign_ms:.2f} ms of it ({sign / per:.0%}), measured alone on this machine — "
        "so signing is a minority of it; the rest is Autobahn's and Twisted's "
        "per-connection work (profile below).  "
        f"{go.agents:,} reconnects therefore need about {per * go.agents:.1f} s of one core, "
        "however the retries are spread: once the jitter window has opened, the arrival "
        "curve is the process's service rate, not the jitter's shape, and the time to "
        "all-active is mostly CPU.  A real fleet has one agent per host and its own CPU "
        "per agent; its arrivals follow the *scheduled* curve.\n\n",
    ]
    if r.profile:
        total = sum(v for _, v in r.profile) or 1.0
        busy = sum(v for k, v in r.profile if "idle" not in k) or 1.0
        out.append(
            f"cProfile of run 1 with {r.profile_agents:,} go agents (profiling slows "
            "everything down alike; the shares are what matter), own time by owner:\n\n"
        )
        rows = [
            [k, f"{v:.2f} s", f"{v / total:.0%}", "—" if "idle" in k else f"{v / busy:.0%}"]
            for k, v in r.profile
            if v / total >= 0.005
        ]
        out.append(_table(["owner", "own time", "of wall", "of busy"], rows) + "\n\n")
        if r.profile_top:
            out.append("The functions with the most own time:\n\n")
            out.append(
                _table(
                    ["function", "calls", "own", "cumulative"],
                    [[f"``{w}``", f"{c:,}", f"{o:.3f} s", f"{cu:.3f} s"] for w, c, o, cu in
                     r.profile_top],
                )
                + "\n\n"
            )
    return "".join(out)


def _choose_text(r: Results) -> str:
    by = {s.strategy: s for s in r.storms}
    go, full, rcf = by.get("go"), by.get("full"), by.get("rcf")
    if go is None or full is None or "drop" not in go.phases or "drop" not in full.phases:
        return ""
    gd, fd = go.phases["drop"], full.phases["drop"]
    g_sched = max(arrivals_per_bin(gd.first_delays), default=0)
    f_sched = max(arrivals_per_bin(fd.first_delays), default=0)
    out = [_section("Reading the storm, and when to choose full jitter", "~")]
    out.append(
        f"**After a drop**, the Go ±25 % jitter sends the whole fleet within "
        f"[{0.75 * go.reconnect_min:g}, {1.25 * go.reconnect_min:g}] s: {g_sched} first "
        f"retries in the busiest 100 ms for {go.agents:,} agents, and none before "
        f"{0.75 * go.reconnect_min:g} s.  Full jitter spreads the same fleet over "
        f"[0, {full.reconnect_min:g}] s: {f_sched} in the busiest 100 ms "
        f"({f_sched / max(1, g_sched):.0%} of the Go peak), and the first agents are back "
        "at once.  "
    )
    if gd.recovery is not None and fd.recovery is not None:
        out.append(
            f"In this one-process fleet the last agent was back after {fd.recovery:.2f} s "
            f"with full jitter and {gd.recovery:.2f} s with Go's.  "
        )
    if rcf is not None and "drop" in rcf.phases:
        rd = rcf.phases["drop"]
        r_sched = max(arrivals_per_bin(rd.first_delays), default=0)
        out.append(
            f"The stock RCF's first retry is normal around 1 s (σ ≈ 0.12 s): about as "
            f"wide as Go's window but peaked, {r_sched} scheduled in the busiest 100 ms "
            f"({r_sched / max(1, g_sched):.0%} of Go's).  "
        )
    out.append("\n\n")
    gdown, fdown = go.phases.get("down"), full.phases.get("down")
    if gdown is not None and fdown is not None:
        out.append(
            f"**After an outage** of {gdown.down_for:g} s, the last agent was back "
            f"{_fmt_s(fdown.recovery)} after the return with full jitter and "
            f"{_fmt_s(gdown.recovery)} with Go's ({len(fdown.attempts):,} against "
            f"{len(gdown.attempts):,} attempts).  "
        )
        if (fdown.recovery or float("inf")) > (gdown.recovery or float("inf")):
            out.append(
                "Every failed attempt doubles the base delay; full jitter's waits average "
                "half of it, so its agents fail more often during the outage, reach "
                "longer base delays by the time the control plane returns, and a wait "
                "drawn from [0, base] can end long after the return.  "
            )
        if rcf is not None and "down" in rcf.phases:
            rdown = rcf.phases["down"]
            out.append(
                f"The stock RCF took {_fmt_s(rdown.recovery)}: with factor *e* its "
                "retries come at about 1, 3.7, 11.1 and 31 s after the loss, so an agent "
                "whose third retry fell just before the return waits about 20 s more.  "
            )
        out.append("\n\n")
    downs = {
        k: v.phases["down"].recovery
        for k, v in by.items()
        if "down" in v.phases and v.phases["down"].recovery is not None
    }
    best_after_outage = bool(downs) and min(downs, key=lambda k: downs[k]) == "go"
    out.append(
        "**Choose** — keep the default (Go ±25 %) where control-plane operators size "
        "their gateways for the reference agent's behaviour: same first retry, same "
        "spread, same ceiling"
        + (", and the quickest recovery after an outage in this run" if best_after_outage else "")
        + ".  Set "
        "``HOSTLINK_WS_RECONNECT_JITTER=full`` for large fleets behind a gateway whose "
        "capacity limits recovery — thousands of agents per gateway instance, TLS "
        "termination or signature checks near their limit, rate-limited upgrades — and "
        "whose sessions are dropped more often than the gateway is down (deploys behind "
        "a load balancer, connection draining, idle-timeout sweeps): there the busiest "
        "100 ms after a drop matters more than the last agent's return, and full jitter "
        "spreads the first retries over twice the window and removes the wave at "
        "``RECONNECT_MIN``.  It is the wrong choice for outages that last many "
        "``RECONNECT_MIN``: it spreads the returns out further.\n\n"
    )
    return "".join(out)


def _owner_share(r: Results, owner: str) -> float | None:
    busy = sum(v for k, v in r.profile if "idle" not in k)
    for k, v in r.profile:
        if k == owner and busy > 0:
            return v / busy
    return None


def _findings_text(r: Results) -> str:
    out = [_section("Findings: what is ours, what is the stack's")]
    c = r.cold_start
    if c is not None and c.status_import is not None:
        out.append(
            "* **Ours, fixed — start-up imported the status page's dependencies.** "
            "``hostlink_tw.service`` used to import ``hostlink_tw.status`` (and with it "
            "``prometheus_client``, ``twisted.web.server``, ``twisted.application.internet``) "
            "at module level, although the status page is off by default; it now imports "
            "it only when ``HOSTLINK_WS_STATUS_LISTEN`` is set, so the default start does "
            f"not pay the {c.status_import * 1000:.0f} ms measured above "
            "(``tests/test_tap.py`` keeps it that way).\n"
        )
    t = r.throughput
    if t is not None and t.shares:
        ack = next((v for k, v in t.shares.items() if k.startswith("ack handling")), None)
        if ack is not None:
            out.append(
                "* **Ours, fixed — an ack's payload was checked twice.** ``_on_ack`` parsed "
                "the payload ``Envelope.validate`` had already checked; it now reads the "
                f"validated field, and ack handling is {ack:.0%} of ``onMessage``.\n"
            )
    pformat_share = _owner_share(r, "Autobahn debug-log arguments (pprint.pformat)")
    if pformat_share is not None:
        out.append(
            f"* **Stack (Autobahn 26.10) — debug-log arguments built eagerly.** "
            "``WebSocketProtocol._connectionMade`` and ``startHandshake`` call "
            "``pprint.pformat`` on the protocol options and transport details for "
            "``log.debug`` lines that are then filtered out: "
            f"{pformat_share:.0%} of the fleet's busy CPU per reconnect in the profile "
            "above.  One agent pays it once per connection (well under a millisecond); "
            "the fix belongs upstream (format lazily, or only when debug is enabled).\n"
        )
    sign_share = _owner_share(r, "RSA-PSS signing (cryptography)")
    if sign_share is not None:
        out.append(
            f"* **Protocol — one RSA-PSS signature per attempt** (PROTOCOL §2): "
            f"{sign_share:.0%} of the fleet's busy CPU per reconnect.  Inherent, and "
            "smaller than the ~1 ms one might expect: Twisted's and Autobahn's "
            "per-connection work, not signing, is most of what bounds a single process "
            "holding thousands of agents.\n"
        )
    out.append(
        "* **Benchmark harness — the fleet in one process.**  Thousands of agents in one "
        "Python process share one core; recovery times grow with N because the work is "
        "serial, not because any agent waits longer than its jitter.\n"
    )
    return "".join(out) + "\n"


def render(r: Results) -> str:
    """The whole of ``docs/performance.rst``."""
    out: list[str] = []
    out.append(_section("Performance", "="))
    out.append(
        f"Measured by ``{r.command}`` (``python -m benchmarks.run``) on {r.date}"
        + (f"; the whole run took {r.runtime / 60:.1f} min" if r.runtime else "")
        + ".  This file and ``storm.png`` are generated; rerun the command to measure "
        "your machine (it writes ``benchmarks/results/``).  Everything talks to 127.0.0.1 only.\n\n"
    )
    out.append(_section("Machine"))
    machine = dict(r.machine)
    if r.load:
        loads = [v for _, v in r.load]
        machine["1-min load average during the run"] = (
            f"{min(loads):.2f} – {max(loads):.2f} (sampled before each benchmark)"
        )
    out.append(_table(["item", "value"], [[k, v] for k, v in machine.items()]) + "\n\n")
    if r.load and max(v for _, v in r.load) > _cores(r) + 0.5:
        out.append(
            "Other jobs shared this machine during the run (a load average above its "
            f"{_cores(r)} cores).  Wall-clock numbers (cold start, storm recovery) are "
            "therefore pessimistic; CPU-time numbers (idle CPU, throughput, CPU per "
            "session) are much less affected.\n\n"
        )
    out.append(_section("Targets"))
    rows = _summary_rows(r)
    out.append(_table(["target", "measured", "ratio", "verdict"], rows) + "\n\n")
    if r.storms:
        out.append(
            "The storm targets apply to run 1 (sessions dropped, control plane listening), "
            "with the bound 1.25 × ``RECONNECT_MIN`` + 3 s; the *mean* is the fleet spread "
            "evenly over the strategy's jitter window for the first retry (Go "
            "[0.75, 1.25] × min, full [0, 1] × min, stock RCF ± 2 σ around 1 s), per 100 ms; "
            "the *peak* is the busiest 100 ms of upgrades the control plane accepted.\n\n"
        )
    c = r.cold_start
    out.append(_section("Cold start"))
    if c is None:
        out.append("Not run.\n\n")
    else:
        out.append(
            "From spawning ``twistd -n --pidfile= --logfile=- hostlink --enable --url ws://"
            "127.0.0.1:PORT/api/v1/agents/ws --state-path … --private-key-path …`` until the "
            "control plane (in the benchmark's process) has the agent's ``agent.hello``, "
            "against the floor: a bare ``python -c \"import autobahn.twisted.websocket\"`` "
            "from spawn to exit.  Runs alternate, one warm-up each is not counted.\n\n"
        )
        out.append(
            _table(
                ["measurement", "median", "runs"],
                [
                    ["agent: spawn → hello", f"{c.agent_median:.3f} s",
                     ", ".join(f"{x:.3f}" for x in c.agent_runs)],
                    ["floor: bare import", f"{c.floor_median:.3f} s",
                     ", ".join(f"{x:.3f}" for x in c.floor_runs)],
                ],
            )
            + f"\n\nRatio {c.ratio:.2f} (target ≤ {TARGET_RATIO:g}): {_verdict(c.met)}.  "
            "The agent's start-up beyond the import is twistd itself, the plugin lookup, "
            "reading the key, one signature, the TCP connect and the upgrade.\n\n"
        )
        if c.status_import is not None:
            out.append(
                f"Importing ``hostlink_tw.status`` costs {c.status_import * 1000:.0f} ms "
                f"({c.status_import / c.agent_median:.0%} of the median start) on top of "
                "everything else the agent loads (``prometheus_client``, ``twisted.web.server``, "
                "``twisted.application.internet``); only an agent with a status page "
                "configured pays it (see *Findings*).\n\n"
            )
    i = r.idle
    out.append(_section("Idle cost"))
    if i is None:
        out.append("Not run.\n\n")
    else:
        rss = [x for _, x in i.rss_samples]
        out.append(
            f"The agent process active for {i.seconds:.0f} s with a "
            f"{i.ping_interval:g} s ping ({i.pings_seen} pings reached the control plane; "
            "the control plane's own 30 s keepalive was on).  CPU is utime + stime from "
            "``/proc/PID/stat`` (10 ms ticks) over the window; RSS is ``VmRSS`` sampled "
            "every 5 s.  The floor is a bare Python that imported "
            "``autobahn.twisted.websocket`` and sleeps.\n\n"
        )
        out.append(
            _table(
                ["measurement", "value", "target", "verdict"],
                [
                    ["RSS (max over the window)", f"{i.rss / _MB:.1f} MB",
                     f"≤ {(i.floor_rss + TARGET_RSS_OVER_FLOOR) / _MB:.1f} MB",
                     _verdict(i.rss_met)],
                    ["RSS first / last sample", f"{rss[0] / _MB:.1f} / {rss[-1] / _MB:.1f} MB",
                     "flat", "flat" if rss[-1] <= rss[0] + 256 * 1024 else "grew"],
                    ["floor RSS", f"{i.floor_rss / _MB:.1f} MB", "", ""],
                    ["CPU over the window (``/proc/PID/stat``)", f"{i.cpu:.2f} s", "", ""],
                    *(
                        []
                        if i.cpu_precise is None
                        else [[
                            "CPU over the window (``/proc/PID/schedstat``, main thread, ns)",
                            f"{i.cpu_precise * 1000:.1f} ms", "", "",
                        ]]
                    ),
                    ["CPU per minute", f"{i.cpu_per_minute:.3f} s",
                     f"≤ {TARGET_CPU_PER_MINUTE:g} s", _verdict(i.cpu_met)],
                ],
            )
            + "\n\nThe RSS above the floor is the rest of Twisted the agent uses (the "
            "twistd runner, ``twisted.application``, ``twisted.logger`` file output), "
            "``cryptography``'s RSA, our "
            "modules and the loaded key.\n\n"
        )
    t = r.throughput
    out.append(_section("Inbound throughput"))
    if t is None:
        out.append("Not run.\n\n")
    else:
        out.append(
            "Valid ``ack`` envelopes (acknowledging ``task.output``, "
            f"{t.envelope_bytes} bytes of JSON) fed to an *active* client protocol over a "
            "**memory transport** (``StringTransport``; no socket, no kernel), on one core "
            "(rates are envelopes per second of this thread's CPU time, "
            f"median of {len(t.on_message)} repeats of {t.envelopes_per_repeat:,}):\n\n"
        )
        out.append(
            _table(
                ["path", "envelopes/s", "runs"],
                [
                    ["``dataReceived`` (WebSocket frames in 64 KiB reads)",
                     f"{t.data_received_rate:,.0f}",
                     ", ".join(f"{x:,.0f}" for x in t.data_received)],
                    ["``onMessage`` (our validation and handling only)",
                     f"{t.on_message_rate:,.0f}",
                     ", ".join(f"{x:,.0f}" for x in t.on_message)],
                ],
            )
            + f"\n\nTarget ≥ {TARGET_PER_SECOND:,.0f}/s on the framed path: "
            f"{_verdict(t.met)} ({t.ratio:.2f} ×).  Every envelope goes through "
            "``parse_envelope`` (JSON with duplicate-key and depth checks, all PROTOCOL §5 "
            "rules against the agent's id), the ack payload check and the ``message_in`` "
            "event.\n\n"
        )
        if t.shares:
            out.append("Where ``onMessage`` spends its time (cProfile, cumulative):\n\n")
            order = {label: i for i, label in enumerate(_STEP_ORDER)}
            steps = sorted(t.shares.items(), key=lambda kv: order.get(kv[0], 99))
            out.append(
                _table(["step", "share"], [[f"↳ {k.strip()}" if k.startswith("  ") else k,
                                            f"{v:.0%}"] for k, v in steps])
                + "\n\n"
            )
    out.append(_section("Fleet reconnect storm"))
    out.append(_storm_text(r))
    out.append(_scale_text(r))
    out.append(_cpu_bound_text(r))
    out.append(_choose_text(r))
    out.append(_findings_text(r))
    out.append(render_tasks(r.tasks))
    return "".join(out)


def plot_storm(storms: Sequence[StormResult], path: str) -> None:
    """Arrivals per 100 ms, one line per strategy, run 1 and run 2 side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [p for p in ("drop", "down") if any(p in s.phases for s in storms)]
    fig, axes = plt.subplots(1, len(phases), figsize=(6.5 * len(phases), 4.2), squeeze=False)
    colors = {"rcf": "tab:red", "go": "tab:blue", "full": "tab:green"}
    titles = {
        "drop": "Run 1: sessions dropped, control plane listening\n(seconds from the drop)",
        "down": "Run 2: control plane down, then back\n(seconds from the return)",
    }
    for ax, phase in zip(axes[0], phases, strict=True):
        horizon = 0.0
        for s in storms:
            p = s.phases.get(phase)
            if p is None:
                continue
            counts = arrivals_per_bin(p.accepted)
            xs = [(k + 0.5) * BIN for k in range(len(counts))]
            ax.plot(xs, counts, color=colors[s.strategy], label=_LABELS[s.strategy])
            horizon = max(horizon, len(counts) * BIN)
            if phase == "drop":
                sched = arrivals_per_bin(p.first_delays)
                ax.plot(
                    [(k + 0.5) * BIN for k in range(len(sched))],
                    sched,
                    color=colors[s.strategy],
                    linestyle=":",
                )
        ax.set_title(titles[phase], fontsize=10)
        ax.set_xlabel("seconds")
        ax.set_ylabel("new sessions per 100 ms")
        ax.set_xlim(0, max(horizon, 1.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    agents = storms[0].agents if storms else 0
    fig.suptitle(f"Reconnect storm, {agents:,} agents in one process", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_to_dict(r: Results) -> dict[str, Any]:
    """JSON-able form of the results (for ``--json``)."""
    return {
        "date": r.date,
        "machine": r.machine,
        "runtime": r.runtime,
        "cold_start": r.cold_start.to_dict() if r.cold_start else None,
        "idle": r.idle.to_dict() if r.idle else None,
        "throughput": r.throughput.to_dict() if r.throughput else None,
        "storms": [s.to_dict() for s in r.storms],
        "scale": r.scale.to_dict() if r.scale else None,
        "profile": r.profile,
        "profile_top": r.profile_top,
        "profile_agents": r.profile_agents,
        "load": r.load,
        "tasks": tasks_to_dict(r.tasks),
    }
