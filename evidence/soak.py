"""
Soak: a real agent against a control plane that restarts every few seconds.

``make soak MINUTES=30`` runs ``python -m evidence.soak --minutes 30``:

* the reference control plane runs as its own process
  (``twistd -n hostlink-controlplane``) on a fixed 127.0.0.1 port and is
  stopped and started again every ``--restart-every`` seconds (default 5),
  alternately with SIGTERM (it closes the sessions) and SIGKILL (the agent
  sees the TCP connection die), down ``--down-for`` seconds each time (the
  agent meets refused connections and backs off), and up at least half a
  period once it listens again (on a busy machine starting takes seconds);
* the agent is ``twistd hostlink`` (the same options and service) started
  through :mod:`evidence.soak_app`, which adds a probe of the reactor's
  pending DelayedCalls; its ``--status-listen`` page tells whether it is
  active before each restart;
* tasks (:mod:`evidence.soak_tasks`): the agent runs with both task flags
  on and a local store kept ``--store-retention`` seconds (default 60, so
  its purge runs during the soak); the control plane keeps its tasks in a
  file across restarts and serves the operator API; every ``--task-every``
  seconds (default 3) the harness submits a short task through that API,
  retrying (bounded by ``--submit-timeout``) while the control plane is
  down, and follows it to its final;
* every ``--sample-every`` seconds (default 60; for runs shorter than ten
  minutes, a tenth of the run so there are enough points) the harness
  samples the agent's open file descriptors (``/proc/PID/fd``), RSS
  (``VmRSS`` in ``/proc/PID/status``), threads (``Threads`` there), pending
  DelayedCalls (the probe) and the store's bytes on disk (the database, its
  ``-wal`` and ``-shm``).  File descriptors, threads and DelayedCalls are
  each the minimum of five reads 0.2 s apart, so an attempt or a task
  caught half-way (a socket being connected, a handshake timer, a task's
  pipes) does not count as growth; a leak survives the minimum.

Verdict: *flat* when, comparing the early steady state (the samples in the
first quarter of the run after the first, which is taken just after start
and is warm-up) with the final state (the samples in the last quarter):

* open file descriptors: the final maximum is at most ``--fd-tolerance``
  (default 2) above the early maximum;
* pending DelayedCalls: the final maximum is at most ``--timer-tolerance``
  (default 2) above the early maximum;
* threads: the final maximum is at most ``--thread-tolerance`` (default 1)
  above the early maximum;
* RSS: the final median is at most ``max(--rss-tolerance-mib, 5 % of the
  early median)`` above the early median (default 4 MiB);
* the store's size: the final maximum is at most ``--store-tolerance-kib``
  (default 256) above the early maximum, the early window starting once
  retention has passed, a purge has run and SQLite has reset the WAL once
  (:func:`evidence.soak_tasks.judge_store`);
* tasks: every submitted task reached its final status exactly once, with
  the expected exit code and output, attempted once and run once (each task
  counts its runs in a file) -- checked after the last sample, once the
  tasks still open have finished (``--drain-timeout``, default 60 s);

and, so that the run proves something: the agent process stayed up, it was
active before at least half of the restarts, and its log holds no
traceback.  Otherwise the exit status is 1 (2 when the harness itself
could not run).

``--inject-leak`` makes the agent leak on purpose (an fd, a DelayedCall and
256 KiB per session) to show that the verdict catches it.  That the store
and task verdicts can fail is shown by the unit tests (``tests/test_soak.py``),
on synthetic samples and a fake control plane.

Everything listens on and connects to 127.0.0.1 only; every wait has a
deadline; both processes are stopped on every exit path (and, on Linux,
killed by the kernel if this harness dies first).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from evidence.faults import free_port
from evidence.soak_tasks import (
    StorePoint,
    TaskFeed,
    TaskSummary,
    add_task_arguments,
    agent_task_args,
    check_task_arguments,
    control_plane_task_args,
    judge_store,
    store_bytes,
    store_settle,
    thread_count,
    wal_resets,
)
from hostlink_tw.identity import (
    AgentState,
    generate_private_key,
    public_key_base64,
    write_agent_state,
)
from hostlink_tw.operatorclient import OperatorClient

AGENT_ID = "agent-soak"
HOST = "127.0.0.1"
_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
_APP = Path(__file__).with_name("soak_app.py")


class SoakError(Exception):
    """The harness could not do its job (not a verdict on the agent)."""


# --- processes -----------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child, before exec: be killed when the harness dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # best effort: the finally blocks still stop the children


def wait_for(what: str, check: Callable[[], bool], timeout: float, every: float = 0.1) -> None:
    """Poll ``check`` until it is true; :class:`SoakError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() >= deadline:
            raise SoakError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


class Daemon:
    """One twistd process, its log in a file, stopped on :meth:`stop`."""

    def __init__(self, name: str, args: Sequence[str], cwd: Path, env: dict[str, str]) -> None:
        self.name = name
        self.args = [sys.executable, "-c", _TWISTD, "-n", "--pidfile=", *args]
        self.cwd = cwd
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Spawn the process."""
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            self.args,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads in this harness
        )

    @property
    def pid(self) -> int:
        """The running process's id."""
        if self.process is None:
            raise SoakError(f"{self.name} is not running")
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process is running."""
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Send ``sig``, wait up to ``timeout`` s, then SIGKILL; the exit status."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                return process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
        return process.wait(10)


# --- samples -------------------------------------------------------------------------------


def open_fds(pid: int) -> int:
    """How many file descriptors ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    """``VmRSS`` of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SoakError(f"no VmRSS for process {pid}")


def get_json(port: int, path: str) -> Any:
    """GET ``http://127.0.0.1:port/path`` and decode its JSON (any status)."""
    url = f"http://{HOST}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http to loopback
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


@dataclass
class Sample:
    """One point of the series."""

    at: float  # seconds since the agent was first active
    fds: int
    rss_kib: int
    delayed_calls: int
    gc_objects: int
    state: str
    restarts: int
    by_callable: dict[str, int] = field(default_factory=dict)
    threads: int = 0
    store_bytes: int = 0
    wal_resets: int = -1
    tasks: int = 0  # submitted so far


# --- verdict -------------------------------------------------------------------------------


@dataclass
class Verdict:
    """Whether the series is flat, and why."""

    flat: bool
    lines: list[str]


def windows(samples: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
    """
    The early steady state and the final state: the samples in the first and
    the last quarter of the run (at least one each), the first sample excluded
    as warm-up.
    """
    steady = list(samples[1:]) if len(samples) > 1 else list(samples)
    k = max(1, round(len(steady) / 4))
    return steady[:k], steady[-k:]


def judge(
    samples: Sequence[Sample],
    *,
    fd_tolerance: int,
    timer_tolerance: int,
    rss_tolerance_kib: int,
    thread_tolerance: int = 1,
    store_tolerance: int = 256 * 1024,
    store_settle: float = 0.0,
) -> Verdict:
    """Compare the final state with the early steady state (see the module docstring)."""
    if len(samples) < 2:
        return Verdict(False, ["too few samples for a verdict (run longer)"])
    early, final = windows(samples)
    lines = []
    flat = True

    def check(name: str, before: float, after: float, allowed: float, unit: str) -> None:
        nonlocal flat
        ok = after - before <= allowed
        flat = flat and ok
        lines.append(
            f"{name}: early {before:g}{unit}, final {after:g}{unit}, "
            f"growth {after - before:+g}{unit} (allowed {allowed:g}{unit}) -> "
            f"{'flat' if ok else 'GROWING'}"
        )

    check("open fds (max)", max(s.fds for s in early), max(s.fds for s in final), fd_tolerance,
          "")
    check("pending DelayedCalls (max)", max(s.delayed_calls for s in early),
          max(s.delayed_calls for s in final), timer_tolerance, "")
    check("threads (max)", max(s.threads for s in early), max(s.threads for s in final),
          thread_tolerance, "")
    rss_early = statistics.median(s.rss_kib for s in early)
    rss_final = statistics.median(s.rss_kib for s in final)
    check("RSS (median)", round(rss_early / 1024, 1), round(rss_final / 1024, 1),
          round(max(rss_tolerance_kib, 0.05 * rss_early) / 1024, 1), " MiB")
    store_ok, store_line = judge_store(
        [StorePoint(s.at, s.store_bytes, s.wal_resets > 0) for s in samples],
        store_settle,
        store_tolerance,
    )
    lines.append(store_line)
    return Verdict(flat and store_ok, lines)


# --- the run -------------------------------------------------------------------------------


@dataclass
class Run:
    """What happened besides the samples."""

    restarts: int = 0
    active_before_restart: int = 0
    samples: list[Sample] = field(default_factory=list)


class Soak:
    """Sets up the identity and both processes, restarts, samples, cleans up."""

    def __init__(self, options: argparse.Namespace, out: Callable[[str], None] = print) -> None:
        self.options = options
        self.out = out
        self.dir = Path(tempfile.mkdtemp(prefix="hostlink-soak-"))
        self.cp_port = free_port()
        self.status_port = free_port()
        self.probe_port = free_port()
        self.operator_port = free_port()
        state = self.dir / "state"
        self.store = state / "task_store.db"
        self.runs = self.dir / "runs"
        self.runs.mkdir()
        key = generate_private_key(str(state / "agent.key"))
        write_agent_state(str(state), AgentState(agent_id=AGENT_ID))
        agents = self.dir / "agents.json"
        agents.write_text(json.dumps({AGENT_ID: public_key_base64(key)}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTLINK_")}
        env.pop("HTTP_PROXY", None)
        env.pop("HTTPS_PROXY", None)
        env.pop("http_proxy", None)
        env.pop("https_proxy", None)
        # The agent reaches the control plane directly, not through a proxy.
        env["NO_PROXY"] = env["no_proxy"] = HOST
        self.control_plane = Daemon(
            "control plane",
            [f"--logfile={self.dir / 'controlplane.log'}", "hostlink-controlplane",
             "--listen", f"tcp:{self.cp_port}:interface={HOST}",
             "--agents", str(agents), "--ping-interval", "5s", "--ping-timeout", "3s",
             *control_plane_task_args(self.operator_port, self.dir / "operator.token",
                                      self.dir / "tasks.db")],
            self.dir,
            env,
        )
        agent_args = [
            "--enable",
            "--url", f"ws://{HOST}:{self.cp_port}/api/v1/agents/ws",
            # The HTTP paths (heartbeats, polling) too, never the production default.
            "--control-plane-url", f"http://{HOST}:{self.cp_port}",
            "--state-path", str(state),
            "--private-key-path", str(state / "agent.key"),
            "--status-listen", f"tcp:{self.status_port}:interface={HOST}",
            "--reconnect-min", "100ms",
            "--reconnect-max", "1s",
            "--ping-interval", "5s",
            "--pong-timeout", "2s",
            "--hello-timeout", "5s",
            "--handshake-timeout", "5s",
            *agent_task_args(self.store, options.store_retention, self.dir),
        ]
        self.agent = Daemon(
            "agent",
            [f"--logfile={self.dir / 'agent.log'}", "--python", str(_APP)],
            self.dir,
            {
                **env,
                "HOSTLINK_SOAK_AGENT_ARGS": json.dumps(agent_args),
                "HOSTLINK_SOAK_PROBE": f"tcp:{self.probe_port}:interface={HOST}",
                **({"HOSTLINK_SOAK_INJECT_LEAK": "1"} if options.inject_leak else {}),
            },
        )
        self.run_info = Run()
        self.feed: TaskFeed | None = None
        self.summary: TaskSummary | None = None

    # -- pieces ------------------------------------------------------------------------------

    def start_control_plane(self) -> None:
        """Start the control plane and wait until it listens."""
        self.control_plane.start()

        def listening() -> bool:
            self.step_tasks()  # submissions meet the control plane down meanwhile
            return port_open(self.cp_port) and port_open(self.operator_port)

        wait_for("the control plane to listen", listening, 20)

    def step_tasks(self) -> None:
        """Let the task feed do what is due (nothing before the feed starts)."""
        if self.feed is not None:
            self.feed.step(time.monotonic())

    def idle(self, seconds: float) -> None:
        """Wait ``seconds``, stepping the task feed meanwhile."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            self.step_tasks()
            due = self.feed.next_due() if self.feed is not None else until
            time.sleep(max(0.0, min(due, until) - time.monotonic()))

    def agent_status(self) -> dict[str, Any]:
        """The agent's ``/status`` (its own status page)."""
        status: dict[str, Any] = get_json(self.status_port, "/status")
        return status

    def agent_active(self) -> bool:
        """Whether the agent says its session is active."""
        try:
            return bool(self.agent_status().get("active"))
        except (OSError, ValueError):
            return False

    def check_agent(self) -> None:
        """The agent must still be running."""
        if not self.agent.alive():
            raise SoakError(f"the agent process exited; see {self.dir / 'agent.log'}")

    def restart_control_plane(self) -> None:
        """Stop the control plane (alternately TERM and KILL), wait, start it again."""
        self.check_agent()
        if self.agent_active():
            self.run_info.active_before_restart += 1
        sig = signal.SIGKILL if self.run_info.restarts % 2 else signal.SIGTERM
        self.control_plane.stop(sig)
        self.idle(self.options.down_for)
        self.start_control_plane()
        self.run_info.restarts += 1

    def sample(self, started: float) -> Sample:
        """One point: fds, threads and timers as the minimum of five reads, RSS, store, state."""
        pid = self.agent.pid
        at = time.monotonic() - started
        fds, calls, threads = [], [], []
        timers: dict[str, Any] = {}
        for i in range(5):
            if i:
                self.idle(0.2)
            fds.append(open_fds(pid))
            threads.append(thread_count(pid))
            timers = get_json(self.probe_port, "/timers")
            calls.append(int(timers["delayed_calls"]))
        try:
            state = str(self.agent_status().get("state"))
        except (OSError, ValueError):
            state = "?"
        return Sample(
            at=at,
            fds=min(fds),
            rss_kib=rss_kib(pid),
            delayed_calls=min(calls),
            gc_objects=int(timers["gc_objects"]),
            state=state,
            restarts=self.run_info.restarts,
            by_callable=dict(timers["by_callable"]),
            threads=min(threads),
            tasks=len(self.feed.tasks) if self.feed is not None else 0,
            store_bytes=store_bytes(self.store),
            wal_resets=wal_resets(self.store),
        )

    # -- the whole run -----------------------------------------------------------------------

    def run(self) -> int:
        """Run the soak; the exit status (0 flat, 1 not flat)."""
        o = self.options
        self.out(
            f"soak: {o.minutes:g} min, control plane restarts every {o.restart_every:g}s "
            f"(down {o.down_for:g}s), a task every {o.task_every:g}s, store retention "
            f"{o.store_retention:g}s, a sample every {o.sample_every:g}s; work dir {self.dir}"
        )
        self.start_control_plane()
        self.agent.start()
        wait_for("the agent's first active session", self.agent_active, 60, every=0.2)
        token = (self.dir / "operator.token").read_text().strip()
        self.feed = TaskFeed(
            OperatorClient(f"http://{HOST}:{self.operator_port}", token, timeout=5),
            AGENT_ID, self.runs, every=o.task_every, submit_timeout=o.submit_timeout,
        )
        started = time.monotonic()
        self.feed.start(started)
        end = started + o.minutes * 60
        next_sample = started
        next_restart = started + o.restart_every
        self.out(f"\n{'t':>7} {'fds':>4} {'RSS MiB':>8} {'timers':>6} {'objects':>8} "
                 f"{'threads':>7} {'store KiB':>9} {'WAL resets':>10} {'restarts':>8} {'tasks':>5}"
                 f"  state")
        while True:
            now = time.monotonic()
            if now >= next_sample:
                s = self.sample(started)
                self.run_info.samples.append(s)
                self.out(self.row(s))
                next_sample += o.sample_every
                if next_sample > end + 1e-6:
                    break
                continue
            if now >= next_restart and now < end:
                self.restart_control_plane()
                # Up for at least half a period once it listens: where starting takes
                # seconds (a busy machine), restarts must not come back to back.
                next_restart = max(next_restart + o.restart_every,
                                   time.monotonic() + o.restart_every / 2)
                continue
            self.check_agent()
            self.step_tasks()
            due = min(next_sample, next_restart, self.feed.next_due())
            time.sleep(max(0.0, due - time.monotonic()))
        if not self.feed.drain(o.drain_timeout, time.monotonic, time.sleep):
            self.out(f"\nsome tasks were still open {o.drain_timeout:g}s after the last sample")
        self.summary = self.feed.verify()
        return self.conclude()

    @staticmethod
    def row(s: Sample) -> str:
        """One line of the printed series."""
        minutes, seconds = divmod(round(s.at), 60)
        return (f"{minutes:4d}:{seconds:02d} {s.fds:4d} {s.rss_kib / 1024:8.1f} "
                f"{s.delayed_calls:6d} {s.gc_objects:8d} {s.threads:7d} "
                f"{s.store_bytes / 1024:9.0f} {s.wal_resets:10d} {s.restarts:8d} {s.tasks:5d}"
                f"  {s.state}")

    def conclude(self) -> int:
        """Print the verdict; 0 when flat and the run proved something."""
        o = self.options
        info = self.run_info
        verdict = judge(
            info.samples,
            fd_tolerance=o.fd_tolerance,
            timer_tolerance=o.timer_tolerance,
            rss_tolerance_kib=round(o.rss_tolerance_mib * 1024),
            thread_tolerance=o.thread_tolerance,
            store_tolerance=round(o.store_tolerance_kib * 1024),
            store_settle=store_settle(o.store_retention, o.task_every),
        )
        early, final = windows(info.samples)
        self.out(
            f"\nearly steady state: samples at {', '.join(self.row(s).split()[0] for s in early)};"
            f" final: {', '.join(self.row(s).split()[0] for s in final)}"
        )
        for line in verdict.lines:
            self.out("  " + line)
        last = info.samples[-1]
        self.out(f"  pending DelayedCalls at the end: {last.by_callable}")
        ok = verdict.flat
        if self.summary is not None:
            for line in self.summary.lines():
                self.out("  " + line)
            ok = ok and self.summary.ok
        self.out(
            f"  control plane restarts: {info.restarts}; agent active before "
            f"{info.active_before_restart} of them"
        )
        if info.restarts and info.active_before_restart * 2 < info.restarts:
            ok = False
            self.out("  the agent was active before fewer than half the restarts -> FAIL")
        # twistd rotates its log file at 1 MB: read the rotated ones too.
        log = "".join(path.read_text(errors="replace")
                      for path in sorted(self.dir.glob("agent.log*")))
        sessions = log.count("session active")
        tracebacks = log.count("Traceback") + log.count("Unhandled Error")
        self.out(f"  agent log: {sessions} sessions became active, {tracebacks} tracebacks")
        if tracebacks:
            ok = False
            self.out(f"  tracebacks in the agent's log -> FAIL (see {self.dir / 'agent.log'})")
        self.out(f"\nverdict: {'FLAT' if ok else 'NOT FLAT'}")
        return 0 if ok else 1

    def close(self, keep: bool) -> None:
        """Stop both processes; remove the work directory unless ``keep``."""
        status = self.agent.stop(signal.SIGTERM)
        self.control_plane.stop(signal.SIGTERM)
        if status not in (None, 0, -signal.SIGTERM):
            self.out(f"agent exit status on SIGTERM: {status}")
        if keep:
            self.out(f"logs kept in {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m evidence.soak",
        description="Soak the agent against a control plane that restarts every few seconds.",
    )
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="how long to run, fractions allowed (default 30)")
    parser.add_argument("--restart-every", type=float, default=5.0, metavar="SECONDS",
                        help="control plane restart period (default 5)")
    parser.add_argument("--down-for", type=float, default=1.0, metavar="SECONDS",
                        help="how long the control plane stays down each time (default 1)")
    parser.add_argument("--sample-every", type=float, default=None, metavar="SECONDS",
                        help="sample period (default 60, or a tenth of runs under 10 minutes)")
    parser.add_argument("--fd-tolerance", type=int, default=2)
    parser.add_argument("--timer-tolerance", type=int, default=2)
    parser.add_argument("--rss-tolerance-mib", type=float, default=4.0)
    add_task_arguments(parser)
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    parser.add_argument("--inject-leak", action="store_true",
                        help="make the agent leak an fd, a DelayedCall and 256 KiB per session, "
                             "to see the verdict catch it")
    options = parser.parse_args(argv)
    if options.minutes <= 0 or options.restart_every <= 0 or options.down_for < 0:
        parser.error("--minutes and --restart-every must be positive, --down-for not negative")
    check_task_arguments(parser, options)
    if options.sample_every is None:
        options.sample_every = 60.0 if options.minutes >= 10 else options.minutes * 6
    if options.sample_every <= 0:
        parser.error("--sample-every must be positive")
    return options


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak; the process exit status."""
    options = parse_args(argv)
    # SIGTERM and SIGHUP unwind like Ctrl-C, through the cleanup below.
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    soak = Soak(options)
    status = 2
    try:
        status = soak.run()
    except SoakError as e:
        print(f"soak could not run: {e}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("soak interrupted", file=sys.stderr)
        status = 128 + signal.SIGINT
    finally:
        soak.close(keep=options.keep or status != 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
