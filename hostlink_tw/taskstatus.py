"""
The agent's tasks on its status page (PROTOCOL §7–§8): metrics and ``/status``.

:mod:`hostlink_tw.status` serves them; this module says what they are.  As
for the session, counters come from events as they happen and gauges from
the state at scrape time:

* the task engine (:class:`~hostlink_tw.agent.tasks.TaskEngine`) tells its
  observers of each ended attempt (``task_ended``) and each message sent
  again (``outbox_resent``); the client passes these on with its own events,
  so the counters and the histogram survive a restart of the service (a new
  engine) within one process;
* the gauges and the ``tasks`` part of ``/status`` read the engine the status
  source holds now (its ``tasks`` attribute: the service's or the client's),
  from memory only -- a scrape never waits for the store.

Every label value is from a fixed set; task ids shown in ``/status`` are
bounded in length (the control plane chose them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hostlink_tw.agent.tasks import OUTBOX_RESENT, TASK_ENDED

__all__ = [
    "DURATION_BUCKETS",
    "PollingMetrics",
    "polling_status",
    "QUEUE_SHOWN",
    "TaskMetrics",
    "engine_of",
    "task_status",
]

#: Upper bounds of the task duration histogram, in seconds: shell tasks take
#: from milliseconds to hours.
DURATION_BUCKETS = (
    0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0, math.inf,
)
#: How many queued attempts ``/status`` names (the depth counts them all).
QUEUE_SHOWN = 5
# Longest id shown; the control plane chooses them, up to a message's size.
_ID_CHARS = 200
_ELLIPSIS = "\u2026"

_STATUSES = ("completed", "failed", "interrupted")
_REASONS = ("replay", "gap", "redelivery")
_OTHER = "other"


def engine_of(source: object) -> Any:
    """The task engine ``source`` (a service or a client) holds now, or ``None``."""
    return getattr(source, "tasks", None)


def _label(value: object, allowed: tuple[str, ...]) -> str:
    return value if isinstance(value, str) and value in allowed else _OTHER


class TaskMetrics:
    """
    The task metrics, registered in ``registry``.

    :param engine: returns the current task engine, or ``None`` when there is
        none (no identity yet, the uplink disabled); read at each scrape.
    """

    def __init__(self, engine: Callable[[], Any], registry: CollectorRegistry) -> None:
        self._engine = engine
        r = registry
        self.ended = Counter(
            "hostlink_tasks", "Task attempts ended, by final status "
            "(attempts a restart interrupted included).", ["status"], registry=r,
        )
        self.resends = Counter(
            "hostlink_outbox_resends", "Outbox messages sent again, by why: replay (on "
            "activation), gap (an output_sequence_gap error), redelivery (a re-delivered "
            "attempt's final).", ["reason"], registry=r,
        )
        self.durations = Histogram(
            "hostlink_task_duration_seconds", "Run time of task attempts, from spawn to the "
            "end of their last process.", buckets=DURATION_BUCKETS, registry=r,
        )
        # The known series exist from the start, at 0: rate() and alerts need them.
        for status in _STATUSES:
            self.ended.labels(status=status)
        for reason in _REASONS:
            self.resends.labels(reason=reason)
        gauges: tuple[tuple[str, str, Callable[[Any], float]], ...] = (
            ("hostlink_tasks_running", "Task attempts whose process runs.",
             lambda e: len(e.running_tasks())),
            ("hostlink_task_queue_depth", "Task attempts received and not started yet.",
             lambda e: e.queue_depth()),
            ("hostlink_outbox_pending_messages", "Task messages stored and not yet acked.",
             lambda e: e.pending_messages),
            ("hostlink_outbox_pending_bytes", "Bytes of the task messages not yet acked "
             "(the spool's use).", lambda e: e.spool_bytes),
            ("hostlink_task_output_paused", "1 while the spool is full and task output "
             "is not read.", lambda e: 1.0 if e.output_paused else 0.0),
        )
        for name, documentation, read in gauges:
            Gauge(name, documentation, registry=r).set_function(self._reader(read))

    def _reader(self, read: Callable[[Any], float]) -> Callable[[], float]:
        def value() -> float:
            engine = self._engine()
            return 0.0 if engine is None else float(read(engine))

        return value

    def observe(self, kind: str, fields: Mapping[str, Any]) -> None:
        """Count one event, if it is one of the engine's."""
        if kind == TASK_ENDED:
            self.ended.labels(status=_label(fields.get("status"), _STATUSES)).inc()
            duration = fields.get("duration")
            if (isinstance(duration, (int, float)) and not isinstance(duration, bool)
                    and math.isfinite(duration) and duration >= 0):
                self.durations.observe(duration)
        elif kind == OUTBOX_RESENT:
            self.resends.labels(reason=_label(fields.get("reason"), _REASONS)).inc()


_POLL_RESULTS = ("ok", "error")
_REPORT_RESULTS = ("accepted", "postponed", "refused")


class PollingMetrics:
    """
    The HTTP paths' metrics (§9), a collector read at each scrape.

    ``hostlink_polling_active`` (1 while polling runs), and the counters
    ``hostlink_polls_total{result}`` (``ok``, ``error``) and
    ``hostlink_reports_total{result}`` (``accepted``, ``postponed``,
    ``refused``), read from the poller and the engine's reporter the source
    holds now: a new client (the service restarted) starts them again at 0,
    which Prometheus reads as a counter reset.

    :param paths: returns the current
        :class:`~hostlink_tw.agent.pollingwiring.HTTPPaths`, or ``None``.
    """

    def __init__(self, paths: Callable[[], Any], registry: CollectorRegistry) -> None:
        self._paths = paths
        registry.register(self)

    def collect(self) -> list[Metric]:
        """The three metrics (prometheus_client's collector protocol)."""
        paths = self._paths()
        active = GaugeMetricFamily("hostlink_polling_active",
                                   "1 while the agent polls the control plane for tasks "
                                   "over HTTP (no session delivers them).")
        active.add_metric([], 1.0 if paths is not None and paths.coordinator.polling else 0.0)
        polls = CounterMetricFamily("hostlink_polls", "Task polls over HTTP, by result.",
                                    labels=["result"])
        counts = paths.poller.polls if paths is not None else {}
        for result in _POLL_RESULTS:
            polls.add_metric([result], float(counts.get(result, 0)))
        reports = CounterMetricFamily("hostlink_reports", "Task results reported over "
                                      "HTTP, by outcome.", labels=["result"])
        reporter = getattr(getattr(paths, "engine", None), "http_results", None)
        done = reporter.reports if reporter is not None else {}
        for result in _REPORT_RESULTS:
            reports.add_metric([result], float(done.get(result, 0)))
        return [active, polls, reports]


def polling_status(paths: Any, time_text: Callable[[float], str | None]) -> dict[str, Any] | None:
    """The ``polling`` part of ``/status`` (:meth:`Poller.describe
    <hostlink_tw.agent.poller.Poller.describe>`, ``last_poll_at`` as text),
    with the reports' outcomes; ``None`` without HTTP paths."""
    if paths is None:
        return None
    state: dict[str, Any] = paths.poller.describe()
    at = state.get("last_poll_at")
    state["last_poll_at"] = None if at is None else time_text(at)
    reporter = getattr(getattr(paths, "engine", None), "http_results", None)
    state["reports"] = dict(reporter.reports) if reporter is not None else {}
    return state


def _shown_id(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= _ID_CHARS else text[:_ID_CHARS] + _ELLIPSIS


def _attempt(spec: Any) -> dict[str, Any]:
    return {
        "task_id": _shown_id(spec.task_id),
        "execution_attempt_id": _shown_id(spec.attempt_id),
    }


def task_status(engine: Any, time_text: Callable[[float], str | None]) -> dict[str, Any] | None:
    """
    The ``tasks`` part of ``/status``, or ``None`` without an engine.

    :param time_text: shows a time of the engine's clock (``started_at``).

    ``running``: each attempt whose process runs (``task_id``,
    ``execution_attempt_id``, ``pid``, ``started_at``), oldest first;
    ``queue``: ``depth`` (received, not started), the first
    :data:`QUEUE_SHOWN` of them in ``first``, and ``limit``; ``store``:
    ``path``, ``available``, ``problem``; ``spool``: ``bytes_used``,
    ``byte_cap``, ``messages`` (unacked), ``paused`` (output not read while
    the spool is full); the local flags, and the control plane's
    ``delivery_enabled`` from its last hello_ack.
    """
    if engine is None:
        return None
    settings = engine.settings
    return {
        "delivery_enabled": settings.delivery_enabled,
        "results_enabled": settings.results_enabled,
        "control_plane_delivery_enabled": engine.peer_delivery_enabled,
        "running": [
            dict(_attempt(task.spec), pid=task.pid, started_at=time_text(task.started_at))
            for task in engine.running_tasks()
        ],
        "queue": {
            "depth": engine.queue_depth(),
            "first": [_attempt(spec) for spec in engine.queued(QUEUE_SHOWN)],
            "limit": settings.queue_limit,
        },
        "store": {
            "path": engine.store.path,
            "available": engine.available,
            "problem": engine.problem,
        },
        "spool": {
            "bytes_used": engine.spool_bytes,
            "byte_cap": settings.spool_cap_bytes,
            "messages": engine.pending_messages,
            "paused": engine.output_paused,
        },
    }
